"""The request schemas (msgspec) and the 400s they become: what is accepted as OpenAI's clients send it, what is
refused, and which field each refusal names (OpenAI's `param`)."""
import json

import msgspec
import pytest

from llmnb.serve.errors import validation_error
from llmnb.serve.schemas import MAX_STOPS, ChatRequest, CompletionRequest, decode


def chat(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def completion(**fields) -> bytes:
    return json.dumps({"model": "m", "prompt": "Hi", **fields}).encode()


def refusal(body: bytes, schema) -> tuple[str | None, str | None, str]:
    with pytest.raises(msgspec.DecodeError) as caught:
        decode(body, schema)
    error = validation_error(caught.value)
    assert error.status == 400 and error.type == "invalid_request_error"
    return error.param, error.code, error.message


def test_bodies_as_openai_clients_send_them_are_accepted():
    body = decode(chat(temperature=1, top_p=1, presence_penalty=0, max_tokens=None, stop="END", seed=7,
                       stream_options={"include_usage": True}), ChatRequest)
    assert body.temperature == 1.0 and isinstance(body.temperature, float)  # a JSON integer is a number
    assert body.stop == ["END"] and body.max_tokens is None and body.stream_options.include_usage
    assert decode(chat(), ChatRequest).stop == [] and decode(chat(stop=["a", "b"]), ChatRequest).stop == ["a", "b"]
    parts = decode(chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]), ChatRequest)
    assert parts.messages[0].text() == "ab"
    assert decode(completion(), CompletionRequest).max_tokens == 16  # OpenAI's default for completions
    assert decode(completion(prompt=[1, 2]), CompletionRequest).prompts() == [[1, 2]]
    assert decode(completion(prompt=[[1, 2], [3]]), CompletionRequest).prompts() == [[1, 2], [3]]
    assert decode(completion(prompt=["a", "b"]), CompletionRequest).prompts() == ["a", "b"]
    assert decode(completion(logprobs=0, echo=True), CompletionRequest).logprobs == 0


@pytest.mark.parametrize("body, param, words", [
    (chat(max_tokens="10"), "max_tokens", "got `str`"),  # strict: a string is not a number
    (chat(max_tokens=0), "max_tokens", ">= 1"),
    (chat(temperature=True), "temperature", "got `bool`"),
    (chat(temperature=2.5), "temperature", "<= 2"),
    (chat(top_p=0), "top_p", "> 0"),
    (chat(n=9), "n", "<= 8"),
    (chat(seed=1.5), "seed", "got `float`"),
    (chat(stream=1), "stream", "got `int`"),
    (chat(logprobs=3), "logprobs", "got `int`"),
    (chat(stop=["a"] * (MAX_STOPS + 1)), "stop", "up to"),
    (chat(stop=[""]), "stop", "non-empty"),
    (chat(frequency_penalty=-2.0), "frequency_penalty", "not supported"),
    (chat(top_logprobs=2), "top_logprobs", "needs logprobs"),
    (chat(messages=[]), "messages", "length >= 1"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages", "messages[0].role"),
    (chat(messages=[{"role": "user"}]), "messages", "messages[0].content: required"),
    (chat(stream_options={"include_usage": "yes"}), "stream_options", "stream_options.include_usage"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), "model", "model: required, and missing"),
])
def test_each_refusal_names_its_field(body, param, words):
    got, code, message = refusal(body, ChatRequest)
    assert got == param and words in message, (got, message)
    assert message.startswith(param)


@pytest.mark.parametrize("prompt, words", [([], "non-empty"), ([1, "a"], "all of one kind"), ([[1], "a"], "all of one kind"),
                                           ([""], "at least one"), ([[]], "at least one"), ([1.5], "got `float`"), (5, "got `int`")])
def test_a_prompt_is_one_kind_of_thing(prompt, words):
    param, _, message = refusal(completion(prompt=prompt), CompletionRequest)
    assert param == "prompt" and words in message, message


def test_streaming_takes_one_prompt_and_completions_logprobs_are_a_count():
    assert "one prompt" in refusal(completion(prompt=["a", "b"], stream=True), CompletionRequest)[2]
    assert refusal(completion(logprobs=True), CompletionRequest)[0] == "logprobs"  # chat's boolean is not a count here
    assert refusal(completion(logprobs=6), CompletionRequest)[0] == "logprobs"


def test_unknown_fields_are_refused_by_name_at_any_depth():
    assert refusal(chat(suffix="x"), ChatRequest) == ("suffix", "unknown_parameter", "suffix: unknown field (this server does not support it)")
    param, code, message = refusal(chat(messages=[{"role": "user", "content": "x", "tool_calls": []}]), ChatRequest)
    assert (param, code) == ("messages", "unknown_parameter") and message.startswith("messages[0].tool_calls: unknown field")


@pytest.mark.parametrize("raw, words", [(b"{", "not valid JSON"), (b"", "not valid JSON"), (b"{'a': 1}", "not valid JSON"),
                                        (b"[1, 2]", "must be a JSON object"), (b"null", "must be a JSON object"), (b'"text"', "must be a JSON object")])
def test_a_body_that_is_not_a_json_object_says_so(raw, words):
    param, code, message = refusal(raw, ChatRequest)
    assert param is None and code is None and words in message, message

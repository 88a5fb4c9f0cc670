"""The request bodies the server accepts: OpenAI's fields, checked by msgspec, strictly (a string is not a number).

An unknown field is refused by name rather than ignored, so that a client never believes a
setting took effect when it did not. `ignore_eos` is an extension that vLLM and llama.cpp
share: generate exactly `max_tokens` (what load tests need).

Why msgspec and not Pydantic (issue 23): the same typed classes and strict checks, and a body decodes straight into
them; importing Pydantic and building these schemas with it held 8 MB in every server, msgspec 1 MB.
`decode` raises `msgspec.ValidationError` (a field, named by its path) or `msgspec.DecodeError` (not JSON);
`errors.validation_error` turns either into OpenAI's 400.
"""
from __future__ import annotations

from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import Meta

MAX_STOPS = 4
MAX_LOGPROBS = 5

Positive = Annotated[int, Meta(ge=1)]


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A JSON object with exactly these fields. A check msgspec cannot state in a type raises ValueError("FIELD: what is
    wrong") in `__post_init__`: `errors.validation_error` names FIELD as the error's param."""


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body, kw_only=True):
    model: str
    max_tokens: Positive | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Meta(gt=0, le=1)] = 1.0
    n: Annotated[int, Meta(ge=1, le=8)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None  # after decoding: always a list
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        self.stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(self.stop) > MAX_STOPS or any(not s for s in self.stop):
            raise ValueError(f"stop: takes up to {MAX_STOPS} non-empty strings")
        if self.presence_penalty != 0 or self.frequency_penalty != 0:
            raise ValueError(f"{'presence_penalty' if self.presence_penalty else 'frequency_penalty'}: penalties are not supported by this server, leave them at 0")


class CompletionRequest(_Generation, kw_only=True):
    # one prompt (text or token ids) or a batch of them, as OpenAI's API: each prompt gets `n` choices.
    # msgspec takes one kind of list in a union, so the batch's items are checked to be all alike below
    prompt: str | list[str | int | list[int]]
    max_tokens: Positive | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False  # the prompt comes back before the reply, with its tokens' log-probabilities when `logprobs` is set

    def __post_init__(self):
        super().__post_init__()
        prompts = self.prompts()
        if not prompts or len({type(p) for p in prompts}) > 1:
            raise ValueError("prompt: takes a string, a list of token ids, or a non-empty list of either (all of one kind)")
        if any(not p for p in prompts):
            raise ValueError("prompt: every prompt needs at least one token or character")
        if self.stream and len(prompts) > 1:
            raise ValueError("prompt: a streamed request takes one prompt, send a batch without stream, or one request per prompt")

    def prompts(self) -> list[str | list[int]]:
        """The batch: a single prompt (a string, or token ids) is a batch of one."""
        if isinstance(self.prompt, str) or all(isinstance(t, int) for t in self.prompt) and self.prompt:
            return [self.prompt]
        return list(self.prompt)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Generation, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: Positive | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")


Body = TypeVar("Body", CompletionRequest, ChatRequest)
_DECODERS = {schema: msgspec.json.Decoder(schema) for schema in (CompletionRequest, ChatRequest)}


def decode(body: bytes, schema: type[Body]) -> Body:
    """A request's JSON body as `schema`: raises msgspec.DecodeError (not JSON) or msgspec.ValidationError."""
    return _DECODERS[schema].decode(body)

"""The server, over real HTTP, in its own process: the official openai client, hundreds of malformed requests,
64 streaming clients of which a third hang up, a full queue, the chat page in headless Chromium, and SIGTERM.

One server (the smoke model: a 2-layer random Llama with SmolLM2's tokenizer and chat template) serves the
whole module on a free port of 127.0.0.1 and is stopped at the end, whatever happens; its last test stops it
with SIGTERM while a stream is running.
"""
import asyncio
import json
import os
import random
import re
import shutil
import signal
import time
import urllib.request

import httpx
import pytest

from llmnb.assets import TINY_CHAT
from llmnb.serve import local_server

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 256
BODY_LIMIT = 32_768


@pytest.fixture(scope="module")
def server():
    with local_server(TINY_CHAT, "--api-key", KEY, "--max-batch", "8", "--max-waiting", "64", "--context", str(CONTEXT),
                      "--max-body-bytes", str(BODY_LIMIT), timeout=180) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.api, api_key=KEY, max_retries=0)


def chat_body(**overrides):
    return {"model": TINY_CHAT, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8, **overrides}


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_openai_client_streams_what_it_gets_whole(client):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    whole = client.chat.completions.create(model=TINY_CHAT, messages=messages, max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason in ("length", "stop") and whole.usage.completion_tokens <= 12
    assert whole.usage.prompt_tokens > 5 and whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=TINY_CHAT, messages=messages, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sampling_parameters_seed_n_stop_and_logprobs(client):
    def complete(**kw):
        return client.completions.create(model=TINY_CHAT, prompt="Once upon a time", max_tokens=10, temperature=1.0, **kw)

    a, b = complete(seed=5), complete(seed=5)
    assert a.choices[0].text == b.choices[0].text != complete(seed=6).choices[0].text
    two = complete(seed=5, n=2)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == a.choices[0].text != two.choices[1].text
    text = a.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = complete(seed=5, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    scored = complete(seed=5, logprobs=3)
    lp = scored.choices[0].logprobs
    assert "".join(lp.tokens) == text and len(lp.token_logprobs) == scored.usage.completion_tokens == 10
    assert all(len(top) == 3 and max(top.values()) >= chosen - 1e-4 for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model=TINY_CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5) for c in content)  # greedy


def test_echo_returns_each_prompt_tokens_log_probability_for_a_batch_of_prompts(server, client):
    import torch

    from llmnb import decoding
    from llmnb.checkpoint import load
    from llmnb.model import token_logprobs

    model, tokenizer = load(TINY_CHAT)
    decoding.prepare(model)  # as the server computes: in the same precision and layout
    prompts = [tokenizer.encode("The quick brown fox jumps"), tokenizer.encode("Once upon a time there was")]
    out = client.completions.create(model=TINY_CHAT, prompt=prompts, max_tokens=1, temperature=0, logprobs=2, echo=True, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3] and out.usage.prompt_tokens == sum(map(len, prompts))  # once per prompt, whatever n
    for k, choice in enumerate(out.choices):
        ids, lp = prompts[k // 2], out.choices[k].logprobs
        assert choice.text.startswith(tokenizer.decode(ids)) and len(lp.tokens) == len(ids) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        with torch.no_grad():
            expected = token_logprobs(model, torch.tensor([ids]))[0].tolist()
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
        assert all(len(top) <= 2 and max(top.values()) >= got - 1e-6 for top, got in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
        assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()))  # greedy: the reply is the likeliest token
    plain = client.completions.create(model=TINY_CHAT, prompt=prompts[0], max_tokens=3, temperature=0, echo=True)
    assert plain.choices[0].text.startswith(tokenizer.decode(prompts[0])) and plain.choices[0].logprobs is None
    refused = httpx.post(f"{server.api}/completions", headers=AUTH, json={"model": TINY_CHAT, "prompt": ["a", "b"], "stream": True})
    assert refused.status_code == 400 and "one prompt" in refused.json()["error"]["message"]


def test_lm_eval_scores_the_served_model_as_it_scores_the_same_folder(server, tmp_path, monkeypatch):
    from llmnb import report_card as rc
    from llmnb.checkpoint import load, resolve_model

    folder = resolve_model(TINY_CHAT)
    tasks = rc.write_tasks(tmp_path, rc.task_items(rc.TaskSizes(6, 4, 6, 1, 300), load(folder)[1]))
    names = ("llmnb_lastword", "llmnb_nextline", "llmnb_arithmetic")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # what local-completions sends as its bearer token
    served = rc.score("local-completions", rc.served_model_args(server.url, TINY_CHAT, folder, max_length=CONTEXT, batch_size=4), tasks, names)
    direct = rc.score("hf", {"pretrained": str(folder)}, tasks, names, batch_size=4)
    for name in names:
        assert served[name]["items"] == direct[name]["items"], name


def test_key_health_models_and_metrics(server, client):
    health = httpx.get(f"{server.url}/health").json()  # no key needed
    assert health["status"] == "ok" and health["decoding"].startswith(("bf16", "fp32"))  # says how it decodes (llmnb.decoding)
    assert health["step"] == "eager"  # served without --compile: nothing to wait for (ServerProcess.wait_step)
    assert server.wait_step(timeout=5) == health
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        reply = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server.api, api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list()] == [TINY_CHAT]
    before = metric(server, "llmnb_generation_tokens_total")
    client.chat.completions.create(model=TINY_CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert metric(server, "llmnb_generation_tokens_total") >= before + 1
    assert metric(server, "llmnb_time_to_first_token_seconds_count") >= 1
    assert metric(server, "llmnb_num_requests_running") == 0


def malformed_cases():
    """(path, raw body or JSON, expected status, expected code or None): each a request a real client could send by mistake."""
    bad_json = ["{", "not json", '{"model": }', "[1, 2", "", "null", "[]", "123", '"text"', "{'single': 'quotes'}"]
    cases = [(path, raw, 400, None) for path in ("/v1/chat/completions", "/v1/completions") for raw in bad_json]
    wrong = {  # field: values that must be refused
        "model": [5, None, ["x"]], "messages": ["hi", [], [{}], [{"role": "user"}], [{"role": "wizard", "content": "x"}],
                                                [{"role": "user", "content": 5}], None],
        "max_tokens": ["10", -1, 0, 1.5, True], "temperature": ["hot", -0.1, 2.5], "top_p": [0, 1.5, "1"], "n": [0, 9, "2"],
        "stream": ["yes", 1], "stop": [[""], ["a", "b", "c", "d", "e"], 5], "seed": ["x", 1.5], "logprobs": ["yes", 3],
        "top_logprobs": [10, -1], "presence_penalty": [1.0], "frequency_penalty": [-2.0], "unknown_field": [1],
        "stream_options": [{"include_usage": "yes"}, "x"],
    }
    for field, values in wrong.items():
        for value in values:
            cases.append(("/v1/chat/completions", chat_body(**{field: value}), 400, None))
    cases.append(("/v1/chat/completions", {k: v for k, v in chat_body().items() if k != "messages"}, 400, None))
    cases.append(("/v1/chat/completions", chat_body(top_logprobs=2), 400, None))  # without logprobs: true
    completion = {"model": TINY_CHAT, "prompt": "Hi", "max_tokens": 4}
    for field, values in {"prompt": [5, [], [-1], [10 ** 9], [1.5], None, [[]], [[1], [-1]], [""], [[1], "a"]], "logprobs": [6, -1, True],
                          "max_tokens": [0, "4"], "echo": ["yes", 1], "suffix": ["x"]}.items():
        for value in values:
            cases.append(("/v1/completions", {**completion, field: value}, 400, None))
    for path, body in (("/v1/chat/completions", chat_body()), ("/v1/completions", completion)):
        cases.append((path, {**body, "model": "gpt-4o"}, 404, "model_not_found"))
        cases.append((path, {**body, "max_tokens": 10 ** 9}, 400, "context_length_exceeded"))
        cases.append((path, {**body, "max_tokens": CONTEXT}, 400, "context_length_exceeded"))
    cases.append(("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "word " * 400}]), 400, "context_length_exceeded"))
    cases.append(("/v1/completions", {**completion, "prompt": "word " * 400}, 400, "context_length_exceeded"))
    cases.append(("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "x" * BODY_LIMIT}]), 413, "request_too_large"))
    cases.append(("/v1/completions", {**completion, "prompt": "y" * (2 * BODY_LIMIT)}, 413, "request_too_large"))
    cases.append(("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "you are a fucking idiot"}]), 400, "content_filter"))
    cases.append(("/v1/nothing", chat_body(), 404, "not_found"))
    return cases


def test_hundreds_of_malformed_requests_get_openai_errors_and_the_server_stays_healthy(server):
    cases = malformed_cases()
    rng = random.Random(0)  # and the same mistakes again, in random combinations of two
    singles = [c for c in cases if isinstance(c[1], dict) and c[2] == 400 and c[0] == "/v1/chat/completions"]
    for _ in range(250):
        (_, a, _, _), (_, b, _, _) = rng.sample(singles, 2)
        merged = {**a, **{k: v for k, v in b.items() if v != chat_body().get(k)}}
        cases.append(("/v1/chat/completions", merged, 400, None))
    assert len(cases) >= 300
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        for path, body, status, code in cases:
            if isinstance(body, str):
                reply = http.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                reply = http.post(path, json=body)
            assert reply.status_code == status, (path, str(body)[:200], reply.text[:300])
            error = reply.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], error
            assert code is None or error["code"] == code, (str(body)[:200], error)
        wrong_method = http.get("/v1/chat/completions")
        assert wrong_method.status_code == 405 and wrong_method.headers["Allow"] == "POST"
        assert wrong_method.json()["error"]["code"] == "method_not_allowed" and "takes POST" in wrong_method.json()["error"]["message"]
        chunked = http.post("/v1/completions", content=iter([b"{" + b" " * BODY_LIMIT, b"}"]), headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413  # no Content-Length: counted as it arrives
        assert "over the context of 256" in http.post("/v1/completions", json={"model": TINY_CHAT, "prompt": "Hi", "max_tokens": 300}).json()["error"]["message"]
        assert http.get("/health").status_code == 200
        assert http.post("/v1/completions", json={"model": TINY_CHAT, "prompt": "Hi", "max_tokens": 3}).status_code == 200


async def stream_client(http: httpx.AsyncClient, index: int, hang_up: bool) -> dict:
    body = chat_body(max_tokens=24, temperature=0, stream=True, ignore_eos=True, messages=[{"role": "user", "content": f"Count to {index}"}])
    out = {"status": None, "text": "", "finish": None, "done": False, "events": 0}
    async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        out["status"] = reply.status_code
        async for line in reply.aiter_lines():
            if line == "data: [DONE]":
                out["done"] = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                out["events"] += 1
                choice = event["choices"][0]
                out["text"] += choice["delta"].get("content") or ""
                out["finish"] = choice["finish_reason"] or out["finish"]
                if hang_up and out["events"] == 3:
                    return out  # leaving the block closes the connection mid-stream
    return out


def test_64_streaming_clients_a_third_hanging_up(server):
    async def all_clients():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120, limits=httpx.Limits(max_connections=80)) as http:
            return await asyncio.gather(*(stream_client(http, i, hang_up=i % 3 == 0) for i in range(64)))

    httpx.post(f"{server.url}/v1/completions", headers=AUTH, json={"model": TINY_CHAT, "prompt": "warm", "max_tokens": 8})
    rss_before = server.rss_bytes()
    results = asyncio.run(all_clients())
    assert all(r["status"] == 200 for r in results), [r for r in results if r["status"] != 200][:3]
    finished = [r for i, r in enumerate(results) if i % 3]
    assert all(r["done"] and r["finish"] == "length" for r in finished)
    assert metric(server, 'llmnb_request_success_total') >= len(finished)
    deadline = time.monotonic() + 10
    while metric(server, "llmnb_num_requests_running") + metric(server, "llmnb_num_requests_waiting") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "llmnb_num_requests_running") == 0 and metric(server, "llmnb_num_requests_waiting") == 0
    assert metric(server, 'llmnb_request_success_total{finished_reason="cancelled"}') >= 1  # hang-ups freed their slots
    assert server.rss_bytes() < rss_before + 64 * 2 ** 20


def test_a_full_queue_answers_429_with_retry_after(server):
    async def burst():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120, limits=httpx.Limits(max_connections=100)) as http:
            body = {"model": TINY_CHAT, "prompt": "Hi", "max_tokens": 24, "ignore_eos": True}
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(100)))

    replies = asyncio.run(burst())
    busy = [r for r in replies if r.status_code == 429]
    assert busy and all(r.status_code == 200 for r in replies if r.status_code != 429)  # 8 running + 64 waiting fit
    assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full" for r in busy)


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI"):
            pytest.fail("CI needs chromium and chromedriver (.ci/run installs them with apt-get)")
        pytest.skip("no chromium/chromedriver here: apt-get install chromium chromium-driver")
    return chromium, driver


def test_chat_page_streams_a_reply_in_headless_chromium(server, client, tmp_path):
    chromium, driver = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "key").send_keys(KEY)
        for field, value in (("temperature", "0"), ("max_tokens", "12")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "prompt").send_keys("What is the capital of France?")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "status").text.startswith(("done", "error")))
        browser.save_screenshot(str(tmp_path / "chat.png"))
        assert browser.find_element(By.ID, "status").text.startswith("done"), browser.find_element(By.ID, "log").text
        shown = browser.find_element(By.CSS_SELECTOR, ".msg.assistant").get_attribute("textContent")
    finally:
        browser.quit()
    expected = client.chat.completions.create(model=TINY_CHAT, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                              max_tokens=12, temperature=0).choices[0].message.content
    assert shown == expected


def test_sigterm_lets_the_running_stream_finish(server):
    """Last in the module: it stops the module's server."""
    body = chat_body(max_tokens=200, temperature=0, stream=True, ignore_eos=True, stream_options={"include_usage": True})
    usage = None
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")
        server.process.send_signal(signal.SIGTERM)
        for line in lines:
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    assert usage and usage["completion_tokens"] == 200  # drained, not cut
    assert server.process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.url}/health", timeout=2)

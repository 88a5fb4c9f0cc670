"""Load on an OpenAI-compatible server, from real HTTP clients that stream (httpx): ours, llama.cpp's, vLLM's alike.

    rows = [closed_loop(url, model, c, seconds=10) for c in (1, 4, 16)]    # c clients, each sending again as soon as it is answered
    row = poisson(url, model, rate=2.0, seconds=10)                         # arrivals at random, `rate` a second on average

Every request asks for exactly `max_tokens` (`ignore_eos`, which vLLM and llama.cpp accept too),
so that each server does the same work. A request still running when the time is up is
cancelled (the client hangs up) and counts only the tokens it received in time.
Time to first token (TTFT) and time per output token after the first (TPOT) are taken over every
request that received tokens, end-to-end latency over those that finished; output tokens/s over
the window.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

CUT = "cut at the deadline"
DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass
class Result:
    started: float
    first_token: float | None = None
    last_token: float | None = None
    first_event_tokens: int = 0  # a server that releases text a phrase at a time sends several tokens in one event
    finished: float | None = None
    tokens: int = 0
    error: str = ""


async def one_request(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, prompt: str, headers: dict,
                      result: Result | None = None) -> Result:
    """One streaming chat completion, filling `result` as it goes: its first and last content chunk, how many came."""
    result = result or Result(time.perf_counter())
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True,
            "temperature": 0.7, "ignore_eos": True, "stream_options": {"include_usage": True},
            "logprobs": True}  # one entry per token in each event: exact counts even for a stream cut short
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = event["error"].get("message", "error")
                    return result
                if event.get("usage"):  # the last event: the server's own count
                    result.tokens = event["usage"]["completion_tokens"]
                choice = event["choices"][0] if event["choices"] else {}
                if choice.get("delta", {}).get("content"):
                    result.tokens += len((choice.get("logprobs") or {}).get("content") or [None])
                    result.last_token = time.perf_counter()
                    if result.first_token is None:
                        result.first_token, result.first_event_tokens = result.last_token, result.tokens
        result.finished = time.perf_counter()
    except httpx.HTTPError as exc:
        result.error = type(exc).__name__
    return result


async def _closed_loop(url, model, concurrency, seconds, max_tokens, prompt, headers, finish) -> tuple[list[Result], float]:
    deadline = time.perf_counter() + seconds
    results: list[Result] = []

    async def client_loop(client):
        while time.perf_counter() < deadline:
            result = Result(time.perf_counter())
            results.append(result)
            if finish:  # no new request after the deadline; the one in flight runs to its end
                await one_request(client, url, model, max_tokens, prompt, headers, result)
                continue
            try:
                await asyncio.wait_for(one_request(client, url, model, max_tokens, prompt, headers, result), deadline - result.started)
            except asyncio.TimeoutError:  # the client hangs up at the deadline: the server should free the slot
                result.error = CUT

    async with httpx.AsyncClient(timeout=httpx.Timeout(seconds + 60), limits=_limits(concurrency + 4)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return results, time.perf_counter() - started


def _limits(connections: int) -> httpx.Limits:
    # A new connection per request: llama.cpp's server closes kept-alive connections now and then just as a client
    # reuses one ("Server disconnected without sending a response"), which would count as its failure.
    return httpx.Limits(max_connections=connections, max_keepalive_connections=0)


def _run(coroutine):
    """asyncio.run, also from inside a running event loop (Jupyter's): then in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def warm_up(url: str, model: str, concurrency: int, max_tokens: int = 8, api_key: str | None = None) -> None:
    """A few requests before measuring: a fresh server's first steps at each batch size run slower (allocation, kernel choice)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def both():
        async with httpx.AsyncClient(timeout=120, limits=_limits(concurrency + 1)) as client:
            for clients in sorted({1, concurrency}):
                await asyncio.gather(*(one_request(client, url, model, max_tokens, DEFAULT_PROMPT, headers) for _ in range(clients)))

    _run(both())


def summarize(results: list[Result], window: float, **labels) -> dict:
    """One table row: throughput over the window, latencies (p50/p99, in ms) over the finished requests."""
    done = [r for r in results if r.finished is not None and not r.error]
    failed = [r for r in results if r.error and r.error != CUT]

    def pct(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] * 1000

    answered = [r for r in results if r.first_token and r not in failed]  # cut at the deadline too: their tokens came
    ttft = [r.first_token - r.started for r in answered]
    tpot = [(r.last_token - r.first_token) / (r.tokens - r.first_event_tokens) for r in answered if r.tokens > r.first_event_tokens]
    e2e = [r.finished - r.started for r in done]
    tokens = sum(r.tokens for r in results)
    return {**labels, "requests done": len(done), "failed": len(failed), "why failed": "; ".join(sorted({r.error for r in failed})),
            "output tok/s": tokens / window,
            "TTFT p50 ms": pct(ttft, 0.5), "TTFT p99 ms": pct(ttft, 0.99), "TPOT p50 ms": pct(tpot, 0.5),
            "TPOT p99 ms": pct(tpot, 0.99), "e2e p50 ms": pct(e2e, 0.5), "e2e p99 ms": pct(e2e, 0.99)}


def closed_loop(url: str, model: str, concurrency: int, seconds: float = 10, max_tokens: int = 32,
                prompt: str = DEFAULT_PROMPT, api_key: str | None = None, finish: bool = True, **labels) -> dict:
    """`concurrency` clients, each sending its next request when the last one is answered, for `seconds`.

    `finish` (the default): the requests in flight at the deadline run to their end and the window closes with the last,
    so every client finishes at least one request and a loaded point still has latencies to report (a window shorter
    than one request would otherwise finish none). `finish=False`: the clients hang up at the deadline (`CUT`)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results, window = _run(_closed_loop(url, model, concurrency, seconds, max_tokens, prompt, headers, finish))
    return summarize(results, window, clients=concurrency, **labels)


async def _poisson(url, model, rate, seconds, max_tokens, prompt, headers, seed) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    deadline = time.perf_counter() + seconds
    results: list[Result] = []
    tasks = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(seconds + 60), limits=_limits(256)) as client:
        started = time.perf_counter()
        while True:
            await asyncio.sleep(rng.expovariate(rate))
            if time.perf_counter() >= deadline:
                break
            results.append(Result(time.perf_counter()))
            tasks.append(asyncio.ensure_future(one_request(client, url, model, max_tokens, prompt, headers, results[-1])))
        if tasks:  # requests that arrived in the window may finish after it: wait for them, up to as long again
            await asyncio.wait(tasks, timeout=seconds)
        for task, result in zip(tasks, results):
            if not task.done():
                task.cancel()
                result.error = CUT
        window = time.perf_counter() - started
    return results, window


def poisson(url: str, model: str, rate: float, seconds: float = 10, max_tokens: int = 32, prompt: str = DEFAULT_PROMPT,
            api_key: str | None = None, seed: int = 0, **labels) -> dict:
    """Requests arriving at random (exponential gaps, `rate` per second on average) for `seconds`, each streamed."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results, window = _run(_poisson(url, model, rate, seconds, max_tokens, prompt, headers, seed))
    return summarize(results, window, rate=rate, **labels)

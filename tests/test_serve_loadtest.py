"""The load test: throughput over the window, percentiles over what was answered, cut requests apart from failures, and a
closed loop that finishes what is in flight."""
import math
import time

import pytest

from llmnb.serve.loadtest import CUT, Result, summarize


def test_summary_counts_tokens_and_takes_percentiles_over_what_was_answered():
    results = [Result(0.0, first_token=0.1, last_token=1.0, finished=1.0, tokens=10, first_event_tokens=1),
               Result(0.0, first_token=0.3, last_token=2.1, finished=2.1, tokens=10, first_event_tokens=1),
               Result(1.0, first_token=1.2, last_token=1.6, tokens=3, error=CUT, first_event_tokens=1),       # cut at the deadline: its tokens count
               Result(1.5, tokens=0, error="HTTP 500"),                                   # a failure
               Result(0.0, first_token=0.5, last_token=1.5, finished=1.5, tokens=9, first_event_tokens=5)]  # phrase-sized events
    row = summarize(results, window=4.0, server="x")
    assert row["server"] == "x" and row["requests done"] == 3 and row["failed"] == 1 and row["why failed"] == "HTTP 500"
    assert row["output tok/s"] == (10 + 10 + 3 + 0 + 9) / 4.0
    assert math.isclose(row["TTFT p50 ms"], 300) and math.isclose(row["TTFT p99 ms"], 500)  # 4 answered: 0.1, 0.2, 0.3, 0.5 s
    # per token after the first event: 0.1, 0.2, 0.2 (cut: 0.4 s / 2), 0.25 (1.0 s over the 4 tokens after a 5-token event)
    assert math.isclose(row["TPOT p50 ms"], 200) and math.isclose(row["TPOT p99 ms"], 250)
    assert math.isclose(row["e2e p50 ms"], 1500) and math.isclose(row["e2e p99 ms"], 2100)


@pytest.fixture
def slow_server():
    """An OpenAI-style streaming endpoint that sends 4 tokens 0.25 s apart: one request takes a second."""
    import asyncio
    import json
    import socket
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def chat(request):
        async def events():
            for _ in range(4):
                await asyncio.sleep(0.25)
                chunk = {"choices": [{"delta": {"content": "x"}, "logprobs": {"content": [{"token": "x"}]}}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join()


def test_a_window_shorter_than_a_request_still_finishes_one_per_client(slow_server):
    """0.3 s against 1 s requests: with the default, each of 3 clients finishes its request (latencies to report) and the
    window closes with them; hanging up at the deadline finishes none."""
    from llmnb.serve.loadtest import closed_loop

    row = closed_loop(slow_server, "m", 3, seconds=0.3, max_tokens=4)
    assert row["requests done"] == 3 and row["e2e p50 ms"] >= 900 and row["output tok/s"] > 0
    cut = closed_loop(slow_server, "m", 3, seconds=0.3, max_tokens=4, finish=False)
    assert cut["requests done"] == 0 and cut["failed"] == 0

"""The OpenAI-compatible HTTP server: Starlette routes over the continuous-batching scheduler.

    app = create_app(ServeConfig(model_folder))   # then uvicorn.run(app), or `llmnb serve MODEL`

Routes: GET /health (503 while the model loads), GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (streaming as server-sent events ending in `data: [DONE]`),
GET /metrics (Prometheus text), GET / (a chat page). The parts: `served` (the model and its scheduler),
`streaming` (tokens to text, stop strings, the filter), `responses` (OpenAI's shapes), `errors`, `guard`.
Starlette, the toolkit FastAPI is built on, is used directly, with the request bodies decoded into typed classes by
msgspec (`schemas`): importing FastAPI (and the OpenTelemetry it now imports) held 7 MB more in every server, and
Pydantic, FastAPI's schemas, 7 MB more than msgspec (issue 23).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .errors import APIError, error_response, validation_error
from .guard import Guard
from .responses import ChatShape, CompletionShape
from .scheduler import Sampling, Token
from .schemas import Body, ChatRequest, CompletionRequest, decode
from .served import Served, ServeConfig
from .streaming import Run, collect as collect_tokens, sse

__all__ = ["ServeConfig", "create_app"]

def create_app(config: ServeConfig, on_load_error: Callable[[str], None] | None = None) -> Starlette:
    """The app; the model loads in the background once it starts. A model that cannot load leaves /health at 503 with
    the reason and calls `on_load_error` (`llmnb serve` prints it and exits: the policy is the caller's)."""
    served = Served(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        served.load_in_background(on_load_error)
        yield
        if served.ready.is_set():  # uvicorn has drained the requests in flight; let the scheduler finish too
            await asyncio.to_thread(served.scheduler.stop)
            if served.filter is not None:
                served.filter.close()

    app = Starlette(routes=_service_routes(served) + _generation_routes(served), lifespan=lifespan,
                    middleware=[Middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)],
                    exception_handlers={APIError: _api_error, HTTPException: _http_error})
    app.state.served = served
    return app


async def _api_error(request: Request, exc: APIError) -> Response:
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (no such route, a method the route does not take) in OpenAI's error shape."""
    if exc.status_code == 404:
        return error_response(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))
    if exc.status_code == 405:
        return error_response(APIError(405, f"{request.url.path} takes {exc.headers['Allow']}, not {request.method}",
                                       code="method_not_allowed", headers=exc.headers))
    return error_response(APIError(exc.status_code, str(exc.detail)))


async def _body(request: Request, schema: type[Body]) -> Body:
    """The request's JSON body checked against `schema`; a body it refuses is a 400 naming the first bad field."""
    try:
        return decode(await request.body(), schema)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise validation_error(exc) from None


def _service_routes(served: Served) -> list[Route]:
    """/health, the chat page, /metrics and the model list."""
    async def health(request: Request) -> Response:
        if served.ready.is_set():
            return JSONResponse({"status": "ok", "model": served.name, "decoding": f"{served.model.decoding}; step: {served.scheduler.decoding()}",
                                 "step": served.scheduler.step_state()})
        status = {"status": "error", "error": served.load_error} if served.load_error else {"status": "loading"}
        return JSONResponse(status, status_code=503)

    async def page(request: Request) -> Response:
        return HTMLResponse((Path(__file__).parent / "chat.html").read_text())

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(served.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(request: Request) -> Response:
        _ready(served)
        return JSONResponse({"object": "list", "data": [_model_card(served)]})

    async def model(request: Request) -> Response:
        _ready(served)
        _check_model(served, request.path_params["name"])
        return JSONResponse(_model_card(served))

    return [Route("/health", health), Route("/", page), Route("/metrics", metrics), Route("/v1/models", models),
            Route("/v1/models/{name:path}", model)]


def _generation_routes(served: Served) -> list[Route]:
    """OpenAI's two generation routes: text completions and chat completions, whole or streamed."""
    async def completions(request: Request) -> Response:
        body = await _body(request, CompletionRequest)
        _ready(served)
        _check_model(served, body.model)
        prompts = [await _prompt_ids(served, prompt) for prompt in body.prompts()]
        top = -1 if body.logprobs is None else body.logprobs
        runs: list[Run] = []
        try:
            for prompt in prompts:  # each prompt is checked against the context before any echo is computed
                runs.append(_start(served, body, prompt, body.max_tokens, top))
            echoes = [await asyncio.to_thread(served.prompt_logprobs, p, top) if body.echo and top >= 0 else
                      [Token(t, None, []) for t in p] if body.echo else None for p in prompts]
        except BaseException:
            for run in runs:
                run.cancel()
            raise
        shapes = [CompletionShape(served, body, run, echo) for run, echo in zip(runs, echoes)]
        if body.stream:
            return await _respond(request, body, runs[0], shapes[0])
        return await _respond_batch(request, runs, shapes)

    async def chat(request: Request) -> Response:
        body = await _body(request, ChatRequest)
        _ready(served)
        _check_model(served, body.model)
        if not served.chat_template:
            raise APIError(400, f"{served.name} has no chat template: use /v1/completions", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        await _moderate(served, "\n".join(m["content"] for m in messages if m["role"] == "user"), "messages")
        prompt = served.chat_ids(messages)
        run = _start(served, body, prompt, body.max_completion_tokens or body.max_tokens,
                     (body.top_logprobs or 0) if body.logprobs else -1)
        shape = ChatShape(served, body, run)
        return await _respond(request, body, run, shape)

    return [Route("/v1/completions", completions, methods=["POST"]), Route("/v1/chat/completions", chat, methods=["POST"])]


def _ready(served: Served) -> None:
    if not served.ready.is_set():
        raise APIError(503, f"the model is not loaded: {served.load_error or 'still loading, retry in a few seconds'}",
                       "server_error", code="model_loading", headers={"Retry-After": "2"})


def _check_model(served: Served, name: str) -> None:
    if name != served.name:
        raise APIError(404, f"the model {name!r} does not exist here: this server serves {served.name!r}", param="model",
                       code="model_not_found")


def _model_card(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "llmnb",
            "context_length": served.scheduler.context}


async def _moderate(served: Served, text: str, param: str) -> None:
    if served.filter is not None and await served.filter.flagged(text):
        raise APIError(400, f"the {param} was flagged by the safety filter ({served.filter.name})", param=param, code="content_filter")


def _start(served: Served, body, prompt: list[int], max_tokens: int | None, top_logprobs: int) -> Run:
    context = served.scheduler.context
    if len(prompt) >= context:
        raise APIError(400, f"the prompt has {len(prompt)} tokens but the context is {context}: shorten it by "
                            f"at least {len(prompt) - context + 1} tokens", param="messages" if isinstance(body, ChatRequest) else "prompt",
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = context - len(prompt)
    if len(prompt) + max_tokens > context:
        raise APIError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) is {len(prompt) + max_tokens}, "
                            f"{len(prompt) + max_tokens - context} over the context of {context}: lower max_tokens or shorten the prompt",
                       param="max_tokens", code="context_length_exceeded")
    stop_ids = frozenset() if body.ignore_eos else served.stop_ids
    samplings = [Sampling(max_tokens, body.temperature, body.top_p, None if body.seed is None else body.seed + i,
                          max(top_logprobs, 0), stop_ids) for i in range(body.n)]
    return Run(served, prompt, samplings, body.stop, want_logprobs=top_logprobs >= 0)


async def _prompt_ids(served: Served, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        vocab = served.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(prompt)
    await _moderate(served, prompt, "prompt")
    return served.encode(prompt)


async def _respond_batch(request: Request, runs: list[Run], shapes: list[CompletionShape]) -> Response:
    """A batch of prompts, whole: every prompt's choices in one response, indexed prompt by prompt (OpenAI's order)."""
    collects = [asyncio.create_task(collect_tokens(run)) for run in runs]
    while not all(c.done() for c in collects):  # a client that hangs up frees its slots, even without a stream
        await asyncio.wait(set(collects), timeout=0.5, return_when=asyncio.FIRST_EXCEPTION)
        if any(c.done() and c.exception() for c in collects) or await request.is_disconnected():
            for c in collects:
                c.cancel()
            failed = next((c.exception() for c in collects if c.done() and not c.cancelled() and c.exception()), None)
            if failed is not None:
                raise failed
            return Response(status_code=499)
    wholes = [shape.whole(c.result()) for shape, c in zip(shapes, collects)]
    choices = [{**choice, "index": p * len(runs[0].seqs) + choice["index"]} for p, whole in enumerate(wholes) for choice in whole["choices"]]
    usage = {key: sum(w["usage"][key] for w in wholes) for key in wholes[0]["usage"]}
    return JSONResponse(shapes[0].envelope(choices, usage=usage))


async def _respond(request: Request, body, run: Run, shape) -> Response:
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(sse(run, shape, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    collect = asyncio.create_task(collect_tokens(run))
    while not collect.done():  # a client that hangs up frees its slots, even without a stream
        await asyncio.wait({collect}, timeout=0.5)
        if not collect.done() and await request.is_disconnected():
            collect.cancel()
            return Response(status_code=499)
    return JSONResponse(shape.whole(collect.result()))

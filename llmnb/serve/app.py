"""The OpenAI-compatible HTTP server: FastAPI routes over the continuous-batching scheduler.

    app = create_app(ServeConfig("outputs/models/smollm2-sft"))   # then uvicorn.run(app), or `llmnb serve MODEL`

Routes: GET /health (503 while the model loads), GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (streaming as server-sent events ending in `data: [DONE]`),
GET /metrics (Prometheus text), GET / (a chat page). Every error has OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, so clients report it as they would OpenAI's.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .moderation import Batched
from .schemas import ChatRequest, CompletionRequest
from .scheduler import QueueFull, Sampling, Scheduler, Sequence, Token, layout_for_decoding

# Each judgement is a classifier call (~8 ms on 2 cores, competing with decoding for the cores): a reply is judged
# every few words, or at the end of a sentence, rather than after each token.
WORDS_PER_JUDGEMENT = 6
PUBLIC_PATHS = ("/health", "/", "/favicon.ico")  # the page holds no data; it asks for the key and sends it with each call


@dataclass
class ServeConfig:
    model: str
    adapter: str | None = None
    name: str | None = None  # the id clients send as "model"; default: the folder's or registry name
    api_key: str | None = None
    max_batch: int = 8  # 1 = batching off
    context: int | None = None  # tokens per request, prompt + reply; default: the model's, at most 2048
    max_waiting: int = 64
    max_body_bytes: int = 1 << 20
    moderation: str = "profanity"
    moderation_threshold: float | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status, headers=exc.headers)


class Served:
    """The loaded model and what serving it needs; filled by a background thread while /health says 503."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.name = config.name or Path(config.model.rstrip("/")).name
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.created = int(time.time())
        from .metrics import Metrics

        self.metrics = Metrics()

    def load(self) -> None:
        """Load the model (merging an adapter), start the filter and the scheduler; then /health says ok."""
        from ..checkpoint import load

        filter_loaded = Batched.start(self.config.moderation, self.config.moderation_threshold)  # in parallel with the model
        model, tokenizer = load(self.config.model)
        if self.config.adapter:
            from ..lora import load_adapter, merge_and_unload

            load_adapter(model, self.config.adapter, expect_base=self.config.model)
            model = merge_and_unload(model)  # serve at the base model's speed
        model = layout_for_decoding(model)
        self.model, self.tokenizer = model, tokenizer
        self.hf = hasattr(tokenizer, "apply_chat_template")
        self.chat_template = bool(getattr(tokenizer, "chat_template", None))
        eos = {getattr(tokenizer, "eos_token_id", None), model.config.eos_token_id}
        self.stop_ids = frozenset(i for i in eos if i is not None)
        self.filter = filter_loaded()
        self.scheduler = Scheduler(model, self.config.max_batch, self.config.context or min(model.config.block_size, 2048),
                                   self.config.max_waiting, self.metrics).start()
        self.ready.set()

    def load_or_exit(self) -> None:
        try:
            self.load()
        except Exception as exc:  # a server that cannot serve says why and exits, rather than answering 503 forever
            self.load_error = f"{type(exc).__name__}: {exc}"
            print(f"llmnb serve: cannot serve {self.config.model}: {self.load_error}", file=sys.stderr, flush=True)
            os._exit(2)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.hf else self.tokenizer.decode(ids)

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id])


# --- one reply: the scheduler's tokens become text, with stop strings and the safety filter -------------


class ReplyText:
    """One choice's text as it grows: holds back what may still turn out to be a stop string, an unfinished
    UTF-8 character, or (with a safety filter) words not judged yet, and blocks what the filter flags."""

    def __init__(self, served: Served, stops: list[str]):
        self.served, self.stops = served, stops or []
        self.ids: list[int] = []
        self.sent = 0  # characters released so far
        self.text = ""
        self.pending: list[Token] = []  # tokens whose text is not released yet, for logprobs
        self.finish: str | None = None

    async def add(self, token: Token) -> tuple[str, list[Token]]:
        """(text to release now, the tokens it comes from); sets `finish` on the last one."""
        if token.id is not None and token.finish != "stop":
            self.ids.append(token.id)
            self.pending.append(token)
        finish = token.finish
        text = self.served.decode(self.ids)
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        end = len(text) if finish else self._safe_end(text)
        if end > self.sent and self.served.filter is not None and await self.served.filter.flagged(text[:end]):
            finish, end = "content_filter", self.sent
        release = text[self.sent:end]
        self.sent, self.text, self.finish = max(self.sent, end), text[:max(self.sent, end)], finish
        if not release and not finish:
            return "", []
        tokens, self.pending = self.pending, []
        return release, tokens

    def _safe_end(self, text: str) -> int:
        end = len(text.rstrip("\ufffd"))  # a character split across tokens decodes as U+FFFD until it completes
        for stop in self.stops:  # a tail that may begin a stop string waits
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[end - k:end] == stop[:k]:
                    end -= k
                    break
        if self.served.filter is not None:  # the filter judges whole words, a phrase or a sentence at a time
            boundary = max(text.rfind(" ", 0, end), text.rfind("\n", 0, end)) + 1
            pending = text[self.sent:boundary]
            if len(pending.split()) < WORDS_PER_JUDGEMENT and not any(mark in pending for mark in ".!?\n"):
                boundary = self.sent
            end = min(end, boundary)
        return max(end, self.sent)


class Run:
    """One request's choices in flight: submits them, then yields (choice, text, tokens, finish) as they grow."""

    def __init__(self, served: Served, prompt: list[int], samplings: list[Sampling], stops: list[str], want_logprobs: bool):
        self.served, self.prompt, self.want_logprobs = served, prompt, want_logprobs
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.replies = [ReplyText(served, stops) for _ in samplings]
        self.seqs = [Sequence(prompt, s, emit=lambda token, i=i: self._put(i, token)) for i, s in enumerate(samplings)]
        try:
            for seq in self.seqs:
                served.scheduler.submit(seq)
        except QueueFull as exc:
            self.cancel()
            raise APIError(429, f"the server is busy ({exc}): retry later", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.retry_after())}) from None

    def _put(self, i: int, token: Token) -> None:  # called from the scheduler's thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, token))
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    def retry_after(self) -> int:
        return max(1, round(self.served.metrics.mean_latency()))  # a request's mean time so far: when a slot is likely free

    async def events(self):
        open_choices = len(self.seqs)
        try:
            while open_choices:
                i, token = await self.queue.get()
                reply = self.replies[i]
                if reply.finish:
                    continue  # tokens generated after we stopped this choice ourselves
                if token.finish == "error":
                    raise APIError(500, f"generation failed: {token.error}", "server_error")
                text, tokens = await reply.add(token)
                if reply.finish and token.finish is None:
                    self.served.scheduler.cancel(self.seqs[i])  # a stop string or the filter ended it
                if reply.finish:
                    open_choices -= 1
                if text or reply.finish:
                    yield i, text, tokens, reply.finish
        finally:
            self.cancel()  # the client left, or an error: free the slots now

    def cancel(self) -> None:
        for seq in self.seqs:
            self.served.scheduler.cancel(seq)

    def usage(self) -> dict:
        done = sum(len(r.ids) for r in self.replies)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": done, "total_tokens": len(self.prompt) + done}


# --- the app -------------------------------------------------------------------------------------------


def create_app(config: ServeConfig) -> FastAPI:
    served = Served(config)

    async def lifespan(app: FastAPI):
        threading.Thread(target=served.load_or_exit, name="llmnb-load", daemon=True).start()
        yield
        if served.ready.is_set():  # uvicorn has drained the requests in flight; let the scheduler finish too
            await asyncio.to_thread(served.scheduler.stop)
            if served.filter is not None:
                served.filter.close()

    app = FastAPI(title="llmnb", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.served = served
    app.add_exception_handler(APIError, lambda request, exc: _error_response(exc))
    app.add_exception_handler(RequestValidationError, lambda request, exc: _error_response(_validation_error(exc)))
    app.add_exception_handler(StarletteHTTPException, lambda request, exc: _error_response(
        APIError(exc.status_code, str(exc.detail) if exc.status_code != 404 else f"no route {request.method} {request.url.path}",
                 code="not_found" if exc.status_code == 404 else None)))

    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)

    @app.get("/health")
    def health():
        if served.ready.is_set():
            return {"status": "ok", "model": served.name}
        status = {"status": "error", "error": served.load_error} if served.load_error else {"status": "loading"}
        return JSONResponse(status, status_code=503)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return (Path(__file__).parent / "chat.html").read_text()

    @app.get("/metrics")
    def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(served.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models():
        _ready(served)
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{name:path}")
    def model(name: str):
        _ready(served)
        _check_model(served, name)
        return _model_card(served)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _ready(served)
        _check_model(served, body.model)
        if isinstance(body.prompt, list):
            vocab = served.model.config.vocab_size
            if any(not 0 <= t < vocab for t in body.prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            prompt = list(body.prompt)
        else:
            await _moderate(served, body.prompt, "prompt")
            prompt = served.encode(body.prompt)
        run = _start(served, body, prompt, body.max_tokens, -1 if body.logprobs is None else body.logprobs)
        shape = _CompletionShape(served, body, run)
        return await _respond(request, body, run, shape)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _ready(served)
        _check_model(served, body.model)
        if not served.chat_template:
            raise APIError(400, f"{served.name} has no chat template: use /v1/completions", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        await _moderate(served, "\n".join(m["content"] for m in messages if m["role"] == "user"), "messages")
        prompt = list(served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True)["input_ids"])
        run = _start(served, body, prompt, body.max_completion_tokens or body.max_tokens,
                     (body.top_logprobs or 0) if body.logprobs else -1)
        shape = _ChatShape(served, body, run)
        return await _respond(request, body, run, shape)

    return app


class Guard:
    """ASGI middleware in front of every route: the API key (compared in constant time), then the body size limit.

    A body without Content-Length (chunked) is read here up to the limit and handed on whole.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in PUBLIC_PATHS:
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return await _error_response(APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                                      code="invalid_api_key"))(scope, receive, send)
        too_large = APIError(413, f"the request body is over the limit of {self.max_body_bytes} bytes", code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_body_bytes:
                return await _error_response(too_large)(scope, receive, send)
            return await self.app(scope, receive, send)
        body, more = b"", scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await _error_response(too_large)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        return await self.app(scope, replay, send)


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if not where:
        return APIError(400, f"the body must be a JSON object with the request's fields: {first['msg']}")
    message = f"{'.'.join(where)}: {first['msg']}" if first.get("type") != "extra_forbidden" else \
        f"{'.'.join(where)}: unknown field (this server does not support it)"
    return APIError(400, message, param=where[0], code=first.get("type"))


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


async def _respond(request: Request, body, run: Run, shape):
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(run, shape, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    collect = asyncio.create_task(_collect(run))
    while not collect.done():  # a client that hangs up frees its slots, even without a stream
        await asyncio.wait({collect}, timeout=0.5)
        if not collect.done() and await request.is_disconnected():
            collect.cancel()
            return Response(status_code=499)
    return shape.whole(collect.result())


async def _collect(run: Run) -> list[list[Token]]:
    tokens: list[list[Token]] = [[] for _ in run.seqs]
    async for i, _text, toks, _finish in run.events():
        tokens[i] += toks
    return tokens


async def _sse(run: Run, shape, include_usage: bool):
    def event(data: dict) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        for first in shape.opening():
            yield event(first)
        async for i, text, tokens, finish in run.events():
            yield event(shape.chunk(i, text, tokens, finish))
        if include_usage:
            yield event(shape.envelope([], usage=run.usage()))
    except APIError as exc:
        yield event(error_body(exc.message, exc.type, exc.param, exc.code))
    yield "data: [DONE]\n\n"


# --- OpenAI's two response shapes -----------------------------------------------------------------------


class _CompletionShape:
    object = "text_completion"

    def __init__(self, served: Served, body, run: Run):
        self.served, self.body, self.run = served, body, run
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.offsets = [0] * body.n

    def envelope(self, choices: list, usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": self.object, "created": self.created, "model": self.served.name, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def opening(self) -> list[dict]:
        return []

    def logprobs(self, i: int, tokens: list[Token]) -> dict | None:
        if not self.run.want_logprobs:
            return None
        texts = [self.served.token_text(t.id) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(self.offsets[i])
            self.offsets[i] += len(text)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens], "text_offset": offsets,
                "top_logprobs": [{self.served.token_text(a): lp for a, lp in t.top} for t in tokens]}

    def chunk(self, i: int, text: str, tokens: list[Token], finish: str | None) -> dict:
        return self.envelope([{"index": i, "text": text, "logprobs": self.logprobs(i, tokens), "finish_reason": finish}])

    def whole(self, tokens: list[list[Token]]) -> dict:
        choices = [{"index": i, "text": r.text, "logprobs": self.logprobs(i, tokens[i]), "finish_reason": r.finish}
                   for i, r in enumerate(self.run.replies)]
        return self.envelope(choices, usage=self.run.usage())


class _ChatShape(_CompletionShape):
    object = "chat.completion"

    def __init__(self, served: Served, body, run: Run):
        super().__init__(served, body, run)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            self.object = "chat.completion.chunk"

    def opening(self) -> list[dict]:  # OpenAI's first chunk of each choice names the role
        return [self.envelope([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
                for i in range(self.body.n)]

    def logprobs(self, i: int, tokens: list[Token]) -> dict | None:
        if not self.run.want_logprobs:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            text = self.served.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(a, lp) for a, lp in t.top]} for t in tokens]}

    def chunk(self, i: int, text: str, tokens: list[Token], finish: str | None) -> dict:
        delta = {"content": text} if text else {}
        return self.envelope([{"index": i, "delta": delta, "logprobs": self.logprobs(i, tokens), "finish_reason": finish}])

    def whole(self, tokens: list[list[Token]]) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": self.logprobs(i, tokens[i]),
                    "finish_reason": r.finish} for i, r in enumerate(self.run.replies)]
        return self.envelope(choices, usage=self.run.usage())

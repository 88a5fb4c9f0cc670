"""One request in flight: the scheduler's tokens become text, held back at stop strings, unfinished characters and
words the safety filter has not judged yet; streamed as server-sent events or collected whole."""
from __future__ import annotations

import asyncio
import json

from .errors import APIError, error_body
from .scheduler import QueueFull, Sampling, Sequence, Token
from .served import Served

# Each judgement is a classifier call (~8 ms on 2 cores, competing with decoding for the cores): a reply is judged
# every few words, or at the end of a sentence, rather than after each token.
WORDS_PER_JUDGEMENT = 6


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


async def collect(run: Run) -> list[list[Token]]:
    tokens: list[list[Token]] = [[] for _ in run.seqs]
    async for i, _text, toks, _finish in run.events():
        tokens[i] += toks
    return tokens


async def sse(run: Run, shape, include_usage: bool):
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

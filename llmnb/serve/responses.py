"""OpenAI's two response shapes, whole and as stream chunks: text completions and chat completions."""
from __future__ import annotations

import time
import uuid

from .scheduler import Token
from .served import Served
from .streaming import Run


class CompletionShape:
    object = "text_completion"

    def __init__(self, served: Served, body, run: Run, echo: list[Token] | None = None):
        """`echo`: the prompt's tokens (with their log-probabilities when asked), returned before each choice's reply."""
        self.served, self.body, self.run, self.echo = served, body, run, echo
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.offsets = [0] * body.n
        self.prompt_text = served.decode([t.id for t in echo], special=True) if echo else ""

    def envelope(self, choices: list, usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": self.object, "created": self.created, "model": self.served.name, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def opening(self) -> list[dict]:  # a streamed echo: the prompt is each choice's first chunk
        if not self.echo:
            return []
        return [self.chunk(i, self.prompt_text, self.echo, None) for i in range(self.body.n)]

    def logprobs(self, i: int, tokens: list[Token]) -> dict | None:
        if not self.run.want_logprobs:
            return None
        texts = [self.served.token_text(t.id) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(self.offsets[i])
            self.offsets[i] += len(text)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens], "text_offset": offsets,
                "top_logprobs": [{self.served.token_text(a): lp for a, lp in t.top} if t.logprob is not None else None for t in tokens]}

    def chunk(self, i: int, text: str, tokens: list[Token], finish: str | None) -> dict:
        return self.envelope([{"index": i, "text": text, "logprobs": self.logprobs(i, tokens), "finish_reason": finish}])

    def whole(self, tokens: list[list[Token]]) -> dict:
        echo = self.echo or []
        choices = [{"index": i, "text": self.prompt_text + r.text, "logprobs": self.logprobs(i, echo + tokens[i]), "finish_reason": r.finish}
                   for i, r in enumerate(self.run.replies)]
        return self.envelope(choices, usage=self.run.usage())


class ChatShape(CompletionShape):
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

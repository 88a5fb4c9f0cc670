"""The model a server serves, and what serving it needs: loaded on a thread while /health says 503."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import decoding, hardware
from ..checkpoint import load
from ..lora import load_adapter, merge_and_unload
from ..tokenizer import FolderTokenizer
from .metrics import Metrics
from .moderation import Batched
from .scheduler import Scheduler, Token
from .step import packs_weights


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
    dtype: str = "auto"  # decoding precision: "auto" (bf16 where the CPU computes it natively), "float32", "bfloat16"
    compile: bool = False  # the decoding step as one compiled library, found on disk or built in the background (serve.step.StepGraph)


class Served:
    """The loaded model and what serving it needs; filled by a background thread while /health says 503."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.name = config.name or Path(config.model.rstrip("/")).name
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.created = int(time.time())
        self.metrics = Metrics()

    def load(self) -> None:
        """Load the model (merging an adapter), start the filter and the scheduler; then /health says ok."""
        filter_loaded = Batched.start(self.config.moderation, self.config.moderation_threshold)  # in parallel with the model
        model, tokenizer = load(self.config.model, light_tokenizer=True)  # no AutoTokenizer where the folder allows it: less memory
        if self.config.adapter:
            load_adapter(model, self.config.adapter, expect_base=self.config.model)
            model = merge_and_unload(model)  # serve at the base model's speed
        # bf16 where the CPU computes it natively; q/k/v and gate/up fused; a tied head stays tied. Eager: weights packed
        # for oneDNN. Compiled: plain, until the step's build packs them where that serves one row fastest (serve.step)
        decoding.prepare(model, self.config.dtype, pack=not self.config.compile)
        if self.config.compile:  # before the first product (the eager server's limit is set by the CLI, before packing)
            hardware.limit_kernel_caches(packed=packs_weights(model))
        self.model, self.tokenizer = model, tokenizer
        self.hf = isinstance(tokenizer, FolderTokenizer) or hasattr(tokenizer, "apply_chat_template")  # decode takes skip_special_tokens
        self.chat_template = bool(getattr(tokenizer, "chat_template", None))
        eos = {getattr(tokenizer, "eos_token_id", None), model.config.eos_token_id}
        self.stop_ids = frozenset(i for i in eos if i is not None)
        self.filter = filter_loaded()
        self.scheduler = Scheduler(model, self.config.max_batch, self.config.context or min(model.config.block_size, 2048),
                                   self.config.max_waiting, self.metrics, compile=self.config.compile).start()
        self.ready.set()

    def load_in_background(self, on_error: Callable[[str], None] | None = None) -> threading.Thread:
        """Load on a thread; a failure is kept for /health (503 with the reason) and handed to `on_error` (the CLI exits)."""
        def run() -> None:
            try:
                self.load()
            except Exception as exc:
                self.load_error = f"{type(exc).__name__}: {exc}"
                if on_error is not None:
                    on_error(self.load_error)

        thread = threading.Thread(target=run, name="llmnb-load", daemon=True)
        thread.start()
        return thread

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int], top: int) -> list[Token]:
        """Each prompt token with its log-probability given the tokens before it (None for the first, which nothing
        predicts) and the `top` likeliest alternatives: what `echo` with `logprobs` returns, what evaluation harnesses
        score answers with. One forward pass, beside the scheduler's decoding (inference only: nothing is shared)."""
        logits, _ = self.model(torch.tensor([ids]))
        logprobs = logits[0, :-1].float().log_softmax(-1)  # (T - 1, vocab): position t predicts token t + 1
        picked = logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
        best = logprobs.topk(top, dim=-1) if top else None
        alternatives = [list(zip(best.indices[t].tolist(), best.values[t].tolist())) if best is not None else []
                        for t in range(len(ids) - 1)]
        return [Token(ids[0], None, [])] + [Token(i, lp, alt) for i, lp, alt in zip(ids[1:], picked, alternatives)]

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt's ids for a chat, its template ending in the assistant's turn."""
        if isinstance(self.tokenizer, FolderTokenizer):
            return self.tokenizer.chat_ids(messages)
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])

    def decode(self, ids: list[int], special: bool = False) -> str:
        """The text of `ids`; `special` keeps special tokens' text (an echoed chat prompt), else they are left out."""
        return self.tokenizer.decode(ids, skip_special_tokens=not special) if self.hf else self.tokenizer.decode(ids)

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id])

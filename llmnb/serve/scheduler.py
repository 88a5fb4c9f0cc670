"""Continuous batching: every running request advances one token per model step, and requests join and leave between steps.

The KV cache is a block of `max_batch` rows ("slots"), each with room for `context` tokens.
The running requests always occupy rows 0..n-1, so one decoding step is one forward pass
on views of those rows, with no copies:

    step:  drop cancelled requests -> prefill waiting requests into free rows, together (their first token)
           -> one batched forward on the n running rows (one token each) -> finished rows leave

A request that finishes hands its row to the last running request (one row copied), so the
rows stay packed. With `max_batch=1` the same server serves requests one after another:
"batching off", the baseline the notebook and benchmarks/serve.py measure against.

`compile=True`: the decoding step (every layer and the head, the cache writes included) runs as one
compiled library for every number of rows and every cache length (llmnb.serve.step: AOTInductor, built
in a child process, reading the model's own weights; benchmarks/serve.py measures what it buys). It is
found on disk or built while the scheduler serves eagerly; the scheduler switches to it once it is
loaded, and stays eager, with one warning, if it cannot be.

The scheduler runs the model in one background thread; `submit` and `cancel` are safe to call
from any thread, and each request's tokens come back through its `emit` callback.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import hardware
from ..data import pad_rows
from ..generate import sample
from ..model import GPT, KVCache
from .step import DecodeStep, StepGraph, row_mask


class QueueFull(RuntimeError):
    """More requests are waiting than the scheduler accepts: the server answers 429."""


@dataclass
class Sampling:
    """How one sequence samples: OpenAI's parameters, plus the token ids that end it."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    top_logprobs: int = 0  # alternatives reported per token (OpenAI allows up to 20; we allow 5)
    stop_ids: frozenset[int] = frozenset()


@dataclass
class Token:
    """One step of one sequence, as `emit` receives it. `finish` is set on its last step."""
    id: int | None
    logprob: float | None  # None: an echoed prompt's first token, which nothing predicts
    top: list[tuple[int, float]]
    finish: str | None = None  # "stop" (a stop token: `id` is that token), "length", "cancelled", "error"
    error: str = ""


@dataclass
class Sequence:
    """One request's one choice: its prompt, how it samples, and where its tokens go."""
    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Token], None]
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    last_token_at: float = 0.0
    generator: torch.Generator | None = None


class SlotCache:
    """A KV cache of `slots` rows, each row holding its own number of tokens."""

    def __init__(self, model: GPT, slots: int, context: int):
        c = model.config
        dtype, device = model.norm_f.weight.dtype, model.norm_f.weight.device
        shape = (slots, c.n_kv_head, context, c.head_dim)  # (S, n_kv, context, hs)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layer)]
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # tokens stored in each row
        self.context = context

    def fill(self, row: int, prefill: KVCache, index: int, n: int) -> None:
        """Copy the first `n` positions of row `index` of a prefilled cache into `row`."""
        for layer in range(len(self.keys)):
            self.keys[layer][row, :, :n] = prefill.keys[layer][index, :, :n]
            self.values[layer][row, :, :n] = prefill.values[layer][index, :, :n]
        self.lengths[row] = n

    def move(self, source: int, target: int) -> None:
        """Row `source` takes the place of row `target` (whose request has left)."""
        n = int(self.lengths[source])
        for layer in range(len(self.keys)):
            self.keys[layer][target, :, :n] = self.keys[layer][source, :, :n]
            self.values[layer][target, :, :n] = self.values[layer][source, :, :n]
        self.lengths[target] = n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def cache_slots(max_batch: int, compile: bool) -> int:
    """Rows of the KV cache a scheduler allocates: a compiled step computes at least MIN_ROWS rows, and the padding
    row needs a (free) row of the cache."""
    return max(max_batch, StepGraph.MIN_ROWS) if compile else max_batch


def cache_bytes(model: GPT, max_batch: int, context: int, dtype: torch.dtype, compile: bool = False) -> int:
    """Bytes of the KV cache `Scheduler(model, max_batch, context, compile=compile)` holds once `model` is prepared to
    decode in `dtype`: what a server holds beside its weights, for reports written outside it."""
    per_token = model.kv_cache_bytes_per_token("fp32") * torch.finfo(dtype).bits // 32
    return int(cache_slots(max_batch, compile) * context * per_token)


class Scheduler:
    """Runs `model` for every submitted Sequence, `max_batch` at a time, in a background thread."""

    def __init__(self, model: GPT, max_batch: int = 8, context: int | None = None, max_waiting: int = 64,
                 metrics=None, prefill_tokens: int = 4096, compile: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.context = min(context or model.config.block_size, model.config.block_size)
        self.max_batch, self.max_waiting, self.prefill_tokens = max_batch, max_waiting, prefill_tokens
        self.eager = DecodeStep(model)
        self.graph = StepGraph(self.eager) if compile else None
        self.cache = SlotCache(model, cache_slots(max_batch, compile), self.context)
        self.running: list[Sequence] = []  # running[i] owns cache row i
        self.waiting: deque[Sequence] = deque()
        self.metrics = metrics
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.builder: threading.Thread | None = None  # compiling the step (compile=True), started by `start`

    # --- called from the server's threads ----------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        if len(seq.prompt) + seq.sampling.max_tokens > self.context:
            raise ValueError(f"prompt ({len(seq.prompt)} tokens) + max_tokens ({seq.sampling.max_tokens}) exceeds the "
                             f"context of {self.context} by {len(seq.prompt) + seq.sampling.max_tokens - self.context}")
        with self._wake:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            if seq.sampling.seed is not None:
                seq.generator = torch.Generator(device=self.cache.lengths.device).manual_seed(seq.sampling.seed)
            self.waiting.append(seq)
            self._wake.notify()
        self._gauges()

    def cancel(self, seq: Sequence) -> None:
        """Stop generating for `seq` (its client left, or a stop string ended it); its row frees at the next step."""
        seq.cancelled = True

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="llmnb-scheduler", daemon=True)
        self._thread.start()
        if self.graph is not None:  # the scheduler uses the graph from the step after it is built
            self.builder = threading.Thread(target=self.graph.build, name="llmnb-compile", daemon=True)
            self.builder.start()
        return self

    def decoding(self) -> str:
        """How the step runs, for /health."""
        return "eager" if self.graph is None else str(self.graph)

    def step_state(self) -> str:
        """/health's "step": "eager", or the compiled step's `StepGraph.state` (a client waits while it is "building")."""
        return "eager" if self.graph is None else self.graph.state

    def stop(self) -> None:
        """Finish the requests already submitted, then end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # --- the model thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                if not self.running and not self.waiting and not self._stopping:
                    # idle: hand back the heap pages the last requests' activations left (40 MB after 16 SmolLM2
                    # requests), or the server's resident memory keeps its busiest moment; about a millisecond
                    hardware.trim_heap()
                while not self.running and not self.waiting and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self.running and not self.waiting:
                    return
            try:
                self.step()
            except Exception as exc:  # a failing step fails its requests, never the server
                for seq in self.running + list(self.waiting):
                    seq.emit(Token(None, 0.0, [], "error", f"{type(exc).__name__}: {exc}"))
                self.running.clear()
                self.waiting.clear()

    @torch.inference_mode()  # not only no gradients: no autograd bookkeeping on any op (a server's step never trains)
    def step(self) -> int:
        """One scheduling step: admit, decode once, retire. Returns the number of running sequences it advanced."""
        for i in reversed(range(len(self.running))):
            if self.running[i].cancelled:
                self._retire(i, Token(None, 0.0, [], "cancelled"))
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        self._gauges()
        n = len(self.running)
        if n == 0:  # everything admitted finished at its first token, or was cancelled
            self._gauges()
            return 0
        last = torch.tensor([[seq.tokens[-1]] for seq in self.running], device=self.cache.lengths.device)  # (n, 1)
        positions = self.cache.lengths[:n].clone()  # (n,) where each row's new token goes
        if self.graph is not None and self.graph.ready:
            logits = self.graph(last, positions, self.cache.keys, self.cache.values)
        else:
            logits = self.eager(last, positions, row_mask(positions, int(positions.max()) + 1), self.cache.keys, self.cache.values)
        self.cache.lengths[:n] += 1
        tokens = self._sample(logits)
        for i in reversed(range(n)):  # backwards: retiring row i moves the last row into it
            self._advance(i, tokens[i])
        self._gauges()
        return n

    def _admit(self) -> list[Sequence]:
        """Waiting requests for the free rows, first come first served, up to `prefill_tokens` padded tokens together."""
        admitted: list[Sequence] = []
        with self._wake:
            while self.waiting and len(self.running) + len(admitted) < self.max_batch:
                seq = self.waiting[0]
                longest = max([len(seq.prompt)] + [len(a.prompt) for a in admitted])
                if admitted and longest * (len(admitted) + 1) > self.prefill_tokens:
                    break
                self.waiting.popleft()
                if not seq.cancelled:
                    admitted.append(seq)
        return admitted

    def _prefill(self, seqs: list[Sequence]) -> None:
        """All admitted prompts in one forward pass (a matrix product over many tokens runs far faster per token than
        one over a few), right-padded: causal attention never lets a real token see the padding after it."""
        device = self.cache.lengths.device
        ids = pad_rows([seq.prompt for seq in seqs], 0)[0].to(device)  # (b, T)
        prefill = KVCache(self.model.config, len(seqs), ids.shape[1], device, self.cache.keys[0].dtype)
        hidden = self.model.hidden_states(ids, cache=prefill)  # (b, T, C)
        last = torch.tensor([len(seq.prompt) - 1 for seq in seqs], device=device)
        logits = self.model.lm_head(hidden[torch.arange(len(seqs)), last]).float()  # (b, vocab): each prompt's last token
        rows = []
        for i, seq in enumerate(seqs):
            rows.append(len(self.running))
            self.cache.fill(rows[-1], prefill, i, len(seq.prompt))
            self.running.append(seq)
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(len(seq.prompt))
        for row, token in reversed(list(zip(rows, self._sample(logits, seqs)))):  # backwards: a retiring row takes the last one's place
            self._advance(row, token)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence] | None = None) -> list[Token]:
        """Each row's next token with its log-probability (and top alternatives), each row by its own settings."""
        seqs = seqs if seqs is not None else self.running
        logprobs = logits.log_softmax(-1)
        chosen = logits.argmax(-1)
        empty = torch.empty(1, 0, dtype=torch.long)
        for i, seq in enumerate(seqs):
            s = seq.sampling
            if s.temperature > 0:
                chosen[i] = sample(logits[i:i + 1], empty, s.temperature, None, s.top_p, 1.0, seq.generator)[0]
        picked = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
        widest = max(s.sampling.top_logprobs for s in seqs)
        top = logprobs.topk(widest, dim=-1) if widest else None
        out = []
        for i, seq in enumerate(seqs):
            k = seq.sampling.top_logprobs
            alternatives = list(zip(top.indices[i, :k].tolist(), top.values[i, :k].tolist())) if k else []
            out.append(Token(int(chosen[i]), picked[i], alternatives))
        return out

    def _advance(self, row: int, token: Token) -> None:
        seq = self.running[row]
        seq.tokens.append(token.id)
        now = time.perf_counter()
        if self.metrics is not None:
            if len(seq.tokens) == 1:
                self.metrics.time_to_first_token.observe(now - seq.arrived)
            else:
                self.metrics.inter_token_latency.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if token.id in seq.sampling.stop_ids:
            token.finish = "stop"
        elif len(seq.tokens) >= seq.sampling.max_tokens or int(self.cache.lengths[row]) >= self.context:  # no room for the next key
            token.finish = "length"
        if token.finish is None:
            seq.emit(token)
        else:
            self._retire(row, token)

    def _retire(self, row: int, token: Token) -> None:
        seq = self.running[row]
        last = len(self.running) - 1
        if row != last:
            self.cache.move(last, row)
            self.running[row] = self.running[last]
        self.running.pop()
        if self.metrics is not None:
            self.metrics.finished(seq, token.finish)
        seq.emit(token)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(len(self.running))
            self.metrics.waiting.set(len(self.waiting))

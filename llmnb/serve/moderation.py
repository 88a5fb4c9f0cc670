"""Safety filters: a second classifier that reads prompts and replies (the seeds' "use a secondary classifier to monitor outputs").

A filter is any callable from texts to probabilities of being unacceptable; the server blocks
a text whose probability reaches `threshold`. Two ship:

    ProfanityFilter()                       alt-profanity-check: a linear SVM on TF-IDF, offline, ~0.1 ms a text
    TransformersFilter("unitary/toxic-bert") any `transformers` text-classification model (needs the hub once)
"""
from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor


Filter = Callable[[Sequence[str]], list[float]]


class ProfanityFilter:
    """alt-profanity-check's calibrated classifier (the package ships the trained model)."""

    name = "alt-profanity-check"

    def __init__(self, threshold: float = 0.9):
        from profanity_check import predict_prob  # imports scikit-learn: ~3 s, so only when a server asks

        self._predict, self.threshold = predict_prob, threshold
        _one_thread_outside_torch()

    def __call__(self, texts: Sequence[str]) -> list[float]:
        return [float(p) for p in self._predict(list(texts))]


def _one_thread_outside_torch() -> None:
    """scikit-learn and scipy bring their own OpenMP and OpenBLAS thread pools: left at one thread per core, their
    waiting threads spin on the cores torch's threads are decoding on, and a served token took 2-4x longer."""
    from threadpoolctl import ThreadpoolController

    for lib in ThreadpoolController().lib_controllers:
        if "torch" not in lib.filepath:
            lib.set_num_threads(1)


class TransformersFilter:
    """A `transformers` text-classification model; `label` is the class that means unacceptable."""

    def __init__(self, model: str, label: str = "toxic", threshold: float = 0.5):
        from transformers import pipeline  # seconds to import: only where a Hugging Face object is built

        self.name, self.label, self.threshold = model, label, threshold
        self._pipe = pipeline("text-classification", model=model, top_k=None)
        labels = set(self._pipe.model.config.id2label.values())
        if label not in labels:
            raise ValueError(f"{model} has no label {label!r}; its labels are {sorted(labels)}: pass one as the label")

    def __call__(self, texts: Sequence[str]) -> list[float]:
        return [next(s["score"] for s in scores if s["label"] == self.label) for scores in self._pipe(list(texts))]


def make_filter(spec: str, threshold: float | None = None):
    """'profanity' (default), 'none', or 'hf:MODEL[:LABEL]' -> a filter with a `threshold`, or None."""
    if spec == "none":
        return None
    if spec == "profanity":
        return ProfanityFilter(0.9 if threshold is None else threshold)
    if spec.startswith("hf:"):
        model, _, label = spec[3:].partition(":")
        return TransformersFilter(model, label or "toxic", 0.5 if threshold is None else threshold)
    raise ValueError(f"unknown moderation {spec!r}: use 'profanity', 'none' or 'hf:MODEL[:LABEL]'")


class Batched:
    """Asks the filter once for every text the server's streams want judged in one turn of the event loop.

    A classifier call costs ~8 ms whether it judges one text or sixteen (alt-profanity-check on 2
    cores): judged one reply at a time, sixteen streams would spend more time in the filter than
    in the model. The server runs the filter in a process of its own (`Batched.start`): in the
    decoding process its Python holds the interpreter lock that PyTorch takes back between every
    operation, and a decoding step with the classifier running beside it went from 0.15 s to
    minutes (measured here).
    """

    def __init__(self, check, pool=None):
        self.check, self.pool = check, pool
        self.name, self.threshold = check.name, check.threshold
        self._pending: list[tuple[str, asyncio.Future]] = []

    @classmethod
    def start(cls, spec: str, threshold: float | None = None) -> Callable[[], Batched | None]:
        """Start the filter `make_filter(spec, threshold)` in a worker process; returns a function that waits until it
        is loaded and gives the Batched filter (None for 'none'). The server loads its model meanwhile."""
        if spec == "none":
            return lambda: None

        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                                   initargs=(spec, threshold))
        info = pool.submit(_worker_info)
        return lambda: cls(_Described(*info.result()), pool)  # raises there when the filter cannot be made

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    async def flagged(self, text: str) -> bool:
        if not text.strip():
            return False
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((text[-1000:], future))
        if len(self._pending) == 1:  # the first of this turn: judge them all once the others have queued theirs
            loop.call_soon(lambda: loop.create_task(self._judge()))
        return await future

    async def _judge(self) -> None:
        batch, self._pending = self._pending, []
        texts = [text for text, _ in batch]
        try:
            if self.pool is None:
                scores = self.check(texts)
            else:
                scores = await asyncio.get_running_loop().run_in_executor(self.pool, _worker_check, texts)
        except Exception as exc:  # a failing filter fails its requests, not the server
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), score in zip(batch, scores):
            if not future.done():
                future.set_result(score >= self.threshold)


class _Described:
    """What the server needs to know of a filter that runs in another process."""

    def __init__(self, name: str, threshold: float):
        self.name, self.threshold = name, threshold


_worker_filter = None


def _start_worker(spec: str, threshold: float | None) -> None:
    global _worker_filter
    _worker_filter = make_filter(spec, threshold)


def _worker_info() -> tuple[str, float]:
    return _worker_filter.name, _worker_filter.threshold


def _worker_check(texts: list[str]) -> list[float]:
    return _worker_filter(texts)

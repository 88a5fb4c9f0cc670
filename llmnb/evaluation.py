"""How good is a model: perplexity, scores with their intervals, paired comparisons and contamination, in one place.

    ppl = perplexity(model, windows)                  # exp(mean next-token loss) over rows of token ids
    low, high = wilson_interval(right, n)             # a score's 95 % interval
    diff, low, high, p = paired_difference(a, b)      # two models on the same items: the interval and McNemar's p
    share = contaminated(items, training_texts)       # items sharing a 13-gram with what a model was trained on

Task scores themselves come from EleutherAI's lm-evaluation-harness (`llmnb.report_card`); this module keeps the
arithmetic every notebook needs around them. The n-grams are the harness's own (`lm_eval.decontamination.janitor`'s
normalisation: lower case, punctuation out), the 13 words GPT-3's paper used.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from .model import token_logprobs

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95 % interval
NGRAM = 13


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token loss) over rows of token ids (every row the same length); any model `token_logprobs` takes."""
    total = [token_logprobs(model, windows[i:i + batch_size]).double().sum() for i in range(0, len(windows), batch_size)]
    return float(torch.exp(-torch.stack(total).sum() / (windows.shape[0] * (windows.shape[1] - 1))))


def wilson_interval(right: int, n: int) -> tuple[float, float]:
    """The 95 % Wilson score interval of a share right / n (sound near 0 and 1, where the normal one leaves [0, 1])."""
    if n <= 0:
        raise ValueError(f"an interval needs at least one item, got n={n}")
    if not 0 <= right <= n:
        raise ValueError(f"right must be between 0 and n={n}, got {right}")
    p = right / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return centre - half, centre + half


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float, float]:
    """mean(b) - mean(a) over the same items, its 95 % interval (normal, on the per-item differences) and, for 0/1
    scores, McNemar's exact two-sided p-value (only the items the two disagree on carry information)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need the same non-zero number of items, got {len(a)} and {len(b)}")
    diffs = [y - x for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    half = Z95 * sd / math.sqrt(n)
    gained = sum(1 for d in diffs if d > 0)
    lost = sum(1 for d in diffs if d < 0)
    return mean, mean - half, mean + half, mcnemar_p(gained, lost)


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact McNemar test: under "no difference" each disagreement goes either way with probability 1/2."""
    k, n = min(gained, lost), gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@functools.cache
def _janitor():
    from lm_eval.decontamination.janitor import Janitor  # the notebooks extra: only where contamination is measured

    return Janitor()


def words(text: str) -> list[str]:
    """The harness's normalisation (lower case, punctuation removed), split into words."""
    return _janitor().normalize_string(text).split()


def ngram_set(texts: Iterable[str], n: int = NGRAM) -> set[int]:
    """Hashes of every n-word sequence of `texts` (a training set's fingerprint)."""
    out: set[int] = set()
    for text in texts:
        w = words(text)
        out.update(hash(tuple(w[i:i + n])) for i in range(len(w) - n + 1))
    return out


def contaminated(items: Sequence[str], training: Iterable[str], n: int = NGRAM) -> list[bool]:
    """For each item: does it share an n-gram with the training texts? An item shorter than n words counts when the
    whole item occurs in them (GPT-3's rule for short items), so a copied arithmetic problem is found too."""
    item_words = [words(t) for t in items]
    lengths = {min(n, len(w)) for w in item_words if w}
    training = list(training)
    seen = {k: ngram_set(training, k) for k in lengths}
    flags = []
    for w in item_words:
        k = min(n, len(w))
        flags.append(bool(w) and any(hash(tuple(w[i:i + k])) in seen[k] for i in range(len(w) - k + 1)))
    return flags

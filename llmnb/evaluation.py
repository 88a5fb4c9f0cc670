"""How good is a model, and how sure is that: the collection's one place for scores, intervals and contamination.

    ppl = perplexity(model, windows)                  # exp(mean next-token loss) over rows of token ids
    replies = answers(model, tokenizer, prompts, system)   # greedy replies through the chat template
    score, replies = accuracy(model, tokenizer, examples)  # share whose last number is the answer
    nll = response_nll(model, rendered)               # the loss on held-out replies (nats per token)
    low, high = wilson_interval(right, n)             # a score's 95 % interval
    diff, low, high, p = paired_difference(a, b)      # two models on the same items: the interval and McNemar's p
    share = contaminated(items, training_texts)       # items sharing a 13-gram with what a model was trained on

Notebooks 04-06 score their models with these; notebook 08's report card scores every model with EleutherAI's
lm-evaluation-harness (`llmnb.report_card`) and reads its results with the intervals here. The n-grams are GPT-3's
paper's: 13 words, lower case, punctuation out (as lm-eval's decontamination tools), arithmetic operators kept.
"""
from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from .data import pad_rows
from .generate import generate
from .model import GPT, token_logprobs
from .sft import Example, prompt_ids

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95 % interval
NGRAM = 13


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token loss) over rows of token ids (every row the same length)."""
    total = [token_logprobs(model, windows[i:i + batch_size]).double().sum() for i in range(0, len(windows), batch_size)]
    return float(torch.exp(-torch.stack(total).sum() / (windows.shape[0] * (windows.shape[1] - 1))))


@torch.no_grad()
def answers(model, tokenizer, prompts: list[str], system: str = "", max_new_tokens: int = 16, batch_size: int = 32) -> list[str]:
    """Greedy replies, left-padded batches; `model` is llmnb's GPT or a `transformers` causal LM (peft, 4-bit...)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_rows([prompt_ids(tokenizer, p, system) for p in prompts[start:start + batch_size]], pad, "left")
        ids, mask = ids.to(device), mask.to(device)
        if isinstance(model, GPT):
            tokens = generate(model, ids, max_new_tokens, temperature=0, stop_tokens=[tokenizer.eos_token_id], attention_mask=mask)
        else:
            tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        out += tokenizer.batch_decode(tokens[:, ids.shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in out]


def last_number(text: str) -> str | None:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return numbers[-1] if numbers else None


def accuracy(model, tokenizer, examples: list[Example], max_new_tokens: int = 16) -> tuple[float, list[str]]:
    """Share of examples whose reply's last number is the exact answer (a chatty "8 - 3 = 5" counts), and the replies."""
    systems = {e.system for e in examples}
    if len(systems) != 1:
        raise ValueError(f"score examples of one system message at a time, got {sorted(systems)}")
    replies = answers(model, tokenizer, [e.prompt for e in examples], systems.pop(), max_new_tokens)
    right = graded(examples, replies)
    return sum(right) / len(right), replies


def graded(examples: list[Example], replies: list[str]) -> list[bool]:
    """Right or wrong, reply by reply: its last number is the exact answer."""
    return [last_number(r) == e.answer for r, e in zip(replies, examples, strict=True)]


@torch.no_grad()
def response_nll(model, rendered: list[tuple[list[int], list[int]]], pad_id: int = 0, batch_size: int = 16) -> float:
    """Mean negative log-likelihood (nats) of the response tokens given their prompts: exp() of it is their perplexity."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for start in range(0, len(rendered), batch_size):
        chunk = rendered[start:start + batch_size]
        ids, mask = pad_rows([p + r for p, r in chunk], pad_id)
        learn = torch.zeros(len(chunk), ids.shape[1] - 1, dtype=torch.bool)
        for i, (p, r) in enumerate(chunk):
            learn[i, len(p) - 1:len(p) + len(r) - 1] = True  # position t predicts token t + 1
        logprobs = token_logprobs(model, ids.to(device), mask.to(device)).cpu()
        total -= logprobs[learn].sum().item()
        count += int(learn.sum())
    model.train(was_training)
    return total / count



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


# GPT-3's normalisation (lm-eval's decontamination Janitor: lower case, punctuation deleted), except that arithmetic's
# operators are kept: deleting them would make "91 - 50" and "91 + 50" the same item.
_NORMALISE = str.maketrans(string.ascii_uppercase, string.ascii_lowercase, "".join(c for c in string.punctuation if c not in "+-*/="))


def words(text: str) -> list[str]:
    """`text` lower-cased, punctuation but arithmetic operators removed, split into words."""
    return text.translate(_NORMALISE).split()


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

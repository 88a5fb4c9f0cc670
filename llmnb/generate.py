"""Sampling from llmnb's GPT: a KV cache, batches of left-padded prompts, streaming, and log-probabilities.

Apart from the model, as in nanochat's `engine.py`: the model computes logits for the
tokens it is given; this module decides which token comes next and keeps the cache.

    tokens = generate(model, prompt, 32, temperature=0)             # (batch, prompt + 32)
    tokens = generate(model, prompt, 8, samples=4)                  # (batch x 4, prompt + 8): one prefill per prompt
    tokens, logprobs = generate(model, prompt, 32, return_logprobs=True)
    for token, logprob in generate_stream(model, prompt, 32): ...   # (batch,) each step

The log-probability of a sampled token is the model's own, log softmax(logits) at
temperature 1 before top-k/top-p: what `model.token_logprobs` gives for the same text,
and what RLHF's ratios and KL penalties need.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .model import GPT, KVCache


@torch.no_grad()
def generate_stream(model: GPT, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, repetition_penalty: float = 1.0, stop_tokens: list[int] | None = None,
                    attention_mask: torch.Tensor | None = None, seed: int | None = None, samples: int = 1,
                    use_cache: bool = True, share_prefix: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next token, its log-probability) of every row, each (batch x samples,), as they are produced.

    temperature 0 is greedy. Rows that produced a stop token keep yielding it, with
    log-probability 0. Prompts of different lengths are left-padded, with `attention_mask`
    marking real tokens. `samples` continuations of each prompt (rows i*samples ... consecutive,
    as transformers' num_return_sequences) share one prefill: the prompt is read once, its
    keys and values copied to its samples; see `prefill` for what all the prompts share
    (`share_prefix=False`: each row reads its whole prompt, as before; benchmarks/align.py compares).
    """
    check_generation_args(idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, model.config.block_size)
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer (continuations per prompt), got {samples!r}")
    if max_new_tokens == 0:
        return
    b, t = idx.shape
    generator = torch.Generator(device=idx.device).manual_seed(seed) if seed is not None else None
    stops = torch.tensor(stop_tokens or [], device=idx.device, dtype=torch.long)
    done = torch.zeros(b * samples, dtype=torch.bool, device=idx.device)
    mask = attention_mask.clone().long() if attention_mask is not None else None  # None: no padding, the causal fast path
    was_training = model.training
    model.eval()
    try:
        compiled = compiled_step(model) if use_cache else None
        if use_cache:
            max_len = compiled.cache_length(t + max_new_tokens) if compiled is not None else t + max_new_tokens
            hidden, cache, mask = prefill(model, idx, mask, max_len, share_prefix)  # (B, C)
        else:
            hidden, cache = model.hidden_states(idx, attention_mask=mask)[:, -1], None
        if samples > 1:
            hidden, idx = hidden.repeat_interleave(samples, dim=0), idx.repeat_interleave(samples, dim=0)
            mask = mask.repeat_interleave(samples, dim=0) if mask is not None else None
            cache = cache.repeat_interleave(samples) if cache is not None else None
        logits = model.lm_head(hidden).float()  # (B, vocab): only the last position's logits are needed
        seq = idx
        for step in range(max_new_tokens):
            next_token = sample(logits, seq, temperature, top_k, top_p, repetition_penalty, generator)
            logprob = logits.log_softmax(-1).gather(1, next_token[:, None]).squeeze(1)
            if stops.numel():
                next_token = torch.where(done, stops[0], next_token)
                logprob = logprob.masked_fill(done, 0.0)
                done |= torch.isin(next_token, stops)
            seq = torch.cat([seq, next_token[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones(len(seq), 1, dtype=mask.dtype, device=mask.device)], dim=1)
            yield next_token, logprob
            if step + 1 == max_new_tokens or (stops.numel() and bool(done.all())):
                return
            if compiled is not None:
                logits = compiled(next_token[:, None], mask, cache)
            else:
                step_input = next_token[:, None] if cache is not None else seq
                logits = model.lm_head(model.hidden_states(step_input, attention_mask=mask, cache=cache)[:, -1]).float()
    finally:
        model.train(was_training)


def compiled_step(model: GPT) -> Callable | None:
    """The compiled decoding step `llmnb.decoding.prepare(model, compile=True)` attached, if any."""
    prepared = getattr(model, "decoding", None)
    return getattr(prepared, "step", None)


def prefill(model: GPT, idx: torch.Tensor, mask: torch.Tensor | None, max_len: int,
            share_prefix: bool = True) -> tuple[torch.Tensor, KVCache, torch.Tensor | None]:
    """Read the prompts into a new KV cache of `max_len`: the last position's hidden state (B, C), the cache, the mask.

    Tokens every prompt starts with (a system message and the chat template's opening: half of
    an arithmetic prompt) are read once and their keys and values copied to each row; the rest
    of each row follows them, its padding moved after the shared part. Positions come from the
    mask, so every real token keeps its position and the result is the same as reading each row.
    """
    b, t = idx.shape
    shared = common_prefix(idx, mask) if b > 1 and share_prefix else 0
    if shared == 0:
        cache = KVCache(model.config, b, max_len, idx.device, model.norm_f.weight.dtype)
        return model.hidden_states(idx, attention_mask=mask, cache=cache)[:, -1], cache, mask
    first = t - (mask.sum(1) if mask is not None else torch.full((b,), t, device=idx.device))  # (B,): where real tokens start
    cache = KVCache(model.config, 1, max_len, idx.device, model.norm_f.weight.dtype)
    model.hidden_states(idx[:1, int(first[0]):int(first[0]) + shared], cache=cache)
    cache = cache.repeat_interleave(b)
    columns = torch.arange(t - shared, device=idx.device)[None]  # each row without its shared tokens, padding kept in front
    source = torch.where(columns < first[:, None], columns, columns + shared)  # (B, t - shared)
    rest = idx.gather(1, source)
    if mask is not None:
        mask = torch.cat([torch.ones(b, shared, dtype=mask.dtype, device=mask.device), mask.gather(1, source)], dim=1)
    return model.hidden_states(rest, attention_mask=mask, cache=cache)[:, -1], cache, mask


def common_prefix(idx: torch.Tensor, mask: torch.Tensor | None) -> int:
    """How many leading real tokens every left-padded row shares (each row keeps at least one of its own)."""
    rows = [row[m.bool()] for row, m in zip(idx, mask)] if mask is not None else list(idx)
    limit = min(len(r) for r in rows) - 1
    same = torch.stack([r[:limit] for r in rows]).eq(rows[0][:limit]).all(0)  # (limit,)
    return int(same.long().cumprod(0).sum())


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, *, return_logprobs: bool = False,
             on_token: Callable[[torch.Tensor], None] | None = None, **options) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The prompt followed by up to `max_new_tokens` new tokens (and, if asked, their log-probabilities, (batch, new)).

    Options as `generate_stream`; `on_token` sees each step's tokens as they come.
    """
    tokens, logprobs = [], []
    for token, logprob in generate_stream(model, idx, max_new_tokens, **options):
        tokens.append(token)
        logprobs.append(logprob)
        if on_token is not None:
            on_token(token)
    prompts = idx.repeat_interleave(options.get("samples", 1), dim=0)  # a row per sample
    out = torch.cat([prompts, torch.stack(tokens, dim=1)], dim=1) if tokens else prompts
    if not return_logprobs:
        return out
    return out, torch.stack(logprobs, dim=1) if logprobs else prompts.new_zeros(prompts.shape[0], 0, dtype=torch.float)


def check_generation_args(idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, block_size) -> None:
    """Refuse impossible generation settings before any work, saying which one and what is allowed."""
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"the prompt must be a (batch, length) tensor with at least one token, got shape {tuple(idx.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if idx.shape[1] + max_new_tokens > block_size:
        raise ValueError(f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the context of {block_size} tokens: shorten one of them")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 is none), got {repetition_penalty}")


def sample(logits: torch.Tensor, seq: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           repetition_penalty: float, generator: torch.Generator | None) -> torch.Tensor:
    """The next token (batch,) from last-position logits (batch, vocab), in Hugging Face's order: penalty, temperature, top-k, top-p."""
    if repetition_penalty != 1.0:
        seen = logits.gather(1, seq)
        logits = logits.scatter(1, seq, torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty))
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    # Inverse-CDF sampling: one uniform number per row against the cumulative probabilities. torch.multinomial draws an
    # exponential number per vocabulary entry (~1.7 ms a row at 49k tokens on 2 cores: 15% of a served decoding step).
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # (B, vocab)
    u = 1.0 - torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device)  # (0, 1]: never lands on a 0-probability token
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp(max=cdf.shape[-1] - 1).squeeze(1)

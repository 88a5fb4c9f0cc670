"""A GPT in one readable file, in GPT-2 and Llama flavours, with a KV cache and a Hugging Face bridge.

In the spirit of nanoGPT's `model.py`: a `GPTConfig` dataclass and a `GPT` module that
covers both families by configuration.

- GPT-2: learned positions, LayerNorm, GELU MLP (4x wide), biases, tied embeddings.
- Llama: rotary positions (RoPE) with a configurable base, RMSNorm, SwiGLU MLP,
  grouped-query attention, tied or untied output head.

Attention runs through `F.scaled_dot_product_attention`, or through the plain-math
path (`attention="math"`) used to teach and to test. `to_hf` / `from_hf` move weights
to and from `GPT2LMHeadModel` / `LlamaForCausalLM` with identical logits.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import budget

FLAVOURS = ("gpt2", "llama")


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # the longest context the model accepts
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # grouped-query attention; None means n_head
    d_ff: int | None = None  # MLP width; None means 4 * n_embd
    flavour: str = "gpt2"
    bias: bool = True
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dropout: float = 0.0
    attention: str = "sdpa"  # "sdpa" (fused kernel) or "math" (spelled out)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if self.flavour not in FLAVOURS:
            raise ValueError(f"unknown flavour {self.flavour!r}: choose one of {FLAVOURS}")
        if self.attention not in ("sdpa", "math"):
            raise ValueError(f"unknown attention {self.attention!r}: choose 'sdpa' or 'math'")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.d_ff = self.d_ff or 4 * self.n_embd
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}: change one of them")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} for grouped-query attention")
        if self.flavour == "llama" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size; n_embd / n_head = {self.head_dim}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def gpt2(cls, **overrides) -> GPTConfig:
        """GPT-2 small (124M) unless overridden."""
        return cls(**{"flavour": "gpt2", "bias": True, "tie_embeddings": True, **overrides})

    @classmethod
    def llama(cls, **overrides) -> GPTConfig:
        """A Llama-style model: no biases, RMSNorm, SwiGLU, RoPE."""
        defaults = {"flavour": "llama", "bias": False, "tie_embeddings": False, "norm_eps": 1e-5}
        config = cls(**{**defaults, **overrides})
        if "d_ff" not in overrides:  # SwiGLU keeps the MLP's parameters at ~8d^2: width 8/3 d, rounded up to 64
            config.d_ff = 64 * math.ceil(8 * config.n_embd / 3 / 64)
        return config

    def shape(self) -> budget.ModelShape:
        """The same sizes as `llmnb.budget` sees them (notebook 00's calculator)."""
        return budget.ModelShape(
            "llmnb-gpt", self.n_layer, self.n_embd, self.n_head, self.n_kv_head, self.d_ff, self.vocab_size,
            gated_mlp=self.flavour == "llama", bias=self.bias, tied_embeddings=self.tie_embeddings,
            learned_positions=self.block_size if self.flavour == "gpt2" else 0,
        )


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 as Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_tables(head_dim: int, length: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles, shape (length, head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of x by each position's angle (the Hugging Face layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to `max_len`."""

    def __init__(self, config: GPTConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, config.n_kv_head, max_len, config.head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # tokens stored; advanced by GPT.forward after all layers ran

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.keys[layer].shape[2]:
            raise ValueError(f"KV cache holds {self.keys[layer].shape[2]} tokens; {end} asked for")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def attention_math(q, k, v, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v, spelled out; `mask` is boolean, True = may attend."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        t_q, t_k = q.shape[-2], k.shape[-2]
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        kv_dim = config.n_kv_head * config.head_dim
        self.qkv = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, rope, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        c = self.config
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([c.n_embd, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim], dim=-1)
        q = q.view(b, t, c.n_head, c.head_dim).transpose(1, 2)
        k = k.view(b, t, c.n_kv_head, c.head_dim).transpose(1, 2)
        v = v.view(b, t, c.n_kv_head, c.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if c.n_kv_head != c.n_head:  # each group of query heads shares one key/value head
            k = k.repeat_interleave(c.n_head // c.n_kv_head, dim=1)
            v = v.repeat_interleave(c.n_head // c.n_kv_head, dim=1)
        causal = mask is None and t > 1
        if c.attention == "math":
            y = attention_math(q, k, v, mask, causal)
        else:
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, c.n_embd))


class MLP(nn.Module):
    """GPT-2: down(gelu(up(x))). Llama (SwiGLU): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gated = config.flavour == "llama"
        self.up = nn.Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.gate = nn.Linear(config.n_embd, config.d_ff, bias=config.bias) if self.gated else None
        self.down = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        norm = (lambda: RMSNorm(config.n_embd, config.norm_eps)) if config.flavour == "llama" else (lambda: nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias))
        self.norm1, self.attn, self.norm2, self.mlp = norm(), CausalSelfAttention(config), norm(), MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, cache, layer) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, mask, cache, layer))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.flavour == "gpt2" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.n_embd, config.norm_eps) if config.flavour == "llama" else nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.flavour == "llama":
            cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (batch, time, vocab) and, with `targets`, the mean cross-entropy (ignore_index -100).

        `attention_mask` (batch, past + time; 1 = token, 0 = padding) supports left-padded
        batches; `cache` continues from the tokens it holds.
        """
        logits = self.lm_head(self.hidden_states(idx, attention_mask=attention_mask, position_ids=position_ids, cache=cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def hidden_states(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """The final normalised hidden states (batch, time, n_embd): everything but the output head."""
        b, t = idx.shape
        past = cache.length if cache is not None else 0
        if past + t > self.config.block_size:
            raise ValueError(f"sequence of {past + t} tokens exceeds the context of {self.config.block_size}")
        if attention_mask is None and past and t > 1:  # SDPA's is_causal aligns top-left; continuing needs a real mask
            attention_mask = torch.ones(b, past + t, dtype=torch.long, device=idx.device)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + t]
            else:
                position_ids = torch.arange(past, past + t, device=idx.device).unsqueeze(0)
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        else:
            rope = (self.rope_cos[position_ids].unsqueeze(1).to(x.dtype), self.rope_sin[position_ids].unsqueeze(1).to(x.dtype))
        mask = None if attention_mask is None else self._mask(attention_mask, past, t)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, cache, i)
        if cache is not None:
            cache.length += t
        return self.norm_f(x)

    @staticmethod
    def _mask(attention_mask: torch.Tensor, past: int, t: int) -> torch.Tensor:
        """(batch, 1, t, past + t) boolean: causal, no padded keys; each token may always see itself."""
        total = past + t
        causal = torch.ones(t, total, dtype=torch.bool, device=attention_mask.device).tril(past)
        keys = attention_mask[:, None, None, :total].bool()
        itself = torch.zeros(t, total, dtype=torch.bool, device=attention_mask.device)
        itself[torch.arange(t), torch.arange(past, total)] = True
        return (causal & keys) | itself

    # --- accounting (the same arithmetic as llmnb.budget) ------------------------------------

    def num_params(self, by_component: bool = False) -> int | dict[str, int]:
        """Unique parameters (tied weights once); by component: embeddings, attention, mlp, norms, head."""
        if not by_component:
            return sum(p.numel() for p in self.parameters())
        parts = {"embeddings": 0, "attention": 0, "mlp": 0, "norms": 0, "head": 0}
        seen = set()
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            part = ("embeddings" if name.startswith(("wte", "wpe")) else "attention" if ".attn." in name else "mlp" if ".mlp." in name
                    else "head" if name.startswith("lm_head") else "norms")
            parts[part] += p.numel()
        return parts

    def flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Forward FLOPs per token at context `seq_len` (3x that for a training step)."""
        forward = self.config.shape().flops_per_token(seq_len)
        return 3 * forward if training else forward

    def kv_cache_bytes_per_token(self, dtype: str = "fp32") -> float:
        return self.config.shape().kv_cache_bytes_per_token(dtype)

    # --- generation ----------------------------------------------------------------------------

    def for_decoding(self) -> GPT:
        """Store every block matrix as (in, out) in memory: same shapes, same values, returns self.

        Generating one token is a matrix-vector product per weight, bound by memory bandwidth;
        on CPUs this layout streams faster (benchmarks/generation.py measures it). It is
        the layout of GPT-2's original Conv1D weights.
        """
        with torch.no_grad():
            for module in self.blocks.modules():
                if isinstance(module, nn.Linear):
                    module.weight.data = module.weight.data.t().contiguous().t()
        return self

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, repetition_penalty: float = 1.0, stop_tokens: list[int] | None = None,
                        attention_mask: torch.Tensor | None = None, seed: int | None = None, use_cache: bool = True) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, (batch,), as it is produced.

        temperature 0 is greedy. Rows that produced a stop token keep yielding it. Prompts
        of different lengths are left-padded, with `attention_mask` marking real tokens.
        """
        _check_generation_args(idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, self.config.block_size)
        if max_new_tokens == 0:
            return
        b, t = idx.shape
        generator = None
        if seed is not None:
            generator = torch.Generator(device=idx.device).manual_seed(seed)
        stops = torch.tensor(stop_tokens or [], device=idx.device, dtype=torch.long)
        done = torch.zeros(b, dtype=torch.bool, device=idx.device)
        mask = attention_mask.clone().long() if attention_mask is not None else None  # None: no padding, the causal fast path
        seq = idx
        cache = KVCache(self.config, b, t + max_new_tokens, idx.device, self.wte.weight.dtype) if use_cache else None
        step_input = idx
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                if cache is not None:
                    hidden = self.hidden_states(step_input, attention_mask=mask, cache=cache)
                else:
                    hidden = self.hidden_states(seq, attention_mask=mask)
                logits = self.lm_head(hidden[:, -1, :]).float()  # only the last position's logits are needed
                next_token = _sample(logits, seq, temperature, top_k, top_p, repetition_penalty, generator)
                if stops.numel():
                    next_token = torch.where(done, stops[0], next_token)
                    done |= torch.isin(next_token, stops)
                seq = torch.cat([seq, next_token[:, None]], dim=1)
                if mask is not None:
                    mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=mask.device)], dim=1)
                step_input = next_token[:, None]
                yield next_token
                if stops.numel() and bool(done.all()):
                    return
        finally:
            self.train(was_training)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, on_token: Callable[[torch.Tensor], None] | None = None, **options) -> torch.Tensor:
        """The prompt followed by up to `max_new_tokens` new tokens; options as `generate_stream`."""
        new = []
        for token in self.generate_stream(idx, max_new_tokens, **options):
            new.append(token)
            if on_token is not None:
                on_token(token)
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx


def _check_generation_args(idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, block_size) -> None:
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


def _sample(logits, seq, temperature, top_k, top_p, repetition_penalty, generator) -> torch.Tensor:
    """The next token from last-position logits, in Hugging Face's order: penalty, temperature, top-k, top-p."""
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
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


# --- the Hugging Face bridge ------------------------------------------------------------------


def _hf_config(config: GPTConfig):
    if config.flavour == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
                          n_head=config.n_head, n_inner=config.d_ff, activation_function="gelu_new", layer_norm_epsilon=config.norm_eps,
                          resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout, tie_word_embeddings=True,
                          **_special_tokens(config))
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=config.vocab_size, max_position_embeddings=config.block_size, hidden_size=config.n_embd,
                       intermediate_size=config.d_ff, num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                       num_key_value_heads=config.n_kv_head, head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
                       rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, attention_bias=config.bias,
                       mlp_bias=config.bias, tie_word_embeddings=config.tie_embeddings, **_special_tokens(config))


def _special_tokens(config: GPTConfig) -> dict:
    """bos/eos ids for a Hugging Face config; None where unknown (GPT2Config would default to 50256)."""
    return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}


def _key_map(config: GPTConfig) -> dict[str, tuple[str, bool]]:
    """Our parameter name -> (Hugging Face name, transpose?). GPT-2's Conv1D stores (in, out)."""
    names: dict[str, tuple[str, bool]] = {}
    if config.flavour == "gpt2":
        names |= {"wte.weight": ("transformer.wte.weight", False), "wpe.weight": ("transformer.wpe.weight", False),
                  "norm_f.weight": ("transformer.ln_f.weight", False), "norm_f.bias": ("transformer.ln_f.bias", False)}
        for i in range(config.n_layer):
            h = f"transformer.h.{i}"
            for ours, theirs, transpose in [("norm1", "ln_1", False), ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
                                            ("norm2", "ln_2", False), ("mlp.up", "mlp.c_fc", True), ("mlp.down", "mlp.c_proj", True)]:
                names[f"blocks.{i}.{ours}.weight"] = (f"{h}.{theirs}.weight", transpose)
                names[f"blocks.{i}.{ours}.bias"] = (f"{h}.{theirs}.bias", False)
        return names
    names |= {"wte.weight": ("model.embed_tokens.weight", False), "norm_f.weight": ("model.norm.weight", False)}
    if not config.tie_embeddings:
        names["lm_head.weight"] = ("lm_head.weight", False)
    for i in range(config.n_layer):
        h = f"model.layers.{i}"
        for ours, theirs in [("norm1", "input_layernorm"), ("attn.proj", "self_attn.o_proj"), ("norm2", "post_attention_layernorm"),
                             ("mlp.up", "mlp.up_proj"), ("mlp.gate", "mlp.gate_proj"), ("mlp.down", "mlp.down_proj")]:
            names[f"blocks.{i}.{ours}.weight"] = (f"{h}.{theirs}.weight", False)
            if config.bias and ours != "norm1" and ours != "norm2":
                names[f"blocks.{i}.{ours}.bias"] = (f"{h}.{theirs}.bias", False)
    return names


def _qkv_names(i: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"]


def to_hf(model: GPT, path: str | Path | None = None, tokenizer=None):
    """A `GPT2LMHeadModel` / `LlamaForCausalLM` with our weights; saved (safetensors, config, tokenizer) when `path` is given."""
    from transformers import AutoModelForCausalLM

    config = model.config
    hf = AutoModelForCausalLM.from_config(_hf_config(config))
    ours = model.state_dict()
    theirs = {}
    for name, (hf_name, transpose) in _key_map(config).items():
        theirs[hf_name] = ours[name].t() if transpose else ours[name]
    if config.flavour == "llama":
        kv = config.n_kv_head * config.head_dim
        for i in range(config.n_layer):
            for part in ("weight", "bias") if config.bias else ("weight",):
                chunks = ours[f"blocks.{i}.attn.qkv.{part}"].split([config.n_embd, kv, kv], dim=0)
                theirs.update({f"{n}.{part}": c for n, c in zip(_qkv_names(i), chunks)})
    missing, unexpected = hf.load_state_dict({k: v.contiguous() for k, v in theirs.items()}, strict=False)
    missing = [m for m in missing if not (config.tie_embeddings and m == "lm_head.weight") and ".attn.bias" not in m and "masked_bias" not in m]
    if missing or unexpected:
        raise RuntimeError(f"weights did not map onto {type(hf).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_embeddings:
        hf.tie_weights()
    hf = hf.to(model.wte.weight.dtype).eval()
    if path is not None:
        hf.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    return hf


def from_hf(source, attention: str = "sdpa") -> GPT:
    """Our GPT with the weights of a Hugging Face GPT-2 or Llama model (a model object, a folder or a name in llmnb.models)."""
    if isinstance(source, (str, Path)):
        from transformers import AutoModelForCausalLM

        from .models import resolve_model

        source = AutoModelForCausalLM.from_pretrained(resolve_model(str(source)), dtype=torch.float32)
    hf_config = source.config
    common = dict(vocab_size=hf_config.vocab_size, n_layer=hf_config.num_hidden_layers, n_head=hf_config.num_attention_heads,
                  n_embd=hf_config.hidden_size, attention=attention, bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id)
    if hf_config.model_type == "gpt2":
        act = hf_config.activation_function
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 checkpoint uses activation {act!r}; llmnb's GPT-2 flavour implements the tanh GELU only")
        config = GPTConfig.gpt2(block_size=hf_config.n_positions, d_ff=hf_config.n_inner or 4 * hf_config.hidden_size,
                                norm_eps=hf_config.layer_norm_epsilon, **common)
    elif hf_config.model_type == "llama":
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        if head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
            raise ValueError("this Llama checkpoint's head_dim * heads differs from its width; llmnb's GPT does not support that layout")
        rope = getattr(hf_config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(hf_config, "rope_theta", 10000.0)}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"RoPE scaling {rope['rope_type']!r} is not implemented in llmnb's GPT; only the default rotation")
        config = GPTConfig.llama(block_size=hf_config.max_position_embeddings, n_kv_head=hf_config.num_key_value_heads,
                                 d_ff=hf_config.intermediate_size, norm_eps=hf_config.rms_norm_eps, rope_theta=rope["rope_theta"],
                                 bias=bool(hf_config.attention_bias), tie_embeddings=bool(hf_config.tie_word_embeddings), **common)
    else:
        raise ValueError(f"model type {hf_config.model_type!r} is not supported: llmnb's GPT loads 'gpt2' and 'llama' checkpoints")
    model = GPT(config)
    theirs = source.state_dict()
    ours = {}
    for name, (hf_name, transpose) in _key_map(config).items():
        ours[name] = theirs[hf_name].t() if transpose else theirs[hf_name]
    if config.flavour == "llama":
        for i in range(config.n_layer):
            for part in ("weight", "bias") if config.bias else ("weight",):
                ours[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([theirs[f"{n}.{part}"] for n in _qkv_names(i)], dim=0)
    if config.tie_embeddings:
        ours["lm_head.weight"] = ours["wte.weight"]
    model.load_state_dict({k: v.float() for k, v in ours.items()}, strict=True)
    return model.eval()

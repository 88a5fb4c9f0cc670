"""A GPT in one readable file, in GPT-2 and Llama flavours, with a KV cache and a Hugging Face bridge.

In the spirit of nanoGPT's `model.py`: a `GPTConfig` dataclass and a `GPT` module that
covers both families by configuration.

- GPT-2: learned positions, LayerNorm, GELU MLP (4x wide), biases, tied embeddings.
- Llama: rotary positions (RoPE) with a configurable base, RMSNorm, SwiGLU MLP,
  grouped-query attention, tied or untied output head.

Attention runs through `F.scaled_dot_product_attention`, or through the plain-math
path (`attention="math"`) used to teach and to test. `llmnb.hf_bridge` moves weights
to and from `GPT2LMHeadModel` / `LlamaForCausalLM` with identical logits.

Every matrix is its own `nn.Linear`, named as Llama names them (`q_proj`, `k_proj`,
`v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`), so that an adapter or a
quantized layer addresses the query and value projections separately, with the same
target names `peft` uses. GPT-2's fused `c_attn` matrix is split into q, k and v by the
bridge. For inference only, `llmnb.decoding` stacks q, k and v (and gate and up) into one
product each (`qkv`, `gate_up`): one multiplication instead of three runs faster at one token.
Sampling lives in `llmnb.generate`; `token_logprobs` scores given text.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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
    head_dim: int | None = None  # None means n_embd // n_head; a model whose heads were pruned keeps their size
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
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}: change one of them")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} for grouped-query attention")
        if self.flavour == "llama" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size; n_embd / n_head = {self.head_dim}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.flavour == "gpt2":  # what GPT2LMHeadModel can hold, so that every model exports
            fixed = {"bias": (self.bias, True), "tie_embeddings": (self.tie_embeddings, True), "n_kv_head": (self.n_kv_head, self.n_head),
                     "head_dim": (self.head_dim, self.n_embd // self.n_head)}
            wrong = {k: v for k, (v, need) in fixed.items() if v != need}
            if wrong:
                raise ValueError(f"the GPT-2 flavour has biases, tied embeddings and one key/value head per query head; "
                                 f"got {wrong}: use GPTConfig.llama(...) for a model without them")

    @property
    def attn_dim(self) -> int:
        """Width of the concatenated heads: n_embd, unless heads were pruned away (llmnb.prune)."""
        return self.n_head * self.head_dim

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

    @classmethod
    def from_dict(cls, values: dict) -> GPTConfig:
        """The config stored in a checkpoint (`dataclasses.asdict`), refusing names this version does not know."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}: the checkpoint was written by another llmnb version")
        return cls(**values)

    @classmethod
    def from_shape(cls, shape: budget.ModelShape, block_size: int = 1024, **overrides) -> GPTConfig:
        """A model with the sizes of one of `llmnb.budget`'s shapes (to measure what the calculator estimates)."""
        make = cls.llama if shape.gated_mlp else cls.gpt2
        extra = {"bias": shape.bias, "tie_embeddings": shape.tied_embeddings, "n_kv_head": shape.n_kv_head} if shape.gated_mlp else {}
        return make(vocab_size=shape.vocab_size, block_size=shape.learned_positions or block_size, n_layer=shape.n_layer,
                    n_head=shape.n_head, n_embd=shape.d_model, d_ff=shape.d_ff, **extra, **overrides)

    def shape(self) -> budget.ModelShape:
        """The same sizes as `llmnb.budget` sees them (notebook 00's calculator)."""
        return budget.ModelShape(
            "llmnb-gpt", self.n_layer, self.n_embd, self.n_head, self.n_kv_head, self.d_ff, self.vocab_size,
            gated_mlp=self.flavour == "llama", bias=self.bias, tied_embeddings=self.tie_embeddings,
            learned_positions=self.block_size if self.flavour == "gpt2" else 0, head_size=self.head_dim,
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


def _fp32_or_wider(x: torch.Tensor) -> torch.Tensor:
    """Losses are taken in fp32 when the model computes in bf16/fp16, and left in float64 when it computes in float64
    (parity tests compare multi-step training in float64, where an fp32 loss would put its rounding back in)."""
    return x if x.dtype == torch.float64 else x.float()


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
        # zeros, not empty: a compiled step attends over the whole buffer, and a masked NaN of stale memory still
        # poisons softmax(scores) @ values (0 * NaN)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # tokens stored; advanced by GPT.forward after all layers ran
        self.slot: torch.Tensor | None = None  # set by a compiled step (llmnb.decoding): where its one new token goes

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slot is not None:  # every shape fixed: write at a position held in a tensor, attend over the whole buffer (masked)
            self.keys[layer].index_copy_(2, self.slot, k)
            self.values[layer].index_copy_(2, self.slot, v)
            return self.keys[layer], self.values[layer]
        end = self.length + k.shape[2]
        if end > self.keys[layer].shape[2]:
            raise ValueError(f"KV cache holds {self.keys[layer].shape[2]} tokens; {end} asked for")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def repeat_interleave(self, n: int) -> KVCache:
        """A cache of batch x n rows, each row's keys and values copied n times: n samples continue one prefilled prompt."""
        out = copy.copy(self)
        out.keys = [k.repeat_interleave(n, dim=0) for k in self.keys]
        out.values = [v.repeat_interleave(n, dim=0) for v in self.values]
        return out


class PrefixCache:
    """Keys and values kept by concatenation instead of in a preallocated buffer, so gradients flow through them.

    RLHF scores a group of replies to one prompt: the prompt's keys and values are computed once
    (with gradients, when training) and shared by the group through `repeat_interleave`.
    """

    def __init__(self, n_layer: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0  # advanced by GPT.hidden_states, as KVCache's

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def repeat_interleave(self, n: int) -> PrefixCache:
        out = PrefixCache(len(self.keys))
        out.keys = [k.repeat_interleave(n, dim=0) for k in self.keys]
        out.values = [v.repeat_interleave(n, dim=0) for v in self.values]
        out.length = self.length
        return out


def attention_math(q, k, v, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v, spelled out; `mask` is boolean, True = may attend."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        t_q, t_k = q.shape[-2], k.shape[-2]
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def attention_one_query(q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query per row, decoding's case: q (B, nh, 1, hs) against keys and values (B, n_kv, L, hs),
    in fp32 (float64 stays float64), returned in q's dtype; `mask` (B, 1, 1, L) boolean, True = may attend (None: every key).

    The query heads that share a key/value head become the rows of one product, so the keys are never repeated
    per head. PyTorch's fused CPU kernel (flash attention) splits work by query blocks: with one query it took
    3 to 4 times as long in bf16 (SmolLM2's shapes, 100 to 500 cached tokens; issue 23), a third of a served step
    at 300 tokens."""
    b, nh, _, hs = q.shape
    n_kv = k.shape[1]
    grouped = _fp32_or_wider(q.reshape(b, n_kv, nh // n_kv, hs))  # (B, n_kv, group, hs): head h reads key/value head h // group
    scores = grouped @ _fp32_or_wider(k).transpose(-2, -1) / math.sqrt(hs)  # (B, n_kv, group, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    y = scores.softmax(dim=-1) @ _fp32_or_wider(v)  # (B, n_kv, group, hs)
    return y.reshape(b, nh, 1, hs).to(q.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) attention; q, k, v and the output are separate linear layers."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        kv_dim = config.n_kv_head * config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.attn_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, kv_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, kv_dim, bias=config.bias)
        self.o_proj = nn.Linear(config.attn_dim, config.n_embd, bias=config.bias)
        self.qkv: nn.Module | None = None  # q, k and v as one product: llmnb.decoding fuses them for inference
        self.dropout = config.dropout

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, T, width each): three products, or one where their weights were stacked (`qkv`)."""
        if self.qkv is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv_dim = self.config.n_kv_head * self.config.head_dim
        return self.qkv(x).split([self.config.attn_dim, kv_dim, kv_dim], dim=-1)

    def forward(self, x, rope, mask, cache: KVCache | PrefixCache | None, layer: int) -> torch.Tensor:
        c = self.config
        b, t, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(b, t, c.n_head, c.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(b, t, c.n_kv_head, c.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(b, t, c.n_kv_head, c.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv, past + T, hs)
        if t == 1 and c.attention == "sdpa" and not (self.training and self.dropout):  # decoding: one new token a row
            return self.o_proj(attention_one_query(q, k, v, mask).transpose(1, 2).reshape(b, t, c.attn_dim))
        if c.n_kv_head != c.n_head:  # each group of query heads shares one key/value head
            k = k.repeat_interleave(c.n_head // c.n_kv_head, dim=1)
            v = v.repeat_interleave(c.n_head // c.n_kv_head, dim=1)
        causal = True if mask is None and t > 1 else False  # a branch, not `t > 1`: traced with a symbolic t that is a SymBool, which SDPA refuses
        if c.attention == "math":
            y = attention_math(q, k, v, mask, causal)
        else:
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, c.attn_dim))  # (B, T, C)


class MLP(nn.Module):
    """GPT-2: down(gelu(up(x))). Llama (SwiGLU): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gated = config.flavour == "llama"
        self.up_proj = nn.Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.gate_proj = nn.Linear(config.n_embd, config.d_ff, bias=config.bias) if self.gated else None
        self.down_proj = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)
        self.gate_up: nn.Module | None = None  # gate and up as one product: llmnb.decoding fuses them for inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = (self.gate_proj(x), self.up_proj(x)) if self.gate_up is None else self.gate_up(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


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
        self.gradient_checkpointing = False  # recompute each block's activations in backward instead of keeping them
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith(("attn.o_proj.weight", "mlp.down_proj.weight")):
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
                position_ids: torch.Tensor | None = None, cache: KVCache | PrefixCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (batch, time, vocab) and, with `targets`, the mean cross-entropy (ignore_index -100).

        Where some targets are -100 (fine-tuning's prompt and padding), the output head runs
        only on the positions that have a target and `logits` is None: with a 49k vocabulary
        the head is a third of a small model's compute, and a chat prompt is most of a row.
        Under `torch.compile` the head runs on every position (the same loss): which positions
        have a target is known only on the device, and asking would split the graph in two and
        wait for the device every step (seen on an H200: benchmarks/README.md).
        `attention_mask` (batch, past + time; 1 = token, 0 = padding) supports left-padded
        batches, and a ready boolean mask (batch, 1, time, past + time) is used as given (rows of
        unequal lengths in one cache: llmnb.serve's scheduler); `cache` continues from the tokens it holds.
        """
        hidden = self.hidden_states(idx, attention_mask=attention_mask, position_ids=position_ids, cache=cache)  # (B, T, C)
        if targets is None:
            return self.lm_head(hidden), None
        learned = targets != -100
        if not torch.compiler.is_compiling() and not bool(learned.all()):
            loss = F.cross_entropy(_fp32_or_wider(self.lm_head(hidden[learned])), targets[learned])  # (N, vocab): learned positions only
            return None, loss
        logits = self.lm_head(hidden)
        return logits, F.cross_entropy(_fp32_or_wider(logits).view(-1, logits.size(-1)), targets.reshape(-1))

    def hidden_states(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      cache: KVCache | PrefixCache | None = None) -> torch.Tensor:
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
        if attention_mask is not None and attention_mask.dim() == 4:  # a ready mask (batch, 1, t, past + t): rows of unequal lengths
            mask = attention_mask.bool()
        else:
            mask = None if attention_mask is None else self._mask(attention_mask, past, t)
        x = self.layers(idx, position_ids, mask, cache)
        if cache is not None:
            cache.length += t
        return x

    def layers(self, idx: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
               cache: KVCache | PrefixCache | None) -> torch.Tensor:
        """Embeddings, every block and the final norm, given each token's position (B, T) and a ready boolean mask
        (None: causal). No Python decision depends on the cache's length: llmnb.decoding compiles this as one graph."""
        x = self.wte(idx).to(self.norm_f.weight.dtype)  # a quantized embedding gives fp32; the blocks compute in the model's dtype
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        else:
            rope = (self.rope_cos[position_ids].unsqueeze(1).to(x.dtype), self.rope_sin[position_ids].unsqueeze(1).to(x.dtype))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                x = checkpoint(block, x, rope, mask, cache, i, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, i)
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


# every nn.init function a module's constructor may call (nn.Linear, nn.Embedding, the norms, GPT's own init)
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Modules built inside keep their weights undrawn: a skeleton for `load_state_dict` to fill.

    Their tensors are `torch.empty`: reserved, never written, so not resident until loaded into. Why not the meta
    device: building a GPT on it runs PyTorch's Python reference ops (arange, normal_), which import torch._dynamo and
    sympy, about 70 MB that a server loading a quantized model then keeps resident. The nn.init functions are
    no-ops meanwhile, in every thread: build nothing else while this is open.
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in saved:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def swap_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` in place of `root`'s submodule `name` (a dotted path); returns the module it replaced.

    The one way a layer changes kind here: LoRA adapters, their merge, quantized layers, the references' layers.
    """
    parent, _, child = name.rpartition(".")
    holder = root.get_submodule(parent) if parent else root
    old = getattr(holder, child)
    setattr(holder, child, new)
    return old


def token_logprobs(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, :t]) for t = 1 .. T-1, shape (batch, T-1), in fp32; 0 where the target is padding.

    The base of the SFT loss, DPO, PPO and perplexity. `model` is llmnb's GPT or any
    `transformers` causal LM (the same call, `model(ids, attention_mask=...)`, serves
    both). Pad on the right: then positions, and so the two, agree token for token.
    """
    out = model(ids, attention_mask=attention_mask)
    logits = out.logits if hasattr(out, "logits") else out[0]  # (B, T, vocab)
    targets = ids[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
    # log_softmax(logits)[target] as a cross-entropy: no (B, T, vocab) log-probability tensor is kept
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    return -nll.view_as(targets)

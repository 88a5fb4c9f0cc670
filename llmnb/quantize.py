"""Smaller weights: int8, int4 and NF4, from scratch, as formats and as layers that compute with them.

    model, tokenizer = load("smollm2-135m-instruct")
    quantize_model(model, "int8")          # every linear layer in place; the model still generates
    save_quantized(model, tokenizer, folder)   # notebook 06 saves through llmnb.artifacts, which names the folder
    model, tokenizer = load_quantized(folder)

The schemes (one weight matrix W of shape (out, in)):
- `int8`: absmax per output row, W ~ scale[row] * q, q in [-127, 127]; matmul by PyTorch's
  int8 weight-only kernel (`_weight_int8pack_mm`, bf16 activations) on CPU.
- `int8-dynamic`: the same weights; each activation row is quantized to int8 on the fly
  too and the product runs in integers (`_int_mm`), as LLM.int8() without its outliers.
- `int4`: min-max per group of `group_size` inputs, W ~ scale * q + min, q in [0, 15];
  PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) does the matmul.
- `nf4`: QLoRA's NormalFloat, 16 levels at the quantiles of a normal distribution,
  absmax per block of 64 and the absmaxes themselves quantized to int8 in blocks of 256
  (double quantization); dequantized before each matmul (no CPU kernel computes in NF4).

The output head (and the embedding tied to it) is kept at int8 in every scheme, as
llama.cpp keeps its output matrix at 6 or 8 bits: it is a fifth of a small model and the
most sensitive matrix. Norms and GPT-2's position table stay fp32 (a few thousand numbers).
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .generate import generate
from .lora import adapters
from .model import GPT, GPTConfig, empty_weights, swap_module
from .paths import write_atomic
from .tokenizer import hf_tokenizer

NF4_BLOCK, ABSMAX_BLOCK = 64, 256  # QLoRA's block sizes: weights per absmax, absmaxes per second-level scale
QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"


# --- formats: one matrix at a time --------------------------------------------------------------


def absmax_quantize(w: torch.Tensor, dim: int | None = -1, bits: int = 8, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric: w ~ scale * q with q in [-(2^(b-1)-1), 2^(b-1)-1]; one scale per tensor (dim None) or along `dim`.

    `scale_dtype`: the scale is rounded to it (a kernel's bf16, say) before rounding w, so the error stays within half a step.
    """
    qmax = 2 ** (bits - 1) - 1
    absmax = w.abs().amax() if dim is None else w.abs().amax(dim=dim, keepdim=True)
    scale = absmax.clamp(min=1e-12) / qmax  # an all-zero row keeps a finite scale
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).float()
    return (w / scale).round().clamp(-qmax, qmax).to(torch.int8), scale


def zeropoint_quantize(w: torch.Tensor, dim: int | None = -1, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric: w ~ scale * (q - zero) with q in [0, 2^b - 1]; uses the whole range when w is not centred on 0."""
    qmax = 2**bits - 1
    lo = w.amin() if dim is None else w.amin(dim=dim, keepdim=True)
    hi = w.amax() if dim is None else w.amax(dim=dim, keepdim=True)
    scale = (hi - lo).clamp(min=1e-12) / qmax
    zero = (-lo / scale).round()
    q = (w / scale + zero).round().clamp(0, qmax)
    return q.to(torch.uint8 if bits <= 8 else torch.int32), scale, zero


def groups(w: torch.Tensor, group_size: int, name: str = "weight") -> torch.Tensor:
    """(out, in) -> (out, in / group_size, group_size); a width the group does not divide is refused, naming the layer."""
    out_features, in_features = w.shape
    if in_features % group_size:
        divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
        raise ValueError(f"{name}: group_size={group_size} does not divide its {in_features} inputs; "
                         f"use one of {divisors or 'no standard size: use int8 for this model'}")
    return w.reshape(out_features, in_features // group_size, group_size)


def int4_quantize(w: torch.Tensor, group_size: int = 64, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max int4 per group: (q in [0, 15] as uint8 (out, in), scale and minimum (out, in / group_size))."""
    g = groups(w.float(), group_size, name)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-12) / 15
    q = ((g - lo) / scale).round().clamp(0, 15).to(torch.uint8)
    return q.reshape(w.shape), scale.squeeze(-1), lo.squeeze(-1)


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int) -> torch.Tensor:
    g = groups(q.float(), group_size)
    return (g * scale[..., None] + minimum[..., None]).reshape(q.shape)


@functools.cache
def nf4_code() -> torch.Tensor:
    """The 16 NormalFloat levels (QLoRA, Dettmers et al. 2023, eq. 4): quantiles of N(0, 1), scaled to [-1, 1], with an exact 0.

    8 positive and 7 negative levels from evenly spaced probabilities between 1 - offset
    and 1/2, where offset = (1/(2*15) + 1/(2*16)) / 2 keeps the extreme quantile finite.
    Built at the first NF4 call and shared (read it, do not write to it); building it at import put PyTorch's
    distribution kernels in the memory of every process that imports this module, a server serving int8 too.
    """
    offset = 0.5 * (1 / 32 + 1 / 30)
    normal = torch.distributions.Normal(0.0, 1.0)
    positive = normal.icdf(torch.linspace(1 - offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(1 - offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (levels / levels.abs().max()).float()


def nf4_quantize(w: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The index of the nearest NF4 level of every weight (uint8, flattened) and the absmax of each block of `block` weights."""
    flat = w.float().reshape(-1)
    if flat.numel() % block:
        raise ValueError(f"NF4 needs a multiple of {block} weights, got {flat.numel()}: change block or keep this layer unquantized")
    blocks = flat.view(-1, block)
    absmax = blocks.abs().amax(-1).clamp(min=1e-12)
    normed = (blocks / absmax[:, None]).reshape(-1)
    levels = nf4_code()
    midpoints = (levels[1:] + levels[:-1]) / 2  # nearest level = how many midpoints lie below the value
    codes = torch.bucketize(normed, midpoints)
    return codes.to(torch.uint8), absmax


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, block: int = 64) -> torch.Tensor:
    return (nf4_code().to(absmax.device)[codes.long()].view(-1, block) * absmax[:, None]).reshape(shape)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (bitsandbytes' order)."""
    pairs = codes.reshape(-1, 2).to(torch.uint8)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)


def nf4_from_packed(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, block: int = NF4_BLOCK) -> torch.Tensor:
    """The weight rebuilt from NF4 codes two to a byte (ours or bitsandbytes' packing: the same order) and block absmaxes."""
    return nf4_dequantize(unpack_nibbles(packed.reshape(-1)), absmax, shape, block)


def double_quantize(absmax: torch.Tensor, block: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QLoRA's double quantization: the fp32 block absmaxes, centred on their mean, as int8 in blocks of `block`.

    Saves 32 - 8 - 32/block bits per NF4 block of 64 weights: 0.37 bits per weight.
    """
    mean = absmax.mean()
    centred = absmax - mean
    pad = (-centred.numel()) % block
    q, scale = absmax_quantize(F.pad(centred, (0, pad)).view(-1, block), dim=-1)
    return q.reshape(-1)[: absmax.numel()], scale.squeeze(-1), mean


def double_dequantize(q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, block: int = 256) -> torch.Tensor:
    pad = (-q.numel()) % block
    return (F.pad(q.float(), (0, pad)).view(-1, block) * scale[:, None]).reshape(-1)[: q.numel()] + mean


# --- layers that compute with quantized weights -------------------------------------------------


def _fast_cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not x.requires_grad


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored quantized; inference only (no gradients through the weight).

    One subclass per scheme (`QUANT_LINEAR`): each says what it stores (`_buffers_for`), how it fills that from a
    full-precision weight (`_store`), the fp32 weight it computes with (`dequantized_weight`) and, where PyTorch
    has a CPU kernel for its format, the fast product (`_kernel`); without one, the dequantized weight is used.
    """
    scheme = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 64):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self._buffers_for(out_features, in_features)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @staticmethod
    def create(scheme: str, in_features: int, out_features: int, bias: bool, group_size: int = 64) -> QuantLinear:
        """An empty layer of `scheme` (to load a state dict into)."""
        if scheme not in QUANT_LINEAR:
            raise ValueError(f"unknown scheme {scheme!r}: choose one of {SCHEMES}")
        return QUANT_LINEAR[scheme](in_features, out_features, bias, group_size)

    @staticmethod
    def from_linear(linear: nn.Linear, scheme: str, group_size: int = 64, name: str = "weight") -> QuantLinear:
        """`linear` quantized in `scheme`; `name` says which layer an error is about."""
        layer = QuantLinear.create(scheme, linear.in_features, linear.out_features, linear.bias is not None, group_size)
        with torch.no_grad():
            layer._store(linear.weight.detach().float().cpu(), name)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach().float())
        return layer

    def _buffers_for(self, n: int, k: int) -> None:
        raise NotImplementedError

    def _store(self, w: torch.Tensor, name: str) -> None:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight this layer computes with, (out, in)."""
        raise NotImplementedError

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor | None:
        return None  # no CPU kernel for this format: the dequantized weight is used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        y = self._kernel(x2) if _fast_cpu(x) else None
        y = F.linear(x2, self.dequantized_weight().to(x.dtype)) if y is None else y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, group_size={self.group_size}"


class Int8Linear(QuantLinear):
    """int8 weights, one scale per output row; the activations stay in bf16 (PyTorch's weight-only int8 kernel)."""
    scheme = "int8"

    def _buffers_for(self, n: int, k: int) -> None:
        self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8))
        self.register_buffer("scale", torch.zeros(n, dtype=torch.bfloat16))  # the kernel's dtype: no conversion per call

    def _store(self, w: torch.Tensor, name: str) -> None:
        q, scale = absmax_quantize(w, dim=-1, scale_dtype=torch.bfloat16)
        self.qweight.copy_(q)
        self.scale.copy_(scale.squeeze(-1))

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scale)


class Int8DynamicLinear(Int8Linear):
    """The same int8 weights; each token's activations quantized to int8 too, multiplied in integers (torch._int_mm)."""
    scheme = "int8-dynamic"

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        xq, xs = absmax_quantize(x2.float(), dim=-1)  # one scale per token
        return torch._int_mm(xq, self.qweight.t()).float() * xs * self.scale.float()


class Int4Linear(QuantLinear):
    """4-bit codes with a bf16 (scale, zero) pair per group of `group_size` inputs, in the CPU kernel's packed layout."""
    scheme = "int4"

    def _buffers_for(self, n: int, k: int) -> None:
        self.register_buffer("qweight", torch.zeros(n, k // 2, dtype=torch.uint8))  # two codes a byte
        self.register_buffer("scales_zeros", torch.zeros(k // self.group_size, n, 2, dtype=torch.bfloat16))

    def _store(self, w: torch.Tensor, name: str) -> None:
        q, scale, lo = int4_quantize(w, self.group_size, name)
        zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
        self.qweight.copy_(torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        self.scales_zeros.copy_(torch.stack([scale, zero], -1).transpose(0, 1).to(torch.bfloat16))

    def dequantized_weight(self) -> torch.Tensor:  # the packed layout is the kernel's own: read it back through the kernel
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.qweight.device)
        return torch._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group_size, self.scales_zeros).float().t()

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.qweight, self.group_size, self.scales_zeros)


class NF4Linear(QuantLinear):
    """QLoRA's NF4: 4-bit codes on the normal quantiles, one absmax per NF4_BLOCK weights, the absmaxes themselves
    quantized to int8 in blocks of ABSMAX_BLOCK (double quantization). No CPU kernel: dequantized, then multiplied."""
    scheme = "nf4"

    def _buffers_for(self, n: int, k: int) -> None:
        blocks = -(-n * k // NF4_BLOCK)
        self.register_buffer("qweight", torch.zeros(n * k // 2, dtype=torch.uint8))
        self.register_buffer("absmax_q", torch.zeros(blocks, dtype=torch.int8))
        self.register_buffer("absmax_scale", torch.zeros(-(-blocks // ABSMAX_BLOCK)))
        self.register_buffer("absmax_mean", torch.zeros(()))

    def _store(self, w: torch.Tensor, name: str) -> None:
        codes, absmax = nf4_quantize(w, NF4_BLOCK)
        self.qweight.copy_(pack_nibbles(codes))
        q, scale, mean = double_quantize(absmax, ABSMAX_BLOCK)
        self.absmax_q.copy_(q)
        self.absmax_scale.copy_(scale)
        self.absmax_mean.copy_(mean)

    def dequantized_weight(self) -> torch.Tensor:
        absmax = double_dequantize(self.absmax_q, self.absmax_scale, self.absmax_mean, ABSMAX_BLOCK)
        return nf4_from_packed(self.qweight, absmax, torch.Size((self.out_features, self.in_features)))


QUANT_LINEAR: dict[str, type[QuantLinear]] = {cls.scheme: cls for cls in (Int8Linear, Int8DynamicLinear, Int4Linear, NF4Linear)}
SCHEMES = tuple(QUANT_LINEAR)  # "int8", "int8-dynamic", "int4", "nf4"


class QuantEmbedding(nn.Module):
    """Token embeddings read from an int8 matrix: its own, or (tied weights) the output head's, stored once."""

    def __init__(self, head: QuantLinear | None = None, num: int = 0, dim: int = 0):
        super().__init__()
        self._head = [head] if head is not None else []  # a list: the head's buffers must not be saved twice
        if head is None:
            self.register_buffer("qweight", torch.zeros(num, dim, dtype=torch.int8))
            self.register_buffer("scale", torch.zeros(num, dtype=torch.bfloat16))

    def _source(self) -> nn.Module:
        return self._head[0] if self._head else self

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        source = self._source()
        return F.embedding(idx, source.qweight).float() * source.scale[idx].float()[..., None]


# --- whole models --------------------------------------------------------------------------------


def _quantizable(model: GPT) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.blocks.named_modules() if isinstance(m, nn.Linear)]


def quantize_model(model: GPT, scheme: str, group_size: int = 64) -> GPT:
    """Replace every linear layer of the blocks by a `QuantLinear` in `scheme`, and the head and embedding by int8; in place."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}: choose one of {SCHEMES}")
    if not isinstance(model, GPT):
        raise TypeError(f"quantize_model takes llmnb's GPT (llmnb.checkpoint.load gives one), got {type(model).__name__}")
    if adapters(model):
        raise ValueError("the model carries LoRA adapters: merge them first (llmnb.lora.merge_and_unload), then quantize")
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is already quantized ({model.quantization['scheme']}): load the full-precision model again")
    for name, linear in _quantizable(model):
        if scheme == "int4":
            groups(linear.weight, group_size, f"blocks.{name}")  # check every layer before changing any
    model.to("cpu")
    for name, linear in _quantizable(model):
        swap_module(model.blocks, name, QuantLinear.from_linear(linear, scheme, group_size, f"blocks.{name}"))
    tied = model.config.tie_embeddings
    model.lm_head = QuantLinear.from_linear(model.lm_head, "int8")
    if tied:
        model.wte = QuantEmbedding(model.lm_head)
    else:
        embedding = QuantLinear.from_linear(_as_linear(model.wte.weight), "int8")
        model.wte = QuantEmbedding(num=model.config.vocab_size, dim=model.config.n_embd)
        model.wte.qweight.copy_(embedding.qweight)
        model.wte.scale.copy_(embedding.scale)
    model.quantization = {"scheme": scheme, "group_size": group_size}
    return model.eval()


def _as_linear(weight: torch.Tensor) -> nn.Linear:
    with empty_weights():
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return linear


def _empty_quantized(config: GPTConfig, scheme: str, group_size: int) -> GPT:
    """A quantized GPT of `config` with empty buffers, to load a state dict into (nothing quantized twice)."""
    with empty_weights():  # nothing drawn, and the full-precision matrices replaced below are never written
        model = GPT(config)
        for name, linear in _quantizable(model):
            swap_module(model.blocks, name, QuantLinear.create(scheme, linear.in_features, linear.out_features, linear.bias is not None, group_size))
        model.lm_head = QuantLinear.create("int8", config.n_embd, config.vocab_size, False)
        model.wte = QuantEmbedding(model.lm_head) if config.tie_embeddings else QuantEmbedding(num=config.vocab_size, dim=config.n_embd)
    model.quantization = {"scheme": scheme, "group_size": group_size}
    return model


def save_quantized(model: GPT, tokenizer, folder: str | Path) -> Path:
    """Weights (safetensors), `quantization.json` (scheme, group size, the GPTConfig) and the tokenizer, written atomically."""
    if not getattr(model, "quantization", None):
        raise ValueError("the model is not quantized: call quantize_model(model, scheme) first")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_file(state, tmp / WEIGHTS_FILE)
        meta = {**model.quantization, "layout": "torch-cpu", "config": asdict(model.config)}
        (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=1))
        tokenizer.save_pretrained(tmp)

    return write_atomic(folder, write)


def load_quantized(folder: str | Path, scheme: str | None = None, light_tokenizer: bool = False) -> tuple[GPT, object]:
    """(quantized GPT, tokenizer) from a `save_quantized` folder; `scheme`, when given, must be the one stored;
    `light_tokenizer`: see `tokenizer.hf_tokenizer`."""
    folder = Path(folder)
    meta_file = folder / QUANT_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{folder} holds no {QUANT_FILE}: it is not a quantized llmnb model (write one with save_quantized)")
    meta = json.loads(meta_file.read_text())
    if scheme is not None and scheme != meta["scheme"]:
        raise ValueError(f"{folder} holds {meta['scheme']} weights, not {scheme}: load it with scheme={meta['scheme']!r} (or None), "
                         f"or quantize the full-precision model to {scheme}")
    model = _empty_quantized(GPTConfig.from_dict(meta["config"]), meta["scheme"], meta["group_size"])
    model.load_state_dict(load_file(folder / WEIGHTS_FILE), strict=True)
    return model.eval(), hf_tokenizer(folder, light_tokenizer)


# --- measuring a scheme, and the libraries people use, on the same model ------------------------------


def model_bytes(model: nn.Module) -> int:
    """Bytes a model's weights take in memory, for ours (packed for decoding too), bitsandbytes' and torchao's layers alike
    (each storage counted once)."""
    seen, total = set(), 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None:
            return
        key = id(t) if t.is_mkldnn else t.data_ptr()  # oneDNN's packed weights have no storage to share
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for t in list(model.parameters()) + [b for _, b in model.named_buffers()]:
        if hasattr(t, "qdata"):  # torchao's quantized tensor: int8 data and its scales
            add(t.qdata)
            add(t.scale)
            continue
        add(t)
        state = getattr(t, "quant_state", None)  # bitsandbytes' 4-bit weight keeps its block scales apart
        if state is not None:
            add(state.absmax)
            if getattr(state, "state2", None) is not None:
                add(state.state2.absmax)
        add(getattr(t, "SCB", None))  # bitsandbytes' int8 row scales
    return total


# bitsandbytes' 4-bit layers take one of two CPU paths at inference (eval mode, no gradients): on a processor with
# AVX-512 BF16 they repack the weight once into a layout of row blocks of 32 and compute in bf16 with a fused kernel;
# elsewhere (and in training) they dequantize to the compute dtype and call F.linear. The packed layout needs the layer's
# inputs to be whole quantization blocks and its outputs whole row blocks: narrower layers crash in bitsandbytes 0.50
# ("shape '[32, 0]' is invalid"), so they are kept on the generic path.
BNB_BLOCK, BNB_PACKED_ROWS = 64, 32
BNB_PATHS = {True: "packed bf16 kernel (AVX-512 BF16)", False: "dequantize, then fp32 matmul"}


def bnb_packed_fits(in_features: int, out_features: int) -> bool:
    """Whether bitsandbytes' packed CPU layout can hold a layer of this shape."""
    return in_features % BNB_BLOCK == 0 and out_features % BNB_PACKED_ROWS == 0


def bnb_cpu_paths(model: nn.Module) -> dict[str, int]:
    """How many of a model's bitsandbytes 4-bit layers take each CPU inference path ({} if it has none)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            path = BNB_PATHS[bool(module.support_avx512bf16_for_cpu)]
            counts[path] = counts.get(path, 0) + 1
    return counts


def reference_model(model: GPT, library: str, bnb_packed: bool | None = None) -> GPT:
    """A copy of `model` whose blocks' linear layers are a library's: "bnb-int8" (LLM.int8), "bnb-nf4", "bnb-fp4", "torchao-int8".

    As `transformers` does with these libraries, the embedding and output head stay full precision. `bnb_packed` picks
    bitsandbytes' 4-bit CPU path: None lets it choose (packed where the processor and the layer's shape allow), False
    forces the generic path on any processor, True insists on the packed one and says why it cannot be had.
    """
    out = copy.deepcopy(model).cpu().eval()
    if library == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(out.blocks, Int8WeightOnlyConfig())
        return out

    import bitsandbytes as bnb

    # LLM.int8 casts fp32 inputs to fp16 and says so on every call
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(lambda record: "inputs will be cast" not in record.getMessage())
    for name, linear in _quantizable(out):
        w = linear.weight.detach().clone()
        if library == "bnb-int8":
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        elif library in ("bnb-nf4", "bnb-fp4"):
            kind = library.split("-")[1]
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None, quant_type=kind, compute_dtype=torch.float32)
            layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=kind, blocksize=BNB_BLOCK)
            layer.support_avx512bf16_for_cpu = _bnb_packed(layer, f"blocks.{name}", bnb_packed)
        else:
            raise ValueError(f"unknown reference {library!r}: choose bnb-int8, bnb-nf4, bnb-fp4 or torchao-int8")
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        swap_module(out.blocks, name, layer.to("cpu"))  # .to() is where bitsandbytes quantizes
    return out.eval()  # the new layers too: bitsandbytes picks its 4-bit CPU path by the layer's mode


def _bnb_packed(layer: nn.Module, name: str, wanted: bool | None) -> bool:
    cpu_has_it = bool(layer.support_avx512bf16_for_cpu)  # bitsandbytes asks its native library about this processor
    fits = bnb_packed_fits(layer.in_features, layer.out_features)
    if wanted and not (cpu_has_it and fits):
        why = "this processor has no AVX-512 BF16" if not cpu_has_it else \
            f"{name} is {layer.in_features} -> {layer.out_features}: inputs must be a multiple of {BNB_BLOCK}, outputs of {BNB_PACKED_ROWS}"
        raise ValueError(f"bitsandbytes' packed CPU path is not available: {why}; pass bnb_packed=None to let it choose")
    return cpu_has_it and fits and wanted is not False


def decode_speed(model: GPT, prompt: torch.Tensor, new_tokens: int = 16, repeats: int = 2) -> float:
    """Generated tokens per second (all rows together), greedy with the KV cache; best of `repeats` after a warm-up."""
    return tokens_per_second(lambda n: generate(model, prompt, n, temperature=0), prompt.shape[0], new_tokens, repeats)


def tokens_per_second(generate_n: Callable[[int], object], rows: int, new_tokens: int, repeats: int) -> float:
    """rows * new_tokens over the best of `repeats` timed calls of `generate_n(new_tokens)`, after a 2-token warm-up:
    one way of timing decoding for every engine compared (ours, ONNX Runtime)."""
    generate_n(2)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        generate_n(new_tokens)
        best = min(best, time.perf_counter() - start)
    return rows * new_tokens / best

"""The fast decoding path: the model in the processor's fastest precision, its weights packed once for oneDNN.

Generating a token multiplies one row of activations by every weight matrix, so a step reads all
the weights (270 MB of bf16 for SmolLM2-135M) and is bound by memory bandwidth. Two changes make a
CPU read them faster, each measured in benchmarks/generation.py:

- bf16 where the processor computes it natively (`hardware.decoding_dtype`): half the bytes of fp32;
- each weight reordered once into oneDNN's blocked layout (`PackedLinear`), which its kernel streams
  at about twice the rate of PyTorch's plain bf16 product from memory.

    model = prepare(load("smollm2-135m-instruct")[0])   # in place; inference only
    print(model.decoding)    # bf16 (the processor has AVX-512 BF16 or AMX), 210 weight matrices packed for oneDNN
    generate(model, ids, 32)

The model keeps its own forward, KV cache and sampling; only its linear layers change kind.
`GPT.for_decoding` (same values, gradients still flow) is what adapters and training use. A tied
output head stays the embedding's own tensor, unpacked: packing it would store the vocabulary
matrix twice (113 MB in fp32 for SmolLM2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from . import hardware
from .lora import adapters
from .model import GPT, swap_module


class PackedLinear(nn.Module):
    """x W^T + b with W held in oneDNN's blocked layout (an opaque tensor); inference only.

    The packed weight replaces the plain one (no second copy) and is no parameter: a prepared model
    cannot be saved, trained or cast; save or adapt the model before `prepare`.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.dtype = weight.dtype
        self.weight_bytes = weight.numel() * weight.element_size()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # laid out for one row: decoding's case
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise TypeError(f"this layer was packed in {self.dtype} and got {x.dtype}: a prepared model computes in one dtype")
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        raise RuntimeError("a model prepared for decoding holds its weights in oneDNN's packed layout and cannot be saved: "
                           "save the model before llmnb.decoding.prepare (or load it again)")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, packed for oneDNN"


@dataclass
class Decoding:
    """What `prepare` did to a model: for tables, logs and the server's /health."""
    dtype: torch.dtype
    why: str
    packed: int  # weight matrices in oneDNN's layout

    def __str__(self) -> str:
        layout = f"{self.packed} weight matrices packed for oneDNN" if self.packed else "weights in PyTorch's plain layout"
        return f"{self.why}, {layout}"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # the names `llmnb serve --dtype` takes


def prepare(model: GPT, dtype: torch.dtype | str = "auto", pack: bool = True) -> GPT:
    """`model`, in place, in the dtype its device decodes fastest in (or `dtype`), linear weights packed; returns it.

    Quantized layers (llmnb.quantize) keep their codes and compute with activations in that dtype.
    Packing needs PyTorch's oneDNN (mkldnn) on a CPU; elsewhere the layers are left as they are.
    """
    if adapters(model):
        raise ValueError("the model has unmerged LoRA adapters: merge them first (llmnb.lora.merge_and_unload), "
                         "then prepare the merged model")
    if getattr(model, "decoding", None) is not None:
        return model
    device = model.norm_f.weight.device
    if dtype == "auto":
        dtype, why = hardware.decoding_dtype(device)
    else:
        named = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
        if not (isinstance(named, torch.dtype) and named.is_floating_point):
            raise ValueError(f"dtype must be 'auto', one of {sorted(DTYPES)} or a floating torch dtype, got {dtype!r}")
        dtype, why = named, f"{str(named).removeprefix('torch.')} (asked for)"
    model.eval().requires_grad_(False).to(dtype)  # floating tensors only: int8/int4 codes keep theirs
    packed = 0
    if pack and device.type == "cpu" and torch.backends.mkldnn.is_available():
        for name, module in list(model.named_modules()):
            if type(module) is nn.Linear and module.weight is not model.wte.weight:  # a tied head stays the embedding's
                swap_module(model, name, PackedLinear(module))
                packed += 1
    model.decoding = Decoding(dtype, why, packed)
    return model


def weight_bytes(model: GPT) -> int:
    """Bytes of the weights a prepared model decodes with (packed matrices at their plain size, each tensor once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total + sum(m.weight_bytes for m in model.modules() if isinstance(m, PackedLinear))

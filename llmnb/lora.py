"""LoRA: low-rank adapters on any linear layer, merged or not, saved in `peft`'s own file format.

    W x   becomes   W x + (alpha / r) * B A dropout(x)       A: (r, in), B: (out, r), B = 0 at the start

so an adapted model starts equal to its base, and only A and B, r * (in + out) numbers per adapted
layer, train (Hu et al., 2021). `attach(model, ["q_proj", "v_proj"], r=8, alpha=16)` wraps every
`nn.Linear` whose name ends with a target, as `peft` matches `target_modules`, and freezes the rest;
`merge` folds B A into W for serving at the base model's speed, `unmerge` takes it out again.
`save_adapter` writes `adapter_config.json` and `adapter_model.safetensors` under the Hugging Face
names, so that `peft.PeftModel.from_pretrained` loads what we train, and `load_adapter` reads
what `peft` saves.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .hf_bridge import hf_module_name
from .model import swap_module
from .paths import write_atomic

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (alpha / r) B A."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        check_rank_alpha(r, alpha)
        self.base, self.r, self.alpha, self.scaling = base, r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's initialisation of A; B = 0 keeps the base's outputs
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.merged = False
        self.enabled = True  # False: the base layer alone (see `disabled`)
        base.requires_grad_(False)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in), the update W receives when merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged or not self.enabled:
            return out
        update = (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()  # (..., r) then (..., out)
        return out + (update * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def check_rank_alpha(r: int, alpha: float) -> None:
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0 (the update is scaled by alpha / r), got {alpha!r}")


def _targets(targets: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    return ALL_LINEAR if targets == "all-linear" else (targets,) if isinstance(targets, str) else tuple(targets)


def attach(model: nn.Module, targets: str | list[str] | tuple[str, ...] = ("q_proj", "v_proj"), r: int = 8, alpha: float = 16,
           dropout: float = 0.0) -> list[str]:
    """Wrap every nn.Linear whose name ends with a target ("all-linear": every projection); freeze all else.

    Returns the names of the wrapped layers. A target that matches no layer is an error that lists
    the linear layers there are.
    """
    check_rank_alpha(r, alpha)
    wanted = _targets(targets)
    linear = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and not name.endswith(".base")}
    chosen = [name for name in linear if name.split(".")[-1] in wanted and name != "lm_head"]
    unmatched = [t for t in wanted if not any(name.split(".")[-1] == t for name in chosen)]
    if unmatched and targets != "all-linear":
        kinds = sorted({name.split(".")[-1] for name in linear})
        raise ValueError(f"LoRA target(s) {unmatched} match no linear layer; this model's linear layers are named {kinds}")
    model.requires_grad_(False)
    for name in chosen:
        swap_module(model, name, LoRALinear(linear[name], r, alpha, dropout))
    return chosen


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model inside the block: every adapter switched off, then on again (RLHF's frozen reference, free)."""
    layers = adapters(model).values()
    if any(layer.merged for layer in layers):
        raise ValueError("the adapters are merged into the weights, so they cannot be switched off: unmerge first")
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def merge(model: nn.Module) -> nn.Module:
    for layer in adapters(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for layer in adapters(model).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put the plain nn.Linear back: a normal model, the base's layout and speed."""
    for name, layer in adapters(model).items():
        layer.merge()
        swap_module(model, name, layer.base)
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters (tied weights once)."""
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


# --- peft's file format ----------------------------------------------------------------------------


def save_adapter(model: nn.Module, folder: str | Path, base_model: str = "") -> Path:
    """`adapter_config.json` + `adapter_model.safetensors`, as `peft` writes them, for `PeftModel.from_pretrained`."""
    layers = adapters(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save: call llmnb.lora.attach first")
    first = next(iter(layers.values()))
    tensors = {}
    for name, layer in layers.items():
        key = f"base_model.model.{hf_module_name(model.config, name)}"
        tensors[f"{key}.lora_A.weight"] = layer.lora_A.detach().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = layer.lora_B.detach().contiguous().cpu()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r, "lora_alpha": first.alpha,
              "lora_dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
              "target_modules": sorted({n.split(".")[-1] for n in layers}), "bias": "none", "fan_in_fan_out": False,
              "base_model_name_or_path": base_model, "inference_mode": True, "use_rslora": False, "init_lora_weights": True}

    def write(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    return write_atomic(folder, write)


def load_adapter(model: nn.Module, folder: str | Path, expect_base: str | None = None) -> list[str]:
    """Attach and fill the adapters of a peft-format folder (ours or peft's); returns the adapted layer names.

    Refuses a folder recorded for another base (`expect_base`), and shapes that do not fit this model.
    """
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} is not a LoRA adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_rslora") or config.get("use_dora"):
        raise ValueError(f"{folder} holds a {config.get('peft_type')} adapter (rslora/dora: {config.get('use_rslora')}/{config.get('use_dora')}); "
                         "llmnb loads plain LoRA only")
    recorded = config.get("base_model_name_or_path") or ""
    if expect_base is not None and recorded and Path(recorded).name != Path(expect_base).name:
        raise ValueError(f"{folder} was trained on {recorded!r}, not {expect_base!r}: load it onto {recorded}")
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    names = attach(model, config["target_modules"], config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0))
    for name, layer in adapters(model).items():
        key = f"base_model.model.{hf_module_name(model.config, name)}"
        for part, param in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
            stored = tensors.get(f"{key}.{part}.weight")
            if stored is None or stored.shape != param.shape:
                raise ValueError(f"{folder} does not fit this model at {name}.{part}: stored "
                                 f"{None if stored is None else tuple(stored.shape)}, model {tuple(param.shape)}; "
                                 f"it was trained on {recorded or 'another base'}")
            with torch.no_grad():
                param.copy_(stored)
    return names

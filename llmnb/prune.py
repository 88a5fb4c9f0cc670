"""Pruning: take away the weights, or whole neurons and heads, a model needs least.

    masks = prune_model(model, "wanda", 0.5, calibration=ids)        # half of every matrix set to zero, in place
    masks = prune_model(model, "magnitude", 0.5, pattern="2:4")      # two of every four inputs, the GPU sparse format
    small = prune_structured(model, ids, mlp_fraction=0.25, head_fraction=1/3)   # a smaller model, transformers loads it

- **magnitude**: drop the smallest |W| of each matrix, as `torch.nn.utils.prune.l1_unstructured` does.
- **Wanda** (Sun et al. 2023, arXiv:2306.11695): score each weight by |W_ij| · ‖X_j‖₂, its size times the norm of the
  input feature it multiplies over calibration tokens, and drop the lowest scores of each output row. No retraining and
  no weight update; the layers are pruned one block after another, each block's calibration input coming from the blocks
  already pruned, as the paper's code does.
- **2:4** (either score): in every four consecutive inputs keep the best two, the pattern NVIDIA's sparse tensor cores
  run at up to twice the speed. On a CPU nothing reads the pattern: the zeros are stored and multiplied like any weight.
- **structured**: remove whole MLP neurons and attention heads, ranked by the Wanda score summed over the weights each
  one writes with (the output projection's columns), the same number in every layer so that one config still describes
  the model (`GPTConfig.d_ff`, `n_head`, `head_dim`). With grouped-query attention whole query heads go within each
  group; the shared key/value heads stay.

The output head and the embedding are never pruned (as in the Wanda paper): only the blocks' linear layers.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from .lora import adapters
from .model import GPT
from .quantize import QuantLinear

METHODS = ("magnitude", "wanda")
PATTERNS = ("unstructured", "2:4")


def prunable(model: GPT) -> list[tuple[str, nn.Linear]]:
    """The blocks' linear layers, by their names in the model ("blocks.0.attn.q_proj", ...)."""
    return [(f"blocks.{name}", m) for name, m in model.blocks.named_modules() if isinstance(m, nn.Linear)]


def _check_full_precision(model: GPT) -> None:
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if quantized:
        raise ValueError(f"{quantized[0]} is quantized: prune the full-precision model, then quantize it (zeros stay zeros)")
    if adapters(model):
        raise ValueError("the model carries LoRA adapters: merge them first (llmnb.lora.merge_and_unload), then prune")


def _check_fraction(value: float, name: str) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{name}={value} must lie strictly between 0 and 1 (0.5 removes half)")


# --- scores and masks (True = keep) ----------------------------------------------------------------


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂ (out, in): a weight matters as much as the inputs it multiplies are large."""
    return weight.detach().abs().float() * input_norm.float()[None, :]


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep all but the lowest-scoring `sparsity` of the weights: of the whole matrix (magnitude pruning; round(s·n)
    weights, as torch.nn.utils.prune), or of each output row (Wanda's comparison group; int(s·in) per row, as its code)."""
    _check_fraction(sparsity, "sparsity")
    mask = torch.ones_like(scores, dtype=torch.bool)
    if per_row:
        k = int(scores.shape[1] * sparsity)
        mask.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
    else:
        k, flat = round(sparsity * scores.numel()), scores.flatten()
        if k:  # the k-th smallest score as a threshold (5x faster than topk here); ties at it broken by position
            threshold = flat.kthvalue(k).values
            drop = flat < threshold
            tied = (flat == threshold).nonzero().squeeze(1)
            drop[tied[: k - int(drop.sum())]] = True
            mask.view(-1)[drop] = False
    return mask


def semi_structured_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """In every m consecutive inputs of each row keep the n best scores (2:4: half the weights, in a pattern GPUs use)."""
    rows, inputs = scores.shape
    if inputs % m:
        raise ValueError(f"{n}:{m} sparsity needs the inputs to be a multiple of {m}; this layer has {inputs}: prune it unstructured")
    grouped = scores.reshape(rows, inputs // m, m)
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(2, grouped.topk(n, dim=2).indices, True)
    return mask.reshape(rows, inputs)


def _mask(weight: torch.Tensor, norm: torch.Tensor | None, method: str, sparsity: float, pattern: str) -> torch.Tensor:
    scores = weight.detach().abs().float() if method == "magnitude" else wanda_scores(weight, norm)
    if pattern == "2:4":
        return semi_structured_mask(scores)
    return unstructured_mask(scores, sparsity, per_row=method == "wanda")


# --- calibration: the norm of every input feature of every linear layer ------------------------------


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it came for."""


def _block_inputs(model: GPT, ids: torch.Tensor) -> tuple:
    """The arguments the first block is called with for `ids`: hidden state, rotary tables, mask, cache, index."""
    seen = {}

    def grab(module, args):
        seen["args"] = args
        raise _Stop

    handle = model.blocks[0].register_forward_pre_hook(grab)
    try:
        model.hidden_states(ids)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["args"]


def _with_input_norms(module: nn.Module, run) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ over every token, for each input feature of each linear layer inside `module`, while `run()` runs it."""
    squares: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(layer, args, output):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, in)
            squares[name] = squares.get(name, 0) + x.pow(2).sum(0)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {name: s.sqrt() for name, s in squares.items()}


@torch.no_grad()
def input_norms(model: GPT, calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ of every prunable layer's inputs over the calibration tokens (batch, time), the dense model in one pass."""
    norms = _with_input_norms(model.blocks, lambda: model.hidden_states(calibration))
    return {f"blocks.{name}": norm for name, norm in norms.items()}


# --- unstructured and 2:4 pruning --------------------------------------------------------------------


@torch.no_grad()
def prune_model(model: GPT, method: str, sparsity: float = 0.5, pattern: str = "unstructured",
                calibration: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Set the pruned weights of every block's linear layers to zero, in place; returns each layer's mask (True = kept).

    `sparsity` is the fraction removed (2:4 removes half by construction and ignores it). Wanda needs `calibration`
    token ids (batch, time): text like the model's own, a few thousand tokens.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}: choose one of {METHODS}")
    if pattern not in PATTERNS:
        raise ValueError(f"unknown sparsity pattern {pattern!r}: choose one of {PATTERNS}")
    if pattern == "unstructured":
        _check_fraction(sparsity, "sparsity")
    _check_full_precision(model)
    if method == "wanda" and calibration is None:
        raise ValueError("Wanda scores weights by the activations they multiply: pass calibration token ids (batch, time)")
    if pattern == "2:4":
        for name, layer in prunable(model):
            if layer.in_features % 4:
                raise ValueError(f"2:4 sparsity needs inputs in multiples of 4; {name} has {layer.in_features}: prune unstructured")
    if method == "magnitude":
        return {name: _apply(layer, _mask(layer.weight, None, method, sparsity, pattern)) for name, layer in prunable(model)}
    masks = {}
    args = list(_block_inputs(model, calibration))
    for i, block in enumerate(model.blocks):  # one block at a time: its inputs come from the blocks already pruned
        norms = _with_input_norms(block, lambda: block(*args))
        for name, layer in block.named_modules():
            if isinstance(layer, nn.Linear):
                masks[f"blocks.{i}.{name}"] = _apply(layer, _mask(layer.weight, norms[name], method, sparsity, pattern))
        args[0] = block(*args)
    return masks


def _apply(layer: nn.Linear, mask: torch.Tensor) -> torch.Tensor:
    layer.weight.mul_(mask.to(layer.weight.dtype))
    return mask


def sparsity(model: GPT) -> float:
    """The fraction of zeros among the blocks' linear weights."""
    zeros = sum(int((layer.weight == 0).sum()) for _, layer in prunable(model))
    return zeros / sum(layer.weight.numel() for _, layer in prunable(model))


def sparse_bytes(model: GPT, bits: int = 32) -> int:
    """Bytes of the model if each block matrix kept only its non-zero values (`bits` each) and a one-bit-per-weight map
    of where they are (the bitmask format sparse kernels read); everything else dense. No file here is written this way."""
    total = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    for _, layer in prunable(model):
        n, nonzero = layer.weight.numel(), int((layer.weight != 0).sum())
        total += (nonzero * bits + n) // 8 - n * layer.weight.element_size()
    return total


# --- structured pruning: a smaller model ---------------------------------------------------------------


def _heads_removed(model: GPT, head_fraction: float) -> tuple[int, int]:
    """(query heads removed per key/value group, query heads per group); refuses what no config could describe."""
    c = model.config
    group = c.n_head // c.n_kv_head
    if not head_fraction:
        return 0, group
    _check_fraction(head_fraction, "head_fraction")
    if c.flavour == "gpt2":
        raise ValueError("transformers' GPT-2 takes its head size from n_embd / n_head, so fewer heads cannot be saved: "
                         "prune MLP neurons only (head_fraction=0) on a GPT-2-flavour model")
    units = group if group > 1 else c.n_head  # grouped-query attention: the same number out of every group
    drop = round(units * head_fraction)
    if not 0 < drop < units:
        raise ValueError(f"head_fraction={head_fraction} removes {drop} of {units} heads{' per key/value group' if group > 1 else ''}: "
                         f"choose a multiple of 1/{units} below 1")
    return drop, group


def _heads_to_keep(score: torch.Tensor, group: int, drop: int) -> list[int]:
    """The query heads kept, in order: the best `group - drop` of each group (or of all heads, without sharing)."""
    if group == 1:
        return sorted(score.topk(len(score) - drop).indices.tolist())
    keep = []
    for start in range(0, len(score), group):
        keep += sorted((start + score[start:start + group].topk(group - drop).indices).tolist())
    return keep


def _take(state: dict, prefix: str, index: torch.Tensor, dim: int) -> None:
    """Keep rows (dim 0: weight and bias) or columns (dim 1: weight only) `index` of the linear layer `prefix`."""
    state[prefix + ".weight"] = state[prefix + ".weight"].index_select(dim, index).contiguous()
    if dim == 0 and prefix + ".bias" in state:
        state[prefix + ".bias"] = state[prefix + ".bias"][index].contiguous()


@torch.no_grad()
def prune_structured(model: GPT, calibration: torch.Tensor, mlp_fraction: float = 0.0, head_fraction: float = 0.0) -> GPT:
    """A smaller copy of `model` without the lowest-scoring `mlp_fraction` of every MLP's neurons and `head_fraction` of
    every layer's query heads: the same number in each layer, so `transformers` and llmnb load it from its config.

    A unit's score is the Wanda score summed over the weights it writes with: for neuron j, ‖X_j‖₂ · Σ_i |W_down[i, j]|;
    for a head, the same summed over its columns of the output projection.
    """
    if not mlp_fraction and not head_fraction:
        raise ValueError("nothing to remove: give mlp_fraction and/or head_fraction between 0 and 1")
    if mlp_fraction:
        _check_fraction(mlp_fraction, "mlp_fraction")
    _check_full_precision(model)
    c = model.config
    drop, group = _heads_removed(model, head_fraction)
    norms = input_norms(model, calibration)
    d_ff = c.d_ff - round(c.d_ff * mlp_fraction)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        down, o = block.mlp.down_proj.weight, block.attn.o_proj.weight
        neuron = norms[p + "mlp.down_proj"] * down.abs().sum(0)  # (d_ff,)
        keep = neuron.topk(d_ff).indices.sort().values
        for name in ("mlp.up_proj", "mlp.gate_proj") if block.mlp.gated else ("mlp.up_proj",):
            _take(state, p + name, keep, 0)
        _take(state, p + "mlp.down_proj", keep, 1)
        if drop:
            head = (norms[p + "attn.o_proj"] * o.abs().sum(0)).view(c.n_head, c.head_dim).sum(1)  # (n_head,)
            heads = _heads_to_keep(head, group, drop)
            rows = torch.cat([torch.arange(h * c.head_dim, (h + 1) * c.head_dim) for h in heads])
            _take(state, p + "attn.q_proj", rows, 0)
            _take(state, p + "attn.o_proj", rows, 1)
            if group == 1:  # no sharing: each removed query head takes its own key and value head with it
                _take(state, p + "attn.k_proj", rows, 0)
                _take(state, p + "attn.v_proj", rows, 0)
    n_head = c.n_head - drop * (c.n_kv_head if group > 1 else 1)
    smaller = GPT(replace(c, d_ff=d_ff, n_head=n_head, n_kv_head=c.n_kv_head if group > 1 else n_head, head_dim=c.head_dim))
    smaller.load_state_dict(state)
    return smaller.eval()

"""The fast decoding path: the model in the processor's fastest precision, its weights packed once for oneDNN.

Generating a token multiplies one row of activations by every weight matrix, so a step reads all
the weights (270 MB of bf16 for SmolLM2-135M) and is bound by memory bandwidth. Three changes make a
CPU read them faster, each measured in benchmarks/generation.py:

- bf16 where the processor computes it natively (`hardware.decoding_dtype`): half the bytes of fp32;
- q/k/v and gate/up stacked into one product each (`fuse_projections`): fewer, larger products;
- each weight reordered once into oneDNN's blocked layout (`PackedLinear`), which its kernel streams
  at about twice the rate of PyTorch's plain bf16 product from memory.

    model = prepare(load("smollm2-135m-instruct")[0])   # in place; inference only
    print(model.decoding)    # bf16 (the processor has AVX-512 BF16 or AMX), 60 products fused (q/k/v, gate/up),
                             # 120 weight matrices packed for oneDNN
    generate(model, ids, 32)

The model keeps its own forward, KV cache and sampling; only its linear layers change kind and number. A tied
output head stays the embedding's own tensor, unpacked: packing it would store the vocabulary
matrix twice (113 MB in fp32 for SmolLM2).
"""
from __future__ import annotations

import shutil
import time
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import hardware
from .lora import adapters
from .model import GPT, KVCache, swap_module
from .quantize import Int8Linear


class PackedLinear(nn.Module):
    """x W^T + b with W held in oneDNN's blocked layout (an opaque tensor); inference only.

    The packed weight replaces the plain one (no second copy) and is opaque: a prepared model cannot be saved,
    trained or cast; save or adapt the model before `prepare`.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.dtype = weight.dtype
        self.packed = self.pack(weight)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @staticmethod
    def pack(weight: torch.Tensor) -> nn.Parameter:
        """`weight` (out, in) in oneDNN's layout, laid out for one row: decoding's case. A parameter, so that an exported
        step (serve.step) names it by its place in the model and reads the server's own tensor; a buffer would be
        copied, a plain attribute renamed."""
        return nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(weight, 1), requires_grad=False)

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


class RowLinear(nn.Module):
    """x W^T + b for one row of activations, written as the reduction it is: each output one dot product over a row
    of W. Compiled, Inductor turns it into one loop that streams the weight once; eagerly, and for more rows, F.linear.

    It holds the layer's own parameters (no copy; a tied head stays tied) and exists for compiled one-row steps only
    (llmnb.serve.step). PyTorch's kernels read plain bf16 weights at one row at about half the memory's rate: SmolLM2's
    products for one token took 10.4 ms compiled this way against 19.5 through F.linear (2 Zen 4 cores; issue 23).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() or x.numel() != x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        y = (x.reshape(1, -1).float() * self.weight.float()).sum(-1)  # (out,): fp32 sums, as the kernels accumulate
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], -1)


def row_linears(model: nn.Module) -> int:
    """Every plain linear layer of `model` as a RowLinear, in place; returns how many.

    Quantized layers keep their kernels: the same reduction over int8 codes, compiled in SmolLM2's one-row step, took
    15.6 ms against 13.6 with PyTorch's weight-only int8 kernel (2 Zen 4 cores; issue 23)."""
    plain = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    for name in plain:
        swap_module(model, name, RowLinear(model.get_submodule(name)))
    return len(plain)


class Compiled:
    """`fn` as one Inductor graph with the model's weights frozen in as constants (which lets Inductor pack them for
    oneDNN); `fn` itself, eagerly, where no graph can be built.

    Inductor writes C++ and builds it with the system's compiler (on a GPU: Triton kernels, which `cuda_graphs`
    records into a CUDA graph at the first call and replays after). A failure warns once and every later call
    runs `fn` eagerly (`failed` says why). `compile_seconds` counts the calls its caller says compiled.
    Frozen weights: the model must not change after this (inference only), and the graph holds its own
    packed copy of every matrix it multiplies by, beside the model's.

    `autotune`: each matrix product also gets Inductor's C++ GEMM templates (micro-kernels written for this
    processor's AVX-512/AMX, the weight-only int8 product included), timed against ATen's kernel at compile time,
    the faster kept. At one row on an Intel Xeon with AVX-512 BF16 they made SmolLM2's compiled step faster in bf16
    and in int8 (ATen's int8 kernel lost every product), for about twice the compile time.
    """

    def __init__(self, fn, autotune: bool = False, cuda_graphs: bool = False):
        self.fn = fn
        self.autotune, self.cuda_graphs = autotune, cuda_graphs
        self.graph = torch.compile(fn, fullgraph=True, dynamic=False)  # every call shape fixed: CompiledStep rounds the cache
        self.compile_seconds = 0.0
        self.failed = "" if compiler_available() else "no C++ compiler (g++, c++ or clang++) for Inductor"

    def __call__(self, *args, compiles: bool = False):
        """fn(*args), compiled; `compiles`: this call builds a graph, count its time."""
        if self.failed:
            return self.fn(*args)
        start = time.perf_counter()
        try:
            # freezing is read at compile time only (passed through `torch.compile(options=...)` it does not reach
            # the graph's lowering, which then multiplies with plain aten::mm)
            with torch._inductor.config.patch(self._options()):
                if self.cuda_graphs:  # a new step: the last one's outputs may be overwritten (they were read already)
                    torch.compiler.cudagraph_mark_step_begin()
                out = self.graph(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly instead, say so once
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            warnings.warn(f"llmnb.decoding: the compiled step failed ({self.failed}); decoding eagerly", stacklevel=3)
            return self.fn(*args)
        if compiles:
            self.compile_seconds += time.perf_counter() - start
        return out

    def _options(self) -> dict:
        """Inductor's settings for the build: frozen weights, CUDA graphs and the GEMM templates if asked for."""
        options = {"freezing": True, "triton.cudagraphs": self.cuda_graphs}
        if self.autotune:  # and quietly: Inductor otherwise writes every product's timings to stderr, hundreds of lines
            options |= {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                        "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
        return options


class CompiledStep:
    """One step of `llmnb.generate` (every row's one new token through every layer and the head) as one graph.

    Every shape is fixed, so the KV cache is read whole, masked, and its length rounded up to
    `CACHE_ROUND` tokens: a new (batch, length) pair compiles once more (benchmarks/generation.py
    prints how long), counted in `compile_seconds`. The server's step is compiled once for every
    batch and length instead, ahead of time (llmnb.serve.step): its rows change every step.

    On a GPU the step is replayed as a CUDA graph: one launch a step instead of a few hundred kernels
    launched from Python, which at batch 1 take longer than the kernels run. A replayed graph reads and
    writes the addresses it recorded, so the cache lives in buffers the step keeps per shape
    (`fixed_addresses`; `_adopt`): allocated once, and held while the model is (one cache per shape used).
    """
    CACHE_ROUND = 64

    def __init__(self, model: GPT):
        self.model = model
        self.fixed_addresses = model.norm_f.weight.device.type == "cuda"
        self.compiled = Compiled(self._logits, autotune=autotunes(model), cuda_graphs=self.fixed_addresses)
        self.shapes: set[tuple[int, int]] = set()
        self.buffers: dict[tuple[int, ...], tuple[weakref.ref, list[torch.Tensor]]] = {}  # cache shape: (its user, keys + values)

    @property
    def failed(self) -> str:
        return self.compiled.failed

    @property
    def compile_seconds(self) -> float:
        return self.compiled.compile_seconds

    def cache_length(self, tokens: int) -> int:
        """The KV cache length that holds `tokens`: rounded up, so that prompts of similar lengths share a graph."""
        return min(-(-tokens // self.CACHE_ROUND) * self.CACHE_ROUND, self.model.config.block_size)

    def _logits(self, tokens, positions, mask, cache) -> torch.Tensor:
        return next_logits(self.model, tokens, positions, mask, cache)

    def __call__(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """The next-token logits (B, vocab) in fp32 after `tokens` (B, 1), as the model's head on
        `model.hidden_states(tokens, attention_mask, cache)[:, -1]`."""
        b, length, past = tokens.shape[0], cache.keys[0].shape[2], cache.length
        columns = torch.arange(length, device=tokens.device)
        if attention_mask is None:
            positions = torch.full((b, 1), past, device=tokens.device)
            mask = (columns <= past).expand(b, length)
        else:  # left padding: a row's position is its number of real tokens before this one
            positions = attention_mask.sum(1, keepdim=True) - 1
            mask = F.pad(attention_mask.bool(), (0, length - attention_mask.shape[1]))
        if self.fixed_addresses:
            self._adopt(cache)
        cache.slot = torch.tensor([past], device=tokens.device)
        shape = (b, length)
        try:
            logits = self.compiled(tokens, positions, mask[:, None, None, :], cache, compiles=shape not in self.shapes)
        finally:
            cache.slot = None
        self.shapes.add(shape)
        cache.length += 1
        return logits

    def _adopt(self, cache: KVCache) -> None:
        """Move `cache` into the step's buffers for its shape (a copy, once per generation). The cache that held them
        before gets copies of them back first: two generations interleaved (two open streams) each keep their own."""
        shape = tuple(cache.keys[0].shape)
        user, buffers = self.buffers.get(shape, (None, None))
        if user is not None and user() is cache:
            return
        if buffers is None:
            buffers = [torch.empty_like(t) for t in cache.keys + cache.values]
            for t in buffers:
                torch._dynamo.mark_static_address(t)  # a graph input whose address is part of the graph: not copied in
        elif (previous := user()) is not None:
            n = len(previous.keys)
            previous.keys, previous.values = [t.clone() for t in buffers[:n]], [t.clone() for t in buffers[n:]]
        for buffer, t in zip(buffers, cache.keys + cache.values):
            buffer.copy_(t)
        n = len(cache.keys)
        cache.keys, cache.values = buffers[:n], buffers[n:]
        self.buffers[shape] = (weakref.ref(cache), buffers)


def next_logits(model: GPT, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
    """(B, vocab) fp32 logits after each row's last token, the head inside: what a compiled step computes (`GPT.layers`
    takes no Python decision on the cache's length, so this traces into one graph)."""
    return model.lm_head(model.layers(tokens, positions, mask, cache)[:, -1]).float()


def gemm_templates_safe() -> bool:
    """Whether a compiled step may autotune its products with Inductor's C++ GEMM templates: where Inductor writes
    AVX-512 code. Its AVX2 template for the weight-only int8 product returned NaN from the first step here (torch 2.13,
    ATEN_CPU_CAPABILITY=avx2; tests/test_decoding.py), so on AVX2 and below products keep ATen's kernels."""
    # here, not at the top: importing Inductor takes a second, and only a compiled step needs it
    from torch._inductor.cpu_vec_isa import pick_vec_isa  # Inductor's own choice; it follows ATEN_CPU_CAPABILITY
    return "avx512" in str(pick_vec_isa())


def autotunes(model: GPT) -> bool:
    """Whether a compiled step of `model` (already in its decoding dtype) autotunes its products: in bf16, where the
    templates won in bf16 and int8 on the Xeon of issue 23 (fixed shapes, `generate`). With fp32 activations the int8
    template moved log-probabilities about as much as int8 rounding itself."""
    weight = model.norm_f.weight
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and gemm_templates_safe()


def compiler_available() -> bool:
    """Inductor's CPU backend writes C++ and builds it with the system's compiler."""
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


@dataclass
class Decoding:
    """What `prepare` did to a model: for tables, logs and the server's /health."""
    dtype: torch.dtype
    why: str
    packed: int  # weight matrices in oneDNN's layout by us, fused ones counted once (a compiled step packs them itself)
    fused: int = 0  # products that stack several matrices (fuse_projections)
    step: CompiledStep | None = None

    def __str__(self) -> str:
        layout = f"{self.packed} weight matrices packed for oneDNN" if self.packed else "weights in PyTorch's plain layout"
        layout = f"{self.fused} products fused (q/k/v, gate/up), {layout}" if self.fused else layout
        if self.step is not None:
            tuned = ", GEMMs autotuned" if self.step.compiled.autotune else ""
            tuned += ", replayed as a CUDA graph" if self.step.compiled.cuda_graphs else ""
            layout = "eager: " + self.step.failed if self.step.failed else f"one compiled graph per step (Inductor, weights frozen{tuned})"
        return f"{self.why}, {layout}"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # names `prepare` takes (the CLI offers the first two)


def packable(dtype: torch.dtype) -> bool:
    """Whether oneDNN can hold weights of `dtype` packed on this CPU: bf16 and fp16 need AVX-512 (or AVX-NE-CONVERT),
    and oneDNN refuses them below; elsewhere a model asked to decode in them keeps PyTorch's plain layout."""
    if not torch.backends.mkldnn.is_available():
        return False
    return {torch.float32: True, torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported(),
            torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported()}.get(dtype, False)


def stacked(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing the outputs of `layers` (same inputs) side by side: their weights stacked by rows. Plain
    linear layers, and int8 ones (a scale per row); None for anything else, or layers of different kinds."""
    kind = type(layers[0])
    if not (kind is nn.Linear or issubclass(kind, Int8Linear)) or any(type(m) is not kind for m in layers):
        return None

    def rows(name: str) -> torch.Tensor:  # each layer's tensor `name`, stacked
        return torch.cat([getattr(m, name).detach() for m in layers])

    biased, n, k = layers[0].bias is not None, sum(m.out_features for m in layers), layers[0].in_features
    with torch.device("meta"):  # an empty layer of the stacked size: its tensors are set below, never allocated twice
        out = nn.Linear(k, n, bias=biased) if kind is nn.Linear else kind(k, n, biased, layers[0].group_size)
    if kind is nn.Linear:  # parameters, as nn.Linear's are
        out.weight = nn.Parameter(rows("weight"), requires_grad=False)
        out.bias = nn.Parameter(rows("bias"), requires_grad=False) if biased else None
    else:  # buffers: codes and a scale per row
        out.qweight, out.scale, out.bias = rows("qweight"), rows("scale"), rows("bias") if biased else None
    return out


def fuse_projections(model: GPT) -> int:
    """Each block's q, k and v as one product (`attn.qkv`), and a gated MLP's gate and up as one (`mlp.gate_up`).

    At one token a row, a product costs a fixed few microseconds beside reading its weight: on 2 cores of an AMD
    EPYC (Zen 4), SmolLM2's 30 layers read in 4 bf16 products a layer instead of 7 took 11.5 ms instead of 14.7
    (packed for oneDNN, weights from memory; issue 23). The stacked weight replaces the separate ones: no matrix is
    stored twice. Returns the number of products fused."""
    fused = 0
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        if (qkv := stacked([attn.q_proj, attn.k_proj, attn.v_proj])) is not None:
            attn.qkv, attn.q_proj, attn.k_proj, attn.v_proj = qkv, None, None, None
            fused += 1
        if mlp.gated and (gate_up := stacked([mlp.gate_proj, mlp.up_proj])) is not None:
            mlp.gate_up, mlp.gate_proj, mlp.up_proj = gate_up, None, None
            fused += 1
    return fused


def pack_linears(model: GPT) -> int:
    """Each plain linear layer of `model`, in place, as a `PackedLinear` (its weight in oneDNN's layout); returns how
    many. A tied head stays the embedding's tensor: packing it would store the vocabulary twice."""
    packed, head = 0, getattr(model.wte, "weight", None)  # a quantized embedding has codes, no weight
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module.weight is not head:
            swap_module(model, name, PackedLinear(module))
            packed += 1
    return packed


def prepare(model: GPT, dtype: torch.dtype | str = "auto", pack: bool = True, compile: bool = False) -> GPT:
    """`model`, in place, in the dtype its device decodes fastest in (or `dtype`), linear weights packed; returns it.

    Each block's q/k/v and gate/up become one product each (`fuse_projections`: plain and int8 layers).
    Quantized layers (llmnb.quantize) keep their codes and compute with activations in that dtype.
    Packing needs PyTorch's oneDNN (mkldnn) on a CPU, in a dtype it packs there (`packable`); elsewhere the layers
    are left as they are.
    `compile`: each decoding step of `llmnb.generate` runs as one compiled graph (`CompiledStep`,
    which packs the weights itself); the prompt's prefill stays eager.
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
    fused = fuse_projections(model)
    packed = pack_linears(model) if pack and not compile and device.type == "cpu" and packable(dtype) else 0
    model.decoding = Decoding(dtype, why, packed, fused, CompiledStep(model) if compile else None)
    hardware.release_freed_memory()  # the fp32 weights just replaced: hand their pages back, or the server's memory keeps them
    return model

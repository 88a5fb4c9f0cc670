"""How much memory, disk and time a model of N parameters needs to train, fine-tune and serve.

Everything here is arithmetic on a model's shape, spelled out so each term can be
checked: parameters, gradients, optimizer state, activations, KV cache, checkpoint
bytes, and training time from FLOPs. Notebook 00 checks the estimates against a
measurement on this machine and against published figures.

Conventions: bytes are bytes; "GB" in tables means 1e9 bytes, as GPU vendors and most
published figures use.
"""
from __future__ import annotations

from dataclasses import dataclass

BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
# Per-parameter overhead of block quantization: int8 keeps one fp16/fp32 scale per
# row or block, NF4 (QLoRA) 0.127 extra bits with double quantization (paper, §3).
QUANT_OVERHEAD_BYTES = {"int8": 4 / 64, "int4": 0.127 / 8}

METHODS = ("pretrain", "full_finetune", "lora", "qlora", "inference")
# Training precision -> (weight, gradient, optimizer-state bytes per trained parameter, activation bytes).
# "mixed": fp32 master weights, grads and Adam moments, bf16/fp16 activations (torch autocast).
# "bf16-true": everything in bf16, as litgpt's --precision bf16-true.
TRAIN_PRECISION = {
    "fp32": (4.0, 4.0, 8.0, 4.0),
    "mixed": (4.0, 4.0, 8.0, 2.0),
    "bf16-true": (2.0, 2.0, 4.0, 2.0),
}
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide memory and FLOPs. GPT-2 style: `gated_mlp=False, bias=True`."""

    name: str
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    d_ff: int
    vocab_size: int
    gated_mlp: bool = True
    bias: bool = False
    tied_embeddings: bool = False
    learned_positions: int = 0
    head_size: int = 0  # 0: d_model // n_head, as in every published shape; a model with pruned heads keeps their size

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_head

    @property
    def attn_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every matrix in one block, by LoRA target name."""
        d, ff = self.d_model, self.d_ff
        shapes = {"q": (d, self.attn_dim), "k": (d, self.kv_dim), "v": (d, self.kv_dim), "o": (self.attn_dim, d), "up": (d, ff), "down": (ff, d)}
        if self.gated_mlp:
            shapes["gate"] = (d, ff)
        return shapes

    @property
    def block_params(self) -> int:
        weights = sum(i * o for i, o in self.linear_shapes().values())
        biases = sum(o for _, o in self.linear_shapes().values()) if self.bias else 0
        return weights + biases + 2 * self.norm_params

    @property
    def norm_params(self) -> int:
        """One norm's parameters: GPT-2's LayerNorm has a bias when the model has biases; RMSNorm never."""
        return self.d_model * (2 if self.bias and not self.gated_mlp else 1)

    @property
    def embedding_params(self) -> int:
        return (self.vocab_size + self.learned_positions) * self.d_model

    @property
    def head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab_size * self.d_model

    @property
    def n_params(self) -> int:
        return self.embedding_params + self.n_layer * self.block_params + self.norm_params + self.head_params

    @property
    def n_linear_params(self) -> int:
        """Parameters in the blocks' matrices: what int8/int4 quantization compresses."""
        return self.n_layer * sum(i * o for i, o in self.linear_shapes().values())

    def lora_params(self, rank: int, targets: tuple[str, ...]) -> int:
        """Trainable parameters of rank-`rank` adapters (A: in x r, B: r x out) on `targets`."""
        shapes = self.linear_shapes()
        unknown = set(targets) - set(shapes)
        if unknown:
            raise ValueError(f"LoRA targets {sorted(unknown)} do not exist in {self.name}; choose from {sorted(shapes)}")
        return self.n_layer * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)

    def kv_cache_bytes_per_token(self, dtype: str = "bf16") -> float:
        """Keys and values of every layer for one token."""
        return 2 * self.n_layer * self.kv_dim * BYTES[dtype]

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: 2 per matmul weight plus attention scores (PaLM appendix B)."""
        matmul = self.n_params - self.embedding_params + (self.head_params == 0) * self.vocab_size * self.d_model
        return 2 * matmul + 2 * self.n_layer * seq_len * self.d_model


def gpt2_shape(name: str, n_layer: int, d_model: int, n_head: int, vocab_size: int = 50257, context: int = 1024) -> ModelShape:
    """A GPT-2 style shape: LayerNorm with biases, GELU MLP of width 4d, tied embeddings."""
    return ModelShape(name, n_layer, d_model, n_head, n_head, 4 * d_model, vocab_size, gated_mlp=False, bias=True, tied_embeddings=True, learned_positions=context)


# Published shapes (each model's config.json); n_params matches the released checkpoints.
CATALOG: dict[str, ModelShape] = {
    s.name: s
    for s in [
        gpt2_shape("gpt2-124M", 12, 768, 12),
        ModelShape("smollm2-135M", 30, 576, 9, 3, 1536, 49152, tied_embeddings=True),
        gpt2_shape("gpt2-medium-350M", 24, 1024, 16),
        gpt2_shape("gpt2-large-774M", 36, 1280, 20),
        ModelShape("llama-3.2-1B", 16, 2048, 32, 8, 8192, 128256, tied_embeddings=True),
        gpt2_shape("gpt2-xl-1.5B", 48, 1600, 25),
        ModelShape("llama-2-7B", 32, 4096, 32, 32, 11008, 32000),
        # multi-query attention (one kv head), a plain GELU MLP, tied embeddings: 6.92B
        ModelShape("falcon-7B", 32, 4544, 71, 1, 18176, 65024, gated_mlp=False, tied_embeddings=True),
        ModelShape("llama-3-8B", 32, 4096, 32, 8, 14336, 128256),
        ModelShape("llama-2-13B", 40, 5120, 40, 40, 13824, 32000),
        ModelShape("llama-65B", 80, 8192, 64, 64, 22016, 32000),
        ModelShape("llama-3-70B", 80, 8192, 64, 8, 28672, 128256),
    ]
}


@dataclass(frozen=True)
class Setup:
    """How the model is used: method, batch, sequence length and the memory-saving choices."""

    method: str = "pretrain"
    batch: int = 1
    seq_len: int = 1024
    precision: str = "mixed"  # training: fp32, mixed, bf16-true
    inference_dtype: str = "bf16"  # inference weights: fp32, bf16, int8, int4
    kv_dtype: str = "bf16"
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q", "v")
    gradient_checkpointing: bool = False
    flash_attention: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {METHODS}")
        if self.precision not in TRAIN_PRECISION:
            raise ValueError(f"unknown precision {self.precision!r}: choose one of {tuple(TRAIN_PRECISION)}")
        for name in ("inference_dtype", "kv_dtype"):
            if getattr(self, name) not in BYTES:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}: choose one of {tuple(BYTES)}")
        if self.batch < 1 or self.seq_len < 1 or self.lora_rank < 1:
            raise ValueError("batch, seq_len and lora_rank must be positive integers")


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory by component, in bytes, and what is trained."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    kv_cache: float
    trainable_params: int

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.kv_cache

    def as_gb(self) -> dict[str, float]:
        parts = ("weights", "gradients", "optimizer", "activations", "kv_cache", "total")
        return {p: round(getattr(self, p) / 1e9, 3) for p in parts}


def activation_elements_per_token_layer(shape: ModelShape, setup: Setup) -> float:
    """Tensors one block keeps for backward, per token, counted in elements.

    Attention: norm input and output, q, k, v, the attention output and the input to the
    output projection; MLP: norm input and output, the up (and gate) outputs, and the
    input to the down projection (SwiGLU also keeps silu(gate)). Without flash attention
    the softmax matrix (heads x seq) is kept too.
    """
    d, ff = shape.d_model, shape.d_ff
    attention = 2 * d + (d + 2 * shape.kv_dim) + 2 * d
    mlp = 2 * d + (4 * ff if shape.gated_mlp else 2 * ff)
    scores = 0 if setup.flash_attention else shape.n_head * setup.seq_len
    return attention + mlp + scores


def estimate_memory(shape: ModelShape, setup: Setup) -> MemoryEstimate:
    """Peak memory of one training step (or of serving), by component."""
    tokens = setup.batch * setup.seq_len
    n = shape.n_params
    if setup.method == "inference":
        weight_bytes = served_weight_bytes(shape, setup.inference_dtype)
        kv = tokens * shape.kv_cache_bytes_per_token(setup.kv_dtype)
        logits = setup.batch * shape.vocab_size * 4.0  # one position's logits, fp32
        return MemoryEstimate(weight_bytes, 0.0, 0.0, logits, kv, 0)

    w_b, g_b, o_b, a_b = TRAIN_PRECISION[setup.precision]
    if setup.method in ("pretrain", "full_finetune"):
        trainable = n
        weights = n * w_b
    else:
        trainable = shape.lora_params(setup.lora_rank, setup.lora_targets)
        frozen_dtype = "int4" if setup.method == "qlora" else ("fp32" if setup.precision == "fp32" else "bf16")
        weights = _quantized_weight_bytes(shape, frozen_dtype) + trainable * w_b
    per_layer = activation_elements_per_token_layer(shape, setup)
    if setup.gradient_checkpointing:  # keep each block's input, recompute one block at a time
        blocks = shape.n_layer * shape.d_model + per_layer
    else:
        blocks = shape.n_layer * per_layer
    # Logits, log-probabilities and their gradient, in fp32: the cross-entropy upcasts.
    activations = tokens * (blocks * a_b + 3 * shape.vocab_size * 4.0)
    return MemoryEstimate(weights, trainable * g_b, trainable * o_b, activations, 0.0, trainable)


def served_weight_bytes(shape: ModelShape, dtype: str) -> float:
    """The weights a server holds at `dtype`, and the file they come in: one answer for disk and serving memory
    everywhere (notebooks 00 and 06, `storage_table`, `checkpoint_bytes`): the GGUF file that llama.cpp loads as is
    (`gguf_file_bytes`, checked against the files and llama.cpp's memory in notebook 06). fp16 is bf16's size."""
    return gguf_file_bytes(shape, "bf16" if dtype == "fp16" else dtype)


def _quantized_weight_bytes(shape: ModelShape, dtype: str) -> float:
    """A frozen base being trained at `dtype` (LoRA's bf16 or fp32, QLoRA's 4-bit): int4 compresses the blocks'
    matrices only (with bitsandbytes' scales); embeddings, head and norms stay bf16."""
    if dtype in ("fp32", "bf16", "fp16"):
        return shape.n_params * BYTES[dtype]
    quantized = shape.n_linear_params * (BYTES[dtype] + QUANT_OVERHEAD_BYTES[dtype])
    return quantized + (shape.n_params - shape.n_linear_params) * BYTES["bf16"]


# Bits per weight of the GGUF files llmnb.gguf writes: Q8_0 and Q4_0 store blocks of 32 weights with one fp16 scale.
GGUF_BITS = {"fp32": 32.0, "bf16": 16.0, "int8": 8.5, "int4": 4.5}


def gguf_file_bytes(shape: ModelShape, dtype: str) -> float:
    """A GGUF file of `shape` at `dtype`: the blocks' matrices at `dtype`; embeddings and an untied head at 8.5 bits
    when quantized (llmnb.gguf writes them as Q8_0); norms, biases and position tables at fp32; and the vocabulary."""
    if dtype not in GGUF_BITS:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {tuple(GGUF_BITS)}")
    bits = GGUF_BITS[dtype]
    outer_bits = bits if dtype in ("fp32", "bf16") else GGUF_BITS["int8"]
    token_table = shape.vocab_size * shape.d_model
    small = shape.n_params - shape.n_linear_params - token_table - shape.head_params  # norms, biases, position table
    vocabulary = 36 * shape.vocab_size  # the tokenizer in the metadata: each token's string, type and merge, ~36 bytes
    return (shape.n_linear_params * bits + (token_table + shape.head_params) * outer_bits + small * 32) / 8 + vocabulary


def storage_table(shapes: list[ModelShape], context: int = 4096, dtypes: tuple[str, ...] = ("fp32", "bf16", "int8", "int4")) -> list[dict]:
    """Disk (the GGUF file) and memory to run (`estimate_memory` for serving one request of `context` tokens: the
    weights, a bf16 KV cache, one position's logits) for each shape and dtype, in GB."""
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            memory = estimate_memory(shape, Setup(method="inference", batch=1, seq_len=context, inference_dtype=dtype))
            rows.append({"model": shape.name, "params (B)": shape.n_params / 1e9, "dtype": dtype, "disk GB": served_weight_bytes(shape, dtype) / 1e9,
                         f"KV cache GB ({context} tokens)": memory.kv_cache / 1e9, "memory GB": memory.total / 1e9})
    return rows


def checkpoint_bytes(shape: ModelShape, setup: Setup) -> dict[str, float]:
    """Disk: the weights file, a resumable training checkpoint (adds optimizer state), a LoRA adapter."""
    w_b, _, o_b, _ = TRAIN_PRECISION[setup.precision]
    weights_file = served_weight_bytes(shape, setup.inference_dtype)
    if setup.method in ("lora", "qlora"):
        trainable = shape.lora_params(setup.lora_rank, setup.lora_targets)
        return {"weights_file": weights_file, "training_checkpoint": trainable * (w_b + o_b), "adapter": trainable * BYTES["bf16"]}
    return {"weights_file": weights_file, "training_checkpoint": shape.n_params * (w_b + o_b), "adapter": 0.0}


def training_flops(shape: ModelShape, setup: Setup, tokens: float) -> float:
    """FLOPs to train on `tokens`: 3x the forward (forward + backward) for full training.

    LoRA skips the frozen weights' gradients: about 2x the forward. Gradient
    checkpointing runs the forward twice. 6*N*tokens is the usual shorthand for the
    first case, without attention.
    """
    forward = shape.flops_per_token(setup.seq_len) * tokens
    factor = 3.0 if setup.method in ("pretrain", "full_finetune") else 2.0
    if setup.method == "inference":
        factor = 1.0
    return forward * (factor + (1.0 if setup.gradient_checkpointing else 0.0))


# The utilisation assumed for a GPU the notebook is not running on (large models on A100s reach 35-50 % in published
# runs); the machine a notebook runs on uses its measured figure instead (llmnb.measure.loop_utilisation).
GPU_MFU = 0.4


def training_seconds(flops: float, peak_flops: float, mfu: float = GPU_MFU) -> float:
    """Wall time at a model-FLOPs utilisation `mfu` of the hardware's peak."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    return flops / (peak_flops * mfu)


def chinchilla_tokens(shape: ModelShape) -> float:
    """Compute-optimal training tokens, about 20 per parameter (Hoffmann et al., 2022)."""
    return 20.0 * shape.n_params


def largest_that_fits(memory_bytes: float, setup: Setup, catalog: dict[str, ModelShape] = CATALOG) -> str | None:
    """The largest catalog model whose estimate fits in `memory_bytes`, or None."""
    fitting = [s for s in catalog.values() if estimate_memory(s, setup).total <= memory_bytes]
    return max(fitting, key=lambda s: s.n_params).name if fitting else None

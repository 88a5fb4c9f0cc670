"""Training: a correct, resumable, measured loop for llmnb's GPT, in parts that every later stage calls.

    python -m llmnb.train --config run.json                       # pretraining, one process
    torchrun --nproc-per-node 2 -m llmnb.train --config run.json  # DDP (gloo on CPU, NCCL on GPU), or FSDP

The parts, as in rasbt's `train_model_simple(model, train_loader, val_loader, optimizer, ...)`:
`make_optimizer` (AdamW over the parameters that train, weight-decay groups), `learning_rate`
(warmup then cosine), `train_step` (one optimisation step: micro-batches, clipping, the
gradient scaler), `evaluate` (fixed batches), and `train(model, data, config)`, the loop
that takes a model and its batches from the caller: token windows for pretraining,
prompt-masked pairs for fine-tuning, a frozen base with adapters, anything with
`batch(step, micro, batch_size, device)`. It resumes from its checkpoint, writes
JSONL metrics, and says so when the run is already finished. `pretrain(config)` builds
the model (new, or from any checkpoint `llmnb.checkpoint.load` takes) and the token
windows, and calls `train`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import psutil
import torch
from tqdm import tqdm  # text bars: a notebook saved by a batch run keeps their last state (a widget keeps its first)

from . import budget
from .checkpoint import CHECKPOINT_FILE, bpe_as_hf, load, read_checkpoint, save_checkpoint, tokenizer_from_state
from .data import TokenWindows, read_meta, read_tokens
from .generate import generate
from .hardware import autocast_dtype, peak_flops, pick_device, rank, seed_everything, world_size
from .hf_bridge import to_hf
from .model import GPT, GPTConfig
from .tokenizer import BPETokenizer, CharTokenizer

EVAL_STEPS = 10**12  # evaluation batches are drawn as if from these step numbers, a stream training never reaches


@dataclass
class TrainConfig:
    """The loop's settings: everything `train` reads, for pretraining and fine-tuning alike."""
    out_dir: str = ""  # checkpoints and metrics.jsonl (llmnb.artifacts.run_dir gives a folder under outputs/)
    block_size: int = 64  # the longest row the loop trains on (what the memory check and the FLOP count assume)
    # optimisation
    batch_size: int = 12  # sequences per micro-batch per process
    grad_accum: int = 1
    max_steps: int = 200
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"  # auto, fp32, bf16, fp16 (autocast); fp64: the whole model in float64, for exact comparisons
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model: pays on a GPU over a long run, not on 2 CPU cores (benchmarks/README.md: train_throughput)
    seed: int = 1337
    device: str | None = None
    distributed: str = "ddp"  # under torchrun: ddp or fsdp
    # logging, evaluation, samples, checkpoints
    log_interval: int = 10  # steps between metric records: the loss is read back from the device (a sync) only then
    eval_interval: int = 50
    eval_batches: int = 10
    checkpoint_interval: int = 100  # 0: only the final one
    sample_prompts: list[str] = field(default_factory=lambda: ["ROMEO:\n"])
    sample_tokens: int = 48
    memory_budget_gb: float | None = None  # refuse a model whose estimated training peak exceeds this; None: this machine's memory
    peak_flops: float | None = None  # for MFU; None: the GPU's datasheet peak, or a measured CPU matmul

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass
class PretrainConfig(TrainConfig):
    """The loop's settings and pretraining's own: the token files and the model (`pretrain` reads these)."""
    data_dir: str = ""  # train.bin, val.bin and meta.json: llmnb.artifacts.ensure("tokens") writes them
    # model: new with these sizes, or from anything llmnb.checkpoint.load takes (then the sizes are the checkpoint's)
    init_from: str | None = None
    flavour: str = "gpt2"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_kv_head: int | None = None
    dropout: float = 0.0
    save_hf: bool = True  # a Hugging Face folder at out_dir/hf when the run finishes


def model_config(config: PretrainConfig, vocab_size: int) -> GPTConfig:
    make = GPTConfig.gpt2 if config.flavour == "gpt2" else GPTConfig.llama
    extra = {"n_kv_head": config.n_kv_head} if config.flavour == "llama" else {}
    return make(vocab_size=vocab_size, block_size=config.block_size, n_layer=config.n_layer, n_head=config.n_head,
                n_embd=config.n_embd, dropout=config.dropout, **extra)


# --- optimisation ------------------------------------------------------------------------------


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


class Batches(Protocol):
    """What the loop trains on: the batch of (step, micro-step), the same every time it is asked for."""

    def batch(self, step: int, micro: int, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]: ...


def make_optimizer(model: torch.nn.Module, config: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the parameters that train (requires_grad), with weight decay on the matrices only:
    not on norms and biases, nor on embeddings unless asked. Frozen parameters get no optimizer state."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = "wte" in name or "wpe" in name
        (decay if p.dim() >= 2 and (config.decay_embeddings or not is_embedding) else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("no parameter of the model requires a gradient: unfreeze some (or attach adapters) before training")
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused or None)


def resolve_precision(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if config.precision == "auto":
        return autocast_dtype(device)
    table = {"fp32": None, "fp64": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if config.precision not in table:
        raise ValueError(f"precision must be auto, fp32, fp64, bf16 or fp16, got {config.precision!r}")
    return table[config.precision]


def check_config(config: TrainConfig) -> None:
    """Refuse impossible optimisation settings before any training, saying what to change."""
    if not config.out_dir:
        raise ValueError("out_dir is empty: name the folder the run keeps its checkpoints and metrics in (llmnb.artifacts.run_dir)")
    for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "log_interval"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    if not 0 <= config.min_lr <= config.lr:
        raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={config.min_lr}, lr={config.lr}")
    resolve_precision(config, torch.device("cpu"))


def check_memory(model: GPT, config: TrainConfig, device: torch.device) -> None:
    """Refuse a model whose estimated training peak (llmnb.budget) exceeds the budget: by default this machine's memory.

    Estimated for full training; a partly frozen model (adapters) needs less, and is not refused here.
    """
    if any(not p.requires_grad for p in model.parameters()):
        return
    limit = config.memory_budget_gb if config.memory_budget_gb is not None else _available_memory_gb(device)
    if limit is None:
        return
    setup = budget.Setup(method="pretrain", batch=config.batch_size, seq_len=min(config.block_size, model.config.block_size),
                         precision="mixed" if config.precision in ("bf16", "fp16") else "fp32",
                         gradient_checkpointing=config.gradient_checkpointing)
    need = budget.estimate_memory(model.config.shape(), setup).total / 1e9
    if need > limit:
        raise ValueError(f"estimated peak memory {need:.2f} GB exceeds the budget of {limit:.2f} GB: "
                         "lower batch_size (raise grad_accum to keep the tokens per step), block_size or the model size, "
                         "or turn on gradient_checkpointing")


def _available_memory_gb(device: torch.device) -> float | None:
    """GPU memory, or the RAM still available, in GB; None where unknown (mps)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 1e9
    if device.type == "cpu":
        return psutil.virtual_memory().available / 1e9
    return None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- the parts of a step -----------------------------------------------------------------------


@dataclass
class Runtime:
    """Where and how a run computes: the device, autocast (bf16/fp16, or none) and fp16's gradient scaler."""
    device: torch.device
    dtype: torch.dtype | None

    def __post_init__(self) -> None:
        self.amp = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


def train_step(trained: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Batches, step: int, config: TrainConfig,
               rt: Runtime) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One optimisation step over `grad_accum` micro-batches: (mean loss, gradient norm before clipping), left on the
    device, and the tokens the step computed on, padding included, over every rank.

    Under DDP, gradients are all-reduced on the last micro-batch only (`no_sync` before it).
    Nothing here reads a value back from the device: the caller does, at its logging interval.
    """
    lr = learning_rate(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    micro_batches = [batches.batch(step, micro, config.batch_size, rt.device) for micro in range(config.grad_accum)]
    # Each micro-batch's loss is a mean over its learned tokens, and fine-tuning rows learn different numbers of
    # them: weigh each by its share of the global batch's learned tokens, so that accumulation and DDP (which
    # averages over ranks) give the mean over every learned token of the step, as one process with one big batch.
    counts = torch.stack([(y != -100).sum() for _, y in micro_batches]).float()
    total = counts.sum()
    if world_size() > 1:
        torch.distributed.all_reduce(total)
    weights = counts * world_size() / total.clamp(min=1)
    loss_sum = 0.0  # becomes a tensor of the loss's dtype: fp32, or float64 for a float64 model
    for micro, (x, y) in enumerate(micro_batches):
        last = micro == config.grad_accum - 1
        sync = trained.no_sync() if isinstance(trained, torch.nn.parallel.DistributedDataParallel) and not last else contextlib.nullcontext()
        with sync:
            with rt.amp:
                _, loss = trained(x, y)
            rt.scaler.scale(loss * weights[micro]).backward()
        loss_sum = loss_sum + loss.detach() * weights[micro]  # averaged over ranks when logged: the step's mean loss
    rt.scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, already the norm over every shard
        grad_norm = grad_norm.full_tensor()
    rt.scaler.step(optimizer)
    rt.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, sum(x.numel() for x, _ in micro_batches) * world_size()


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: dict[str, Batches], config: TrainConfig, rt: Runtime) -> dict[str, float]:
    """Mean loss of each split over the same `eval_batches` batches every time (fixed steps of the data order)."""
    model.eval()
    out = {}
    for split, batches in data.items():
        losses = []
        for i in range(config.eval_batches):
            x, y = batches.batch(EVAL_STEPS + i, 0, config.batch_size, rt.device)
            with rt.amp:
                _, loss = model(x, y)
            losses.append(loss.float())
        loss = torch.stack(losses).mean()
        if world_size() > 1:
            torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)
        out[f"{split}_loss"] = loss.item()
    model.train()
    return out


@torch.no_grad()
def sample_texts(model: GPT, tokenizer, config: TrainConfig) -> list[str]:
    """Sampled continuations of the configured prompts (temperature 0.8, top-k 40, seed fixed by the config), as text."""
    out = []
    for prompt in config.sample_prompts:
        ids = torch.tensor([tokenizer.encode(prompt)], device=model.wte.weight.device)
        n = min(config.sample_tokens, model.config.block_size - ids.shape[1])
        if n <= 0:
            continue
        result = generate(model, ids, n, temperature=0.8, top_k=40, seed=config.seed)
        out.append(tokenizer.decode(result[0].tolist()))
    return out


# --- the loop ----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out_dir: Path
    metrics_file: Path
    final_train_loss: float
    final_val_loss: float
    steps: int
    seconds: float
    tokens: int
    hf_dir: Path | None = None
    already_finished: bool = False


def _setup_distributed(device: torch.device) -> torch.device:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def _wrap(model: GPT, config: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The module that trains: the model itself, or its DDP / FSDP wrapper under torchrun."""
    if world_size() == 1:
        return model
    if config.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    if config.distributed != "ddp":
        raise ValueError(f"distributed must be 'ddp' or 'fsdp', got {config.distributed!r}")
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _training_state(model: GPT, trained: torch.nn.Module, optimizer, trainable_only: bool) -> tuple[dict, dict]:
    """(model state, optimizer state), gathered from every rank's shard under FSDP (all ranks must call it).

    `trainable_only` (a base with adapters) keeps only what trains: the frozen base is
    already on disk where it came from, and a 135M-parameter base is 0.5 GB a checkpoint.
    """
    if world_size() > 1 and not isinstance(trained, torch.nn.parallel.DistributedDataParallel):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainable_only:
        return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}, optimizer.state_dict()
    return model.state_dict(), optimizer.state_dict()


def _restore(model: GPT, trained: torch.nn.Module, optimizer, state: dict) -> None:
    if world_size() > 1 and not isinstance(trained, torch.nn.parallel.DistributedDataParallel):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if state.get("trainable_only") and set(state["model"]) != trainable:
            raise ValueError("the checkpoint holds only the parameters that trained, and they are not the ones that train now: "
                             "attach the same adapters (or freeze the same layers) before resuming, or start a new out_dir")
        model.load_state_dict(state["model"], strict=not state.get("trainable_only"))
        optimizer.load_state_dict(state["optimizer"])


class MetricsLog:
    """A run's metrics.jsonl (written by rank 0): every step's loss and gradient norm, read back from the device once
    per logging interval (a read-back is a sync), with the interval's speed: tokens/s, MFU and memory."""

    def __init__(self, path: Path, write: bool, flops_per_token: float, peak: float, device: torch.device):
        self.file = path.open("a") if write else None
        self.flops_per_token, self.peak, self.device = flops_per_token, peak, device
        self.pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # (step, lr, loss, grad norm)
        self.tokens, self.started = 0, time.perf_counter()

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def step(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor, tokens: int) -> None:
        self.pending.append((step, lr, loss, grad_norm))
        self.tokens += tokens

    def flush(self) -> float:
        """Write the interval's records; returns its last loss."""
        values = torch.stack([torch.stack([loss, norm.float()]) for _, _, loss, norm in self.pending])
        if world_size() > 1:
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.AVG)
        seconds = time.perf_counter() - self.started
        for (step, lr, _, _), (loss, norm) in zip(self.pending, values.tolist()):
            self.write({"step": step, "loss": loss, "lr": lr, "grad_norm": norm})
        self.write({"step": self.pending[-1][0], "event": "speed", "tokens_per_s": self.tokens / seconds,
                    "mfu": self.tokens * self.flops_per_token / seconds / self.peak, "memory_mb": _memory_mb(self.device)})
        self.pending, self.tokens = [], 0
        self.restart()
        return values[-1, 0].item()

    def restart(self) -> None:
        """The interval's clock starts again (after an evaluation: it is not training time)."""
        self.started = time.perf_counter()

    def close(self) -> None:
        if self.file:
            self.file.close()


def _run_setup(config: TrainConfig) -> tuple[Runtime, bool]:
    """(the runtime, whether this is one process of several), the process group started under torchrun."""
    device = pick_device(config.device)
    distributed = world_size() > 1
    if distributed:
        device = _setup_distributed(device)
    return Runtime(device, resolve_precision(config, device)), distributed


def _flops_per_token(model: GPT, config: TrainConfig) -> float:
    # forward + backward is 3 forwards; with frozen weights their gradients are skipped, about 2 (as llmnb.budget counts)
    frozen = not all(p.requires_grad for p in model.parameters())
    return (2 if frozen else 3) * model.flops_per_token(min(config.block_size, model.config.block_size))


def _finished(state: dict, out_dir: Path, config: TrainConfig) -> TrainResult:
    last = state.get("last_eval") or {}
    print(f"{out_dir} already finished at step {state['step']} (max_steps={config.max_steps}): nothing to train. "
          "Raise max_steps to continue it, or delete the folder to start again.")
    return TrainResult(out_dir, out_dir / "metrics.jsonl", last.get("train_loss", math.nan), last.get("val_loss", math.nan), state["step"],
                       0.0, 0, already_finished=True)


def train(model: GPT, data: dict[str, Batches], config: TrainConfig, *, tokenizer=None, on_eval: Callable[[dict], None] | None = None,
          stop_after: int | None = None, progress: bool = True) -> TrainResult:
    """Train `model` on `data` ("train", and optionally "val") as configured, resuming from `out_dir` when it holds a checkpoint.

    Only the parameters that require a gradient train. `tokenizer` (optional) writes samples
    at each evaluation and is stored in the checkpoints. `stop_after` ends the run early at
    that step, as a crash would, for tests. A run whose checkpoint has reached `max_steps`
    is not trained again: the result says `already_finished`.
    """
    check_config(config)
    rt, distributed = _run_setup(config)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = read_checkpoint(out_dir, device="cpu") if (out_dir / CHECKPOINT_FILE).exists() else None
    if state is not None and state["step"] >= config.max_steps:
        return _finished(state, out_dir, config)
    # fp64: float32 sums rounded in another order (another rank count, another processor) move a multi-step run by
    # ~1e-6; in float64 that rounding is ~1e-15, so runs that should be equal can be compared tightly
    weights_dtype = torch.float64 if config.precision == "fp64" else None  # None: the weights keep their dtype
    model = model.to(rt.device, dtype=weights_dtype)
    model.gradient_checkpointing = config.gradient_checkpointing
    check_memory(model, config, rt.device)
    model.train()
    trained = _wrap(model, config, rt.device)
    optimizer = make_optimizer(trained, config, fused=rt.device.type == "cuda")  # after sharding: FSDP replaces the parameters
    start_step, last = 0, {}
    if state is not None:
        _restore(model, trained, optimizer, state)
        start_step, last = state["step"], state.get("last_eval") or {}
    if config.compile:
        trained = torch.compile(trained)
    is_main, fsdp = rank() == 0, distributed and config.distributed == "fsdp"
    trainable_only = not all(p.requires_grad for p in model.parameters()) and not fsdp  # FSDP gathers the full state from the shards
    peak = config.peak_flops or peak_flops(rt.device)
    log = MetricsLog(out_dir / "metrics.jsonl", is_main, _flops_per_token(model, config), peak, rt.device)
    if start_step == 0:
        log.write({"event": "start", "config": asdict(config), "params": model.num_params(), "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                   "peak_flops_assumed": peak, "device": str(rt.device), "world_size": world_size(), "precision": str(weights_dtype or rt.dtype)})
    bar = tqdm(range(start_step, config.max_steps), desc="training", unit="step", disable=not (progress and is_main), initial=start_step,
               total=config.max_steps, mininterval=1.0)
    if state is not None:
        set_rng_state(state["rng"])  # last: the set-up above (measuring the peak, say) draws random numbers too
    started, done, total_tokens = time.perf_counter(), start_step, 0  # fine-tuning rows are as wide as the longest: tokens computed
    for step in bar:
        loss, grad_norm, tokens = train_step(trained, optimizer, data["train"], step, config, rt)
        log.step(step + 1, learning_rate(step, config), loss, grad_norm, tokens)
        total_tokens += tokens
        done = step + 1
        finishing = done == config.max_steps or done == stop_after
        if done % config.log_interval == 0 or finishing:
            bar.set_postfix(loss=f"{log.flush():.3f}")
        if done % config.eval_interval == 0 or done == config.max_steps:
            last = _evaluate_and_report(model, trained, data, config, rt, done, tokenizer if not fsdp else None, log,
                                        on_eval if is_main else None)
        if (config.checkpoint_interval and done % config.checkpoint_interval == 0) or finishing:
            _checkpoint(model, trained, optimizer, out_dir, done, tokenizer, config, last, trainable_only)
        if done == stop_after:
            break
    log.close()
    if distributed:
        torch.distributed.barrier()
    return TrainResult(out_dir, out_dir / "metrics.jsonl", last.get("train_loss", math.nan), last.get("val_loss", math.nan), done,
                       time.perf_counter() - started, total_tokens)


def _evaluate_and_report(model: GPT, trained: torch.nn.Module, data: dict[str, Batches], config: TrainConfig, rt: Runtime, step: int,
                         tokenizer, log: MetricsLog, on_eval: Callable[[dict], None] | None) -> dict[str, float]:
    """Losses on fixed batches of every split and, with a tokenizer, samples (not under FSDP: a rank holds a shard of each weight)."""
    losses = evaluate(trained, data, config, rt)
    record = {"step": step, "event": "eval", **losses, "samples": sample_texts(model, tokenizer, config) if tokenizer is not None else []}
    if "val_loss" in losses:
        record["val_perplexity"] = math.exp(losses["val_loss"])
    log.write(record)
    if on_eval is not None:
        on_eval(record)
    log.restart()
    return losses


def _checkpoint(model: GPT, trained: torch.nn.Module, optimizer, out_dir: Path, step: int, tokenizer, config: TrainConfig, last: dict,
                trainable_only: bool) -> None:
    """The run's state at `step` (every rank takes part under FSDP; rank 0 writes it)."""
    model_state, optimizer_state = _training_state(model, trained, optimizer, trainable_only)
    if rank() == 0:
        save_checkpoint(out_dir / CHECKPOINT_FILE, model_state, model.config, tokenizer, optimizer=optimizer_state, step=step,
                        rng=rng_state(), train_config=asdict(config), last_eval=last, trainable_only=trainable_only)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6

    return psutil.Process().memory_info().rss / 1e6


# --- pretraining: token windows and a model ----------------------------------------------------


def data_tokenizer(data_dir: str | Path):
    """The tokenizer of a token folder: llmnb's CharTokenizer, or the BPE tokenizer.json as a `PreTrainedTokenizerFast`."""
    meta, path = read_meta(data_dir), Path(data_dir)
    if meta.tokenizer_kind == "char":
        return CharTokenizer.load(path / meta.tokenizer_file)
    return bpe_as_hf(BPETokenizer.from_hf_json(path / meta.tokenizer_file))


def build_model(config: PretrainConfig, vocab_size: int) -> GPT:
    """A new GPT with the configured sizes (seeded), or the weights of `init_from` (then its sizes)."""
    if config.init_from is None:
        torch.manual_seed(config.seed)
        return GPT(model_config(config, vocab_size))
    model, _ = load(config.init_from)
    if vocab_size > model.config.vocab_size:
        raise ValueError(f"the token files use {vocab_size} ids but {config.init_from} knows {model.config.vocab_size}: "
                         "tokenize the data with that model's tokenizer")
    if config.dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = config.dropout
    return model.train()


def pretrain(config: PretrainConfig, on_eval: Callable[[dict], None] | None = None, stop_after: int | None = None, progress: bool = True) -> TrainResult:
    """Train on the token windows of `data_dir`, then (at the end, with `save_hf`) export a Hugging Face folder to `out_dir/hf`."""
    meta = read_meta(config.data_dir)
    if config.save_hf and meta.tokenizer_kind == "char":
        raise ValueError("a character-level model has no Hugging Face tokenizer to save beside it: set save_hf=False")
    check_config(config)
    seed_everything(config.seed)
    windows = {split: TokenWindows(read_tokens(config.data_dir, split), config.block_size, config.seed) for split in ("train", "val")}
    tokenizer = data_tokenizer(config.data_dir)
    model = build_model(config, meta.vocab_size)
    eos = getattr(tokenizer, "eos_token_id", None)  # <|endoftext|> for BPE, none at the character level
    if eos is not None:
        model.config.eos_token_id = model.config.bos_token_id = eos
    result = train(model, windows, config, tokenizer=tokenizer, on_eval=on_eval, stop_after=stop_after, progress=progress)
    if config.save_hf and result.steps == config.max_steps and rank() == 0:
        state = read_checkpoint(result.out_dir)
        final = GPT(GPTConfig.from_dict(state["model_config"]))
        final.load_state_dict(state["model"])
        result.hf_dir = result.out_dir / "hf"
        to_hf(final, result.hf_dir, tokenizer_from_state(state["tokenizer"]))
    return result


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) from a metrics.jsonl; the speed of each logging interval
    (tokens/s, MFU, memory) is on the step record that closed it."""
    steps, evals, speeds = [], [], {}
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "eval":
            evals.append(record)
        elif record.get("event") == "speed":
            speeds[record["step"]] = {k: v for k, v in record.items() if k not in ("step", "event")}
        elif "loss" in record:
            steps.append(record)
    return [s | speeds.get(s["step"], {}) for s in steps], evals


def parse_settings(items: list[str]) -> dict[str, Any]:
    """`NAME=VALUE` command-line settings: the value as JSON, or as plain text when it is not JSON."""
    values = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            values[name] = json.loads(value)
        except json.JSONDecodeError:
            values[name] = value
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmnb.train", description="Pretrain llmnb's GPT (one process, or under torchrun).")
    parser.add_argument("--config", type=Path, help="JSON file of TrainConfig settings")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="override settings (JSON values)")
    parser.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this step, as an interruption would")
    args = parser.parse_args(argv)
    if args.config and not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    try:
        values = json.loads(args.config.read_text()) if args.config else {}
    except json.JSONDecodeError as exc:
        parser.error(f"--config {args.config} is not valid JSON: {exc}")
    values.update(parse_settings(args.set))
    result = pretrain(PretrainConfig.from_dict(values), stop_after=args.stop_after)
    if rank() == 0:
        print(json.dumps({"steps": result.steps, "train_loss": result.final_train_loss, "val_loss": result.final_val_loss,
                          "seconds": round(result.seconds, 2), "tokens": result.tokens, "hf_dir": str(result.hf_dir) if result.hf_dir else None}))
    if world_size() > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

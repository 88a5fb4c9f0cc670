"""Pretraining: a correct, resumable, measured training loop for llmnb's GPT, on one process or under torchrun.

    python -m llmnb.train --config run.json                       # one process
    torchrun --nproc-per-node 2 -m llmnb.train --config run.json  # DDP (gloo on CPU, NCCL on GPU)

AdamW with weight-decay groups, linear warmup then cosine decay, gradient accumulation
and clipping, bf16/fp16 autocast where it pays, a deterministic data order (the batch of
step s is a function of the seed and s alone), evaluation on fixed batches, atomic
checkpoints with optimizer and RNG state, a JSONL metrics log with tokens/s and MFU, and
a final Hugging Face folder that `transformers.pipeline` loads.
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
from typing import Any, Callable

import numpy as np
import torch

from . import budget
from .data import read_token_file
from .hardware import autocast_dtype, measure_matmul_flops, pick_device, seed_everything
from .model import GPT, GPTConfig, to_hf

EVAL_STEPS = 10**12  # evaluation batches are drawn as if from these step numbers
# Dense bf16/fp16 peak of common GPUs (datasheets), for MFU; other devices use a measured matmul.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "T4": 65e12, "V100": 125e12}


@dataclass
class TrainConfig:
    data_dir: str = "outputs/data/shakespeare-bpe"  # train.bin, val.bin and meta.json from notebook 01
    out_dir: str = "outputs/pretrain/run"
    # model
    flavour: str = "gpt2"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_kv_head: int | None = None
    block_size: int = 64
    dropout: float = 0.0
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
    precision: str = "auto"  # auto, fp32, bf16, fp16
    gradient_checkpointing: bool = False
    compile: bool = False
    seed: int = 1337
    device: str | None = None
    distributed: str = "ddp"  # under torchrun: ddp or fsdp
    # evaluation, samples, checkpoints
    eval_interval: int = 50
    eval_batches: int = 10
    checkpoint_interval: int = 100  # 0: only the final one
    sample_prompts: list[str] = field(default_factory=lambda: ["ROMEO:\n"])
    sample_tokens: int = 48
    memory_budget_gb: float | None = None  # refuse a configuration whose estimated peak exceeds this; None: this machine's memory
    peak_flops: float | None = None  # for MFU; None: the GPU's datasheet peak, or a measured CPU matmul
    save_hf: bool = True

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.block_size * world_size()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def model_config(config: TrainConfig, vocab_size: int) -> GPTConfig:
    make = GPTConfig.gpt2 if config.flavour == "gpt2" else GPTConfig.llama
    extra = {"n_kv_head": config.n_kv_head} if config.flavour == "llama" else {}
    return make(vocab_size=vocab_size, block_size=config.block_size, n_layer=config.n_layer, n_head=config.n_head,
                n_embd=config.n_embd, dropout=config.dropout, **extra)


# --- data --------------------------------------------------------------------------------------


class TokenWindows:
    """Random (input, target) windows from a memory-mapped token file, in a reproducible order.

    The batch of (step, micro-step) is drawn from a generator seeded by (seed, step, micro):
    a resumed run sees exactly the batches an uninterrupted one would, and under DDP each
    rank takes its slice of the same global batch that one process would draw whole.
    """

    def __init__(self, path: Path, vocab_size: int, block_size: int, seed: int):
        self.tokens = read_token_file(path, vocab_size)
        self.block_size, self.seed = block_size, seed
        if len(self.tokens) <= block_size + 1:
            raise ValueError(f"{path} holds {len(self.tokens)} tokens, fewer than a context of {block_size} + 1: lower block_size")

    def batch(self, step: int, micro: int, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        generator = np.random.default_rng([self.seed, step, micro])
        starts = generator.integers(0, len(self.tokens) - self.block_size - 1, batch_size * world_size())
        starts = starts[rank() * batch_size:(rank() + 1) * batch_size]
        rows = np.stack([self.tokens[s:s + self.block_size + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows).to(device)
        return rows[:, :-1], rows[:, 1:]


# --- optimisation ------------------------------------------------------------------------------


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def make_optimizer(model: torch.nn.Module, config: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only: not on norms and biases, nor on embeddings unless asked."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = "wte" in name or "wpe" in name
        (decay if p.dim() >= 2 and (config.decay_embeddings or not is_embedding) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused or None)


def resolve_precision(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if config.precision == "auto":
        return autocast_dtype(device)
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if config.precision not in table:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {config.precision!r}")
    return table[config.precision]


def check_config(config: TrainConfig, vocab_size: int, val_tokens: int) -> GPTConfig:
    """Refuse impossible configurations before any training, saying what to change."""
    gpt = model_config(config, vocab_size)  # raises for heads that do not divide the width, and so on
    for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    if val_tokens <= config.block_size + 1:
        raise ValueError(f"the validation split has {val_tokens} tokens, fewer than a context of {config.block_size} + 1: lower block_size")
    if not 0 <= config.min_lr <= config.lr:
        raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={config.min_lr}, lr={config.lr}")
    limit = config.memory_budget_gb if config.memory_budget_gb is not None else _available_memory_gb(pick_device(config.device))
    if limit is not None:
        setup = budget.Setup(method="pretrain", batch=config.batch_size, seq_len=config.block_size,
                             precision="mixed" if config.precision in ("bf16", "fp16") else "fp32",
                             gradient_checkpointing=config.gradient_checkpointing)
        need = budget.estimate_memory(gpt.shape(), setup).total / 1e9
        if need > limit:
            raise ValueError(f"estimated peak memory {need:.2f} GB exceeds the budget of {limit:.2f} GB: "
                             "lower batch_size (raise grad_accum to keep the tokens per step), block_size or the model size, "
                             "or turn on gradient_checkpointing")
    return gpt


def _available_memory_gb(device: torch.device) -> float | None:
    """GPU memory, or the RAM still available, in GB; None where unknown (mps)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 1e9
    if device.type == "cpu":
        import psutil

        return psutil.virtual_memory().available / 1e9
    return None


# --- checkpoints ------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict) -> Path:
    """Write atomically: a temporary file, then a rename, so a crash leaves the last complete checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    path = out_dir / "checkpoint.pt"
    return path if path.exists() else None


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
    hf_dir: Path | None


def peak_flops_for(device: torch.device, config: TrainConfig) -> float:
    if config.peak_flops:
        return config.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    return measure_matmul_flops(device, size=1024, seconds=0.5)


@torch.no_grad()
def evaluate(model, windows: dict[str, TokenWindows], config: TrainConfig, device, amp) -> dict[str, float]:
    """Mean loss over the same `eval_batches` batches every time (fixed steps of the data order)."""
    model.eval()
    out = {}
    for split, data in windows.items():
        losses = []
        for i in range(config.eval_batches):
            x, y = data.batch(EVAL_STEPS + i, 0, config.batch_size, device)  # a stream training never reaches
            with amp:
                _, loss = model(x, y)
            losses.append(loss.float())
        loss = torch.stack(losses).mean()
        if world_size() > 1:
            torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)
        out[f"{split}_loss"] = loss.item()
    model.train()
    return out


def train(config: TrainConfig, on_eval: Callable[[dict], None] | None = None, stop_after: int | None = None, progress: bool = True) -> TrainResult:
    """Train (or resume) as configured. `stop_after` ends the run early at that step, as a crash would, for tests."""
    distributed = world_size() > 1
    device = pick_device(config.device)
    if distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    seed_everything(config.seed)
    data_dir, out_dir = Path(config.data_dir), Path(config.out_dir)
    meta_file = data_dir / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"no {meta_file}: run notebook 01 (llmnb run --only 01) to write the token files, or point data_dir at them")
    meta = json.loads(meta_file.read_text())
    vocab = meta["vocab_size"]
    windows = {"train": TokenWindows(data_dir / "train.bin", vocab, config.block_size, config.seed),
               "val": TokenWindows(data_dir / "val.bin", vocab, config.block_size, config.seed)}
    gpt_config = check_config(config, vocab, len(windows["val"].tokens))
    tokenizer = text_tokenizer(data_dir, meta)  # built once, for the samples at every evaluation
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = GPT(gpt_config).to(device)
    if config.gradient_checkpointing:
        _checkpoint_blocks(model)
    start_step, state = 0, None
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        start_step = state["step"]
    fsdp = distributed and config.distributed == "fsdp"
    trained = model
    if distributed:
        if config.distributed == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            trained = fully_shard(model)
        else:
            trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(trained, config, fused=device.type == "cuda")  # after sharding: FSDP replaces the parameters
    if state is not None:
        if state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
    if config.compile:
        trained = torch.compile(trained)
    dtype = resolve_precision(config, device)
    amp = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    flops_per_step = model.flops_per_token(config.block_size, training=True) * config.tokens_per_step
    peak = peak_flops_for(device, config)
    metrics_file = out_dir / "metrics.jsonl"
    is_main = rank() == 0
    log = metrics_file.open("a") if is_main else None

    def write(record: dict) -> None:
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()

    if is_main and start_step == 0:
        write({"event": "start", "config": asdict(config), "params": model.num_params(), "peak_flops_assumed": peak, "device": str(device),
               "world_size": world_size(), "precision": str(dtype)})
    from tqdm.auto import tqdm

    bar = tqdm(range(start_step, config.max_steps), desc="training", unit="step", disable=not (progress and is_main), initial=start_step, total=config.max_steps)
    last = {"train_loss": float("nan"), "val_loss": float("nan")}
    started, tokens_seen = time.perf_counter(), 0
    step = start_step
    for step in bar:
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = 0.0
        for micro in range(config.grad_accum):
            x, y = windows["train"].batch(step, micro, config.batch_size, device)
            sync = contextlib.nullcontext()
            if distributed and config.distributed == "ddp" and micro < config.grad_accum - 1:
                sync = trained.no_sync()
            with sync:
                with amp:
                    _, loss = trained(x, y)
                scaler.scale(loss / config.grad_accum).backward()
            loss_sum += loss.item() / config.grad_accum
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trained.parameters(), config.grad_clip if config.grad_clip > 0 else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens_seen += config.tokens_per_step
        loss_t = torch.tensor(loss_sum, device=device)
        if distributed:
            torch.distributed.all_reduce(loss_t, op=torch.distributed.ReduceOp.AVG)
        record = {"step": step + 1, "loss": loss_t.item(), "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": config.tokens_per_step / dt,
                  "mfu": flops_per_step / dt / peak, "memory_mb": _memory_mb(device)}
        write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        done = step + 1
        if done % config.eval_interval == 0 or done == config.max_steps:
            last = evaluate(trained, windows, config, device, amp)
            samples = [] if fsdp else sample(model, config, tokenizer, device)  # FSDP holds only a shard of each weight
            evaluation = {"step": done, "event": "eval", **last, "val_perplexity": math.exp(last["val_loss"]), "samples": samples}
            write(evaluation)
            if on_eval and is_main:
                on_eval(evaluation)
        if (config.checkpoint_interval and done % config.checkpoint_interval == 0) or done == config.max_steps or done == stop_after:
            saved = {"model": _full_state_dict(trained, model), "optimizer": None if fsdp else optimizer.state_dict(),
                     "step": done, "rng": rng_state(), "config": asdict(config)}  # every rank takes part in gathering FSDP shards
            if is_main:
                save_checkpoint(out_dir / "checkpoint.pt", saved)
        if done == stop_after:
            break
    if log:
        log.close()
    hf_dir = None
    if config.save_hf and step + 1 == config.max_steps and is_main:
        final = GPT(gpt_config)
        final.load_state_dict(saved["model"])  # the final step always writes a checkpoint
        hf_dir = save_hf(final, out_dir / "hf", data_dir, meta)
    if distributed:
        torch.distributed.barrier()
    return TrainResult(out_dir, metrics_file, last["train_loss"], last["val_loss"], step + 1, time.perf_counter() - started, tokens_seen, hf_dir)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    import psutil

    return psutil.Process().memory_info().rss / 1e6


def _full_state_dict(trained, model) -> dict:
    if world_size() > 1 and not isinstance(trained, torch.nn.parallel.DistributedDataParallel):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def _checkpoint_blocks(model: GPT) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        forward = block.forward
        block.forward = lambda *args, _f=forward: checkpoint(_f, *args, use_reentrant=False) if torch.is_grad_enabled() else _f(*args)


def text_tokenizer(data_dir: Path, meta: dict):
    """The llmnb tokenizer named in meta.json: character level, or BPE from its tokenizer.json."""
    from .tokenizer import BPETokenizer, CharTokenizer

    path = data_dir / meta["tokenizer"]
    return CharTokenizer.load(path) if path.name == "char_tokenizer.json" else BPETokenizer.from_hf_json(path)


@torch.no_grad()
def sample(model: GPT, config: TrainConfig, tokenizer, device) -> list[str]:
    """Sampled continuations of the configured prompts (temperature 0.8, top-k 40, fixed seed), as text."""
    out = []
    for prompt in config.sample_prompts:
        ids = torch.tensor([tokenizer.encode(prompt)], device=device)
        n = min(config.sample_tokens, config.block_size - ids.shape[1])
        if n <= 0:
            continue
        result = model.generate(ids, n, temperature=0.8, top_k=40, seed=config.seed)
        out.append(tokenizer.decode(result[0].tolist()))
    return out


def save_hf(model: GPT, folder: Path, data_dir: Path, meta: dict) -> Path:
    """The trained model as a Hugging Face folder, with its tokenizer when the data has a tokenizer.json."""
    tokenizer = None
    if meta["tokenizer"] == "tokenizer.json":
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(data_dir / meta["tokenizer"]), eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    model.config.eos_token_id = model.config.bos_token_id = meta.get("end_of_text")
    to_hf(model, folder, tokenizer)
    return folder


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) from a metrics.jsonl."""
    steps, evals = [], []
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "eval":
            evals.append(record)
        elif "loss" in record:
            steps.append(record)
    return steps, evals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmnb.train", description="Pretrain llmnb's GPT (one process, or under torchrun).")
    parser.add_argument("--config", type=Path, help="JSON file of TrainConfig settings")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="override settings (JSON values)")
    parser.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this step, as an interruption would")
    args = parser.parse_args(argv)
    values = json.loads(args.config.read_text()) if args.config else {}
    for item in args.set:
        name, _, value = item.partition("=")
        try:
            values[name] = json.loads(value)
        except json.JSONDecodeError:
            values[name] = value
    result = train(TrainConfig.from_dict(values), stop_after=args.stop_after)
    if rank() == 0:
        print(json.dumps({"steps": result.steps, "train_loss": result.final_train_loss, "val_loss": result.final_val_loss,
                          "seconds": round(result.seconds, 2), "tokens": result.tokens, "hf_dir": str(result.hf_dir) if result.hf_dir else None}))
    if world_size() > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

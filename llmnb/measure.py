"""Measure what a training step really holds, to check `llmnb.budget`'s estimates (notebooks 00 and 04).

Each measurement runs in a fresh process (`measure_training_memory`): the rise of its peak
resident memory (CPU) or `torch.cuda.max_memory_allocated` (GPU) over what it held before
the model was built, for pretraining, full fine-tuning, LoRA (llmnb's adapters) and QLoRA
(the usual stack: transformers, bitsandbytes NF4, peft).
"""
from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace

import torch

from .budget import ModelShape, Setup, gpt2_shape, training_flops
from .hardware import machine_figure, peak_flops, reset_peak_resident, resident_bytes
from .hf_bridge import hf_config
from .lora import attach
from .model import GPT, GPTConfig


def _measure_main() -> None:
    """Child-process entry: read shape, setup and steps as JSON on stdin, print the result as JSON."""
    job = json.load(sys.stdin)
    shape, setup = ModelShape(**job["shape"]), Setup(**{**job["setup"], "lora_targets": tuple(job["setup"]["lora_targets"])})
    device = job["device"]
    def build(shape: ModelShape, method: str) -> torch.nn.Module:
        torch.manual_seed(0)
        config = GPTConfig.from_shape(shape, block_size=setup.seq_len, attention="sdpa" if setup.flash_attention else "math")
        targets = [f"{t}_proj" for t in setup.lora_targets]
        if method == "qlora":  # transformers' model, its frozen matrices in 4-bit NF4 by bitsandbytes, peft's adapters
            return _qlora_model(config, setup.lora_rank, targets, device)
        model = GPT(config).to(device)
        model.gradient_checkpointing = setup.gradient_checkpointing
        if method == "lora":
            attach(model, targets, r=setup.lora_rank, alpha=2 * setup.lora_rank)
        return model

    def train(shape: ModelShape, steps: int, method: str) -> tuple[int, float, list[float]]:
        model = build(shape, method).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, shape.vocab_size, (setup.batch, setup.seq_len + 1), device=device)
        seconds = []
        for _ in range(steps):
            started = time.perf_counter()
            if method == "qlora":
                loss = model(input_ids=ids, labels=ids).loss
            else:
                _, loss = model(ids[:, :-1], ids[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
        return sum(p.numel() for p in model.parameters()), float(loss), seconds

    # Warm up on a minimal model of the same kind, so that the runtime's one-off costs
    # (kernel libraries paged in, thread pools) are not charged to the model.
    tiny = replace(shape, n_layer=1, d_model=64, n_head=1, n_kv_head=1, d_ff=64, vocab_size=64)
    train(tiny, 1, setup.method)
    gc.collect()
    reset_peak_resident()
    base, _ = resident_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    params, loss, seconds = train(shape, job["steps"], setup.method)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resident_bytes()[1] - base
    # the first step also allocates the optimizer's state and picks kernels: the median of the others is the pace
    print(json.dumps({"peak_bytes": peak, "params": params, "loss": loss, "step_seconds": statistics.median(seconds[1:] or seconds)}))


def _qlora_model(config, rank: int, targets: list[str], device: str):
    """A random `transformers` model of `config`, reloaded with its linear layers in NF4, with peft adapters."""
    from peft import LoraConfig, get_peft_model  # QLoRA's reference stack, loaded only when measured
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # seconds to import: only where a Hugging Face object is built

    with tempfile.TemporaryDirectory() as folder:
        AutoModelForCausalLM.from_config(hf_config(config)).save_pretrained(folder)
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4, dtype=torch.float32, device_map=device)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, task_type="CAUSAL_LM"))


def measure_training_memory(shape: ModelShape, setup: Setup, steps: int = 3, device: str = "cpu") -> dict:
    """Peak memory of `steps` fp32 AdamW steps with `shape`, in a fresh process, random weights; also the seconds a
    step took (the median after the first).

    Pretraining and full fine-tuning train every weight of llmnb's GPT; "lora" adds
    llmnb.lora adapters on `setup.lora_targets`; "qlora" is the usual stack: transformers,
    its frozen matrices in NF4 by bitsandbytes, peft's adapters. On CUDA:
    `torch.cuda.max_memory_allocated`. On CPU: the rise of the process's peak resident
    memory over its resident memory before the model was built.
    """
    if setup.method == "inference" or setup.precision != "fp32":
        raise ValueError("the measurement covers fp32 training only (method pretrain, full_finetune, lora or qlora; precision='fp32')")
    job = json.dumps({"shape": asdict(shape), "setup": asdict(setup), "steps": steps, "device": device})
    result = subprocess.run([sys.executable, "-c", "from llmnb.measure import _measure_main; _measure_main()"], input=job, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the measurement process failed (exit {result.returncode}; out of memory?):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# The model our loop's utilisation is measured on: GPT-2's vocabulary and head, six 384-wide layers (30 M parameters),
# 8 x 256 tokens a step, fp32. Large enough that its matmuls are not all overhead, small enough for seconds on 2 cores.
UTILISATION_SHAPE = gpt2_shape("utilisation reference", n_layer=6, d_model=384, n_head=6, vocab_size=50257, context=256)
UTILISATION_SETUP = Setup(method="pretrain", batch=8, seq_len=256, precision="fp32")


def loop_utilisation(device: str = "cpu", remeasure: bool = False) -> float:
    """The share of this machine's matmul peak (`hardware.peak_flops`) that a training step of llmnb's loop reaches, on
    `UTILISATION_SHAPE`: the utilisation every time estimate for this machine uses (notebooks 00, 03, 04), measured
    once per machine (`hardware.machine_figure`). Larger models use the machine better, so it errs long."""
    def measure() -> float:
        seconds = measure_training_memory(UTILISATION_SHAPE, UTILISATION_SETUP, steps=4, device=device)["step_seconds"]
        flops = training_flops(UTILISATION_SHAPE, UTILISATION_SETUP, UTILISATION_SETUP.batch * UTILISATION_SETUP.seq_len)
        utilisation = flops / (seconds * peak_flops(device))
        if utilisation > 1:  # the loop beat the peak: the peak was measured while something else ran; once more
            utilisation = flops / (seconds * peak_flops(device, remeasure=True))
        if utilisation > 1:
            raise RuntimeError(f"our training loop reached {utilisation:.2f}x this machine's measured matmul peak: the peak was "
                               "measured while another process used the cores. Stop it and set LLMNB_REMEASURE=1 to measure again")
        return utilisation

    return machine_figure("our training loop's utilisation of the matmul peak", measure, device, remeasure)

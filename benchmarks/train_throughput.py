"""Training throughput: llmnb's training step against transformers' GPT2LMHeadModel, same widths, data and optimizer.

Both models get the same initial weights (through the Hugging Face bridge), the same batches from the
token files of notebook 01, and the same AdamW; we time `--steps` full steps (forward, backward,
clip, update) after a warm-up, the two models taking turns in rounds of 5 steps so that a slow spell of a
shared machine (CPU steal) hits both alike. Configurations: nanoGPT's documented CPU one (4 layers, 4 heads,
128 wide, context 64, batch 12) and a larger one. "ours, compiled" is the same model and step through
`torch.compile(model)` (what `TrainConfig.compile` does: forward and backward each one Inductor graph);
its compile time (the first step's, less an eager step's) is its own column, and "steps to repay" is how
many steps the compiled speed takes to win that time back. The ratios are over transformers in tokens/s.

    python benchmarks/train_throughput.py
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from llmnb import hardware  # noqa: E402
from llmnb.hf_bridge import to_hf  # noqa: E402
from llmnb.model import GPT, GPTConfig  # noqa: E402
from llmnb import artifacts  # noqa: E402
from llmnb.data import TokenWindows, read_meta, read_tokens  # noqa: E402

CONFIGS = {"nanoGPT CPU (4x4x128, ctx 64, batch 12)": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch=12),
           "larger (6x6x384, ctx 256, batch 8)": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=8)}


def trainer(model, windows, batch, device, hf: bool, compile: bool = False):
    """One full training step of `model` per call, on the batch of that step number."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    forward = torch.compile(model) if compile else model

    def step(i: int) -> None:
        x, y = windows.batch(i, 0, batch, device)
        loss = forward(input_ids=x, labels=x).loss if hf else forward(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def tokens_per_second(steps: dict, tokens_per_step: int, n_steps: int, round_size: int = 5) -> tuple[dict[str, float], dict[str, float]]:
    """Tokens/s of each contender over `n_steps` timed steps (after 3 warm-up steps), in turns of `round_size` steps;
    and each one's first step in seconds (a compiled step's includes its compile)."""
    first = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        step(0)
        first[name] = time.perf_counter() - t0
        for i in range(1, 3):
            step(i)
    spent = dict.fromkeys(steps, 0.0)
    for start in range(0, n_steps, round_size):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for i in range(start, min(start + round_size, n_steps)):
                step(100 + i)
            spent[name] += time.perf_counter() - t0
    return {name: n_steps * tokens_per_step / seconds for name, seconds in spent.items()}, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", type=Path, default=None, help="a token folder (default: the Shakespeare BPE one, prepared if missing)")
    args = parser.parse_args()
    args.data = args.data or artifacts.ensure("tokens")
    meta = read_meta(args.data)
    device = hardware.pick_device()
    info = hardware.machine_info()
    print(f"# {time.strftime('%Y-%m-%d')} on {info.cpu}, {info.cores} cores, GPU: {info.gpu or 'none'}; device {device}, fp32; "
          f"torch {torch.__version__}, transformers {info.libraries['transformers']}; {args.steps} steps after 3 warm-up, in turns of 5\n")
    print("| configuration | params (M) | ours (tokens/s) | ours, compiled (tokens/s) | transformers GPT2LMHeadModel (tokens/s) "
          "| ours / transformers | compiled / transformers | compile (s) | steps to repay |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, c in CONFIGS.items():
        windows = TokenWindows(read_tokens(args.data, "train"), c["block_size"], seed=0)
        torch.manual_seed(0)
        ours = GPT(GPTConfig.gpt2(vocab_size=meta.vocab_size, block_size=c["block_size"], n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"])).to(device)
        theirs = to_hf(ours).to(device)
        theirs.config._attn_implementation = "sdpa"
        twin = copy.deepcopy(ours)
        tokens = c["batch"] * c["block_size"]
        rates, first = tokens_per_second({"ours": trainer(ours, windows, c["batch"], device, hf=False),
                                          "compiled": trainer(twin, windows, c["batch"], device, hf=False, compile=True),
                                          "theirs": trainer(theirs, windows, c["batch"], device, hf=True)}, tokens, args.steps)
        a, compiled, b = rates["ours"], rates["compiled"], rates["theirs"]
        compile_s = first["compiled"] - tokens / a
        saved = tokens / a - tokens / compiled  # seconds a compiled step saves
        repay = f"{compile_s / saved:,.0f}" if saved > 0 else "never"
        print(f"| {name} | {ours.num_params() / 1e6:.2f} | {a:,.0f} | {compiled:,.0f} | {b:,.0f} | {a / b:.2f} | {compiled / b:.2f} "
              f"| {compile_s:.0f} | {repay} |", flush=True)


if __name__ == "__main__":
    main()

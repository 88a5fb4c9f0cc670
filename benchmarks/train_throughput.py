"""Training throughput: llmnb's training step against transformers' GPT2LMHeadModel, same widths, data and optimizer.

Both models get the same initial weights (through the Hugging Face bridge), the same batches from the
token files of notebook 01, and the same AdamW; we time `--steps` full steps (forward, backward,
clip, update) after a warm-up. Configurations: nanoGPT's documented CPU one (4 layers, 4 heads,
128 wide, context 64, batch 12) and a larger one. The last column is ours / transformers in tokens/s.

    python benchmarks/train_throughput.py
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from llmnb import hardware  # noqa: E402
from llmnb.model import GPT, GPTConfig, to_hf  # noqa: E402
from llmnb.paths import outputs_dir  # noqa: E402
from llmnb.train import TokenWindows  # noqa: E402

CONFIGS = {"nanoGPT CPU (4x4x128, ctx 64, batch 12)": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch=12),
           "larger (6x6x384, ctx 256, batch 8)": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=8)}


def tokens_per_second(model, windows, batch, steps, device, hf: bool) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()

    def step(i):
        x, y = windows.batch(i, 0, batch, device)
        loss = model(input_ids=x, labels=x).loss if hf else model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(3):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(100 + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch * windows.block_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", type=Path, default=outputs_dir("data", "shakespeare-bpe"))
    args = parser.parse_args()
    meta = json.loads((args.data / "meta.json").read_text())
    device = hardware.pick_device()
    info = hardware.machine_info()
    print(f"# {time.strftime('%Y-%m-%d')} on {info.cpu}, {info.cores} cores, GPU: {info.gpu or 'none'}; device {device}, fp32; "
          f"torch {torch.__version__}, transformers {info.libraries['transformers']}; {args.steps} steps after 3 warm-up\n")
    print("| configuration | params (M) | ours (tokens/s) | transformers GPT2LMHeadModel (tokens/s) | ours / transformers |")
    print("|---|---:|---:|---:|---:|")
    for name, c in CONFIGS.items():
        windows = TokenWindows(args.data / "train.bin", meta["vocab_size"], c["block_size"], seed=0)
        torch.manual_seed(0)
        ours = GPT(GPTConfig.gpt2(vocab_size=meta["vocab_size"], block_size=c["block_size"], n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"])).to(device)
        theirs = to_hf(ours).to(device)
        theirs.config._attn_implementation = "sdpa"
        a = tokens_per_second(ours, windows, c["batch"], args.steps, device, hf=False)
        b = tokens_per_second(theirs, windows, c["batch"], args.steps, device, hf=True)
        print(f"| {name} | {ours.num_params() / 1e6:.2f} | {a:,.0f} | {b:,.0f} | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()

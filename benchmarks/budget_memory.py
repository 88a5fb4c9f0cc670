"""How well does llmnb.budget predict real training memory? Estimate vs measurement, in one run.

For a sweep of GPT-2 shaped models, train a few fp32 AdamW steps of llmnb's GPT (the model
the notebooks train) in a fresh process, measure its peak memory, and print it beside our
estimate. The last column is measured / estimate.

    python benchmarks/budget_memory.py            # CPU here, CUDA where present
    python benchmarks/budget_memory.py --quick    # three small shapes
"""
from __future__ import annotations

import argparse
import time

from llmnb import budget, hardware, measure

SWEEP = [  # layers, width, heads, vocab, seq, batch
    (2, 128, 4, 4096, 128, 4),
    (4, 256, 4, 8192, 256, 8),
    (6, 384, 6, 8192, 256, 8),
    (12, 384, 6, 8192, 256, 8),
    (6, 384, 6, 50257, 256, 8),
    (6, 384, 6, 50257, 512, 4),
    (8, 512, 8, 50257, 256, 8),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the first three shapes")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    device = hardware.pick_device().type
    info = hardware.machine_info()
    print(f"# {time.strftime('%Y-%m-%d')} on {info.cpu}, {info.cores} cores, {info.ram_gb:.0f} GB RAM, GPU: {info.gpu or 'none'}; device {device}\n")
    print("| layers | width | vocab | seq x batch | params (M) | estimate (MB) | measured (MB) | measured / estimate |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for layers, width, heads, vocab, seq, batch in SWEEP[:3] if args.quick else SWEEP:
        shape = budget.gpt2_shape("bench", layers, width, heads, vocab_size=vocab, context=seq)
        setup = budget.Setup(method="pretrain", batch=batch, seq_len=seq, precision="fp32")
        estimate = budget.estimate_memory(shape, setup).total
        measured = measure.measure_training_memory(shape, setup, steps=args.steps, device=device)["peak_bytes"]
        print(f"| {layers} | {width} | {vocab} | {seq} x {batch} | {shape.n_params / 1e6:.1f} | {estimate / 1e6:.0f} | {measured / 1e6:.0f} | {measured / estimate:.2f} |", flush=True)


if __name__ == "__main__":
    main()

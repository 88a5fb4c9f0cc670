"""LoRA training speed and memory: llmnb.lora on our GPT vs peft on transformers (and trl's SFTTrainer), same model and batch.

    .venv/bin/python benchmarks/lora.py                 # SmolLM2-135M, rank 16 on every linear layer, batch 8
    .venv/bin/python benchmarks/lora.py --rounds 3 --steps 6

Each contender runs in a fresh process (so that its peak resident memory is its own), the
contenders take turns for `--rounds` rounds and each keeps its best seconds per step: a
slow spell of a shared machine hits all of them alike. The batch is the same prompt-masked
arithmetic batch for the first two; trl draws its own batches of the same data and size.
Printed: a Markdown table with the ratio to peft (> 1: ours is faster).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
import torch
from llmnb import checkpoint, lora, sft
from llmnb.hardware import reset_peak_resident, resident_bytes

job = json.loads(sys.argv[1])
torch.manual_seed(0)
reset_peak_resident()
before = resident_bytes()[0]
examples = sft.arithmetic_examples(512, seed=1)
_, tokenizer = checkpoint.load_hf(job["model"])
x, y = sft.batches(tokenizer, examples, 160, seed=0, batch_size=job["batch"]).batch(0, 0, job["batch"], "cpu")
if job["who"] == "trl":
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = [{"prompt": [{"role": "system", "content": e.system}, {"role": "user", "content": e.prompt}],
             "completion": [{"role": "assistant", "content": e.response}]} for e in examples]
    args = SFTConfig(output_dir="/tmp/llmnb-bench-trl", max_steps=job["steps"] + 1, per_device_train_batch_size=job["batch"], learning_rate=1e-4,
                     logging_steps=1, report_to=[], save_strategy="no", activation_checkpointing=False, disable_tqdm=True, bf16=False, use_cpu=True)
    trainer = SFTTrainer(model=checkpoint.load_hf(job["model"])[0], args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=job["r"], lora_alpha=2 * job["r"], target_modules=list(lora.ALL_LINEAR), task_type="CAUSAL_LM"))
    times = []

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(Clock())
    trainer.train()
    seconds = min(times[1:])
else:
    if job["who"] == "ours":
        model, _ = checkpoint.load(job["model"])
        lora.attach(model, "all-linear", r=job["r"], alpha=2 * job["r"])
        step = lambda: model(x, y)[1]
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(checkpoint.load_hf(job["model"])[0], LoraConfig(r=job["r"], lora_alpha=2 * job["r"],
                                                                               target_modules=list(lora.ALL_LINEAR), task_type="CAUSAL_LM"))
        labels = torch.cat([torch.full_like(y[:, :1], -100), y[:, :-1]], dim=1)  # transformers shifts labels itself
        step = lambda: model(input_ids=x, labels=labels).loss
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(job["steps"] + 1):  # the first step warms up
        t = time.perf_counter()
        step().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    seconds = min(times[1:])
print(json.dumps({"seconds": seconds, "peak_mb": (resident_bytes()[1] - before) / 1e6, "tokens": int(x.numel())}))
"""

NAMES = {"ours": "llmnb.lora on llmnb's GPT", "peft": "peft on transformers", "trl": "peft + trl SFTTrainer"}


def measure(who: str, model: str, r: int, batch: int, steps: int) -> dict:
    job = json.dumps({"who": who, "model": model, "r": r, "batch": batch, "steps": steps})
    run = subprocess.run([sys.executable, "-c", CHILD, job], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{who} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for who in NAMES:
            result = measure(who, args.model, args.r, args.batch, args.steps)
            if who not in best or result["seconds"] < best[who]["seconds"]:
                best[who] = {**result, "peak_mb": max(result["peak_mb"], best.get(who, {}).get("peak_mb", 0.0))}
    print(f"LoRA r={args.r} on every linear layer of {args.model}, batch {args.batch}, {best['ours']['tokens']} tokens a step (padded), "
          f"best of {args.rounds} rounds x {args.steps} steps\n")
    print("| contender | s/step | peak memory rise (MB) | peft s/step / this s/step |")
    print("|---|---:|---:|---:|")
    for who, name in NAMES.items():
        print(f"| {name} | {best[who]['seconds']:.3f} | {best[who]['peak_mb']:.0f} | {best['peft']['seconds'] / best[who]['seconds']:.2f} |")


if __name__ == "__main__":
    main()

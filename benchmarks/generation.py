"""Generation speed: llmnb's GPT with and without its KV cache, and prepared for decoding, against transformers' `generate`.

Greedy decoding of `--new` tokens after a `--prompt`-token prompt, at batch 1 and 8, for
SmolLM2-135M-Instruct (Llama flavour, the offline model) and a randomly initialised GPT-2
124M, same weights everywhere. "fp32" is the model as loaded; "prepared" is the same model after
`llmnb.decoding.prepare` (the dtype the processor decodes fastest in, weights packed for oneDNN:
the line above the table says which); "compiled" adds `compile=True` (each step one Inductor graph;
its compile time, paid once per batch size and cache length, is its own column, not in the speed).
The ratios are over our fp32 with its KV cache, and compiled over transformers. "first token" is the
prefill's time: prompt read, first token chosen (eager in every contender).

    python benchmarks/generation.py
    python benchmarks/generation.py --new 16 --batches 1   # quicker
    python benchmarks/generation.py --config FOLDER        # SmolLM2's architecture with random weights, where the
                                                           # offline model is not installed (a GPU machine, say)
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from llmnb import decoding, hardware  # noqa: E402
from llmnb.hf_bridge import from_hf, to_hf  # noqa: E402
from llmnb.model import GPT, GPTConfig  # noqa: E402
from llmnb.checkpoint import resolve_model  # noqa: E402
from llmnb.generate import generate  # noqa: E402


def tokens_per_second(fns: dict, new_tokens: int, batch: int, repeats: int) -> dict[str, float]:
    """Tokens/s of each function, best of `repeats`. The functions take turns, so that a slow spell of a
    shared machine (CPU steal) hits every contender alike instead of one of them."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # a GPU's work done, not only queued
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: batch * new_tokens / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--config", type=Path, default=None,
                        help="a folder whose config.json is SmolLM2's: its architecture with random weights (speed does not depend on them)")
    args = parser.parse_args()
    device = hardware.pick_device()
    torch.manual_seed(0)
    pairs = {}
    if args.config is None:
        hf = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"), dtype=torch.float32).eval()
    else:
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.config), dtype=torch.float32).eval()
    pairs["SmolLM2-135M (llama)" + (", random weights" if args.config else "")] = (from_hf(hf).to(device), hf.to(device))
    gpt2 = GPT(GPTConfig.gpt2()).eval()
    pairs["GPT-2 124M (random)"] = (gpt2.to(device), to_hf(gpt2).to(device))
    info = hardware.machine_info()
    dtype, why = hardware.decoding_dtype(device)
    print(f"# {time.strftime('%Y-%m-%d')} on {info.cpu}, {info.cores} cores, GPU: {info.gpu or 'none'}; device {device}, "
          f"torch {torch.__version__}; prompt {args.prompt}, {args.new} new tokens, greedy, best of {args.repeats} taken in turns; "
          f"prepared: {why}\n")
    print("| model | batch | fp32, no cache (tok/s) | fp32, KV cache (tok/s) | prepared (tok/s) | compiled (tok/s) | transformers fp32 (tok/s) "
          "| ms per step: fp32 → prepared → compiled | first token fp32 → prepared (ms) | compile (s) | prepared / fp32 | compiled / fp32 "
          "| compiled / transformers |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (ours, theirs) in pairs.items():
        fast, compiled = (GPT(ours.config).to(device).eval() for _ in range(2))
        for model in (fast, compiled):
            model.load_state_dict(ours.state_dict())
        decoding.prepare(fast)
        decoding.prepare(compiled, compile=True)
        for batch in [int(b) for b in args.batches.split(",")]:
            ids = torch.randint(0, ours.config.vocab_size, (batch, args.prompt), device=device)
            compiling = compiled.decoding.step.compile_seconds  # so far: this batch size compiles in the warm-up below
            with torch.no_grad():
                rates = tokens_per_second({
                    "cached": lambda: generate(ours, ids, args.new, temperature=0),
                    "fast": lambda: generate(fast, ids, args.new, temperature=0),
                    "compiled": lambda: generate(compiled, ids, args.new, temperature=0),
                    "ref": lambda: theirs.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0),
                }, args.new, batch, args.repeats)
                first = tokens_per_second({"cached": lambda: generate(ours, ids, 1, temperature=0),
                                           "fast": lambda: generate(fast, ids, 1, temperature=0)}, 1, 1, args.repeats)
                plain = tokens_per_second({"plain": lambda: generate(ours, ids, args.new, temperature=0, use_cache=False)}, args.new, batch, 1)["plain"]
            r = rates
            step = compiled.decoding.step
            assert not step.failed, step.failed
            print(f"| {name} | {batch} | {plain:.1f} | {r['cached']:.1f} | {r['fast']:.1f} | {r['compiled']:.1f} | {r['ref']:.1f} "
                  f"| {1000 * batch / r['cached']:.1f} → {1000 * batch / r['fast']:.1f} → {1000 * batch / r['compiled']:.1f} "
                  f"| {1000 / first['cached']:.0f} → {1000 / first['fast']:.0f} | {step.compile_seconds - compiling:.0f} "
                  f"| {r['fast'] / r['cached']:.2f} | {r['compiled'] / r['cached']:.2f} | {r['compiled'] / r['ref']:.2f} |", flush=True)

if __name__ == "__main__":
    main()

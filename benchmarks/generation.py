"""Generation speed: llmnb's GPT with and without its KV cache against transformers' `generate`, same weights.

Greedy decoding of `--new` tokens after a `--prompt`-token prompt, at batch 1 and 8, for
SmolLM2-135M-Instruct (Llama flavour, the offline model) and a randomly initialised GPT-2
124M. "decoding layout" is the same model after `GPT.for_decoding()`. The last column is our
best cached generation's tokens/s over transformers'.

    python benchmarks/generation.py
    python benchmarks/generation.py --new 16 --batches 1   # quicker
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from llmnb import hardware  # noqa: E402
from llmnb.model import GPT, GPTConfig, from_hf, to_hf  # noqa: E402
from llmnb.models import resolve_model  # noqa: E402


def tokens_per_second(fn, new_tokens: int, batch: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return batch * new_tokens / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = hardware.pick_device()
    torch.manual_seed(0)
    pairs = {}
    hf = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"), dtype=torch.float32).eval()
    pairs["SmolLM2-135M (llama)"] = (from_hf(hf).to(device), hf.to(device))
    gpt2 = GPT(GPTConfig.gpt2()).eval()
    pairs["GPT-2 124M (random)"] = (gpt2.to(device), to_hf(gpt2).to(device))
    info = hardware.machine_info()
    print(f"# {time.strftime('%Y-%m-%d')} on {info.cpu}, {info.cores} cores, GPU: {info.gpu or 'none'}; device {device}, fp32, "
          f"torch {torch.__version__}; prompt {args.prompt}, {args.new} new tokens, greedy, best of {args.repeats}\n")
    print("| model | batch | ours, no cache (tok/s) | ours, KV cache (tok/s) | ours, KV cache, decoding layout (tok/s) | transformers generate (tok/s) | ours cached / transformers |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (ours, theirs) in pairs.items():
        decoding = GPT(ours.config).to(device).eval()
        decoding.load_state_dict(ours.state_dict())
        decoding.for_decoding()
        for batch in [int(b) for b in args.batches.split(",")]:
            ids = torch.randint(0, ours.config.vocab_size, (batch, args.prompt), device=device)
            with torch.no_grad():
                cached = tokens_per_second(lambda: ours.generate(ids, args.new, temperature=0), args.new, batch, args.repeats)
                relaid = tokens_per_second(lambda: decoding.generate(ids, args.new, temperature=0), args.new, batch, args.repeats)
                plain = tokens_per_second(lambda: ours.generate(ids, args.new, temperature=0, use_cache=False), args.new, batch, 1)
                ref = tokens_per_second(lambda: theirs.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0),
                                        args.new, batch, args.repeats)
            print(f"| {name} | {batch} | {plain:.1f} | {cached:.1f} | {relaid:.1f} | {ref:.1f} | {max(cached, relaid) / ref:.2f} |", flush=True)


if __name__ == "__main__":
    main()

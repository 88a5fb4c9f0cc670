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
from llmnb.hf_bridge import from_hf, to_hf  # noqa: E402
from llmnb.model import GPT, GPTConfig  # noqa: E402
from llmnb.checkpoint import resolve_model  # noqa: E402
from llmnb.generate import generate  # noqa: E402


def tokens_per_second(fns: dict, new_tokens: int, batch: int, repeats: int) -> dict[str, float]:
    """Tokens/s of each function, best of `repeats`. The functions take turns, so that a slow spell of a
    shared machine (CPU steal) hits every contender alike instead of one of them."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: batch * new_tokens / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
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
          f"torch {torch.__version__}; prompt {args.prompt}, {args.new} new tokens, greedy, best of {args.repeats} taken in turns\n")
    print("| model | batch | ours, no cache (tok/s) | ours, KV cache (tok/s) | ours, KV cache, decoding layout (tok/s) | transformers generate (tok/s) | ours cached / transformers |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (ours, theirs) in pairs.items():
        decoding = GPT(ours.config).to(device).eval()
        decoding.load_state_dict(ours.state_dict())
        decoding.for_decoding()
        for batch in [int(b) for b in args.batches.split(",")]:
            ids = torch.randint(0, ours.config.vocab_size, (batch, args.prompt), device=device)
            with torch.no_grad():
                rates = tokens_per_second({
                    "cached": lambda: generate(ours, ids, args.new, temperature=0),
                    "relaid": lambda: generate(decoding, ids, args.new, temperature=0),
                    "ref": lambda: theirs.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0),
                }, args.new, batch, args.repeats)
                plain = tokens_per_second({"plain": lambda: generate(ours, ids, args.new, temperature=0, use_cache=False)}, args.new, batch, 1)["plain"]
            cached, relaid, ref = rates["cached"], rates["relaid"], rates["ref"]
            print(f"| {name} | {batch} | {plain:.1f} | {cached:.1f} | {relaid:.1f} | {ref:.1f} | {max(cached, relaid) / ref:.2f} |", flush=True)


if __name__ == "__main__":
    main()

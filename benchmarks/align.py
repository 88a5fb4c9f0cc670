"""Alignment steps: llmnb.align vs trl (DPO, GRPO) on the same model and data, and where a PPO step's time goes.

    .venv/bin/python benchmarks/align.py                   # SmolLM2-135M (notebook 04's model if present), LoRA r=16
    .venv/bin/python benchmarks/align.py --rounds 2 --steps 3

Each contender runs in a fresh process; the contenders take turns for `--rounds` rounds and
keep their best seconds per step (a slow spell of a shared machine hits all alike), after one
warm-up step. DPO: the same preference pairs (the verifier's, sampled from the model), batch
`--pairs`; trl computes the reference on the fly as ours does (its default). GRPO: the same
prompts, `--group` samples per prompt, replies of up to 8 tokens, no KL term, one update per
rollout (trl's defaults), in fp32 as ours (trl's configs default to bf16=True, on a CPU too). PPO: ours only (trl deleted its PPO trainer), split by phase. Rollouts: the same
step's sampling and scoring pass laid out as before shared prefills and as now, tokens/s of each.
Printed: Markdown tables with the ratio to trl (> 1: ours is faster).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
from llmnb import align, artifacts, checkpoint, evaluation, lora, sft
from llmnb.hardware import reset_peak_resident, resident_bytes

job = json.loads(sys.argv[1])
torch.manual_seed(0)
reset_peak_resident()
before = resident_bytes()[0]
folder = str(artifacts.ensure("tuned", base=job["model"]))
prompts = sft.arithmetic_examples(64, seed=50_001)
model, tok = checkpoint.load(folder)
lora.attach(model, "all-linear", r=job["r"], alpha=2 * job["r"])
times, phases = [], {}


def clock():
    # a trainer callback that appends each step's seconds to times
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    return Clock()


if job["what"] == "rollout":
    # one GRPO step's sampling and scoring pass, laid out as before (every row reads its whole prompt) and as now (the
    # system message read once for the batch, each prompt once for its group), alternating, best of `steps`
    from llmnb.data import pad_rows
    from llmnb.generate import generate

    ids, mask = pad_rows([sft.prompt_ids(tok, e.prompt, e.system) for e in prompts[:job["prompts"]]], tok.pad_token_id, "left")
    samples, tokens, layouts = {}, {}, {"before": 1, "shared": job["group"]}
    for _ in range(job["steps"]):
        for name, group in layouts.items():
            rows, rows_mask = (ids, mask) if group > 1 else (ids.repeat_interleave(job["group"], 0), mask.repeat_interleave(job["group"], 0))
            started = time.perf_counter()
            out, logprobs = generate(model, rows, 8, temperature=1.0, stop_tokens=[tok.eos_token_id], attention_mask=rows_mask, seed=0,
                                     return_logprobs=True, samples=group, share_prefix=group > 1)
            sampled = time.perf_counter() - started
            full_mask = torch.cat([rows_mask.repeat_interleave(group, 0), (logprobs != 0).long()], dim=1)
            rollout = align.Rollout(out, full_mask, ids.shape[1], logprobs, group)
            started = time.perf_counter()
            align.response_logprobs(model, rollout)[0].sum().backward()
            scored = time.perf_counter() - started
            tokens[name] = int((logprobs != 0).sum())
            best = samples.get(name, (float("inf"), float("inf")))
            samples[name] = (min(best[0], sampled), min(best[1], scored))
    phases = {name: {"sample s": s, "pass s": p, "tokens": tokens[name]} for name, (s, p) in samples.items()}
    times = [sum(samples["shared"])]
elif job["what"] == "dpo":
    pairs = align.verifier_preferences(model, tok, prompts[:24], samples=4, max_new_tokens=8, reference_when_none=True)
    if job["who"] == "ours":
        params = [p for p in model.parameters() if p.requires_grad]
        history = align.train_preferences(lambda b: align.dpo_batch_loss(model, tok, b, 0.1), params, pairs, steps=job["steps"] + 1,
                                          batch_size=job["batch"], lr=1e-5, progress=False)
        times = [b["elapsed"] - a["elapsed"] for a, b in zip(history, history[1:])]
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer

        rows = Dataset.from_list([{"prompt": [{"role": "system", "content": p.system}, {"role": "user", "content": p.prompt}],
                                   "chosen": [{"role": "assistant", "content": p.chosen}],
                                   "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs])
        trainer = DPOTrainer(model=checkpoint.load_hf(folder)[0], processing_class=tok, train_dataset=rows,
                             peft_config=LoraConfig(r=job["r"], lora_alpha=2 * job["r"], target_modules=list(lora.ALL_LINEAR), task_type="CAUSAL_LM"),
                             args=DPOConfig(output_dir="/tmp/llmnb-bench-dpo", max_steps=job["steps"] + 1, per_device_train_batch_size=job["batch"],
                                            learning_rate=1e-5, beta=0.1, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
                                            use_cpu=True, bf16=False))

        trainer.add_callback(clock())
        trainer.train()
        times = times[1:]
else:
    config = align.RLConfig(steps=job["steps"] + 1, prompts_per_step=job["prompts"], method=job["what"], samples_per_prompt=job["group"] if job["what"] == "grpo" else 1,
                            max_new_tokens=8, lr=1e-5, kl_coef=0.0 if job["what"] == "grpo" else 0.05, epochs=1 if job["what"] == "grpo" else 2)
    if job["who"] == "ours":
        history = align.train_rl(align.new_state(model, tok, config), prompts, align.verifier_reward, config,
                                 progress=False)
        times = [b["elapsed"] - a["elapsed"] for a, b in zip(history, history[1:])]
        phases = {k.removeprefix("seconds "): min(h[k] for h in history[1:]) for k in history[0] if k.startswith("seconds ")}
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from trl import GRPOConfig, GRPOTrainer

        def reward(completions, answer, **kwargs):
            return [float(evaluation.last_number(c[0]["content"]) == a) for c, a in zip(completions, answer)]

        rows = Dataset.from_list([{"prompt": [{"role": "system", "content": e.system}, {"role": "user", "content": e.prompt}], "answer": e.answer}
                                  for e in prompts])
        trainer = GRPOTrainer(model=checkpoint.load_hf(folder)[0], reward_funcs=reward, train_dataset=rows, processing_class=tok,
                              peft_config=LoraConfig(r=job["r"], lora_alpha=2 * job["r"], target_modules=list(lora.ALL_LINEAR), task_type="CAUSAL_LM"),
                              args=GRPOConfig(output_dir="/tmp/llmnb-bench-grpo", max_steps=job["steps"] + 1, learning_rate=1e-5,
                                              per_device_train_batch_size=job["prompts"] * job["group"], num_generations=job["group"],
                                              max_completion_length=8, beta=0.0, temperature=1.0, logging_steps=1, report_to=[], save_strategy="no",
                                              disable_tqdm=True, use_cpu=True, bf16=False))

        trainer.add_callback(clock())
        trainer.train()
        times = times[1:]
print(json.dumps({"seconds": min(times), "peak_mb": (resident_bytes()[1] - before) / 1e6, "phases": phases}))
"""


def measure(job: dict) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the base; notebook 04's recipe tunes it first if needed")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=8, help="DPO: preference pairs a step")
    parser.add_argument("--prompts", type=int, default=4, help="GRPO and PPO: prompts a step")
    parser.add_argument("--group", type=int, default=4, help="GRPO: samples per prompt")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    common = {"model": args.model, "r": args.r, "steps": args.steps, "batch": args.pairs, "prompts": args.prompts, "group": args.group}
    best: dict[tuple[str, str], dict] = {}
    for _ in range(args.rounds):
        for what, who in [("rollout", "ours"), ("dpo", "ours"), ("dpo", "trl"), ("grpo", "ours"), ("grpo", "trl"), ("ppo", "ours")]:
            result = measure({**common, "what": what, "who": who})
            if (what, who) not in best or result["seconds"] < best[what, who]["seconds"]:
                best[what, who] = result
    print(f"LoRA r={args.r} on every linear layer of notebook 04's model ({args.model}), best of {args.rounds} rounds x {args.steps} steps\n")
    layouts = best["rollout", "ours"]["phases"]
    print(f"Rollouts: {args.prompts} prompts x {args.group} samples, up to 8 tokens each, then the policy's scoring pass with its backward\n")
    print("| layout | sampling s | sampled tokens/s | scoring pass + backward s |")
    print("|---|---:|---:|---:|")
    for name, label in (("before", "every row reads its whole prompt"), ("shared", "system message once, each prompt once per group")):
        m = layouts[name]
        print(f"| {label} | {m['sample s']:.2f} | {m['tokens'] / m['sample s']:.0f} | {m['pass s']:.2f} |")
    print(f"\nshared / before: sampling {layouts['before']['sample s'] / layouts['shared']['sample s']:.2f}x faster, scoring pass "
          f"{layouts['before']['pass s'] / layouts['shared']['pass s']:.2f}x faster\n")
    print("| step | ours s/step | trl s/step | trl / ours | ours peak memory rise (MB) | trl peak memory rise (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for what, label in (("dpo", f"DPO, {args.pairs} pairs"), ("grpo", f"GRPO, {args.prompts} prompts x {args.group} samples")):
        ours, trl = best[what, "ours"], best[what, "trl"]
        print(f"| {label} | {ours['seconds']:.2f} | {trl['seconds']:.2f} | {trl['seconds'] / ours['seconds']:.2f} | {ours['peak_mb']:.0f} | {trl['peak_mb']:.0f} |")
    ppo = best["ppo", "ours"]
    print(f"\nPPO step, {args.prompts} prompts, 2 epochs x 2 minibatches: {ppo['seconds']:.2f} s (fastest phases of any step)\n")
    print("| phase | seconds | share |")
    print("|---|---:|---:|")
    total = sum(ppo["phases"].values())
    for phase, seconds in ppo["phases"].items():
        print(f"| {phase} | {seconds:.2f} | {seconds / total:.0%} |")


if __name__ == "__main__":
    main()

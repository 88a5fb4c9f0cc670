"""Supervised fine-tuning: instruction data built offline, rendered with the model's chat template, scored.

Every source gives `Example(prompt, response)`:

    arithmetic_examples(200, seed=1)        reasoning-gym's procedural problems, each with an exact answer
    dialogue_examples(load_corpus().documents)   a line of a play -> the next speaker's reply, "in character"
    read_examples("data.jsonl")             Alpaca / Dolly / prompt-response rows, from a file or "hf:<dataset>"

`pairs(tokenizer, examples, system)` renders them with the tokenizer's chat template into
(prompt ids, response ids), the shape `llmnb.data.PairBatches` masks the prompt of; replies are
generated and scored by `llmnb.evaluation` (`answers`, `accuracy`, `response_nll`). `python -m llmnb.sft` (or `torchrun ... -m llmnb.sft`) fine-tunes a base with
LoRA, or fully, from a JSONL file, with the training loop of `llmnb.train`.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from . import lora
from .checkpoint import load
from .data import Document, PairBatches, load_corpus
from .hardware import rank, world_size
from .hf_bridge import to_hf
from .model import GPT
from .train import TrainConfig, TrainResult, parse_settings, train

ARITHMETIC_SYSTEM = "Answer with the number only."
CHARACTER_SYSTEM = "You are a character in a Shakespeare play. Reply to the line in character, in the play's language."
PLAIN_TEMPLATE = "{system}\n\n### Instruction:\n{prompt}\n\n### Response:\n"  # for tokenizers without a chat template


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    answer: str | None = None  # the exact answer a scorer checks, where the task has one
    source: str = ""  # where it came from (a play, a row): splits keep a source on one side
    system: str = ""  # the system message it is rendered with ("" : the caller's, or none)


# --- sources ---------------------------------------------------------------------------------


def arithmetic_examples(n: int, seed: int, max_digits: int = 2, terms: int = 2) -> list[Example]:
    """`n` problems from reasoning-gym's `basic_arithmetic` (+ and -, phrased in words), the answer as the response."""
    import reasoning_gym

    data = reasoning_gym.create_dataset("basic_arithmetic", size=n, seed=seed, min_terms=terms, max_terms=terms, min_digits=1,
                                        max_digits=max_digits, operators=("+", "-"), allow_parentheses=False, allow_negation=False,
                                        format_style="natural")
    return [Example(e["question"], e["answer"], e["answer"], e["metadata"]["expression"], ARITHMETIC_SYSTEM) for e in data]


def arithmetic_split(n_train: int, n_test: int, seed: int = 1) -> tuple[list[Example], list[Example]]:
    """Training problems and held-out ones whose expressions never occur in training.

    reasoning-gym draws item i with seed + i, so seeds 1 and 2 share all but one item: the
    held-out stream starts where the training one ends, and repeats are dropped.
    """
    train = arithmetic_examples(n_train, seed)
    test = held_out(train, arithmetic_examples(2 * n_test, seed + n_train))[:n_test]
    if len(test) < n_test:
        raise ValueError(f"only {len(test)} of {n_test} held-out problems differ from the training ones: raise max_digits, or ask for fewer")
    return train, test


def held_out(train: list[Example], test: list[Example]) -> list[Example]:
    """`test` without the examples whose source (a play, an expression) also occurs in `train`."""
    seen = {e.source for e in train}
    return [e for e in test if e.source not in seen]


def dialogue_examples(documents: list[Document], max_chars: int = 240) -> list[Example]:
    """Consecutive speeches of two different speakers as (line -> reply); `source` is the play."""
    out = []
    for doc in documents:
        speeches = [s.split(":\n", 1) for s in doc.text.split("\n\n") if ":\n" in s]
        for (speaker, line), (replier, reply) in zip(speeches, speeches[1:]):
            if speaker != replier and len(line) <= max_chars and len(reply) <= max_chars:
                out.append(Example(f"{speaker.title()}: {line}\n\nReply as {replier.title()}.", reply, source=doc.id.split("/")[0],
                                   system=CHARACTER_SYSTEM))
    return out


# Alpaca (instruction, input, output), Dolly (instruction, context, response), and plain prompt/response files.
FORMATS = (("instruction", "input", "output"), ("instruction", "context", "response"), ("prompt", None, "response"),
           ("prompt", None, "completion"))


def example_from_row(row: dict, where: str) -> Example:
    """One row of an instruction dataset; a row missing its instruction or response says which row and field."""
    for prompt_key, extra_key, response_key in FORMATS:
        if prompt_key in row and response_key in row:
            prompt, extra, response = row[prompt_key], row.get(extra_key) if extra_key else None, row[response_key]
            if not isinstance(prompt, str) or not prompt.strip() or not isinstance(response, str) or not response.strip():
                raise ValueError(f"{where}: {prompt_key!r} and {response_key!r} must be non-empty text, got {prompt!r} and {response!r}")
            return Example(f"{prompt}\n\n{extra}" if extra else prompt, response, source=where)
    expected = " or ".join(f"({p}, {r})" for p, _, r in FORMATS)
    raise ValueError(f"{where} has fields {sorted(row)}; an instruction row needs {expected}")


def read_examples(source: str | Path, split: str = "train") -> list[Example]:
    """Examples from a JSONL file (one object a line), or from the hub as `hf:<dataset id>` (needs internet)."""
    source = str(source)
    if source.startswith("hf:"):
        from datasets import load_dataset

        rows = load_dataset(source[3:], split=split)
        return [example_from_row(dict(row), f"{source} row {i}") for i, row in enumerate(rows)]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no instruction file {path}: give a JSONL file (one JSON object a line) or hf:<dataset id>")
    examples = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {i} is not JSON: {error}") from None
            examples.append(example_from_row(row, f"{path} line {i}"))
    if not examples:
        raise ValueError(f"{path} holds no rows")
    return examples


# --- rendering -------------------------------------------------------------------------------


def _messages(system: str, prompt: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def prompt_ids(tokenizer, prompt: str, system: str = "") -> list[int]:
    """The tokens a model sees before it answers: the chat template with the assistant's turn opened."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(_messages(system, prompt), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    return list(tokenizer.encode(PLAIN_TEMPLATE.format(system=system, prompt=prompt)))


def render(tokenizer, example: Example, system: str = "") -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the whole conversation through the chat template, split where the reply starts.

    The response keeps the template's end-of-turn token, so the model learns to stop. The
    example's own system message wins over `system`.
    """
    system = example.system or system
    prompt = prompt_ids(tokenizer, example.prompt, system)
    if getattr(tokenizer, "chat_template", None):
        messages = _messages(system, example.prompt) + [{"role": "assistant", "content": example.response}]
        full = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        if full[:len(prompt)] != prompt:
            raise ValueError("this chat template renders the prompt differently inside a conversation; the prompt cannot be masked")
        return prompt, full[len(prompt):]
    end = getattr(tokenizer, "eos_token_id", None)
    return prompt, list(tokenizer.encode(example.response)) + ([end] if end is not None else [])


def pairs(tokenizer, examples: list[Example], system: str = "", max_tokens: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Rendered examples; with `max_tokens`, those longer than it are left out."""
    rendered = [render(tokenizer, e, system) for e in examples]
    return [p for p in rendered if max_tokens is None or len(p[0]) + len(p[1]) <= max_tokens]


def batches(tokenizer, examples: list[Example], block_size: int, seed: int, batch_size: int, system: str = "",
            packed: bool = False) -> PairBatches:
    """Prompt-masked training batches; a dataset smaller than one batch is refused, saying so."""
    rendered = pairs(tokenizer, examples, system, None if packed else block_size + 1)
    if len(rendered) < batch_size:
        raise ValueError(f"{len(rendered)} examples fit in {block_size + 1} tokens, fewer than one batch of {batch_size}: "
                         "give more examples, a smaller batch_size or a larger block_size")
    pad = getattr(tokenizer, "pad_token_id", None)
    return PairBatches(rendered, block_size, seed, pad_id=pad if pad is not None else 0, packed=packed)


# --- scoring ---------------------------------------------------------------------------------


# --- notebook 04's recipe: its data split and its run, for the notebook and for llmnb.artifacts -----------


@dataclass
class TuneSplit:
    """Notebook 04's examples: arithmetic from two stretches of the generator, replies from plays held out whole."""
    arith_train: list[Example]
    arith_test: list[Example]
    dia_train: list[Example]
    dia_test: list[Example]
    test_plays: set[str]


def tune_split(recipe: dict) -> TuneSplit:
    """The arithmetic problems and Shakespeare (line -> reply) pairs notebook 04 trains on and scores; every seventh play held out.

    `recipe`: n_train, n_test (arithmetic), n_dialogue_train, n_dialogue_test (replies), as `llmnb.artifacts.tuned_recipe` gives them.
    """
    arith_train, arith_test = arithmetic_split(recipe["n_train"], recipe["n_test"])
    dialogue = dialogue_examples(load_corpus("shakespeare").documents)
    test_plays = held_out_plays(dialogue)
    random.Random(0).shuffle(dialogue)
    return TuneSplit(arith_train, arith_test, [e for e in dialogue if e.source not in test_plays][:recipe["n_dialogue_train"]],
                     [e for e in dialogue if e.source in test_plays][:recipe["n_dialogue_test"]], test_plays)


def held_out_plays(dialogue: list[Example]) -> set[str]:
    """Every seventh play, by name, of the (line -> reply) pairs: notebook 04 never trains on them; notebook 08 tests on them."""
    return set(sorted({e.source for e in dialogue})[::7])


def tune(base: GPT, tokenizer, split: TuneSplit, out_dir: str | Path, recipe: dict, progress: bool = True, **config) -> tuple[GPT, TrainResult]:
    """LoRA (rank, alpha 2·rank) on every linear layer of a copy of `base`, both tasks at once: notebook 04's main run.

    `recipe`: steps, batch_size, block_size, lr, rank; `config`: further TrainConfig settings (peak_flops, say).
    """
    steps, batch_size, block_size, lr, rank = (recipe[k] for k in ("steps", "batch_size", "block_size", "lr", "rank"))
    model = copy.deepcopy(base)
    lora.attach(model, "all-linear", r=rank, alpha=2 * rank)
    data = {"train": batches(tokenizer, split.arith_train + split.dia_train, block_size, seed=0, batch_size=batch_size),
            "val": batches(tokenizer, split.arith_test + split.dia_test, block_size, seed=1, batch_size=batch_size)}
    settings = TrainConfig(out_dir=str(out_dir), max_steps=steps, batch_size=batch_size, block_size=block_size, lr=lr, min_lr=lr / 10,
                           warmup_steps=max(1, steps // 10), eval_interval=max(5, steps // 4), eval_batches=4, checkpoint_interval=0,
                           log_interval=5, sample_prompts=[], **config)
    return model, train(model, data, settings, tokenizer=tokenizer, progress=progress)


# --- the command line: fine-tune a base on a JSONL file, under torchrun too --------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fine-tune a model on instruction data (LoRA, or every weight).")
    parser.add_argument("--base", required=True, help="anything llmnb.checkpoint.load takes: a folder, a checkpoint, a registry name")
    parser.add_argument("--data", required=True, help="a JSONL file of Alpaca, Dolly or prompt/response rows, or hf:<dataset id>")
    parser.add_argument("--system", default="", help="the system message every example is rendered with")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank; 0 trains every weight (full fine-tuning)")
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--targets", default="all-linear", help="comma-separated layer names, or all-linear")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="TrainConfig values (JSON values), e.g. max_steps=100")
    args = parser.parse_args(argv)
    config = TrainConfig.from_dict({"sample_prompts": [], **parse_settings(args.set)})
    model, tokenizer = load(args.base)
    data = {"train": batches(tokenizer, read_examples(args.data), config.block_size, config.seed, config.batch_size, args.system)}
    if args.lora_r:
        torch.manual_seed(config.seed)  # the adapters' initial A: the same on every rank
        lora.attach(model, args.targets if args.targets == "all-linear" else args.targets.split(","), r=args.lora_r, alpha=args.lora_alpha)
    train(model, data, config, tokenizer=tokenizer, progress=False)
    if rank() == 0:
        out = Path(config.out_dir)
        if args.lora_r:
            lora.save_adapter(model, out / "adapter", base_model=str(args.base))
        else:  # the final checkpoint holds the whole model, gathered from every shard under FSDP
            full, tokenizer = load(out)
            to_hf(full, out / "model", tokenizer=tokenizer)
    if world_size() > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

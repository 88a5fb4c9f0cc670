"""Notebook 08's report card: tasks built offline from the project's own data, scored by EleutherAI's lm-evaluation-harness.

    folder = write_tasks(outputs / "eval" / "tasks", TaskSizes(400, 200, 400, 20), tokenizer)  # JSONL + YAML per task
    card = score("hf", {"pretrained": model_folder}, folder, TASKS)    # lm-eval's own Hugging Face model type
    card = score(LlmnbLM(model, tokenizer), None, folder, TASKS)        # our GPT (int8, int4...) under the harness
    card = score("local-completions", served_model_args(url, name, tokenizer_folder), folder, TASKS)  # any OpenAI server

The tasks (held-out text no model here trained on: scenes in pretraining's validation split, from the plays fine-tuning
holds out; arithmetic problems none of the training sets contain):

- `llmnb_lastword`: LAMBADA's idea on Shakespeare. Two lines with the last word removed; scored by the word's
  log-likelihood (`perplexity`) and by whether greedy decoding gives it (`acc`).
- `llmnb_nextline`: which of four lines follows a line (multiple choice by log-likelihood, `acc` and `acc_norm`).
- `llmnb_arithmetic`: notebook 04's skill, generated and compared by exact match of the reply's last number.
- `llmnb_ppl_shakespeare`, `llmnb_ppl_wikipedia`: bits per byte of held-out passages (comparable across tokenizers):
  what fine-tuning did to the model's English, and what it forgot.

The harness does the scoring: its task YAML with local JSON files (`dataset_path: json`), its metrics and standard errors.
"""
from __future__ import annotations

import functools
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from . import data, sft
from .data import Document
from .evaluation import contaminated
from .generate import generate
from .model import GPT
from .paths import write_atomic


@dataclass(frozen=True)
class Task:
    output_type: str
    metric: str  # the card's number for it
    higher_is_better: bool
    what: str


TASKS: dict[str, Task] = {
    "llmnb_lastword": Task("loglikelihood", "acc", True, "the last word of two held-out lines, greedy (LAMBADA-style)"),
    "llmnb_nextline": Task("multiple_choice", "acc", True, "which of four lines follows a held-out line"),
    "llmnb_arithmetic": Task("generate_until", "exact_match", True, "held-out arithmetic problems in the chat template, exact answer"),
    "llmnb_ppl_shakespeare": Task("loglikelihood_rolling", "bits_per_byte", False, "bits per byte of held-out Shakespeare scenes"),
    "llmnb_ppl_wikipedia": Task("loglikelihood_rolling", "bits_per_byte", False, "bits per byte of Wikipedia articles (forgetting)"),
}
TEXT_TASKS = ("llmnb_lastword", "llmnb_nextline", "llmnb_ppl_shakespeare")  # what a model without a chat template can take
GENERATIVE_TASKS = ("llmnb_arithmetic",)  # what a server without prompt log-probabilities (llama.cpp's) can take
ARITHMETIC_SEED = 100_000  # reasoning-gym item i is drawn with seed + i: far from notebooks 04 and 05's stretches
STOP = "<|im_end|>"  # SmolLM2's end of turn


@dataclass(frozen=True)
class TaskSizes:
    lastword: int
    nextline: int
    arithmetic: int
    passages: int  # per perplexity task
    passage_chars: int = 1500


# --- the items, from the project's data --------------------------------------------------------------------


def heldout_scenes(val_fraction: float = 0.1) -> list[Document]:
    """Scenes no model here trained on: in pretraining's validation split (notebooks 01 and 03) and in the plays
    fine-tuning holds out (notebook 04)."""
    return list(_heldout_scenes(val_fraction))


@functools.cache
def _heldout_scenes(val_fraction: float) -> tuple[Document, ...]:  # cleaning the corpus takes seconds: once per process
    corpus = data.load_corpus("shakespeare")
    plays = sft.held_out_plays(sft.dialogue_examples(corpus.documents))
    _, val = data.split_documents(data.clean(corpus)[0].documents, val_fraction)
    return tuple(d for d in val if d.id.split("/")[0] in plays)


def _speeches(doc: Document) -> list[list[str]]:
    """A scene's speeches, each a list of verse lines (speaker names left out)."""
    return [s.split(":\n", 1)[1].splitlines() for s in doc.text.split("\n\n") if ":\n" in s]


def lastword_items(scenes: list[Document], n: int, seed: int = 0) -> list[dict]:
    """Two consecutive lines of one speech without the second's last word (a plain word of 3+ letters)."""
    items = []
    for doc in scenes:
        for lines in _speeches(doc):
            for before, line in zip(lines, lines[1:]):
                head, _, last = line.rstrip(" .,;:!?'\"-").rpartition(" ")
                if len(head.split()) >= 4 and re.fullmatch(r"[A-Za-z]{3,}", last):
                    items.append({"context": f"{before}\n{head}", "target": f" {last}"})
    return _sample(items, n, seed, "lastword")


def nextline_items(scenes: list[Document], n: int, seed: int = 0) -> list[dict]:
    """A line, the line that follows it in the speech, and three lines from elsewhere in the held-out scenes."""
    pairs = [(a, b) for doc in scenes for lines in _speeches(doc) for a, b in zip(lines, lines[1:]) if len(b.split()) >= 4]
    pool = sorted({b for _, b in pairs})
    rng = random.Random(seed)
    items = []
    for line, follows in _sample(pairs, n, seed, "nextline"):
        choices = rng.sample([p for p in pool if p != follows], 3)
        gold = rng.randrange(4)
        choices.insert(gold, follows)
        items.append({"context": f"{line}\n", "choices": choices, "gold": gold})
    return items


def arithmetic_items(tokenizer, n: int, exclude: list[sft.Example] = ()) -> list[dict]:
    """Problems whose expression occurs in none of `exclude` (the training sets), rendered in the chat template as
    notebook 04 asks them."""
    fresh = sft.held_out(list(exclude), sft.arithmetic_examples(3 * n, ARITHMETIC_SEED))[:n]  # about 1 in 10 repeats a training one
    if len(fresh) < n:
        raise ValueError(f"only {len(fresh)} of {n} problems differ from the training ones: ask for fewer")
    return [{"prompt": tokenizer.decode(sft.prompt_ids(tokenizer, e.prompt, e.system)), "question": e.prompt, "answer": e.answer}
            for e in fresh]


def passages(documents: list[Document], n: int, max_chars: int) -> list[dict]:
    """`n` passages of whole paragraphs, up to `max_chars` characters each: every document's first, then their second..."""
    chunks = []
    for doc in documents:
        mine, text = [], ""
        for paragraph in doc.text.split("\n\n"):
            if text and len(text) + len(paragraph) + 2 > max_chars:
                mine.append(text)
                text = ""
            text = f"{text}\n\n{paragraph}" if text else paragraph[:max_chars]
        chunks.append([c for c in mine + [text] if len(c) >= max_chars // 4])
    ordered = [c[k] for k in range(max(map(len, chunks), default=0)) for c in chunks if k < len(c)]
    if len(ordered) < n:
        raise ValueError(f"only {len(ordered)} of {n} passages of at least {max_chars // 4} characters: ask for fewer")
    return [{"text": t} for t in ordered[:n]]


def _sample(items: list, n: int, seed: int, name: str) -> list:
    if len(items) < n:
        raise ValueError(f"only {len(items)} {name} items in the held-out scenes, {n} asked: ask for fewer")
    return random.Random(seed).sample(items, n)


def task_items(sizes: TaskSizes, chat_tokenizer, exclude_problems: list[sft.Example] = (), val_fraction: float = 0.1) -> dict[str, list[dict]]:
    scenes = heldout_scenes(val_fraction)
    wiki = data.load_corpus("wikipedia-sample").documents
    return {"llmnb_lastword": lastword_items(scenes, sizes.lastword),
            "llmnb_nextline": nextline_items(scenes, sizes.nextline),
            "llmnb_arithmetic": arithmetic_items(chat_tokenizer, sizes.arithmetic, exclude_problems),
            "llmnb_ppl_shakespeare": passages(scenes, sizes.passages, sizes.passage_chars),
            "llmnb_ppl_wikipedia": passages(wiki, sizes.passages, sizes.passage_chars)}


# --- the task files lm-eval reads ---------------------------------------------------------------------------


def task_yaml(name: str, data_file: Path) -> str:
    """lm-eval's task config for one of TASKS, reading `data_file` (JSON lines) as its test split."""
    head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file))}\ntest_split: test\n" \
           f"output_type: {TASKS[name].output_type}\n"
    body = {
        "loglikelihood": 'doc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\ntarget_delimiter: ""\n'
                         "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
                         "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        "multiple_choice": 'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\ntarget_delimiter: ""\n'
                           "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                           "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n",
        "generate_until": 'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
                          f"generation_kwargs:\n  until: [{json.dumps(STOP)}]\n  max_gen_toks: 16\n  do_sample: false\n"
                          "filter_list:\n  - name: last_number\n    filter:\n"
                          '      - function: regex\n        regex_pattern: "(-?\\\\d+)"\n        group_select: -1\n'
                          "      - function: take_first\n"
                          "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
        "loglikelihood_rolling": 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                                 "metric_list:\n" + "".join(f"  - metric: {m}\n    aggregation: {a}\n    higher_is_better: false\n" for m, a in
                                                            (("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                                                             ("bits_per_byte", "bits_per_byte"))),
    }[TASKS[name].output_type]
    return head + body + "metadata:\n  version: 1.0\n"


def write_tasks(folder: str | Path, items: dict[str, list[dict]]) -> Path:
    """Each task's items as `<task>.jsonl` and its config as `<task>.yaml` in `folder` (lm-eval's `include_path`)."""
    unknown = sorted(set(items) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}: choose from {list(TASKS)}")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in items.items():
        jsonl = folder / f"{name}.jsonl"
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        write_atomic(jsonl, lambda tmp: tmp.write_bytes(payload))
        text = task_yaml(name, jsonl)
        write_atomic(folder / f"{name}.yaml", lambda tmp: tmp.write_text(text))
    return folder


def read_items(folder: str | Path, name: str) -> list[dict]:
    path = Path(folder) / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no task file {path}: build the tasks first (report_card.write_tasks, notebook 08)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def item_texts(name: str, rows: list[dict]) -> list[str]:
    """What of an item could have been seen in training: the text a model is shown and the answer."""
    if name == "llmnb_lastword":
        return [r["context"] + r["target"] for r in rows]
    if name == "llmnb_nextline":
        return [r["context"] + r["choices"][r["gold"]] for r in rows]
    if name == "llmnb_arithmetic":
        return [r["question"] for r in rows]
    return [r["text"] for r in rows]


def contamination(folder: str | Path, training: dict[str, list[str]], tasks=tuple(TASKS)) -> dict[str, dict[str, float]]:
    """Share of each task's items sharing a 13-gram (or, when shorter, the whole item) with each training set."""
    out: dict[str, dict[str, float]] = {}
    for source, texts in training.items():
        out[source] = {}
        for name in tasks:
            flags = contaminated(item_texts(name, read_items(folder, name)), texts)
            out[source][name] = sum(flags) / len(flags)
    return out


# --- scoring: lm-eval over a model ----------------------------------------------------------------------------


def served_model_args(url: str, model: str, tokenizer: str | Path, max_length: int = 2048, batch_size: int = 8) -> dict:
    """lm-eval's `local-completions` against an OpenAI-compatible /v1/completions (ours, vLLM's...), token ids sent as
    they are (the server's tokenizer must be `tokenizer`'s)."""
    return {"base_url": f"{url.rstrip('/')}/v1/completions", "model": model, "tokenizer_backend": "huggingface",
            "tokenizer": str(tokenizer), "tokenized_requests": True, "max_length": max_length, "batch_size": batch_size,
            "num_concurrent": 1, "max_retries": 1}


def score(model, model_args: dict | None, folder: str | Path, tasks=tuple(TASKS), limit: int | None = None,
          batch_size: int = 16) -> dict[str, dict]:
    """lm-eval's `simple_evaluate` on the tasks in `folder`: per task, the card's metric with its standard error, every
    metric the harness reported, and the per-item scores (for paired comparisons)."""
    from lm_eval import simple_evaluate  # the evaluator imports every model type the harness knows (~2 s)
    from lm_eval.tasks import TaskManager

    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}: choose from {list(TASKS)}")
    missing = [t for t in tasks if not (Path(folder) / f"{t}.yaml").is_file()]
    if missing:
        raise FileNotFoundError(f"no task config for {missing} in {folder}: build the tasks first (report_card.write_tasks)")
    if isinstance(model, str) and model == "hf":
        folder_given = Path(model_args.get("pretrained", ""))
        if not (folder_given / "config.json").is_file():
            raise FileNotFoundError(f"no Hugging Face model folder at {folder_given} (no config.json): make it with its notebook "
                                    "or llmnb.artifacts.ensure")
        model_args = {"dtype": "float32", "device": "cpu", "batch_size": batch_size, **model_args}
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    out = simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                          limit=limit, log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                          torch_random_seed=0, fewshot_random_seed=0)
    card = {}
    for name in tasks:
        metric, results = TASKS[name].metric, out["results"][name]
        filt = "last_number" if TASKS[name].output_type == "generate_until" else "none"
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        card[name] = {"metric": metric, "value": results[f"{metric},{filt}"], "stderr": _number(results.get(f"{metric}_stderr,{filt}")),
                      "n": len(samples), "all": {k.split(",")[0]: v for k, v in results.items() if "," in k and "stderr" not in k},
                      "items": [s[metric] for s in samples] if TASKS[name].output_type != "loglikelihood_rolling" else []}
    return card


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None  # lm-eval writes "N/A" where it has no error estimate


class LlmnbLM(TemplateLM):
    """Our GPT under lm-eval: fp32, int8, int4, pruned... whatever `llmnb.checkpoint.load` returns. Log-likelihoods from
    one forward pass per batch (right-padded), generation from `llmnb.generate` (greedy, left-padded), as lm-eval's
    `hf` model type does with a `transformers` model; tokens encoded without special tokens, as `hf` does."""

    def __init__(self, model: GPT, tokenizer, batch_size: int = 16, max_length: int | None = None):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.config.block_size
        self.pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else tokenizer.eos_token_id

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # what predicts a text's first token: the BOS token where there is one, as `hf` does
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tokenizer.encode(string, add_special_tokens=False))

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):  # no bar of its own: a bar per task and model buries notebook 08's one bar
            chunk = order[start:start + self.batch_size]
            rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):] for i in chunk]
            ids, mask = data.pad_rows([r[:-1] for r in rows], self.pad)
            logits, _ = self.model(ids, attention_mask=mask)  # (B, T, vocab)
            for row, i, r in zip(range(len(chunk)), chunk, rows):
                n = len(requests[i][2])
                positions = slice(len(r) - 1 - n, len(r) - 1)  # the positions that predict the continuation
                logprobs = F.log_softmax(logits[row, positions].float(), dim=-1)
                target = torch.tensor(r[-n:])
                out[i] = (float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all()))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(request.args[0]), self.prefix_token_id, self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            results.append(sum(s for s, _ in scores))
        return results

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            kwargs = chunk[0].args[1]
            if any(r.args[1] != kwargs for r in chunk):
                raise ValueError("requests of one batch ask for different generation settings: score one task at a time")
            until, new = list(kwargs.get("until") or []), int(kwargs.get("max_gen_toks", 256))
            prompts = [self.tok_encode(r.args[0])[-(self.max_length - new):] for r in chunk]
            ids, mask = data.pad_rows(prompts, self.pad, "left")
            tokens = generate(self.model, ids, new, temperature=0, stop_tokens=[self.eot_token_id], attention_mask=mask)
            for j, row in enumerate(tokens[:, ids.shape[1]:].tolist()):
                text = self.tokenizer.decode(row, skip_special_tokens=False)
                for stop in until + [self.tokenizer.decode([self.eot_token_id])]:
                    text = text.split(stop)[0]
                out[start + j] = text
        return out

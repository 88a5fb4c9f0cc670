"""GGUF files for llama.cpp and everything built on it (LM Studio, Ollama, GPT4All), written with the `gguf` package.

    path = write_gguf(model, tokenizer, "model.Q8_0.gguf", "Q8_0")
    write_modelfile(path, tokenizer)     # Ollama: `ollama create mine -f model.Q8_0.Modelfile`

A GGUF file is one self-describing file: key-value metadata (architecture, sizes, the
tokenizer's vocabulary and merges, the chat template) followed by the tensors, each in
its own type. Quantized types work in blocks of 32 weights: Q8_0 stores 32 int8 values and
one fp16 scale (8.5 bits a weight), Q4_0 32 4-bit values and one fp16 scale (4.5 bits).
The embedding (and an untied output head) is written at Q8_0 in quantized files, as our
torch schemes keep it at int8; norms stay F32, as llama.cpp requires.

llama.cpp's Llama rotates adjacent pairs of each head's dimensions where Hugging Face (and
llmnb) rotate the two halves; the query and key matrices are permuted on the way out so
that both compute the same thing (llama.cpp's own converter does the same).
"""
from __future__ import annotations

import concurrent.futures
import copy
import json
import multiprocessing
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from .hf_bridge import CONV1D, key_map, to_theirs
from .model import GPT, token_logprobs
from .paths import write_atomic

TYPES = ("F32", "F16", "Q8_0", "Q4_0")
BLOCK = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]  # weights per quantization block in Q8_0 and Q4_0 (32)
GPT4_SPLIT_START = "'(?i:[sdmt]|ll|ve|re)|"


def _pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's split regex: GPT-2's, or the GPT-4 one llmnb's BPE uses ("llama-bpe")."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt-2"
    split = [s for s in steps if s.get("type") == "Split"]
    if split and split[0]["pattern"].get("Regex", "").startswith(GPT4_SPLIT_START):
        return "llama-bpe"
    raise ValueError(f"no llama.cpp pre-tokenizer known for {json.dumps(pre)[:200]}: pass pre=... (a name from llama.cpp's "
                     "llama-vocab.cpp, such as 'gpt-2' or 'llama-bpe')")


def tokenizer_metadata(tokenizer, pre: str | None = None) -> dict:
    """The tokenizer as llama.cpp's "gpt2" (byte-level BPE) vocabulary: tokens by id, their types, merges, special ids."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("write_gguf needs a fast Hugging Face tokenizer (llmnb.checkpoint.load returns one for BPE models)")
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise ValueError(f"only byte-level BPE tokenizers are written, not {data['model']['type']}")
    vocab = {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data["added_tokens"]}}
    tokens = [""] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    special = {t["id"] for t in data["added_tokens"] if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad", "unk")}
    return {"tokens": tokens, "types": [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))], "merges": merges,
            "pre": pre or _pre_tokenizer(data), "ids": ids, "chat_template": tokenizer.chat_template}


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's rotate-half layout of q/k rows -> llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_names(config) -> dict[str, str]:
    """Hugging Face tensor name -> llama.cpp's, through gguf-py's own map for the architecture (our side: llmnb.hf_bridge)."""
    arch = gguf.MODEL_ARCH.LLAMA if config.flavour == "llama" else gguf.MODEL_ARCH.GPT2
    names = gguf.get_tensor_name_map(arch, config.n_layer)
    theirs = list(key_map(config).values()) + [f"transformer.h.{i}.attn.c_attn.{p}" for i in range(config.n_layer) for p in ("weight", "bias")
                                               if config.flavour == "gpt2"]
    return {hf: names.get_name(hf, try_suffixes=(".weight", ".bias")) for hf in theirs}


def _tensors(model: GPT) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor names -> fp32 tensors, (rows, cols) as in PyTorch: the Hugging Face tensors, renamed.

    GPT-2's Conv1D matrices go back to (out, in); Llama's q and k rows are permuted to llama.cpp's rotation.
    """
    c = model.config
    theirs = to_theirs(c, {k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    out = {}
    for hf, name in _gguf_names(c).items():
        t = theirs[hf]
        if c.flavour == "gpt2" and t.ndim == 2 and hf.endswith((*CONV1D, "c_attn.weight")):
            t = t.t()
        elif hf.endswith("q_proj.weight"):
            t = _permute(t, c.n_head)
        elif hf.endswith("k_proj.weight"):
            t = _permute(t, c.n_kv_head)
        out[name] = t
    return out


def _tensor_type(name: str, t: torch.Tensor, qtype: str) -> str:
    """Norms, biases and position tables stay F32; matrices whose rows are not whole blocks fall back to F16."""
    if t.ndim == 1 or name.startswith("position_embd"):
        return "F32"
    if qtype in ("F32", "F16"):
        return qtype
    if t.shape[1] % BLOCK:
        return "F16"
    return "Q8_0" if name in ("token_embd.weight", "output.weight") else qtype


def file_weights(model: GPT, qtype: str) -> GPT:
    """A copy of `model` whose weights are what a `qtype` file stores, read back in fp32: the model llama.cpp runs.

    Quantization blocks run along a row (32 consecutive inputs), and the q/k permutation
    moves whole rows, so rounding before or after the permutation is the same.
    """
    if model.config.flavour != "llama":
        raise ValueError("file_weights maps Llama-flavour models (GPT-2's fused qkv is written differently)")
    out = copy.deepcopy(model)
    state = out.state_dict()
    ours = {name: mine for mine, hf in key_map(model.config).items() for h, name in _gguf_names(model.config).items() if h == hf}
    with torch.no_grad():
        for name, t in _tensors(model).items():
            kind = _tensor_type(name, t, qtype)
            if t.ndim != 2 or kind == "F32":
                continue
            target = state[ours[name]]
            w = target.float().cpu().numpy()
            if kind == "F16":
                back = w.astype(np.float16).astype(np.float32)
            else:
                qt = getattr(gguf.GGMLQuantizationType, kind)
                back = gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt)
            target.copy_(torch.from_numpy(back))
    return out


def _architecture(writer, model: GPT) -> None:
    c = model.config
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.d_ff)
    writer.add_head_count(c.n_head)
    if c.flavour == "llama":
        writer.add_head_count_kv(c.n_kv_head)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_layer_norm_rms_eps(c.norm_eps)
        writer.add_rope_dimension_count(c.head_dim)
        if c.attn_dim != c.n_embd:  # heads pruned (llmnb.prune): llama.cpp reads their size from these keys
            writer.add_key_length(c.head_dim)
            writer.add_value_length(c.head_dim)
        writer.add_vocab_size(c.vocab_size)
    else:
        writer.add_layer_norm_eps(c.norm_eps)


def _vocabulary(writer, meta: dict, vocab_size: int) -> None:
    tokens, types = meta["tokens"], meta["types"]
    if len(tokens) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embeddings: they do not belong together")
    for i in range(len(tokens), vocab_size):  # embedding rows no token uses (a vocabulary padded to a round size)
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(meta["merges"])
    for name, value in meta["ids"].items():
        if value is not None:
            getattr(writer, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "pad": "add_pad_token_id", "unk": "add_unk_token_id"}[name])(value)
    writer.add_add_bos_token(False)  # neither SmolLM2 nor llmnb's models start with a BOS token
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])


def write_gguf(model: GPT, tokenizer, path: str | Path, qtype: str = "F16", name: str = "", pre: str | None = None) -> Path:
    """Write `model` (llmnb's GPT, full precision) and its tokenizer as one GGUF file; atomic: no half-written file is left."""
    if qtype not in TYPES:
        raise ValueError(f"unknown GGUF type {qtype!r}: choose one of {TYPES}")
    if getattr(model, "quantization", None):
        raise ValueError("write_gguf takes the full-precision model (GGUF quantizes on its own): load it again before quantize_model")
    arch = "llama" if model.config.flavour == "llama" else "gpt2"
    meta = tokenizer_metadata(tokenizer, pre)
    path = Path(path)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(name or path.stem)
        writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                              "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _architecture(writer, model)
        _vocabulary(writer, meta, model.config.vocab_size)
        for tensor_name, t in _tensors(model).items():
            kind = _tensor_type(tensor_name, t, qtype)
            array = t.numpy()
            if kind == "F16":
                writer.add_tensor(tensor_name, array.astype(np.float16))
            elif kind == "F32":
                writer.add_tensor(tensor_name, array.astype(np.float32))
            else:
                qt = getattr(gguf.GGMLQuantizationType, kind)
                writer.add_tensor(tensor_name, gguf.quants.quantize(array, qt), raw_dtype=qt)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, write)


def read_metadata(path: str | Path) -> dict:
    """The scalar and string metadata of a GGUF file, and each tensor's type (long arrays left out)."""
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if len(f.data) <= 1}
    return {"fields": fields, "tensor_types": {t.name: t.tensor_type.name for t in reader.tensors}}


# --- what the tools people run at home need beside the file -------------------------------------

# Ollama's templates are Go templates; ChatML (<|im_start|>role ... <|im_end|>) is SmolLM2's and llmnb's chat format.
CHATML_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def write_modelfile(gguf_path: str | Path, tokenizer) -> Path:
    """An Ollama Modelfile beside the GGUF file: ChatML for chat models, the bare prompt for a plain language model."""
    gguf_path = Path(gguf_path)
    chat = bool(tokenizer.chat_template) and "<|im_start|>" in tokenizer.chat_template
    lines = [f"FROM ./{gguf_path.name}"]
    if chat:
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', 'PARAMETER stop "<|im_end|>"']
    else:
        lines += ['TEMPLATE """{{ .Prompt }}"""']
        if tokenizer.eos_token:
            lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    path = gguf_path.with_suffix(".Modelfile")
    return write_atomic(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


def deployment_notes(folder: str | Path, files: list[Path]) -> Path:
    """README.md in the GGUF folder: how llama.cpp, Ollama and LM Studio load each file."""
    rows = "\n".join(f"| `{f.name}` | {f.stat().st_size / 1e6:.1f} MB | `ollama create {f.stem.lower().replace('.', '-')} -f {f.with_suffix('.Modelfile').name}` |"
                     for f in files)
    text = f"""# GGUF files written by llmnb

| file | size | Ollama |
|---|---:|---|
{rows}

- **llama.cpp**: `llama-server -m FILE --port 8080` (OpenAI-compatible API), or `llama-cli -m FILE -cnv` to chat.
- **Ollama**: run the command in the table in this folder, then `ollama run NAME`; the Modelfile carries the chat template.
- **LM Studio**: copy the file to `~/.lmstudio/models/llmnb/NAME/FILE` (one folder per model) or use *My Models → Import*;
  it reads the chat template from the file's `tokenizer.chat_template`.
- **GPT4All**: put the file in its models folder (Settings → Application → Download path); chat models use the file's template.
"""
    return write_atomic(Path(folder) / "README.md", lambda tmp: tmp.write_text(text))


# --- llama.cpp itself, through the xllamacpp wheel: the reader that every GGUF tool shares -------------


def llama_cpp_server(path: str | Path, n_ctx: int = 512, n_parallel: int = 1, threads: int | None = None, repack: bool = True):
    """An in-process llama.cpp server (xllamacpp) on the GGUF file; its `handle_completions(dict)` answers as /v1/completions.

    `repack`: llama.cpp copies quantized weights into an interleaved layout for its AVX kernels (faster, and a second copy
    of those weights in memory beside the mapped file); False reads them from the file as they are.
    """
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = n_ctx * n_parallel  # each parallel slot gets n_ctx tokens
    params.n_parallel = n_parallel
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads or torch.get_num_threads() or os.cpu_count()
    params.warmup = False
    params.verbosity = -1  # llama.cpp logs every load and request to stderr otherwise
    params.no_extra_bufts = not repack
    return xllamacpp.Server(params)


def llama_cpp_decode_speed(path: str | Path, prompt: list[int], tokens: int, repeats: int = 1, threads: int | None = None) -> float:
    """llama.cpp's decoding speed on the file, tokens/s at batch 1 (its own `predicted_per_second`: the prompt's prefill not
    counted), best of `repeats` after a warm-up, measured in a process of its own.

    Not in this one: inside a process whose PyTorch has run its products, llama.cpp decoded SmolLM2's F16 file at about
    half its speed (23-30 against 58-60 tok/s on an Intel Xeon, 2 cores; OMP_WAIT_POLICY=passive did not help): each
    library brings its own OpenMP runtime. Its server (`llmnb serve-gguf`) runs in a process of its own too.
    """
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: a forked one would carry PyTorch's threads along
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_decode_speed, str(path), list(prompt), tokens, repeats, threads or torch.get_num_threads()).result()


def _decode_speed(path: str, prompt: list[int], tokens: int, repeats: int, threads: int) -> float:
    server = llama_cpp_server(path, n_ctx=len(prompt) + tokens, threads=threads)
    request = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "cache_prompt": False, "ignore_eos": True}
    speeds = []
    for _ in range(repeats + 1):  # the first is the warm-up
        timings = server.handle_completions(request)["timings"]
        if timings["predicted_n"] != tokens:
            raise RuntimeError(f"llama.cpp decoded {timings['predicted_n']} tokens where {tokens} were asked for")
        speeds.append(timings["predicted_per_second"])
    return max(speeds[1:])


def llama_cpp_greedy(server, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """llama.cpp's greedy continuation of token ids (up to its end-of-text token), and its log-probability of each token it chose.

    The end-of-text token is not banned (`ignore_eos`): banning it makes llama.cpp pick the runner-up where the model would stop.
    """
    reply = server.handle_completions({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "n_probs": 1, "cache_prompt": False})
    if "choices" not in reply:
        raise RuntimeError(f"llama.cpp answered {str(reply)[:300]}")
    content = reply["choices"][0]["logprobs"]["content"]
    return [c["id"] for c in content], [c["logprob"] for c in content]


@torch.no_grad()
def agreement(model, prompt: list[int], tokens: list[int], logprobs: list[float], margin: float = 0.1) -> dict[str, float]:
    """Our model, teacher-forced on llama.cpp's greedy continuation: how often our top token is its token, and the log-prob gaps.

    `decided` counts only the steps where our top two tokens are more than `margin` nats
    apart: a near tie may fall either way under fp16 rounding, without anything being wrong.
    """
    ids = torch.tensor([prompt + tokens])
    logits = model(ids)[0][0, len(prompt) - 1:-1].float()  # the logits that predicted each of llama.cpp's tokens
    ours = token_logprobs(model, ids)[0, len(prompt) - 1:]
    top2 = logits.topk(2, dim=-1)
    same = top2.indices[:, 0] == torch.tensor(tokens)
    clear = (top2.values[:, 0] - top2.values[:, 1]) > margin
    gap = (ours - torch.tensor(logprobs)).abs()
    return {"top1_agreement": float(same.float().mean()), "decided_agreement": float(same[clear].float().mean()) if clear.any() else 1.0,
            "max_logprob_gap": float(gap.max()), "mean_logprob_gap": float(gap.mean())}

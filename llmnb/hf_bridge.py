"""The one map between llmnb's GPT and Hugging Face's `GPT2LMHeadModel` / `LlamaForCausalLM`.

`to_hf` / `from_hf` move weights across with identical logits; `key_map` is the name map
itself (our parameter name -> theirs), which `lora` uses for peft's adapter keys and `gguf`
for llama.cpp's tensor names (through gguf-py's own map from Hugging Face names).
GPT-2's fused `c_attn` matrix is split into q, k and v here, and its Conv1D weights transposed.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from .model import GPT, GPTConfig
from .paths import write_atomic


def hf_config(config: GPTConfig):
    """The `GPT2Config` / `LlamaConfig` of a model with `config`: the one mapping between the two worlds."""
    from transformers import GPT2Config, LlamaConfig  # seconds to import: only where a Hugging Face object is built

    special = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}  # None stays None (GPT2Config would say 50256)
    if config.flavour == "gpt2":
        return GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
                          n_head=config.n_head, n_inner=config.d_ff, activation_function="gelu_new", layer_norm_epsilon=config.norm_eps,
                          resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout, tie_word_embeddings=True, **special)
    return LlamaConfig(vocab_size=config.vocab_size, max_position_embeddings=config.block_size, hidden_size=config.n_embd,
                       intermediate_size=config.d_ff, num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                       num_key_value_heads=config.n_kv_head, head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
                       rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, attention_bias=config.bias,
                       mlp_bias=config.bias, tie_word_embeddings=config.tie_embeddings, attention_dropout=config.dropout, **special)


def key_map(config: GPTConfig) -> dict[str, str]:
    """Our parameter name -> the Hugging Face name, for every parameter stored one to one.

    GPT-2's fused `c_attn` (q, k and v in one Conv1D) is handled apart, in `to_theirs` and `to_ours`.
    """
    names: dict[str, str] = {}
    parts = ["weight", "bias"] if config.bias else ["weight"]
    if config.flavour == "gpt2":
        names |= {"wte.weight": "transformer.wte.weight", "wpe.weight": "transformer.wpe.weight",
                  "norm_f.weight": "transformer.ln_f.weight", "norm_f.bias": "transformer.ln_f.bias"}
        layer = [("norm1", "ln_1"), ("attn.o_proj", "attn.c_proj"), ("norm2", "ln_2"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")]
        for i in range(config.n_layer):
            names |= {f"blocks.{i}.{ours}.{p}": f"transformer.h.{i}.{theirs}.{p}" for ours, theirs in layer for p in parts}
        return names
    names |= {"wte.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(config.n_layer):
        h = f"model.layers.{i}"
        names |= {f"blocks.{i}.norm1.weight": f"{h}.input_layernorm.weight", f"blocks.{i}.norm2.weight": f"{h}.post_attention_layernorm.weight"}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names |= {f"blocks.{i}.attn.{proj}.{p}": f"{h}.self_attn.{proj}.{p}" for p in parts}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names |= {f"blocks.{i}.mlp.{proj}.{p}": f"{h}.mlp.{proj}.{p}" for p in parts}
    return names


# GPT-2 stores its matrices as Conv1D, (in, out): transposed against nn.Linear's (out, in).
CONV1D = ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def to_theirs(config: GPTConfig, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    theirs = {hf: ours[name].t() if hf.endswith(CONV1D) else ours[name] for name, hf in key_map(config).items()}
    if config.flavour == "gpt2":
        for i in range(config.n_layer):
            a = f"blocks.{i}.attn"
            theirs[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([ours[f"{a}.{p}_proj.weight"] for p in "qkv"]).t()
            theirs[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat([ours[f"{a}.{p}_proj.bias"] for p in "qkv"])
    return theirs


def to_ours(config: GPTConfig, theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ours = {name: theirs[hf].t() if hf.endswith(CONV1D) else theirs[hf] for name, hf in key_map(config).items()}
    if config.flavour == "gpt2":
        for i in range(config.n_layer):
            h, a = f"transformer.h.{i}.attn.c_attn", f"blocks.{i}.attn"
            for p, w, b in zip("qkv", theirs[f"{h}.weight"].t().chunk(3), theirs[f"{h}.bias"].chunk(3)):
                ours[f"{a}.{p}_proj.weight"], ours[f"{a}.{p}_proj.bias"] = w, b
    if config.tie_embeddings:
        ours["lm_head.weight"] = ours["wte.weight"]
    return ours


def to_hf(model: GPT, path: str | Path | None = None, tokenizer=None):
    """A `GPT2LMHeadModel` / `LlamaForCausalLM` with our weights; saved (safetensors, config, tokenizer) when `path` is given.

    A folder is written only with its tokenizer: without one, `AutoTokenizer` would load an
    empty tokenizer from it without any error.
    """
    from transformers import AutoModelForCausalLM  # seconds to import: only where a Hugging Face object is built

    if path is not None and tokenizer is None:
        raise ValueError("to_hf(model, path) needs the tokenizer too: a model folder without one loads in AutoTokenizer as an empty tokenizer")
    config = model.config
    hf = AutoModelForCausalLM.from_config(hf_config(config))
    theirs = to_theirs(config, model.state_dict())
    missing, unexpected = hf.load_state_dict({k: v.contiguous() for k, v in theirs.items()}, strict=False)
    missing = [m for m in missing if not (config.tie_embeddings and m == "lm_head.weight") and ".attn.bias" not in m and "masked_bias" not in m]
    if missing or unexpected:
        raise RuntimeError(f"weights did not map onto {type(hf).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_embeddings:
        hf.tie_weights()
    hf = hf.to(model.wte.weight.dtype).eval()
    if path is not None:
        def write(folder: Path) -> None:
            hf.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

        write_atomic(path, write)
    return hf


def config_from_hf(hf_config, attention: str = "sdpa") -> GPTConfig:
    """Our GPTConfig for a `transformers` GPT-2 or Llama config; refuses what our GPT cannot represent."""
    common = dict(vocab_size=hf_config.vocab_size, n_layer=hf_config.num_hidden_layers, n_head=hf_config.num_attention_heads,
                  n_embd=hf_config.hidden_size, attention=attention, bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id)
    if hf_config.model_type == "gpt2":
        act = hf_config.activation_function
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 checkpoint uses activation {act!r}; llmnb's GPT-2 flavour implements the tanh GELU only")
        return GPTConfig.gpt2(block_size=hf_config.n_positions, d_ff=hf_config.n_inner or 4 * hf_config.hidden_size,
                              norm_eps=hf_config.layer_norm_epsilon, **common)
    if hf_config.model_type == "llama":
        rope = getattr(hf_config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(hf_config, "rope_theta", 10000.0)}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"RoPE scaling {rope['rope_type']!r} is not implemented in llmnb's GPT; only the default rotation")
        if bool(getattr(hf_config, "mlp_bias", False)) != bool(hf_config.attention_bias):
            raise ValueError("this Llama checkpoint has biases in attention or in the MLP but not both; llmnb's GPT has them everywhere or nowhere")
        return GPTConfig.llama(block_size=hf_config.max_position_embeddings, n_kv_head=hf_config.num_key_value_heads,
                               d_ff=hf_config.intermediate_size, head_dim=getattr(hf_config, "head_dim", None), norm_eps=hf_config.rms_norm_eps,
                               rope_theta=rope["rope_theta"],
                               bias=bool(hf_config.attention_bias), tie_embeddings=bool(hf_config.tie_word_embeddings), **common)
    raise ValueError(f"model type {hf_config.model_type!r} is not supported: llmnb's GPT loads 'gpt2' and 'llama' checkpoints")


# What transformers' GPT2Config / LlamaConfig give the fields `config_from_hf` reads when a config.json leaves them
# out, and GPT-2's other names for four of them: `read_config` uses them to read a file without importing
# transformers' config classes (84 MB of a server's memory: they import its kernel and accelerate integrations).
# tests/test_model.py compares the result with transformers' own on files that omit every one.
HF_DEFAULTS = {
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
             "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256},
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": None, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "attention_bias": False, "mlp_bias": False, "head_dim": None, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2},
}
GPT2_NAMES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "max_position_embeddings": "n_positions"}


def read_config(folder: str | Path, attention: str = "sdpa") -> GPTConfig | None:
    """Our GPTConfig from a folder's config.json, read as JSON; None where transformers must read it (another
    model type, RoPE scaling in the older `rope_scaling` form), and `config_from_hf` refuses what our GPT cannot be."""
    values = json.loads((Path(folder) / "config.json").read_text())
    kind = values.get("model_type")
    if kind not in HF_DEFAULTS or values.get("rope_scaling"):
        return None
    fields = {**HF_DEFAULTS[kind], **values}  # an explicit null stays null, as in transformers
    if kind == "gpt2":
        fields |= {ours: fields[theirs] for ours, theirs in GPT2_NAMES.items()}
    else:
        fields["num_key_value_heads"] = values.get("num_key_value_heads") or fields["num_attention_heads"]
        fields.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": fields["rope_theta"]})
    return config_from_hf(SimpleNamespace(**fields), attention)


def from_hf(source, attention: str = "sdpa") -> GPT:
    """Our GPT with the weights of a Hugging Face GPT-2 or Llama model: a `transformers` model or a folder.

    Names (registry names, hub ids) are resolved by `llmnb.checkpoint`, which calls this.
    """
    if isinstance(source, (str, Path)):
        if not (Path(source) / "config.json").is_file():
            raise FileNotFoundError(f"{source} holds no config.json: pass a Hugging Face model folder, or use llmnb.checkpoint.load for names")
        if (model := _from_safetensors(Path(source), attention)) is not None:
            return model
        from transformers import AutoModelForCausalLM  # seconds to import: only where a Hugging Face object is built

        source = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = config_from_hf(source.config, attention)
    model = GPT(config)
    model.load_state_dict({k: v.float() for k, v in to_ours(config, source.state_dict()).items()}, strict=True)
    return model.eval()


def _from_safetensors(folder: Path, attention: str) -> GPT | None:
    """Our GPT straight from a folder's config.json and safetensors files under the names `save_pretrained` writes,
    without transformers (building its model first held a second fp32 copy of every weight). None where the names
    differ (older GPT-2 files lack the `transformer.` prefix), the weights are in another format or the config needs
    transformers to read it: `transformers` loads those."""
    index = folder / "model.safetensors.index.json"  # a sharded checkpoint names its files here
    files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.is_file() else [folder / "model.safetensors"]
    if not all(f.is_file() for f in files):
        return None
    if (config := read_config(folder, attention)) is None:
        return None
    theirs = {name: tensor for file in files for name, tensor in load_file(file).items()}
    try:
        ours = to_ours(config, theirs)
    except KeyError:
        return None
    model = GPT(config)
    model.load_state_dict({k: v.float() for k, v in ours.items()}, strict=True)
    return model.eval()


def hf_module_name(config: GPTConfig, name: str) -> str:
    """The Hugging Face module name of one of our linear layers (`blocks.0.attn.q_proj` -> `model.layers.0.self_attn.q_proj`)."""
    if config.flavour != "llama":
        raise NotImplementedError("peft-format adapter files are written for the Llama flavour (GPT-2 fuses q, k and v into one c_attn matrix)")
    theirs = key_map(config).get(f"{name}.weight")
    if theirs is None:
        raise ValueError(f"no Hugging Face name for layer {name!r}")
    return theirs.removesuffix(".weight")

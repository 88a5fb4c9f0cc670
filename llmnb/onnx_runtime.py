"""ONNX Runtime as a deployment target: our GPT exported with its KV cache, run in fp32 and with ORT's own int8.

    export(model, tokenizer, folder)       # model.onnx (+ model.onnx.data), the tokenizer, README.md
    quantize_int8(folder)                  # model.int8.onnx: ORT's dynamic int8
    onnx = OnnxModel(folder / "model.onnx")
    logits, _ = onnx(ids)                  # (B, T, vocab), like our GPT: llmnb.model.token_logprobs scores it too
    ids = onnx.generate(prompt, 32)        # greedy, through the exported KV cache

One graph serves the prompt (no past) and every decoding step. Inputs: `input_ids` (B, T), `attention_mask`
(B, past + T; 1 = token), `past_keys` and `past_values` (n_layer, B, n_kv_head, past, head_dim); outputs: `logits`
(B, T, vocab), `present_keys`, `present_values` (n_layer, B, n_kv_head, past + T, head_dim). `torch.onnx.export`'s
dynamo path writes it (torch.export traces our model's own forward with a cache that concatenates); ORT optimizes the
graph when it loads it. ORT's int8 (`quantize_dynamic`) stores each matrix's weights in int8 with a scale per output
channel and quantizes activations per tensor at run time, then multiplies in integers.

Serving it: ONNX Runtime GenAI and NVIDIA Triton (onnxruntime backend) load such a file; neither is needed here.
"""
from __future__ import annotations

import copy
import logging
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .lora import adapters
from .model import GPT
from .paths import write_atomic
from .quantize import QuantLinear, tokens_per_second

FP32_FILE, INT8_FILE = "model.onnx", "model.int8.onnx"
INPUTS = ("input_ids", "attention_mask", "past_keys", "past_values")
OUTPUTS = ("logits", "present_keys", "present_values")
README = """# {name}, for ONNX Runtime

Exported by llmnb ({how}): `{fp32}` (fp32, weights in `{fp32}.data`) and `{int8}` (ONNX Runtime's dynamic int8).
Inputs: input_ids (B, T), attention_mask (B, past + T), past_keys / past_values (n_layer, B, n_kv_head, past, head_dim);
outputs: logits, present_keys, present_values. Feed the presents back as the next step's pasts.

    from llmnb.onnx_runtime import OnnxModel
    OnnxModel("{int8}").generate(prompt_ids, 32)

To serve it: ONNX Runtime GenAI (`onnxruntime-genai`) or NVIDIA Triton's onnxruntime backend load such a graph.
"""


class _ConcatCache:
    """The cache interface GPT.forward calls (`length`, `update`), over past tensors given as inputs: concatenates,
    and keeps what it returns as the graph's present keys and values."""

    def __init__(self, past_keys: torch.Tensor, past_values: torch.Tensor):
        self.past_keys, self.past_values, self.length = past_keys, past_values, past_keys.shape[3]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.cat([self.past_keys[layer], k], dim=2)  # (B, n_kv, past + T, hs)
        v = torch.cat([self.past_values[layer], v], dim=2)
        self.keys.append(k)
        self.values.append(v)
        return k, v


class _Step(nn.Module):
    """One call of the exported graph: (ids, mask, past keys, past values) -> (logits, present keys, present values)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, past_keys, past_values):
        cache = _ConcatCache(past_keys, past_values)
        logits, _ = self.model(input_ids, attention_mask=attention_mask, cache=cache)
        return logits, torch.stack(cache.keys), torch.stack(cache.values)


def _example(model: GPT) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: every size at least 2, so that none is specialised to 0 or 1 in the graph."""
    c, batch, new, past = model.config, 2, 3, 4
    ids = torch.zeros(batch, new, dtype=torch.long)
    cache = torch.zeros(c.n_layer, batch, c.n_kv_head, past, c.head_dim)
    return ids, torch.ones(batch, past + new, dtype=torch.long), cache, cache.clone()


@contextmanager
def _quiet():
    """The exporter reports each phase and every operator it skips on the root logger and stdout: keep notebooks readable."""
    names = ["torch.onnx", "torch.export", "onnxscript", "onnx_ir", ""]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def export(model: GPT, tokenizer, folder: str | Path) -> Path:
    """`model` as `folder/model.onnx` (+ `.data`) with its tokenizer and a README; returns the file."""
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if quantized or getattr(model, "quantization", None):
        raise ValueError("this model is quantized by llmnb (its int8/int4 layers call PyTorch kernels ONNX has no operator for): "
                         "export the full-precision model, then quantize_int8(folder) for ONNX Runtime's own int8")
    if adapters(model):
        raise ValueError("the model carries LoRA adapters: merge them first (llmnb.lora.merge_and_unload), then export")
    full = model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()
    auto = torch.export.Dim.AUTO
    dynamic = {"input_ids": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto}, "past_keys": {1: auto, 3: auto},
               "past_values": {1: auto, 3: auto}}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        with _quiet(), torch.no_grad():
            torch.onnx.export(_Step(full.eval()).eval(), _example(full), str(tmp / FP32_FILE), dynamo=True, optimize=False, verbose=False,
                              input_names=list(INPUTS), output_names=list(OUTPUTS), dynamic_shapes=dynamic, external_data=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(README.format(name=Path(folder).name, how="torch.onnx.export, dynamo", fp32=FP32_FILE, int8=INT8_FILE))

    write_atomic(Path(folder), write)
    return Path(folder) / FP32_FILE


def quantize_int8(folder: str | Path) -> Path:
    """`folder/model.int8.onnx`: ONNX Runtime's dynamic int8 of `folder/model.onnx` (weights per output channel)."""
    import onnxruntime as ort  # the notebooks extra: only where an ONNX graph is run or quantized
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = Path(folder) / FP32_FILE
    if not source.is_file():
        raise FileNotFoundError(f"no {FP32_FILE} in {folder}: export the model first (llmnb.onnx_runtime.export)")
    with tempfile.TemporaryDirectory() as tmp:
        # ORT's constant folding first: the exporter leaves each weight behind a Transpose, which hides it from the quantizer
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "folded.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "folded.onnx.data")
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        with _quiet():
            return write_atomic(Path(folder) / INT8_FILE, lambda tmp: quantize_dynamic(options.optimized_model_filepath, str(tmp),
                                                                                    weight_type=QuantType.QInt8, per_channel=True))


class OnnxModel:
    """An exported graph in an ONNX Runtime session on the CPU, called like our GPT."""

    def __init__(self, path: str | Path):
        import onnxruntime as ort  # the notebooks extra: only where an ONNX graph is run or quantized

        if not Path(path).is_file():
            raise FileNotFoundError(f"no ONNX file at {path}: llmnb.onnx_runtime.export writes one")
        started = time.perf_counter()
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.load_seconds = time.perf_counter() - started
        shape = {i.name: i.shape for i in self.session.get_inputs()}["past_keys"]  # (n_layer, B, n_kv, past, hs)
        self.n_layer, self.n_kv_head, self.head_dim = shape[0], shape[2], shape[4]

    def step(self, ids: np.ndarray, mask: np.ndarray, past: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Logits (B, T, vocab) for `ids` after the `past` keys and values, and the presents to pass next."""
        logits, keys, values = self.session.run(list(OUTPUTS), {"input_ids": ids, "attention_mask": mask, "past_keys": past[0],
                                                                "past_values": past[1]})
        return logits, (keys, values)

    def empty_past(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        empty = np.zeros((self.n_layer, batch, self.n_kv_head, 0, self.head_dim), dtype=np.float32)
        return empty, empty

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """(logits, None) for whole rows, as GPT.forward returns them."""
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        logits, _ = self.step(ids.numpy(), mask.long().numpy(), self.empty_past(ids.shape[0]))
        return torch.from_numpy(logits), None

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """The prompt (B, T) and `new_tokens` greedy tokens after it, decoded one step at a time through the cache."""
        ids = prompt.numpy()
        (batch, length), out = ids.shape, [ids]
        logits, past = self.step(ids, np.ones_like(ids), self.empty_past(batch))
        for i in range(new_tokens):
            out.append(logits[:, -1].argmax(-1)[:, None].astype(np.int64))  # (B, 1)
            if i + 1 < new_tokens:
                logits, past = self.step(out[-1], np.ones((batch, length + i + 1), dtype=np.int64), past)
        return torch.from_numpy(np.concatenate(out, axis=1))

    def decode_speed(self, prompt: torch.Tensor, new_tokens: int = 16, repeats: int = 2) -> float:
        """Generated tokens per second (all rows together), greedy; best of `repeats` after a warm-up (as quantize.decode_speed)."""
        return tokens_per_second(lambda n: self.generate(prompt, n), prompt.shape[0], new_tokens, repeats)

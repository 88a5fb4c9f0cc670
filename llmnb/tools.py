"""Which tools would I use? Every tool the project's documents name, placed: what it does, the stage it belongs to, when a
person needs it, what this collection uses instead or beside it, and where its idea runs here.

One table, rendered into README.md (a test keeps the two equal) and shown by notebook 00. A release line comes from the
package index (PyPI, read 2026-11); a maintenance notice is stated only with the address that states it.
"""
from __future__ import annotations

from dataclasses import dataclass

# The tools the documents this project answers name, in their words; a test checks each has a row below.
NAMED_BY_THE_DOCUMENTS = ("DeepSpeed", "Megatron-LM", "Hugging Face Accelerate", "TensorRT", "SentencePiece", "TorchServe", "FastAPI",
                          "Text Generation Inference", "OpenLLM", "ONNX Runtime", "LM Studio", "GPT4All", "JAX/TPU")


@dataclass(frozen=True)
class Tool:
    name: str
    does: str
    stage: str  # the notebook whose stage it belongs to
    needed_when: str
    here: str  # what llmnb uses instead or beside it, and why
    state: str  # latest release, and a maintenance notice with its source where one exists
    shown: str  # where its idea runs in this collection (or "not run here" and why)


TOOLS = (
    Tool("SentencePiece", "trains and applies subword tokenizers (unigram or BPE) on raw text, spaces included", "01",
         "training a tokenizer for a new model family (Llama 1–2, T5, Gemma, Mistral use it)",
         "our byte-level BPE (GPT-2/Llama-3 style), built in the open; `tokenizer.train_sentencepiece` trains it beside ours on the same text",
         "PyPI 0.2.3 (2026-11)", "notebook 01 trains both and compares them"),
    Tool("DeepSpeed", "distributed training: ZeRO shards optimizer state (stage 1), gradients (2) and weights (3) across GPUs, "
         "with CPU/NVMe offload", "03, 04", "weights + gradients + AdamW state (16 bytes a parameter in mixed precision) exceed one GPU: "
         "full fine-tuning from a few billion parameters up",
         "PyTorch's FSDP under torchrun (ZeRO-3's sharding, inside PyTorch); DeepSpeed's config runs through Accelerate unchanged",
         "PyPI 0.19.8 (2026-10)", "notebook 03: DDP, FSDP SHARD_GRAD_OP (ZeRO-2) and FULL_SHARD (ZeRO-3) on 2 processes, memory per process measured"),
    Tool("Megatron-LM", "NVIDIA's training of very large models: tensor, pipeline, sequence and expert parallelism", "03",
         "one layer's matrices no longer fit one GPU, or a model spans nodes (tens to hundreds of billions of parameters)",
         "data parallelism (DDP/FSDP) covers models to ~70B on 8 GPUs; tensor parallelism is `torch.distributed.tensor.parallel` in PyTorch",
         "PyPI megatron-core 0.19.2 (2026-09)", "notebook 03: an MLP and an attention layer split over 2 processes, equal to one (Megatron itself needs NVIDIA GPUs)"),
    Tool("Hugging Face Accelerate", "one training script on CPU, one GPU, many GPUs or TPUs; launches DeepSpeed and FSDP from a config file",
         "03, 04", "a `transformers`/`trl` training script moved to several GPUs without changing its code",
         "our loop runs under torchrun directly; `trl` (notebooks 04, 05) uses Accelerate inside. `accelerate launch --cpu` runs one process only",
         "PyPI 1.15.0 (2026-09)", "notebooks 04, 05 (inside trl's trainers)"),
    Tool("TensorRT", "NVIDIA's compiler of a model into fused GPU kernels (TensorRT-LLM: the same for LLMs, with its own server)", "06, 07",
         "the lowest latency on NVIDIA GPUs in production (and the 2:4 sparse kernels pruning aims at)",
         "llama.cpp (GGUF) on CPU, vLLM on GPU read our Hugging Face folders without a build step; notebook 06's `model.onnx` is what "
         "ONNX Runtime's TensorRT execution provider takes",
         "PyPI tensorrt 11.4 (2026-10), tensorrt-llm 1.2.1 (2026-04)", "not run here: NVIDIA GPUs only"),
    Tool("ONNX Runtime", "runs an exported ONNX graph with optimised kernels on CPU, GPU, mobile and the browser", "06",
         "deploying where Python/PyTorch cannot go, or one model file for many runtimes",
         "`llmnb.onnx_runtime` exports our GPT with its KV cache (`torch.onnx.export`, dynamo path) and runs it; GGUF/llama.cpp stay the "
         "default CPU format", "PyPI onnxruntime 1.31.1 (2026-10)",
         "notebook 06: the fine-tuned SmolLM2 in fp32 (our logits and greedy tokens) and ORT's int8, speed and size beside every other format"),
    Tool("lm-evaluation-harness", "EleutherAI's evaluation harness (`lm-eval`): hundreds of benchmark tasks as YAML, any model by "
         "Hugging Face, vLLM or an OpenAI-compatible API, standard errors", "08",
         "comparing a model with others on the tasks model cards and leaderboards report (HellaSwag, ARC, MMLU...)",
         "`llmnb.report_card` writes our offline tasks as its YAML, scores our Hugging Face folders with its `hf` model type, our "
         "quantized GPT through its `TemplateLM` interface, and `llmnb serve` through `local-completions` (our server returns prompt "
         "log-probabilities for it)", "PyPI lm-eval 0.4.13 (2026)", "notebook 08: every model of the collection, one report card"),
    Tool("FastAPI", "Python web framework with typed request schemas (Pydantic)", "07", "writing your own HTTP API around a model",
         "`llmnb serve` uses Starlette, its routing part, directly, with request schemas in msgspec and OpenAI-shaped errors: "
         "FastAPI itself (it now imports OpenTelemetry) held 7 MB more in every server, and Pydantic 7 MB more than msgspec",
         "PyPI 0.165.0 (2026-11)",
         "its parts in notebook 07 and tests/test_serve.py; FastAPI itself not run here"),
    Tool("TorchServe", "PyTorch's model server (model archives, handlers, REST/gRPC)", "07", "serving non-LLM PyTorch models in an existing deployment",
         "`llmnb serve` (OpenAI API, continuous batching) on CPU; vLLM on GPU",
         "PyPI 0.12.0 (2024-09); limited maintenance, no planned updates or security fixes (https://docs.pytorch.org/serve/)",
         "not run here: no LLM batching, and unmaintained"),
    Tool("Text Generation Inference", "Hugging Face's LLM server: continuous batching, tensor parallelism, OpenAI-compatible route", "07",
         "GPU serving of Hugging Face models", "vLLM or llama.cpp for the same folders; our scheduler shows the batching idea",
         "maintenance mode since 2025-12-11 (https://huggingface.co/docs/text-generation-inference)", "README *Deploying*: its command; not run here"),
    Tool("OpenLLM", "BentoML's command to run open models behind an OpenAI-compatible API", "07", "a one-command GPU server on BentoML's stack",
         "`llmnb serve` / llama.cpp / vLLM, which it wraps", "PyPI 0.6.30 (2025-04)", "not run here: it downloads models from the hub"),
    Tool("LM Studio", "desktop app that downloads and runs GGUF models, with a local OpenAI-compatible server", "06, 07",
         "chatting with a model on a laptop without code", "our GGUF files load in it (notebook 06 writes them)",
         "PyPI SDK lmstudio 1.5.0 (2025-08)", "notebook 06 writes the GGUF files it reads"),
    Tool("GPT4All", "desktop app and Python bindings for local GGUF models", "06, 07", "a private local chat app on CPU",
         "our GGUF files; llama.cpp is the engine beneath both", "PyPI gpt4all 2.8.2 (2024-08)", "notebook 06 writes the GGUF files it reads"),
    Tool("JAX/TPU", "Google's array library (grad, jit, sharding) and its TPU chips; MaxText and T5X train LLMs on them", "03",
         "training on TPUs (Google Cloud, Kaggle, Colab TPU runtimes)", "PyTorch throughout; PyTorch/XLA reaches TPUs from PyTorch code",
         "PyPI jax 0.12.0.1 (2026-10)", "not run here: no TPU"),
    Tool("vLLM", "the common open GPU LLM server: paged KV cache, continuous batching, OpenAI API", "07", "serving on GPUs under real traffic",
         "`llmnb serve` teaches the same scheduling on CPU; vLLM serves our Hugging Face folders on GPU", "PyPI 0.33.0 (2026-11)",
         "README *Deploying*: its command"),
    Tool("llama.cpp", "C/C++ inference of GGUF files on CPU and GPU, with an OpenAI-compatible server (Ollama, LM Studio, GPT4All build on it)",
         "06, 07", "fast CPU or laptop inference, small quantized files", "the reference our GGUF files and our server are checked against",
         "PyPI xllamacpp 2026.10 (2026-10)", "notebooks 06 and 07: it loads our files and serves them"),
)

@dataclass(frozen=True)
class Server:
    name: str
    needs: str
    reads: str  # which of this collection's outputs it serves
    command: str
    here: str


SERVERS = (
    Server("llmnb serve", "Python, CPU or GPU", "a Hugging Face folder (notebooks 03–05), notebook 06's int8/int4 folders",
           "llmnb serve outputs/models/MODEL", "notebook 07 and tests/test_serve.py, through the openai client"),
    Server("llama.cpp server", "a C++ binary (or the xllamacpp wheel), CPU or GPU", "a GGUF file (notebook 06)",
           "llama-server -m outputs/gguf/MODEL.F16.gguf --port 8080", "notebook 07 and the tests (`llmnb serve-gguf`)"),
    Server("Ollama", "the ollama binary (ollama.com), CPU or GPU", "a GGUF file and the Modelfile notebook 06 writes beside it",
           "ollama create MODEL -f outputs/gguf/MODEL.F16.Modelfile && ollama run MODEL", "the Modelfile is written and tested; the binary is not installed here"),
    Server("LM Studio", "a desktop app (macOS, Windows, Linux)", "a GGUF file", "copy the file to ~/.lmstudio/models/llmnb/NAME/, then load it",
           "not run here: a desktop app"),
    Server("GPT4All", "a desktop app, or the gpt4all Python bindings", "a GGUF file", "put the file in its models folder", "not run here: a desktop app"),
    Server("vLLM", "an NVIDIA or AMD GPU (CPU builds exist, slow to install)", "a Hugging Face folder",
           "vllm serve outputs/models/MODEL --max-model-len 2048", "not run here: no GPU"),
    Server("Text Generation Inference", "Docker and a GPU; in maintenance mode", "a Hugging Face folder",
           "docker run --gpus all -v $PWD/outputs/models:/data ghcr.io/huggingface/text-generation-inference --model-id /data/MODEL",
           "not run here: no Docker engine, no GPU"),
    Server("TensorRT-LLM", "an NVIDIA GPU; builds an engine from the checkpoint", "a Hugging Face folder",
           "trtllm-serve outputs/models/MODEL", "not run here: NVIDIA GPUs only"),
    Server("OpenLLM", "BentoML; models from its catalogue", "a Hugging Face folder, packaged as a Bento", "openllm serve MODEL",
           "not run here: its models come from the hub"),
    Server("TorchServe", "Java and Python; a handler and a model archive per model", "a Hugging Face folder inside a .mar archive",
           "torch-model-archiver ... && torchserve --start --models smollm2=smollm2.mar", "not run here: unmaintained, no LLM batching"),
)


def serving_table() -> str:
    """Where each server fits: what it needs, which of our outputs it reads, the command (README *Deploying*, notebook 07)."""
    rows = ["| server | needs | reads of ours | command | here |", "|---|---|---|---|---|"]
    rows += [f"| {s.name} | {s.needs} | {s.reads} | `{s.command}` | {s.here} |" for s in SERVERS]
    return "\n".join(rows)


FEDORA = (
    "sudo dnf install python3.13 gcc gcc-c++ make git   # Fedora's python3 is 3.14: make takes python3.13 (see make python)",
    "git clone <this repository> && cd llmnb && make run",
)


def markdown_table() -> str:
    """The tools map as one Markdown table (README's section, notebook 00's closing table)."""
    rows = ["| tool | what it does | stage | you need it when | llmnb | release / state | shown |", "|---|---|---|---|---|---|---|"]
    rows += [f"| {t.name} | {t.does} | {t.stage} | {t.needed_when} | {t.here} | {t.state} | {t.shown} |" for t in TOOLS]
    return "\n".join(rows)

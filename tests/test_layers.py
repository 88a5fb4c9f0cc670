"""The package's import graph, read from the files' own headers: layers that import only downwards, no circle,
and function-local imports only for heavy optional packages, each with its reason (../shared/design/layout.md)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llmnb"

# Bottom to top. A module imports modules of its own layer or below, at the top of its file.
LAYERS = [
    ["paths", "hub", "tools"],                                   # infrastructure
    ["presets", "record", "tokenizer", "budget", "hardware", ""],  # "" is the package itself (llmnb/__init__.py)
    ["model", "hf_bridge"],                                      # the GPT and its one name map to Hugging Face's
    ["generate", "lora", "decoding", "quantize", "prune", "gguf", "onnx_runtime", "checkpoint", "assets", "data"],
    ["train", "parallel", "measure"],
    ["sft"],
    ["evaluation"],                                              # scores, intervals, contamination: one place
    ["align", "report_card"],                                    # notebook 08's tasks over the stages' data
    ["serve"],                                                   # the package and its modules
    ["artifacts", "runner"],
    ["__main__"],
]

# Function-local imports: only these, each for the reason given.
LOCAL_IMPORTS = {
    "transformers": "its model, config, auto and pipeline classes take seconds to import (AutoModelForCausalLM ~3 s, pipeline ~15 s "
                    "on 2 cores): imported where a Hugging Face object is built, so that training our GPT, serving it and every "
                    "torchrun worker start without them",
    "peft": "the reference side of QLoRA's memory measurement, loaded only when that is measured",
    "bitsandbytes": "bitsandbytes' own 4-bit layers: a reference, with CPU kernels that depend on the processor",
    "torchao": "torchao's int8/int4 layers: a reference, imported only to compare against",
    "datasets": "only for hub datasets (hf:<id>), which need the network",
    "reasoning_gym": "imports a hundred task modules (seconds): only when arithmetic problems are generated",
    "onnxruntime": "the notebooks extra: ONNX Runtime, only where an exported graph is run or quantized",
    "lm_eval": "the notebooks extra: the harness's evaluator imports every model type it knows (~2 s); only where tasks are scored",
    "xllamacpp": "llama.cpp's server wheel: only when a GGUF file is served or read back",
    "tiktoken": "reads TIKTOKEN_CACHE_DIR, which must point at the offline cache first",
    "sentencepiece": "the notebooks extra: notebook 01 sets SentencePiece beside our BPE; serving does not install it",
    "huggingface_hub": "imported only after the hub question is settled (HF_HUB_OFFLINE), see llmnb.hub",
    "torch.distributed": "only under torchrun",
    "torch._inductor": "Inductor's compiler (~1 s to import): only where a compiled step is built and asks which vector ISA it writes",
    "papermill": "the notebooks extra: `llmnb run` only",
    "nbformat": "the notebooks extra: `llmnb run` only",
    "nbconvert": "the notebooks extra: `llmnb run --commit` only (coalescing a notebook's streams)",
    "uvicorn": "the serve extra: `llmnb serve` only",
    "profanity_check": "the default safety filter's model, loaded in the filter's own process",
    "threadpoolctl": "pins the filter process's BLAS to one thread, in that process",
}
CLI = "__main__"  # each command imports what it runs: `llmnb serve` loads no papermill, `llmnb run` no web server


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _targets(node: ast.AST, module: str, path: Path) -> list[str]:
    """The llmnb modules (names relative to the package) or outside packages an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not node.level:
        return [node.module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = [p for p in package[:len(package) - node.level + 1] if p]
    base += node.module.split(".") if node.module else []
    named = [".".join(base + [a.name]) for a in node.names]
    return ["llmnb." + (n if n in MODULES else ".".join(base)) for n in named]


def _imports(module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(llmnb modules imported at the top of the file, [(line, name)] of every import inside a function or class)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    top, local = set(), []
    for node in tree.body:
        for inner in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(inner, (ast.Import, ast.ImportFrom)):
                top |= {t.removeprefix("llmnb.") if t != "llmnb" else "" for t in _targets(inner, module, path)
                        if t == "llmnb" or t.startswith("llmnb.")}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    local += [(inner.lineno, t) for t in _targets(inner, module, path) if (inner.lineno, t) not in local]
    top.discard(module)
    return top, local


def _layer(module: str) -> int:
    head = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if module in names or head in names:
            return i
    raise AssertionError(f"llmnb/{MODULES[module].relative_to(PACKAGE)} is in no layer: add it to LAYERS in {__file__}")


def test_every_module_imports_only_its_own_layer_or_below():
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m in MODULES for t in _imports(m)[0] if t in MODULES and _layer(t) > _layer(m)]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_the_import_graph_has_no_circle():
    graph = {m: {t for t in _imports(m)[0] if t in MODULES} for m in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return trail + [node, nxt]
            if nxt not in state and (found := visit(nxt, trail + [node])):
                return found
        state[node] = 2
        return None

    for start in MODULES:
        if start not in state and (circle := visit(start, [])):
            pytest.fail("an import circle: " + " -> ".join(circle))


def test_function_local_imports_are_only_heavy_optional_packages():
    found = [f"llmnb/{MODULES[m].relative_to(PACKAGE)}:{line} imports {name} inside a function"
             for m in MODULES if m != CLI for line, name in _imports(m)[1]
             if not any(name == p or name.startswith(p + ".") for p in LOCAL_IMPORTS)]
    assert not found, "import these at the top of the file (or give the package a reason in LOCAL_IMPORTS):\n" + "\n".join(found)


def test_the_contract_catches_what_it_is_for(tmp_path, monkeypatch):
    """The checks above fail on an upward import, a circle and a local import (so that they cannot pass vacuously)."""
    fake = tmp_path / "llmnb"
    fake.mkdir()
    (fake / "model.py").write_text("from .serve import app\n")
    (fake / "hub.py").write_text("from .paths import x\n")
    (fake / "paths.py").write_text("from .hub import y\n\ndef f():\n    import json\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    monkeypatch.setattr(__import__(__name__), "MODULES", {_module_name(p): p for p in fake.rglob("*.py")} | {"serve": fake / "model.py"})
    with pytest.raises(AssertionError, match="model \\(layer 2\\) imports serve"):
        test_every_module_imports_only_its_own_layer_or_below()
    with pytest.raises(pytest.fail.Exception, match="an import circle: (hub -> paths -> hub|paths -> hub -> paths)"):
        test_the_import_graph_has_no_circle()
    with pytest.raises(AssertionError, match="paths.py:4 imports json inside a function"):
        test_function_local_imports_are_only_heavy_optional_packages()

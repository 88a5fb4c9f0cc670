"""The scheduler's decoding step, compiled ahead of time: a shared library for any number of rows and any cache
length, and one for a single row, each built in a process of its own, reading the weights the server already holds.

    graph = StepGraph(DecodeStep(model))               # Scheduler(model, compile=True) makes one
    graph.build()                                      # the first time: a child process exports the step and
                                                       # AOTInductor compiles it (a minute a library for SmolLM2 on 2
                                                       # cores); later: loaded from outputs/cache/steps/ in a second
    logits = graph(tokens, positions, keys, values)    # (n, vocab) fp32; writes each row's new key and value

Why ahead of time, and elsewhere (issue 23): built inside the server (`torch.compile` with frozen weights), the int8
SmolLM2 server's step held 1200 MB resident where weights and KV cache are 326 MB. The extra was Inductor's own
state and a second, packed copy of every weight matrix. Here the server holds only the libraries (a few MB; its
weights are not in them) and hands them pointers to the model's own tensors (`load_constants(..., user_managed=True)`).
No weight is stored twice, no compiler state stays in the server, and a restarted server finds its libraries on disk.

Why three ways to serve one row (`WAYS`): a step for one client multiplies one row by every matrix, and is bound by
how fast the weights are read, which depends on the processor. Written as reductions (`decoding.RowLinear`), Inductor's
loops stream plain bf16 weights at about twice the rate of PyTorch's kernels on a Zen 4 EPYC: SmolLM2's one-row step
took 11.6 ms against 17.6 with oneDNN's packed weights (2 cores; benchmarks/README.md). On a Xeon with AMX it went the
other way: the library of many on packed weights took 10.5 ms, on plain ones 16.5, and reductions were within a few
percent of plain. So the first `build` on a machine times one row each way on a scratch cache, keeps the fastest and
records it beside the libraries (`choice_path`); later servers read it before their first product.
A compiled server starts with plain weights (`decoding.prepare(..., pack=False)`); the way "packed" swaps each
matrix for its packed form (oneDNN's opaque layout, which a reduction cannot read), and one row is served as two.
"""
from __future__ import annotations

import atexit
import copy
import hashlib
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import hardware
from ..decoding import PackedLinear, compiler_available, next_logits, pack_linears, packable, row_linears
from ..model import GPT, swap_module
from ..paths import outputs_dir
from ..quantize import QuantLinear
from .launch import die_with_parent

# Inductor's settings for the library: weights are inputs the server hands over at load (not frozen in, not in the .so)
OPTIONS = {"freezing": False, "aot_inductor.package_constants_in_so": False}
_CHILDREN: set[subprocess.Popen] = set()  # builds under way: a server that exits stops them (atexit below; killed: die_with_parent)


class RowsCache:
    """The cache as GPT.layers sees it for one decoding step of rows 0..n-1: row i writes its new key at its own
    position `positions[i]`, then attention reads the first `length` positions of every row, masked per row.

    Nothing here is a Python decision on a tensor's value, so the same code runs eagerly and in the compiled library.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor, length: int):
        self.keys, self.values, self.positions, self.length = keys, values, positions, length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[0]
        rows = torch.arange(n, device=k.device)
        self.keys[layer][rows, :, self.positions] = k[:, :, 0]  # k: (n, n_kv, 1, hs)
        self.values[layer][rows, :, self.positions] = v[:, :, 0]
        return self.keys[layer][:n, :, :self.length], self.values[layer][:n, :, :self.length]


def row_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """(n, 1, 1, length): row i sees positions 0 .. positions[i]."""
    columns = torch.arange(length, device=positions.device)
    return (columns[None, :] <= positions[:, None])[:, None, None, :]


class DecodeStep(nn.Module):
    """One decoding step of rows 0..n-1 as a module: the eager step, and what torch.export traces."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """(n, vocab) fp32 logits of each row's next token after `tokens` (n, 1) at `positions` (n,)."""
        return next_logits(self.model, tokens, positions[:, None], mask, RowsCache(keys, values, positions, mask.shape[-1]))


def weights(step: DecodeStep) -> dict[str, torch.Tensor]:
    """Every tensor the library reads, by its name in the step, a tied one under each of its names."""
    return {**dict(step.named_parameters(remove_duplicate=False)), **dict(step.named_buffers(remove_duplicate=False))}


def library_path(step: DecodeStep, rows: str = "many") -> Path:
    """Where the library of this step lives: named by everything its code depends on and nothing its weights hold.

    The key: every weight's name, shape and dtype; the source of every module class in the model and of this file;
    the processor, torch's version and the kernel switches (Inductor writes C++ for the vector ISA they allow); the
    threads (its parallel loops are compiled for a number of them); `rows`, which library ("many": 2 or more rows;
    "one": a single row, its products as reductions). A fine-tune of the same architecture finds its base model's
    library; a changed model.py builds a new one.
    """
    classes = sorted({type(m) for m in step.modules()}, key=lambda c: c.__qualname__)
    sources = sorted({inspect.getsourcefile(c) or "" for c in classes} | {__file__})
    key = hashlib.sha256()
    for name, t in sorted(weights(step).items()):
        key.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    for path in sources:
        key.update(Path(path).read_bytes() if Path(path).is_file() else path.encode())
    key.update(f"{hardware.machine_fingerprint('cpu')}|{torch.backends.cpu.get_cpu_capability()}|{torch.get_num_threads()}|{rows}".encode())
    return outputs_dir("cache", "steps") / f"{key.hexdigest()[:24]}.pt2"


def export(step: DecodeStep, rows: str = "many") -> torch.export.ExportedProgram:
    """The step traced for any rows (2 or more; `rows="one"`: exactly one), cache slots, mask length and cache positions.

    The example gives each size a distinct value above 1: one of 0 or 1, or two equal, would be specialised or tied."""
    c, dtype = step.model.config, step.model.norm_f.weight.dtype
    length = torch.export.Dim("length", min=2)
    slots, positions = torch.export.Dim("slots", min=2), torch.export.Dim("positions", min=2)
    keys = [torch.zeros(5, c.n_kv_head, 13, c.head_dim, dtype=dtype) for _ in range(c.n_layer)]  # (slots, n_kv, positions, hs)
    values = [torch.zeros_like(k) for k in keys]
    n, by_row = (1, {}) if rows == "one" else (3, {0: torch.export.Dim("rows", min=2)})
    at = torch.arange(n) + 4
    cache = [{0: slots, 2: positions}] * c.n_layer
    return torch.export.export(step, (torch.zeros(n, 1, dtype=torch.long), at, row_mask(at, 11), keys, values),
                               dynamic_shapes=(by_row, by_row, {**by_row, 3: length}, cache, cache))


def compile_library(step: DecodeStep, path: Path, rows: str = "many") -> None:
    """Export `step` for `rows` ("many" or "one") and build its library at `path`, in a child process: the compiler's
    memory never joins the server's. The child gets the step's structure only (on the meta device): the weights'
    values are not in the library."""
    _in_child(step, "build", str(path), rows)


def time_in_child(step: DecodeStep, record: Path) -> None:
    """Time one row of `step` (plain weights) each way it allows, in a child process on zero weights of the same
    shapes, building the libraries that are not on disk; the child records the way and the times at `record`.
    Not here: a library loaded with tensors keeps them alive after it is deleted (torch 2.13's AOTI loader), so a
    server that loaded the ways it does not keep would hold both layouts' weights."""
    _in_child(step, "time", str(record))


def _in_child(step: DecodeStep, *args: str) -> None:
    """`_main(REQUEST, *args)` in a child process, REQUEST being `step` with its tensors on the meta device."""
    # on the meta device a packed weight (decoding.PackedLinear) is a plain one of its shape; the child packs it again
    memo = {id(p): nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False) for p in step.parameters()}
    memo |= {id(b): b.to("meta") for b in step.buffers()}
    memo[id(getattr(step.model, "decoding", None))] = None  # what prepare() did: not needed, and holds graphs
    with tempfile.TemporaryDirectory() as folder:
        request = Path(folder) / "step.pt"
        torch.save(copy.deepcopy(step, memo), request)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the library's loops are written for the server's threads
        child = subprocess.Popen([sys.executable, "-m", __name__, str(request), *args], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
        _CHILDREN.add(child)
        try:
            _, err = child.communicate()
        finally:
            _CHILDREN.discard(child)
    if child.returncode != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        what = "building the step's library" if args[0] == "build" else "timing one row each way"
        raise RuntimeError(f"{what} failed (exit {child.returncode}): {lines[-1] if lines else 'no message'}")


@atexit.register
def _stop_children() -> None:
    for child in list(_CHILDREN):
        child.kill()


WAYS = {  # how one row can be served (`StepGraph.way`), and what /health calls it
    "reductions": "one row as reductions (the single-row library, plain weights)",
    "many": "one row through the library of many (plain weights)",
    "packed": "one row through the library of many (weights packed for oneDNN)",
}


def ways(step: DecodeStep) -> tuple[str, ...]:
    """The ways `step` can serve one row: through the library of many always; as reductions where its products are
    plain float matrices (reductions cannot read oneDNN's layout, and quantized layers keep their own kernels); on
    packed weights where it holds plain matrices oneDNN packs on this processor. A step already packed has one way."""
    modules, head, norm = list(step.modules()), getattr(step.model.wte, "weight", None), step.model.norm_f.weight
    if any(isinstance(m, PackedLinear) for m in modules):
        return ("packed",)
    found = ("many",) if any(isinstance(m, QuantLinear) for m in modules) else ("reductions", "many")
    plain = any(type(m) is nn.Linear and m.weight is not head for m in modules)  # a tied head stays plain (pack_linears)
    return found + ("packed",) if plain and norm.device.type == "cpu" and packable(norm.dtype) else found


def choice_path(step: DecodeStep) -> Path:
    """Where the way `step` (its weights plain) serves one row is recorded once timed: beside its libraries, named as
    they are, so a new processor, torch or model.py times again."""
    return library_path(step, "choice").with_suffix(".json")


def read_choice(path: Path | None) -> tuple[str, dict[str, float]] | None:
    """The way recorded at `path` and the milliseconds it was chosen by; None where nothing readable is (timed again)."""
    try:
        record = json.loads(path.read_text())
        return str(record["way"]), {str(k): float(v) for k, v in record["ms"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def packs_weights(model: GPT) -> bool:
    """Whether a compiled server of `model` (prepared with plain weights) will serve them packed for oneDNN, or may (no
    way recorded yet): what `hardware.limit_kernel_caches` must be told before the server's first product."""
    step = DecodeStep(model)
    if "packed" not in ways(step):
        return False
    recorded = read_choice(choice_path(step))
    return recorded is None or recorded[0] == "packed"


def packed_copy(step: DecodeStep) -> DecodeStep:
    """`step` with its plain matrices packed for oneDNN (`decoding.pack_linears`); every other tensor is shared, not copied."""
    shared = {id(t): t for t in [*step.parameters(), *step.buffers()]}
    copied = copy.deepcopy(step, shared)
    pack_linears(copied.model)
    return copied


class StepGraph:
    """The scheduler's decoding step as compiled libraries: one for any number of rows (2 or more) and any cache, and,
    where the weights are plain floats, one for a single row whose products are reductions (decoding.RowLinear).

    Which serves one row fastest depends on the processor (module docstring): `build` times each way the step allows
    (`ways`) the first time, on this machine, and records the fastest beside the libraries (`choice_path`); a later
    build reads it. The way "packed" swaps the model's plain matrices for packed ones (no second copy stays).
    `build` finds each library on disk or has a child process compile it (`compile_library`), then loads it; the
    scheduler serves eagerly meanwhile. Without the single-row library one row is served as two (a free row computes
    beside it): the library of many takes 2 rows or more, as a size of 1 would have been specialised. Any failure,
    building or calling, warns once and leaves the step eager (`failed` says why); a failing single-row library
    only sends one row through the library of many (`single_failed`).
    """
    MIN_ROWS = 2

    def __init__(self, step: DecodeStep):
        self.step = step  # the eager step: what the libraries were traced from, and the fallback
        self.runner = None  # rows >= 2
        self.single = None  # exactly one row
        self.ways = ways(step)
        # named while the weights are plain (the way "packed" changes them); None: time at every build, record nothing
        self.choice_path: Path | None = choice_path(step) if len(self.ways) > 1 else None
        self.way = self.ways[0] if len(self.ways) == 1 else None  # chosen by `build`
        self.one_row_ms: dict[str, float] = {}  # one row's step, each way, as timed (`time_one_row`)
        self.recorded = False  # the way was read from `choice_path`, timed on an earlier start
        self.compile_seconds = 0.0  # 0 when the libraries were found on disk
        self.path: Path | None = None
        self.failed = "" if compiler_available() else "no C++ compiler (g++, c++ or clang++) for Inductor"
        self.single_failed = ""

    def build(self) -> None:
        """Choose the way one row is served, find or compile the libraries, and load them with the model's own weights."""
        if self.failed:  # no compiler: nothing to build
            warnings.warn(f"llmnb.serve: {self}; serving eagerly")
            return
        try:
            self.way = self.way or self._choose()
            many = self._load("many")  # on packed weights where the way is "packed": `_choose` swapped them in
        except Exception as exc:  # noqa: BLE001 - any failure to build or load: serve eagerly, say why once
            self._fail(exc)
            return
        if self.way == "reductions":
            try:
                self.single = self._load("one")
            except Exception as exc:  # noqa: BLE001 - one row is served as two instead
                self._fail_single(exc)
        # last: the scheduler's thread calls a library only once this one no longer does (two threads calling one
        # library at once deadlocked in it)
        self.runner = many

    def _choose(self) -> str:
        """The way recorded on this machine, else timed in a child process (`time_in_child`) and recorded. For
        "packed", the model's plain matrices are swapped for packed ones here (the scheduler meanwhile serves eagerly
        on either: each layer is one or the other)."""
        recorded = read_choice(self.choice_path)
        self.recorded = recorded is not None and recorded[0] in self.ways
        way, self.one_row_ms = recorded if self.recorded else self.time_ways()
        if way == "packed":
            for name, module in packed_copy(self.step).model.named_modules():
                if isinstance(module, PackedLinear):
                    swap_module(self.step.model, name, module)
            if getattr(self.step.model, "decoding", None) is not None:  # /health's description of the weights
                self.step.model.decoding.packed = sum(isinstance(m, PackedLinear) for m in self.step.modules())
            hardware.release_freed_memory()  # the plain matrices just replaced
        return way

    def time_ways(self) -> tuple[str, dict[str, float]]:
        """The fastest way to serve one row and each way's milliseconds, timed now (and recorded at `choice_path`)."""
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            record = self.choice_path or Path(folder) / "choice.json"
            time_in_child(self.step, record)
            timed = read_choice(record)
        self.compile_seconds += time.perf_counter() - start  # mostly building the libraries the first time
        if timed is None:
            raise RuntimeError(f"timing one row each way recorded nothing readable at {record}")
        return timed

    def _load(self, rows: str, step: DecodeStep | None = None):
        """The library of `step` (default: the served one) for `rows`, compiled first if it is not on disk, reading
        the step's own tensors."""
        step = step or self.step
        path = self.path = library_path(step, rows)  # the libraries live in one folder (`__str__` names it)
        if not path.is_file():
            start = time.perf_counter()
            compile_library(step, path, rows)
            self.compile_seconds += time.perf_counter() - start
        return loaded(path, step)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        n = tokens.shape[0]
        if n == 1 and self.single is not None:
            try:
                return self.single.boxed_run([tokens, positions, row_mask(positions, int(positions[0]) + 1), *keys, *values])[0]
            except Exception as exc:  # noqa: BLE001 - one row through the library of many from now on
                self._fail_single(exc)
        if self.runner is not None:
            try:
                return padded_run(self.runner, tokens, positions, keys, values)[:n]
            except Exception as exc:  # noqa: BLE001 - a call the library refuses: this step and every later one eagerly
                self._fail(exc)
        return self.step(tokens, positions, row_mask(positions, int(positions.max()) + 1), keys, values)

    def _fail(self, exc: Exception) -> None:
        self.runner = self.single = None
        self.failed = _reason(exc)
        warnings.warn(f"llmnb.serve: the compiled step failed ({self.failed}); serving eagerly", stacklevel=3)

    def _fail_single(self, exc: Exception) -> None:
        self.single = None
        self.single_failed = _reason(exc)
        warnings.warn(f"llmnb.serve: the single-row library failed ({self.single_failed}); one row is served as two", stacklevel=3)

    @property
    def ready(self) -> bool:
        return self.runner is not None

    @property
    def state(self) -> str:
        """"compiled" (every library loaded: `build` hands over the library of many last), "building" (served eagerly
        meanwhile) or "eager" (no library: `failed` says why)."""
        return "eager" if self.failed else "compiled" if self.ready else "building"

    def __str__(self) -> str:
        if self.state == "eager":
            return f"eager: {self.failed}"
        if self.state == "building":
            return "eager while the compiled step builds"
        how = f"built in {self.compile_seconds:.0f} s" if self.compile_seconds else f"found in {self.path.parent}"
        served = "many" if self.way == "reductions" and self.single is None else self.way
        one = f", {WAYS[served]}"
        if self.one_row_ms:
            times = ", ".join(f"{way} {ms:.1f}" for way, ms in sorted(self.one_row_ms.items(), key=lambda item: item[1]))
            when = "timed on an earlier start" if self.recorded else "timed at this start"
            one += f" (ms a step: {times}; {when})"
        return f"one compiled library per step (AOTInductor, the model's own weights), any rows and length{one} ({how})"


def loaded(path: Path, step: DecodeStep):
    """The library at `path`, reading `step`'s own tensors (pointers: no copy; it keeps them alive, even once deleted)."""
    # the C++ loader itself: torch._inductor.aoti_load_package would import the compiler's Python side (dynamo, sympy),
    # 80 MB the server keeps for nothing
    runner = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    runner.load_constants(weights(step), False, True, user_managed=True)
    return runner


def time_one_row(step: DecodeStep, libraries: dict, length: int = 64, rounds: int = 3, calls: int = 5) -> dict[str, float]:
    """Milliseconds a step of one row of `step` takes each way in `libraries` (way: library; "reductions" takes one
    row, the others two, one a padding row), each the fastest of `rounds` alternating rounds of `calls`, on a scratch
    cache of `length` positions."""
    c, weight = step.model.config, step.model.norm_f.weight
    shape = (StepGraph.MIN_ROWS, c.n_kv_head, length, c.head_dim)  # (slots, n_kv, positions, hs)
    keys, values = ([torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(c.n_layer)] for _ in "kv")
    tokens, positions = torch.zeros(1, 1, dtype=torch.long, device=weight.device), torch.tensor([length - 1], device=weight.device)
    mask = row_mask(positions, length)
    run = {way: (lambda lib=library: lib.boxed_run([tokens, positions, mask, *keys, *values])) if way == "reductions" else
           (lambda lib=library: padded_run(lib, tokens, positions, keys, values)) for way, library in libraries.items()}
    best = dict.fromkeys(run, math.inf)
    for _ in range(rounds):  # the first round warms each up; the fastest round is the least disturbed one
        for way, one_step in run.items():
            start = time.perf_counter()
            for _ in range(calls):
                one_step()
            best[way] = min(best[way], (time.perf_counter() - start) / calls * 1e3)
    return best


def padded_run(library, tokens: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """The library of many rows on `tokens`, padded to StepGraph.MIN_ROWS: (max(n, MIN_ROWS), vocab) logits."""
    pad = max(0, StepGraph.MIN_ROWS - tokens.shape[0])  # the padding rows write at position 0 of free rows, which a prefill overwrites
    tokens, positions = F.pad(tokens, (0, 0, 0, pad)), F.pad(positions, (0, pad))
    return library.boxed_run([tokens, positions, row_mask(positions, int(positions.max()) + 1), *keys, *values])[0]  # the step's inputs, flat


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def _zero_step(request: str) -> DecodeStep:
    """The step from `request` (meta tensors) with zeros of the same shapes: values never matter to a library's code,
    nor to its speed."""
    step = torch.load(request, weights_only=False).to_empty(device="cpu")
    for t in [*step.parameters(), *step.buffers()]:
        t.data.zero_()
    for layer in step.modules():
        if isinstance(layer, PackedLinear):  # oneDNN's layout is fixed by shape, dtype and processor, not by values
            layer.packed = PackedLinear.pack(layer.packed)
    return step


def _build(step: DecodeStep, path: Path, rows: str) -> None:
    """Export `step` for `rows` and compile its library to `path`, in this process."""
    if rows == "one":  # the same parameters under the same names: the server's tensors fit this library too
        step = copy.deepcopy(step)
        row_linears(step)
    with torch.no_grad():
        program = export(step, rows)
    partial = path.with_suffix(f".{os.getpid()}.partial.pt2")  # two servers building one library: each replaces it whole
    torch._inductor.aoti_compile_and_package(program, package_path=str(partial), inductor_configs=OPTIONS)
    os.replace(partial, path)


def _time(step: DecodeStep, record: Path) -> None:
    """Build (where missing), load and time each way `step` serves one row; record the fastest at `record`."""
    packed = packed_copy(step) if "packed" in ways(step) else None
    libraries = {}
    for way in ways(step):
        served, rows = (packed if way == "packed" else step), ("one" if way == "reductions" else "many")
        if not (path := library_path(served, rows)).is_file():
            _build(served, path, rows)
        libraries[way] = loaded(path, served)
    ms = time_one_row(step, libraries)
    partial = record.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps({"way": min(ms, key=ms.get), "ms": ms}))
    os.replace(partial, record)


def _main(request: str, job: str, *args: str) -> None:
    """The child's work on the step at `request`: "build PATH ROWS" or "time RECORD"."""
    step = _zero_step(request)
    if job == "build":
        _build(step, Path(args[0]), args[1])
    else:
        _time(step, Path(args[0]))


if __name__ == "__main__":
    _main(*sys.argv[1:])

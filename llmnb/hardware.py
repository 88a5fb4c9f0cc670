"""Device, precision and reproducibility helpers, the process group's rank, memory readings, and a report of the machine."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import json
import os
import platform
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata

import numpy as np
import psutil
import torch

from .paths import outputs_dir, write_atomic

LIBRARIES = ("torch", "transformers", "tokenizers", "datasets", "peft", "trl", "bitsandbytes", "accelerate")


def world_size() -> int:
    """Processes in the run: torchrun sets WORLD_SIZE; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def resident_bytes(pid: int | None = None) -> tuple[int, int]:
    """(current, peak) resident memory of a process (default: this one).

    Linux keeps the peak itself (VmHWM in /proc); elsewhere the peak of this process comes
    from ru_maxrss, and another process's is its current RSS (sample it to find a peak).
    """
    try:
        fields = _proc_status(pid)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError):
        if pid is not None and pid != os.getpid():
            rss = psutil.Process(pid).memory_info().rss
            return rss, rss
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB
        return psutil.Process().memory_info().rss, peak


def file_backed_bytes(pid: int | None = None) -> int:
    """The part of a process's resident memory that is pages of mapped files, its shared libraries' code mostly
    (Linux's RssFile; 0 elsewhere). Clean pages the kernel can drop at any time: how many count as resident depends on
    the page cache, not on the process. A fully cached libtorch_cpu.so (just installed) put 149 MiB of it in a server
    that, after `echo 3 > /proc/sys/vm/drop_caches`, held 69 MiB of it, with the same anonymous memory."""
    try:
        return int(_proc_status(pid)["RssFile"].split()[0]) * 1024
    except (OSError, KeyError):
        return 0


def _proc_status(pid: int | None) -> dict[str, str]:
    """Linux's /proc/PID/status (default: this process) as {field: value}; OSError where there is none."""
    with open(f"/proc/{pid or 'self'}/status") as f:
        return dict(line.split(":", 1) for line in f if ":" in line)


def release_freed_memory() -> int:
    """Collect garbage and hand freed heap pages back to the OS (glibc's malloc_trim); returns the resident bytes after.

    Freed tensors otherwise stay in the process's heap, so its resident memory, and any
    peak measured from it, keeps what earlier cells used: call this before measuring a stage.
    """
    gc.collect()
    trim_heap()
    return resident_bytes()[0]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library, where it is glibc (malloc_trim, mallopt); None elsewhere (musl, macOS). Looked up once:
    `find_library` runs `ldconfig -p` in a subprocess, and an idle server trims its heap after every burst."""
    name = ctypes.util.find_library("c")
    if not (name and sys.platform.startswith("linux")):
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim), without collecting garbage first: about a
    millisecond, where a full collection takes 40-80 ms in a server process (what an idle server can afford)."""
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


def limit_heap_arenas(arenas: int = 1) -> None:
    """At most `arenas` glibc malloc arenas for this process's threads (M_ARENA_MAX); call before they start.

    glibc gives each new thread that allocates an arena of its own, up to 8 per core, and each arena keeps the free
    pages its thread left behind. Worse, `malloc_trim` (what an idle server calls) hands back the free pages inside an
    arena but not the free top of a thread's arena, only the main one's. Measured on SmolLM2's compiled servers
    (issue 23): two arenas instead of eight held 8 MB less; one instead of two, 6-9 MB less again after a load sweep,
    the activations of the last steps no longer kept at the top of the scheduler thread's arena.
    A no-op where malloc is not glibc's.
    """
    if (libc := _glibc()) is not None:
        libc.mallopt(-8, arenas)  # -8: M_ARENA_MAX in glibc's malloc.h


# oneDNN's cache of compiled kernels, and PyTorch's (ideep's) cache of the products that hold them: 1024 each by default
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's, ideep's
PACKED_PRODUCTS = 8  # ideep's cache for packed weights: a decoding step's five product shapes (SmolLM2's four, the head) and three more


def limit_kernel_caches(kernels: int = 16, packed: bool = True) -> None:
    """Keep at most `kernels` of oneDNN's compiled matrix products in this process; call before its first one.

    oneDNN compiles a kernel for each shape it multiplies, and PyTorch keeps up to 1024 of them: one per prompt length
    (and per number of rows decoded together) for each of a layer's matrix shapes. On SmolLM2's packed bf16 weights
    each held 0.6-0.8 MB, so a server's memory grew with every new prompt length (issue 23), while making one again
    takes about a millisecond. A decoding step uses five shapes (SmolLM2's four, and the head), so 16 keep the steps
    of three batch sizes. Both caches read their size at their first use, so this works after `import torch`; a
    value set in the environment is kept.

    PyTorch's own cache (ideep's) keeps fewer: each kept product holds another 0.3 MB, and it speeds up products on
    packed weights only. Packed (`packed=True`: an eager server, or a compiled one serving packed weights): 8, a
    decoding step's five shapes and three more. Plain (`packed=False`, a compiled server whose products are
    `torch.mm`'s: serve.step.packs_weights): 1, no slower (bf16, 2 Zen 4 cores: 4.6 MB less in a served SmolLM2).
    """
    if kernels < 1:
        raise ValueError(f"kernels must be >= 1, got {kernels}: PyTorch's cache of size 0 crashes the process")
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(kernels))
    os.environ.setdefault("LRU_CACHE_CAPACITY", str(min(kernels, PACKED_PRODUCTS) if packed else 1))


def reset_peak_resident(pid: int | None = None) -> None:
    """Reset Linux's peak-RSS counter of a process (default: this one; another must be this user's) to its current RSS,
    so that `resident_bytes(pid)[1]` is the peak from now on (no-op where unsupported)."""
    try:
        with open(f"/proc/{pid or 'self'}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def pick_device(prefer: str | None = None) -> torch.device:
    """`prefer` if given and available, else cuda, then mps, then cpu."""
    if prefer:
        device = torch.device(prefer)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA GPU; use 'cpu' or install a CUDA build of torch")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError("device 'mps' asked for, but it is not available on this machine; use 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype worth using on `device`, or None for plain fp32.

    bf16 on GPUs that support it (Ampere and later), fp16 (with a gradient scaler)
    on older ones and on mps. None on CPU: most CPUs lack bf16 matrix units, and
    bf16 autocast there is slower than fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return None


def decoding_dtype(device: torch.device | str = "cpu") -> tuple[torch.dtype, str]:
    """The dtype a decoding step runs fastest in on `device`, and why.

    A CPU with bf16 instructions (AVX-512 BF16 or AMX) multiplies bf16 natively and reads half
    the bytes: 1.5-2x faster at one token (benchmarks/generation.py). Without them oneDNN
    emulates bf16 and fp32 is the safer choice. `ONEDNN_MAX_CPU_ISA` below bf16 (how
    tests/test_cpu_paths.py takes another user's path) counts as not having them.
    """
    device = torch.device(device)
    if device.type != "cpu":
        dtype = autocast_dtype(device)
        return dtype, f"{device.type}: {str(dtype).removeprefix('torch.')}"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    capped = not any(word in cap for word in ("ALL", "BF16", "AMX", "AVX10"))
    if native and not capped:
        return torch.bfloat16, "bf16: the processor has AVX-512 BF16 or AMX"
    why = f"ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN below bf16" if native else "the processor has no AVX-512 BF16 or AMX"
    return torch.float32, f"fp32: {why}"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


@dataclass
class MachineInfo:
    cpu: str
    cores: int
    ram_gb: float
    gpu: str | None
    gpu_memory_gb: float | None
    disk_free_gb: float
    python: str
    libraries: dict[str, str]

    def as_dict(self) -> dict:
        return asdict(self)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(path: str = ".") -> MachineInfo:
    """CPU, RAM, GPU and its memory, free disk at `path`, library versions."""
    gpu = gpu_mem = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu, gpu_mem = props.name, props.total_memory / 1e9
    elif torch.backends.mps.is_available():
        gpu = "Apple mps (unified memory)"
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return MachineInfo(
        cpu=_cpu_name(),
        cores=psutil.cpu_count(logical=True) or 1,
        ram_gb=psutil.virtual_memory().total / 1e9,
        gpu=gpu,
        gpu_memory_gb=gpu_mem,
        disk_free_gb=shutil.disk_usage(path).free / 1e9,
        python=platform.python_version(),
        libraries=versions,
    )


# Dense bf16/fp16 tensor-core peak of common GPUs, from the vendors' datasheets (FLOP/s).
# The one table for MFU and time estimates; `gpu_peak_flops` matches the longest name first.
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "A10G": 70e12, "A10": 125e12,
    "L40S": 362e12, "L4": 121e12, "T4": 65e12, "V100": 125e12,
}


def gpu_peak_flops(device_name: str) -> float | None:
    """The datasheet peak of a GPU from its reported name ("NVIDIA A10G", "NVIDIA L40S"), or None.

    Longest key first, so "A10G" is not taken for an "A10", "L40S" for an "L4", nor a PCIe H100 for an SXM one.
    """
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if key in device_name:
            return GPU_PEAK_FLOPS[key]
    return None


def machine_fingerprint(device: torch.device | str = "cpu") -> str:
    """What a measured speed depends on: the processor (or GPU), its cores, torch's version and the kernels it may use."""
    device = torch.device(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{_cpu_name()}, {os.cpu_count()} cores"
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "") + os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    return f"{where} | torch {torch.__version__}" + (f" | {capability}" if capability else "")


def machine_figure(name: str, measure: Callable[[], float], device: torch.device | str = "cpu", remeasure: bool = False) -> float:
    """A figure of this machine that several notebooks use (its matmul peak, our loop's utilisation), measured once and
    kept in `outputs/cache/machine.json` under the machine's fingerprint, so that every notebook answers with the same
    one (a test run keeps its own, under outputs/smoke/). `remeasure=True`, or LLMNB_REMEASURE=1, measures it again."""
    path = outputs_dir("cache") / "machine.json"
    figures = json.loads(path.read_text()) if path.exists() else {}
    mine = figures.setdefault(machine_fingerprint(device), {})
    if remeasure or os.environ.get("LLMNB_REMEASURE") == "1" or name not in mine:
        mine[name] = {"value": float(measure()), "measured": time.strftime("%Y-%m-%d %H:%M")}
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(figures, indent=1)))
    return mine[name]["value"]


def peak_flops(device: torch.device | str = "cpu", remeasure: bool = False) -> float:
    """The FLOP/s that MFU and time estimates are measured against: a GPU's datasheet peak, else this machine's fp32
    matmul, measured once (`machine_figure`)."""
    device = torch.device(device)
    if device.type == "cuda":
        found = gpu_peak_flops(torch.cuda.get_device_name(device))
        if found is not None:
            return found
    return machine_figure("matmul peak fp32 (FLOP/s)", lambda: measure_matmul_flops(device, size=1024, seconds=1.0), device, remeasure)


def memory_bandwidth(device: torch.device | str = "cpu", remeasure: bool = False) -> float:
    """Bytes per second this machine reads from memory (`measure_read_bandwidth`), measured once (`machine_figure`):
    what a decoding step at batch 1, which reads every weight once, is held to."""
    return machine_figure("memory read bandwidth (B/s)", lambda: measure_read_bandwidth(device), device, remeasure)


def measure_read_bandwidth(device: torch.device | str = "cpu", megabytes: int = 512, seconds: float = 1.0) -> float:
    """Bytes per second of summing a tensor far larger than any cache: a read of every byte, and almost no arithmetic."""
    device = torch.device(device)
    a = torch.ones(megabytes * 2**20 // 4, device=device)
    runs, elapsed = _timed_runs(a.sum, device, seconds)
    return a.numel() * a.element_size() * runs / elapsed


def measure_matmul_flops(device: torch.device | str = "cpu", size: int = 1024, dtype: torch.dtype = torch.float32,
                         seconds: float = 1.0, windows: int = 5) -> float:
    """Achieved FLOP/s of a square matmul on `device`: this machine's practical peak, the best of `windows` windows
    that share `seconds`. A peak is the best the machine does: one window shared with another process would set it
    low for every notebook after (seen on 2 cores: 171 GFLOP/s, then 315 a minute later)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = 0.0
    for _ in range(windows):
        runs, elapsed = _timed_runs(lambda: a @ b, device, seconds / windows)
        best = max(best, 2 * size**3 * runs / elapsed)
    return best


def _timed_runs(work: Callable[[], object], device: torch.device, seconds: float) -> tuple[int, float]:
    """(runs, seconds) of repeating `work` for at least `seconds` and 3 runs, after one warm-up run (pages touched,
    kernels chosen, the thread pool started), waiting for a GPU to finish each run."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    work()
    sync()
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 3:
        work()
        sync()
        runs += 1
    return runs, elapsed

import json
import random
import subprocess
import sys

import pytest
import torch

from llmnb import hardware


def test_pick_device_defaults_to_an_available_device():
    assert hardware.pick_device().type in {"cpu", "cuda", "mps"}
    assert hardware.pick_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_missing_cuda_says_what_to_do():
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        hardware.pick_device("cuda")


def test_autocast_dtype_is_none_on_cpu():
    assert hardware.autocast_dtype("cpu") is None


def test_seed_everything_repeats_random_streams():
    hardware.seed_everything(3)
    first = (random.random(), torch.rand(3))
    hardware.seed_everything(3)
    second = (random.random(), torch.rand(3))
    assert first[0] == second[0] and torch.equal(first[1], second[1])


def test_machine_info_reports_real_numbers(tmp_path):
    info = hardware.machine_info(str(tmp_path))
    assert info.cores >= 1 and info.ram_gb > 0.5 and info.disk_free_gb > 0
    assert info.libraries["torch"] == torch.__version__.split("+")[0] or info.libraries["torch"].startswith(torch.__version__.split("+")[0])


def test_matmul_flops_count_two_n_cubed_per_product_over_the_elapsed_time(monkeypatch):
    """On a clock that advances 0.25 s per reading, a 1-second window runs exactly 3 products in 1.0 s.

    A fake clock makes the arithmetic exact: timing real products on this shared machine swings by more than
    the factor of two a wrong count would cause (seen: 0.28x to 1.7x between two honest measurements).
    """
    import types

    readings = iter(i * 0.25 for i in range(100))
    monkeypatch.setattr(hardware, "time", types.SimpleNamespace(perf_counter=lambda: next(readings)))
    n = 64
    assert hardware.measure_matmul_flops("cpu", size=n, seconds=1.0, windows=1) == 2 * n**3 * 3 / 1.0


def test_the_matmul_peak_is_the_best_window(monkeypatch):
    """A window that another process shared (the slow ones) does not set the peak."""
    windows = iter([(3, 1.0), (3, 0.5), (3, 2.0)])
    seen = []
    monkeypatch.setattr(hardware, "_timed_runs", lambda work, device, seconds: (seen.append(seconds), next(windows))[1])
    n = 64
    assert hardware.measure_matmul_flops("cpu", size=n, seconds=1.5, windows=3) == 2 * n**3 * 3 / 0.5
    assert seen == [0.5, 0.5, 0.5], "the windows share the time asked for"


def test_resident_memory_sees_a_large_allocation_and_its_peak():
    """In a fresh process, where no freed pages can hide the allocation."""
    import json
    import subprocess
    import sys

    code = ("import json, numpy as np; from llmnb.hardware import resident_bytes as r; b0 = r()[0]; block = np.ones(25_000_000); d = r()[0]; "
            "del block; a, p = r(); print(json.dumps([b0, d, a, p]))")
    before, during, after, peak = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert during - before > 180e6 and peak - before > 180e6 and after < during - 180e6  # 200 MB, touched, then freed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's RssFile")
def test_file_backed_memory_counts_a_mapped_file_and_not_an_allocation(tmp_path):
    """A server's resident memory splits into what it allocated and pages of files it maps: the second grows by a
    mapped file read through (64 MB), not by 200 MB of numpy."""
    data = tmp_path / "mapped.bin"
    data.write_bytes(b"x" * 64_000_000)
    code = ("import json, mmap, sys, numpy as np; from llmnb.hardware import file_backed_bytes as f; f0 = f(); "
            "block = np.ones(25_000_000); f1 = f(); fh = open(sys.argv[1], 'rb'); m = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ); "
            "total = sum(m[i] for i in range(0, len(m), 4096)); print(json.dumps([f0, f1, f()]))")
    before, allocated, mapped = json.loads(subprocess.run([sys.executable, "-c", code, str(data)], capture_output=True, text=True, check=True).stdout)
    assert abs(allocated - before) < 10e6 and mapped - allocated > 60e6


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's peak counter")
def test_another_process_peak_is_reset_from_outside():
    """A server's peak while it serves, not while it loaded: a child that touched 200 MB and freed them, its peak read
    and reset by its parent."""
    code = "import numpy as np, sys; b = np.ones(25_000_000); del b; print('freed', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "freed"
        now, peak = hardware.resident_bytes(child.pid)
        assert peak - now > 180e6
        hardware.reset_peak_resident(child.pid)
        now, peak = hardware.resident_bytes(child.pid)
        assert peak - now < 20e6
    finally:
        child.communicate("")


def test_freed_memory_is_handed_back_so_a_later_peak_is_its_own():
    """Many small freed blocks stay in glibc's heap (below the mmap threshold) until trimmed."""
    import json
    import subprocess
    import sys

    code = ("import json, torch; from llmnb.hardware import resident_bytes as r, release_freed_memory as f; b0 = r()[0]; "
            "blocks = [torch.ones(16_000) for _ in range(4000)]; d = r()[0]; del blocks; kept = r()[0]; after = f(); "
            "print(json.dumps([b0, d, kept, after]))")
    before, during, kept, after = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert during - before > 200e6 and after < kept - 200e6


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("limit", [None, 1, 2])
def test_heap_arenas_are_limited_for_the_threads_that_start_after(limit, tmp_path):
    """Eight threads that allocate get arenas of their own unless limited (counted in glibc's malloc_info)."""
    code = f"""
import ctypes, threading
from llmnb import hardware
if {limit!r}: hardware.limit_heap_arenas({limit!r})
libc = ctypes.CDLL("libc.so.6"); libc.malloc.restype = ctypes.c_void_p; libc.fopen.restype = ctypes.c_void_p
start = threading.Barrier(8)
def work():
    start.wait()
    for _ in range(2000): libc.free(ctypes.c_void_p(libc.malloc(4096)))
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]; [t.join() for t in threads]
f = libc.fopen(b"{tmp_path / 'info.xml'}", b"w"); libc.malloc_info(0, ctypes.c_void_p(f)); libc.fclose(ctypes.c_void_p(f))
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    heaps = (tmp_path / "info.xml").read_text().count("<heap nr=")
    assert heaps <= limit if limit else heaps > 2, heaps


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN's kernels")
def test_kernel_caches_are_limited_even_after_torch_is_imported():
    """A oneDNN product at 48 row counts compiles 48 kernels; kept (the default) they hold tens of MB, limited to 4
    they do not. Each case in a fresh process: the caches read their size once."""
    code = """
import os, sys, torch
DTYPE = torch.float32  # bf16 kernels are smaller where oneDNN emulates bf16, and absent below AVX-512
from llmnb import hardware
env = {k: os.environ.get(k) for k in hardware.KERNEL_CACHE_VARIABLES}
if sys.argv[1] == "limit": hardware.limit_kernel_caches(4)
weight = torch.ops.mkldnn._reorder_linear_weight(torch.randn(1536, 576).to(DTYPE), 1)
def product(rows): torch.ops.mkldnn._linear_pointwise(torch.ones(rows, 576, dtype=DTYPE), weight, None, "none", [], "")
product(2); before = hardware.release_freed_memory()
for rows in range(3, 51): product(rows)
print((hardware.release_freed_memory() - before) / 1e6, env)
"""
    grown = {case: subprocess.run([sys.executable, "-c", code, case], capture_output=True, text=True, check=True).stdout.split(maxsplit=1)
             for case in ("keep", "limit")}
    assert float(grown["keep"][0]) > 10 and float(grown["limit"][0]) < float(grown["keep"][0]) / 3, grown
    assert "'4'" not in grown["limit"][1]  # set by the call, not inherited


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN's bf16 products (AVX-512 and up)")
def test_plain_weights_keep_fewer_products_than_packed_ones():
    """A plain bf16 product (torch.mm: oneDNN's, what a compiled server runs; fp32 goes to BLAS) at 48 row counts: with
    `packed=False` PyTorch's own cache keeps one product, not eight, and the process holds about 2 MB less."""
    code = """
import sys, torch
from llmnb import hardware
hardware.limit_kernel_caches(16, packed=sys.argv[1] == "packed")
weight = torch.randn(1536, 576, dtype=torch.bfloat16)
def product(rows): torch.mm(torch.ones(rows, 576, dtype=torch.bfloat16), weight.t())
product(2); before = hardware.release_freed_memory()
for rows in range(3, 51): product(rows)
print((hardware.release_freed_memory() - before) / 1e6)
"""
    grown = {case: float(subprocess.run([sys.executable, "-c", code, case], capture_output=True, text=True, check=True).stdout)
             for case in ("packed", "plain")}
    assert grown["packed"] - grown["plain"] > 1.0, grown  # 7 products of about 0.3 MB
    with pytest.raises(ValueError, match="crashes"):
        hardware.limit_kernel_caches(0)


def test_rank_and_world_size_come_from_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert (hardware.world_size(), hardware.rank()) == (4, 3)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert (hardware.world_size(), hardware.rank()) == (1, 0)


def test_a_machine_figure_is_measured_once_per_machine_and_again_on_request(tmp_path, monkeypatch):
    from llmnb import hardware

    monkeypatch.setenv("LLMNB_HOME", str(tmp_path))
    monkeypatch.delenv("LLMNB_REMEASURE", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    calls = []
    def measure():
        calls.append(1)
        return 10.0 * len(calls)
    assert hardware.machine_figure("speed", measure) == 10.0
    assert hardware.machine_figure("speed", measure) == 10.0 and len(calls) == 1, "the second notebook reads the first's figure"
    assert hardware.machine_figure("speed", measure, remeasure=True) == 20.0
    monkeypatch.setenv("LLMNB_REMEASURE", "1")
    assert hardware.machine_figure("speed", measure) == 30.0
    monkeypatch.delenv("LLMNB_REMEASURE")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # other kernels: another machine as far as speed goes
    assert hardware.machine_figure("speed", measure) == 40.0
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    assert hardware.machine_figure("speed", measure) == 30.0
    from llmnb.paths import outputs_root

    assert "speed" in (outputs_root() / "cache" / "machine.json").read_text(), "beside the preset's outputs (a test run: outputs/smoke/)"


def test_loop_utilisation_is_the_reference_steps_flops_over_its_time_at_the_peak(tmp_path, monkeypatch):
    from llmnb import budget, measure

    monkeypatch.setenv("LLMNB_HOME", str(tmp_path))
    monkeypatch.delenv("LLMNB_REMEASURE", raising=False)
    monkeypatch.setattr(measure, "measure_training_memory", lambda shape, setup, steps, device: {"step_seconds": 10.0})
    monkeypatch.setattr(measure, "peak_flops", lambda device, remeasure=False: 1e11)
    tokens = measure.UTILISATION_SETUP.batch * measure.UTILISATION_SETUP.seq_len
    expected = budget.training_flops(measure.UTILISATION_SHAPE, measure.UTILISATION_SETUP, tokens) / (10.0 * 1e11)
    assert measure.loop_utilisation() == pytest.approx(expected) and 0 < expected < 1


def test_a_loop_that_beats_the_peak_has_the_peak_measured_again(tmp_path, monkeypatch):
    """A utilisation above 1 means the peak was measured on shared cores: measured once more, else a clear error."""
    from llmnb import budget, measure

    monkeypatch.setenv("LLMNB_HOME", str(tmp_path))
    monkeypatch.delenv("LLMNB_REMEASURE", raising=False)
    monkeypatch.setattr(measure, "measure_training_memory", lambda shape, setup, steps, device: {"step_seconds": 1.0})
    tokens = measure.UTILISATION_SETUP.batch * measure.UTILISATION_SETUP.seq_len
    flops = budget.training_flops(measure.UTILISATION_SHAPE, measure.UTILISATION_SETUP, tokens)
    peaks = {False: flops / 2, True: flops * 4}  # disturbed first, then the machine's own
    monkeypatch.setattr(measure, "peak_flops", lambda device, remeasure=False: peaks[remeasure])
    assert measure.loop_utilisation() == pytest.approx(0.25)
    peaks[True] = flops / 2
    with pytest.raises(RuntimeError, match="LLMNB_REMEASURE=1"):
        measure.loop_utilisation(remeasure=True)


def test_read_bandwidth_counts_every_byte_of_each_pass(monkeypatch):
    from llmnb import hardware

    ticks = iter(i * 0.5 for i in range(100))   # every clock reading half a second later: 3 passes in 2 s
    monkeypatch.setattr(hardware.time, "perf_counter", lambda: next(ticks))
    assert hardware.measure_read_bandwidth(megabytes=8) == pytest.approx(8 * 2**20 * 3 / 2.0)


def test_read_bandwidth_of_this_machine_is_plausible():
    from llmnb import hardware

    assert 1e8 < hardware.measure_read_bandwidth(megabytes=64, seconds=0.2) < 1e13, "between a floppy's and an HBM stack's"

"""The tests whose results depend on the processor's kernels run twice: in `make test` on this machine's best kernels,
and here (`make test-long`, which CI runs after the suite) again on a lower path that another user's CPU would take.

PyTorch picks its vectorised ATen kernels (AVX-512, AVX2 or plain C++) and oneDNN its bf16 matmuls (AVX-512 BF16 /
AMX, or none) from the processor at start-up; `ATEN_CPU_CAPABILITY` and `ONEDNN_MAX_CPU_ISA` lower both for a process.
The tests marked `cpu_paths` (transformers/peft/torchao parity, our int8/int4 kernels, bf16 and fp16 autocast) run again
in a child process on the lower path. bitsandbytes' own switch is a module attribute: its test covers both paths in
process (tests/test_quantize.py).

oneDNN is capped only where the processor has bf16 instructions, and then at AVX512_CORE_VNNI (an Intel Cascade Lake:
bf16 emulated, int8 dot products kept). A lower cap on a processor with VNNI describes no real CPU: PyTorch sends
`torch._int_mm` to oneDNN when the *processor* has VNNI (pytorch/pytorch#136942), and oneDNN capped below it saturates
int16 sums (measured here: off by up to 62,963 on a 128-long dot product of int8 values) — a real AVX2 processor takes
PyTorch's reference path instead.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
LOWER = {"AVX512": "avx2", "AVX2": "default"}  # the next path down from this machine's
# how oneDNN names an ISA with bf16 instructions: "... and bfloat16 support", "... with Intel AMX", or "Intel AVX 10.1"
# (AVX10.1 includes AVX512-BF16: oneDNN names it so on an Intel Xeon with avx512_fp16 and no AMX, seen here)
BF16_ISA = ("bfloat16", "AMX", "AVX 10")


def cpu_flags() -> set[str]:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def lower_path_env() -> dict[str, str]:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": LOWER.get(torch.backends.cpu.get_cpu_capability(), "default")}
    if cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        env["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE_VNNI"
    return env


def probe(env: dict[str, str]) -> tuple[str, str]:
    """(ATen's kernel level, oneDNN's reported ISA or '' when bf16 matmuls do not reach oneDNN) in a fresh process."""
    code = ("import torch; a = torch.ones(32, 64, dtype=torch.bfloat16); a @ a.T; "
            "print(torch.backends.cpu.get_cpu_capability())")
    out = subprocess.run([sys.executable, "-c", code], env={**env, "ONEDNN_VERBOSE": "1"}, capture_output=True, text=True, check=True).stdout
    isa = next((line.split("isa:", 1)[1] for line in out.splitlines() if ",isa:" in line), "")
    return out.strip().splitlines()[-1], isa


def test_the_switches_change_the_kernels_a_process_takes():
    env = lower_path_env()
    here, here_isa = probe(dict(os.environ))
    lowered, lowered_isa = probe(env)
    assert lowered == env["ATEN_CPU_CAPABILITY"].upper() != here, (here, lowered)
    if "ONEDNN_MAX_CPU_ISA" in env:
        assert any(name in here_isa for name in BF16_ISA), f"oneDNN names no bf16 instructions here: {here_isa}"
        assert not any(name in lowered_isa for name in BF16_ISA), f"oneDNN still uses bf16 instructions: {lowered_isa}"


@pytest.mark.long
def test_kernel_dependent_tests_pass_again_on_the_lower_path():
    env = lower_path_env()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cpu_paths", "-p", "no:cacheprovider", "-o", "addopts=", "tests"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    switches = {k: env[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in env}
    assert run.returncode == 0, f"with {switches}:\n{run.stdout[-4000:]}"
    assert " passed" in summary and " deselected" in summary, summary

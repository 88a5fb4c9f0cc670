"""How close each numerical comparison of the suite came to its tolerance: the margin table.

    LLMNB_TOLERANCES=/tmp/tol.jsonl make test      # the suite records every comparison it makes
    .venv/bin/python tests/tolerances.py /tmp/tol.jsonl

With the variable set, conftest wraps `torch.testing.assert_close`, `torch.allclose` and `pytest.approx` so that each
call also writes, for its call site in a test file: the tolerance (atol, rtol), the largest difference measured, and
the margin — the smallest ratio, over the elements, of what the tolerance allowed to what was measured (inf: equal).
A margin under 10 means the comparison is decided by rounding that another processor does differently: fix the
comparison (float64, a derived bound), not the number. Behaviour is unchanged: each wrapper calls the original.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
_TORCH_DEFAULTS = {torch.float16: (1e-5, 1e-3), torch.bfloat16: (1e-5, 1.6e-2), torch.float32: (1e-5, 1.3e-6), torch.float64: (1e-7, 1e-7)}


def _call_site() -> str:
    """`test_x.py:LINE (function)` of the test line that compared, marked when that line asserts a difference."""
    for frame in inspect.stack()[2:]:
        path = Path(frame.filename)
        if path.parent == TESTS and path.name.startswith("test_"):
            line = "".join(frame.code_context or [])
            negated = " (asserts they differ)" if "not torch.allclose" in line or "assert not " in line else ""
            return f"{path.name}:{frame.lineno} ({frame.function}){negated}"
    return ""


def _margin(actual, expected, atol: float, rtol: float) -> tuple[float, float]:
    """(largest |actual - expected|, smallest allowed / measured over the elements that differ)."""
    a = torch.as_tensor(actual, dtype=torch.float64).flatten() if not isinstance(actual, torch.Tensor) else actual.detach().double().flatten()
    e = torch.as_tensor(expected, dtype=torch.float64).flatten() if not isinstance(expected, torch.Tensor) else expected.detach().double().flatten()
    a, e = torch.broadcast_tensors(a, e)
    diff = (a - e).abs()
    allowed = atol + rtol * e.abs()
    differing = diff > 0
    margin = float((allowed[differing] / diff[differing]).min()) if bool(differing.any()) else math.inf
    return float(diff.max()) if diff.numel() else 0.0, margin


def _record(kind: str, actual, expected, atol: float, rtol: float) -> None:
    site = _call_site()
    if not site:
        return
    try:
        largest, margin = _margin(actual, expected, atol, rtol)
    except (TypeError, ValueError, RuntimeError):  # not numbers (approx also compares dicts of strings, say)
        return
    with open(os.environ["LLMNB_TOLERANCES"], "a") as out:
        out.write(json.dumps({"site": site, "kind": kind, "atol": atol, "rtol": rtol, "largest": largest, "margin": margin}) + "\n")


def install() -> None:
    """Wrap the three comparison functions (conftest calls this when LLMNB_TOLERANCES is set)."""
    original_close, original_allclose, original_approx = torch.testing.assert_close, torch.allclose, pytest.approx

    def assert_close(actual, expected, *args, rtol=None, atol=None, **kwargs):
        if isinstance(actual, torch.Tensor) and actual.is_floating_point():
            default_atol, default_rtol = _TORCH_DEFAULTS.get(actual.dtype, (1e-5, 1.3e-6))
            _record("assert_close", actual, expected, default_atol if atol is None else atol, default_rtol if rtol is None else rtol)
        return original_close(actual, expected, *args, rtol=rtol, atol=atol, **kwargs)

    def allclose(input, other, rtol=1e-5, atol=1e-8, equal_nan=False):
        _record("allclose", input, other, atol, rtol)
        return original_allclose(input, other, rtol=rtol, atol=atol, equal_nan=equal_nan)

    class Recorded:
        def __init__(self, expected, rel, abs, nan_ok):
            self.inner, self.expected = original_approx(expected, rel=rel, abs=abs, nan_ok=nan_ok), expected
            # pytest's rule: abs alone means no relative tolerance; otherwise rel defaults to 1e-6 and abs to 1e-12
            self.atol = 1e-12 if abs is None else abs
            self.rtol = (0.0 if abs is not None else 1e-6) if rel is None else rel

        def __eq__(self, actual):
            _record("approx", actual, self.expected, self.atol, self.rtol)
            return self.inner == actual

        def __repr__(self):
            return repr(self.inner)

    def approx(expected, rel=None, abs=None, nan_ok=False):
        return Recorded(expected, rel, abs, nan_ok)

    torch.testing.assert_close, torch.allclose, pytest.approx = assert_close, allclose, approx


def table(records: list[dict]) -> str:
    """One row per call site: its tolerance, the largest difference and the smallest margin over every call there."""
    sites: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        sites[r["site"]].append(r)
    rows = ["| call site | kind | atol | rtol | calls | largest difference | smallest margin |", "|---|---|---:|---:|---:|---:|---:|"]
    for site, rs in sorted(sites.items(), key=lambda kv: min(r["margin"] for r in kv[1])):
        worst = min(rs, key=lambda r: r["margin"])
        margin = "equal" if math.isinf(worst["margin"]) else f"{worst['margin']:.3g}"
        flag = " **under 10**" if worst["margin"] < 10 and "differ" not in site else ""
        rows.append(f"| {site} | {worst['kind']} | {worst['atol']:.2g} | {worst['rtol']:.2g} | {len(rs)} | "
                    f"{max(r['largest'] for r in rs):.3g} | {margin}{flag} |")
    return "\n".join(rows)


if __name__ == "__main__":
    lines = Path(sys.argv[1]).read_text().splitlines()
    print(table([json.loads(line) for line in lines]))

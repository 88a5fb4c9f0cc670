"""Key results a notebook reports: `record(name, value, unit)`, `save_figure(fig, name)`, and `cost(...)`, what it spent.

Under `llmnb run` each notebook's records go to the JSONL file named by
`LLMNB_RECORD_FILE` and its figures to `LLMNB_FIGURE_DIR`; the runner turns them into
the run report. Interactively, figures land in `outputs/figures/`.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from .hardware import resident_bytes
from .paths import outputs_dir


def record(name: str, value: Any, unit: str = "") -> Any:
    """Keep a key metric for the run report; returns `value` so it can be used inline."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"record({name!r}) got {value}: a metric must be a finite number")
    if path := os.environ.get("LLMNB_RECORD_FILE"):
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": "metric", "name": name, "value": value, "unit": unit}) + "\n")
    return value


def save_figure(fig: Any, name: str) -> Path:
    """Save a matplotlib figure as `<name>.png` and list it in the run report."""
    folder = Path(os.environ["LLMNB_FIGURE_DIR"]) if "LLMNB_FIGURE_DIR" in os.environ else outputs_dir("figures")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    if record_file := os.environ.get("LLMNB_RECORD_FILE"):
        with open(record_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": "figure", "name": name, "path": str(path)}) + "\n")
    return path


def read_records(path: str | Path) -> list[dict]:
    """The records one notebook wrote; an absent file means none."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def disk_bytes(path: str | Path) -> int:
    """Bytes of a file, or of every file under a folder; 0 if it does not exist."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def cost(started: float, written: list[str | Path]) -> dict[str, float]:
    """What a notebook spent: wall seconds since `started` (time.perf_counter), this process's peak resident
    memory, and the disk taken by the files and folders it wrote. Recorded for the run report too."""
    spent = {"wall time (s)": time.perf_counter() - started, "peak memory of the kernel (GB)": resident_bytes()[1] / 1e9,
             "disk written (GB)": sum(disk_bytes(p) for p in written) / 1e9}
    for name, value in spent.items():
        record(f"cost: {name}", value)
    return spent

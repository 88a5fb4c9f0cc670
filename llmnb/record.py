"""Key results a notebook reports: `record(name, value, unit)` and `save_figure(fig, name)`.

Under `llmnb run` each notebook's records go to the JSONL file named by
`LLMNB_RECORD_FILE` and its figures to `LLMNB_FIGURE_DIR`; the runner turns them into
the run report. Interactively, figures land in `outputs/figures/`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

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

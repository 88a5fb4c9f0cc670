"""Key results a notebook reports: `record(name, value, unit)`, `save_figure(fig, name)`, `styled(styler)`, and what it
spent: `started = start_costs()` in its first cell, `cost(started, written)` in its last.

Under `llmnb run` each notebook's records go to the JSONL file named by
`LLMNB_RECORD_FILE` and its figures to `LLMNB_FIGURE_DIR`; the runner turns them into
the run report. Interactively, figures land in `outputs/figures/`.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .hardware import resident_bytes
from .paths import outputs_dir


def record(name: str, value: Any, unit: str = "", tolerance: float | None = None) -> Any:
    """Keep a key metric for the run report; returns `value` so it can be used inline.

    `tolerance`: how far (relative) a run on another machine may land from the committed reference run's value and still
    be normal; the run report flags a value outside it (None: the report's default for its unit)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"record({name!r}) got {value}: a metric must be a finite number")
    if tolerance is not None and not tolerance > 0:
        raise ValueError(f"record({name!r}) got tolerance={tolerance}: a relative tolerance is a positive number")
    if path := os.environ.get("LLMNB_RECORD_FILE"):
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": "metric", "name": name, "value": value, "unit": unit, "tolerance": tolerance}) + "\n")
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


class TreeMemory:
    """The peak of the resident memory of this process and all its descendants together (a server, torchrun's
    workers, a measuring subprocess), sampled on a daemon thread: a child's memory is not in the kernel's own peak."""

    def __init__(self, interval: float = 0.25, include_self: bool = True):
        self.interval, self.include_self, self.peak = interval, include_self, 0
        self._stop = threading.Event()
        threading.Thread(target=self._poll, daemon=True, name="llmnb-tree-memory").start()

    def sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss if self.include_self else 0
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass  # it ended between the listing and the reading
        self.peak = max(self.peak, total)
        return total

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> int:
        self._stop.set()
        return max(self.peak, self.sample())


@dataclass
class Started:
    """What `start_costs()` returns: when the notebook started, and the poller of its process tree's memory."""
    seconds: float = field(default_factory=time.perf_counter)
    tree: TreeMemory = field(default_factory=TreeMemory)


def start_costs() -> Started:
    """Call in a notebook's first cell; pass the result to `cost` in its last."""
    return Started()


def cost(started: Started, written: list[str | Path]) -> dict[str, float]:
    """What a notebook spent: wall seconds since `start_costs()`, the peak resident memory of the kernel with every process
    it started (and of the kernel alone), and the disk taken by the files and folders it wrote. Recorded for the run
    report too."""
    kernel = resident_bytes()[1]
    spent = {"wall time (s)": time.perf_counter() - started.seconds,
             "peak memory, kernel and its subprocesses (GB)": max(started.tree.stop(), kernel) / 1e9,
             "peak memory of the kernel alone (GB)": kernel / 1e9,
             "disk written (GB)": sum(disk_bytes(p) for p in written) / 1e9}
    for name, value in spent.items():
        record(f"cost: {name}", value)
    return spent


class styled:  # noqa: N801 - used like a function: `styled(df.style.format(...))` as a cell's last line
    """A pandas Styler shown as its HTML in Jupyter and as formatted text everywhere else (a saved notebook's text
    form, GitHub's diff, a terminal): a bare Styler's text form is only `<Styler at 0x...>`."""

    def __init__(self, styler: Any):
        self.styler = styler

    def _repr_html_(self) -> str:
        return self.styler.to_html()

    def __repr__(self) -> str:
        rows = [line.split("\t") for line in self.styler.to_string(delimiter="\t").splitlines()]
        widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
        return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)

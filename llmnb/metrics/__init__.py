"""Our metrics as local `evaluate` modules, loaded by path so they work offline.

`evaluate.load("accuracy")` fetches a script from the hub; `llmnb.metrics.load("accuracy")`
loads the file beside this one, through the same `evaluate` API.
"""
from __future__ import annotations

from pathlib import Path

NAMES = ("accuracy", "exact_match", "perplexity")


def load(name: str):
    """An `evaluate.EvaluationModule` for one of NAMES."""
    if name not in NAMES:
        raise ValueError(f"unknown metric {name!r}: llmnb ships {', '.join(NAMES)}")
    import evaluate

    return evaluate.load(str(Path(__file__).with_name(f"{name}.py")))

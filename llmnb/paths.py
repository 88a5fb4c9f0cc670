"""Where the collection keeps its files: the project root, `data/` and `outputs/`.

A checkout keeps everything beside the package; an installed llmnb (Colab, Kaggle)
uses the current folder. `LLMNB_HOME` overrides both, for a shared cache.
"""
from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The folder that holds `data/`, `outputs/` and `notebooks/`."""
    if home := os.environ.get("LLMNB_HOME"):
        return Path(home).expanduser().resolve()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "notebooks").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout
    return Path.cwd()


def outputs_dir(*parts: str) -> Path:
    """`outputs/<parts>` (generated, git-ignored), created on first use."""
    path = project_root().joinpath("outputs", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir(*parts: str) -> Path:
    """`data/<parts>` (downloaded and converted corpora), created on first use."""
    path = project_root().joinpath("data", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def notebooks_dir() -> Path:
    return project_root() / "notebooks"

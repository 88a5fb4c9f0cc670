"""Where the collection keeps its files: the project root, `data/` and `outputs/`.

A checkout keeps everything beside the package; an installed llmnb (Colab, Kaggle)
uses the current folder. `LLMNB_HOME` overrides both, for a shared cache.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path


def project_root() -> Path:
    """The folder that holds `data/`, `outputs/` and `notebooks/`."""
    if home := os.environ.get("LLMNB_HOME"):
        return Path(home).expanduser().resolve()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "notebooks").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout
    return Path.cwd()


SMOKE = "smoke"
RUNS, SET_ASIDE = "runs", "previous"  # outputs/runs/<preset>/: run reports; outputs/previous/<time>/: what a --commit run moved aside
PLACEHOLDER = ".gitkeep"  # the one file git tracks under outputs/


class MissingPackage(RuntimeError):
    """An asset package (a corpus, a model file) that is not installed; the message says how to install it."""


def package_folder(module: str, install_hint: str) -> Path:
    """The folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"the package {module!r} is not installed: run `python -m llmnb assets` (or `pip install --no-deps {install_hint}`)")
    return Path(next(iter(spec.submodule_search_locations)))



def outputs_dir(*parts: str) -> Path:
    """`outputs/<parts>` (generated, git-ignored), created on first use.

    While the smoke preset runs (`LLMNB_PRESET=smoke`: the tests, CI, `llmnb run --preset smoke`) everything goes to
    `outputs/smoke/<parts>` instead, so that a test run never replaces a model that a cpu or gpu run left for the
    next notebook (a 2-layer stand-in where notebook 05 expects notebook 04's SmolLM2).
    """
    return _created(outputs_root().joinpath(*parts))


def outputs_root() -> Path:
    """`outputs/`, or `outputs/smoke/` under the smoke preset."""
    root = project_root() / "outputs"
    return root / SMOKE if os.environ.get("LLMNB_PRESET") == SMOKE else root


def shared_outputs_dir(*parts: str) -> Path:
    """`outputs/<parts>` whatever the preset: for assets that are the same for every preset (SmolLM2 converted from its
    GGUF file, tiktoken's cache), prepared once by `llmnb assets`."""
    return _created(project_root().joinpath("outputs", *parts))


def set_aside_outputs(keep: list[tuple[str, ...]]) -> Path | None:
    """Move everything under `outputs/` into `outputs/previous/<time>/`, except the `keep` paths (and the smoke
    preset's folder, the runs' reports, earlier set-asides and git's placeholder), so that a run starts from a clean `outputs/` without
    deleting anything. Returns the folder it moved things into, or None when there was nothing to move."""
    root = project_root() / "outputs"
    kept = {Path(*k) for k in keep} | {Path(name) for name in (SMOKE, RUNS, SET_ASIDE, PLACEHOLDER)}
    aside = root / SET_ASIDE / time.strftime("%Y%m%d-%H%M%S")
    moved = False
    for path in sorted(root.rglob("*")) if root.is_dir() else []:
        relative = path.relative_to(root)
        if any(relative == k or k in relative.parents for k in kept) or not path.exists():
            continue  # kept, or inside a folder already moved
        if any(relative in k.parents for k in kept):
            continue  # a folder that holds a kept path: its other entries are visited one by one
        (aside / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, aside / relative)
        moved = True
    return aside if moved else None


def data_dir(*parts: str) -> Path:
    """`data/<parts>` (downloaded and converted corpora), created on first use."""
    return _created(project_root().joinpath("data", *parts))


def _created(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def notebooks_dir() -> Path:
    return project_root() / "notebooks"


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it into place.

    A crash mid-write leaves the previous file (or none), never a half-written one that
    looks finished: the rename is atomic on the same file system. `path` may be a folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        write(tmp)
        if path.is_dir() and tmp.is_dir():  # a folder cannot be renamed over a non-empty one
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)
    return path


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()

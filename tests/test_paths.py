from pathlib import Path

from llmnb import paths


def test_checkout_root_holds_notebooks_and_pyproject():
    root = paths.project_root()
    assert (root / "notebooks").is_dir() and (root / "pyproject.toml").is_file()


def test_llmnb_home_overrides_root_and_dirs_are_created(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMNB_HOME", str(tmp_path))
    assert paths.project_root() == tmp_path
    out = paths.outputs_dir("runs", "x")
    assert out == tmp_path / "outputs" / "runs" / "x" and out.is_dir()
    assert paths.data_dir("d") == tmp_path / "data" / "d"
    assert paths.notebooks_dir() == Path(tmp_path) / "notebooks"

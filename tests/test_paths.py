import pytest
from pathlib import Path

from llmnb import paths


def test_checkout_root_holds_notebooks_and_pyproject():
    root = paths.project_root()
    assert (root / "notebooks").is_dir() and (root / "pyproject.toml").is_file()


def test_llmnb_home_overrides_root_and_dirs_are_created(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMNB_HOME", str(tmp_path))
    monkeypatch.setenv("LLMNB_PRESET", "cpu")
    assert paths.project_root() == tmp_path
    out = paths.outputs_dir("runs", "x")
    assert out == tmp_path / "outputs" / "runs" / "x" and out.is_dir()
    assert paths.data_dir("d") == tmp_path / "data" / "d"
    assert paths.notebooks_dir() == Path(tmp_path) / "notebooks"


def test_write_atomic_keeps_the_old_file_when_the_writer_fails_and_replaces_folders(tmp_path):
    from llmnb.paths import write_atomic

    target = tmp_path / "sub" / "file.txt"
    write_atomic(target, lambda tmp: tmp.write_text("first"))

    def crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, crash)
    assert target.read_text() == "first" and [p.name for p in target.parent.iterdir()] == ["file.txt"]
    folder = tmp_path / "model"
    write_atomic(folder, lambda tmp: (tmp.mkdir(), (tmp / "a").write_text("1")))
    write_atomic(folder, lambda tmp: (tmp.mkdir(), (tmp / "b").write_text("2")))
    assert sorted(p.name for p in folder.iterdir()) == ["b"]


def test_the_smoke_preset_writes_apart_from_the_other_presets_but_shares_the_assets(tmp_path, monkeypatch):
    """A test run (smoke) must not replace the models a cpu run left for the next notebook."""
    from llmnb.presets import configure

    monkeypatch.setenv("LLMNB_HOME", str(tmp_path))
    monkeypatch.setenv("LLMNB_PRESET", "cpu")
    assert paths.outputs_dir("models") == tmp_path / "outputs" / "models"
    monkeypatch.delenv("LLMNB_PRESET")
    configure("04", "smoke")  # a smoke notebook started by hand, without the environment variable
    assert paths.outputs_dir("models") == tmp_path / "outputs" / "smoke" / "models"
    assert paths.shared_outputs_dir("models") == tmp_path / "outputs" / "models"


def test_the_runner_tells_its_notebooks_the_preset(tmp_path, monkeypatch):
    from llmnb import runner

    monkeypatch.setenv("LLMNB_HOME", str(tmp_path))
    monkeypatch.delenv("LLMNB_PRESET", raising=False)
    seen = []
    monkeypatch.setattr(runner, "find_notebooks", lambda only: [])
    monkeypatch.setattr(runner, "write_report", lambda *args: seen.append(paths.outputs_dir()) or tmp_path / "report.md")
    runner.run("smoke", out=tmp_path / "run")
    assert seen == [tmp_path / "outputs" / "smoke"]

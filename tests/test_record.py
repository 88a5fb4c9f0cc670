import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from llmnb.record import read_records, record, save_figure  # noqa: E402


def test_records_and_figures_go_to_the_runner_files(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMNB_RECORD_FILE", str(tmp_path / "r.jsonl"))
    monkeypatch.setenv("LLMNB_FIGURE_DIR", str(tmp_path / "fig"))
    assert record("loss", 1.5, "nats") == 1.5
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    path = save_figure(fig, "curve")
    assert path.exists() and path.suffix == ".png"
    records = read_records(tmp_path / "r.jsonl")
    assert records[0] == {"kind": "metric", "name": "loss", "value": 1.5, "unit": "nats", "tolerance": None}
    assert records[1]["kind"] == "figure" and records[1]["path"] == str(path)


def test_record_without_runner_is_harmless_and_rejects_nan(monkeypatch):
    monkeypatch.delenv("LLMNB_RECORD_FILE", raising=False)
    assert record("x", 3) == 3
    with pytest.raises(ValueError, match="finite"):
        record("x", math.nan)
    with pytest.raises(ValueError, match="tolerance"):
        record("x", 1.0, tolerance=0)
    assert read_records("/nonexistent/file.jsonl") == []


def test_cost_measures_time_memory_and_the_disk_of_what_was_written(tmp_path, monkeypatch):
    from llmnb.record import cost, disk_bytes, start_costs

    monkeypatch.setenv("LLMNB_RECORD_FILE", str(tmp_path / "records.jsonl"))
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "sub" / "a.bin").write_bytes(b"x" * 3000)
    (tmp_path / "b.bin").write_bytes(b"y" * 500)
    assert disk_bytes(tmp_path / "folder") == 3000 and disk_bytes(tmp_path / "b.bin") == 500 and disk_bytes(tmp_path / "none") == 0
    started = start_costs()
    started.seconds -= 2.0
    spent = cost(started, [tmp_path / "folder", tmp_path / "b.bin", tmp_path / "none"])
    assert spent["disk written (GB)"] == 3500 / 1e9 and 2.0 <= spent["wall time (s)"] < 60
    assert 0.01 < spent["peak memory of the kernel alone (GB)"] <= spent["peak memory, kernel and its subprocesses (GB)"] < 1000
    assert {r["name"] for r in read_records(tmp_path / "records.jsonl")} == {f"cost: {k}" for k in spent}


def test_tree_memory_counts_a_subprocess_the_kernels_own_peak_does_not():
    """A child holding 300 MB: the sampled tree's peak rises by it over what this process held (the process's own peak
    may already be higher than both, from earlier tests, so the sampler is read directly)."""
    import subprocess
    import sys

    import psutil

    from llmnb.record import TreeMemory

    before = psutil.Process().memory_info().rss
    tree = TreeMemory(interval=0.05)
    subprocess.run([sys.executable, "-c", "import time; b = bytearray(300_000_000); b[::4096] = b'x' * len(b[::4096]); time.sleep(2)"], check=True)
    assert tree.stop() - before > 0.25e9


def test_styled_has_a_text_form_with_the_stylers_formatting():
    import pandas as pd

    from llmnb.record import styled

    shown = styled(pd.DataFrame({"error": [0.123456, 2.0], "scheme": ["int4", "fp32"]}, index=["a", "b"]).style.format("{:.2f}", subset=["error"]))
    assert repr(shown).splitlines() == ["   error  scheme", "a   0.12    int4", "b   2.00    fp32"]
    assert "<table" in shown._repr_html_() and "0.12" in shown._repr_html_()

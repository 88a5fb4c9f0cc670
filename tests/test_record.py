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
    assert records[0] == {"kind": "metric", "name": "loss", "value": 1.5, "unit": "nats"}
    assert records[1]["kind"] == "figure" and records[1]["path"] == str(path)


def test_record_without_runner_is_harmless_and_rejects_nan(monkeypatch):
    monkeypatch.delenv("LLMNB_RECORD_FILE", raising=False)
    assert record("x", 3) == 3
    with pytest.raises(ValueError, match="finite"):
        record("x", math.nan)
    assert read_records("/nonexistent/file.jsonl") == []


def test_cost_measures_time_memory_and_the_disk_of_what_was_written(tmp_path, monkeypatch):
    import time

    from llmnb.record import cost, disk_bytes

    monkeypatch.setenv("LLMNB_RECORD_FILE", str(tmp_path / "records.jsonl"))
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "sub" / "a.bin").write_bytes(b"x" * 3000)
    (tmp_path / "b.bin").write_bytes(b"y" * 500)
    assert disk_bytes(tmp_path / "folder") == 3000 and disk_bytes(tmp_path / "b.bin") == 500 and disk_bytes(tmp_path / "none") == 0
    spent = cost(time.perf_counter() - 2.0, [tmp_path / "folder", tmp_path / "b.bin", tmp_path / "none"])
    assert spent["disk written (GB)"] == 3500 / 1e9 and 2.0 <= spent["wall time (s)"] < 60
    assert 0.01 < spent["peak memory of the kernel (GB)"] < 1000
    assert {r["name"] for r in read_records(tmp_path / "records.jsonl")} == {f"cost: {k}" for k in spent}

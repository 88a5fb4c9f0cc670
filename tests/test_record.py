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

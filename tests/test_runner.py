import json

import nbformat
import pytest

from llmnb import runner
from llmnb.__main__ import main


def _notebook(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(sources[0], metadata={"tags": ["parameters"]})] + [nbformat.v4.new_code_cell(s) for s in sources[1:]]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMNB_HOME", str(tmp_path))
    (tmp_path / "notebooks").mkdir()
    _notebook(tmp_path / "notebooks" / "00_ok.ipynb", 'preset = "auto"\nsteps = 1',
              "import llmnb, matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nllmnb.record('steps_seen', steps, 'steps')\nllmnb.record('preset_seen', preset)\nfig, ax = plt.subplots()\nllmnb.save_figure(fig, 'ok_plot')")
    _notebook(tmp_path / "notebooks" / "01_fails.ipynb", 'preset = "auto"', "x = 1", "raise ValueError('broken on purpose')")
    _notebook(tmp_path / "notebooks" / "02_never.ipynb", 'preset = "auto"', "pass")
    return tmp_path


def test_find_notebooks_orders_and_filters(home):
    assert [p.name for p in runner.find_notebooks()] == ["00_ok.ipynb", "01_fails.ipynb", "02_never.ipynb"]
    assert [p.name for p in runner.find_notebooks(["2", "00"])] == ["00_ok.ipynb", "02_never.ipynb"]
    with pytest.raises(ValueError, match="no notebook numbered"):
        runner.find_notebooks(["07"])


def test_parameters_parse_as_literals_or_strings():
    assert runner.parse_parameter("5") == 5
    assert runner.parse_parameter("0.5") == 0.5
    assert runner.parse_parameter("[1, 2]") == [1, 2]
    assert runner.parse_parameter("gpt2") == "gpt2"


def test_run_passes_parameters_records_metrics_and_stops_at_the_failing_cell(home, capsys):
    assert main(["run", "--preset", "smoke", "-p", "steps", "3"]) == 1
    err = capsys.readouterr().err
    # papermill's injected-parameters cell is executed too, so the failing cell is [4]
    assert "01_fails failed at the cell [4] of" in err and "(`raise ValueError('broken on purpose')`)" in err
    out = home / "outputs" / "smoke" / "runs" / "smoke"
    report = (out / "report.md").read_text()
    assert "| [00_ok](00_ok.ipynb) | ok |" in report
    assert "| [01_fails](01_fails.ipynb) | failed |" in report
    assert "| 02_never | not run |" in report
    assert "| steps_seen | 3 | steps |" in report and "| preset_seen | smoke |" in report
    assert "![ok_plot](figures/ok_plot.png)" in report and (out / "figures" / "ok_plot.png").exists()
    assert "<table>" in (out / "report.html").read_text()
    executed = nbformat.read(out / "00_ok.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)


def test_only_and_out_select_notebooks_and_folder(home, tmp_path, capfd):
    assert main(["run", "--preset", "smoke", "--only", "00", "--out", str(tmp_path / "elsewhere")]) == 0
    assert "without encryption" not in capfd.readouterr().err, "the kernel's start-up warnings stay out of the runner's output"
    assert (tmp_path / "elsewhere" / "report.md").exists()
    assert json.loads((tmp_path / "elsewhere" / "records" / "00_ok.jsonl").read_text().splitlines()[0])["value"] == 1


def test_bad_arguments_exit_2_with_a_message(home, capsys):
    assert main(["run", "--preset", "fast"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["run", "--only", "9"]) == 2


def test_unknown_or_mistyped_parameters_are_refused_before_any_notebook_runs(home, capsys):
    assert main(["run", "--preset", "smoke", "--only", "00", "-p", "bogus", "3"]) == 2
    err = capsys.readouterr().err
    assert "unknown parameter(s) ['bogus']" in err and "00_ok: steps" in err
    assert not (home / "outputs" / "smoke" / "runs" / "smoke" / "00_ok.ipynb").exists(), "nothing ran"


def test_a_parameter_of_the_wrong_type_names_the_expected_type():
    from llmnb.paths import notebooks_dir

    with pytest.raises(ValueError, match=r"parameter 'matmul_size' of notebook 00 expects int \(the preset has \d+\), got 'abc' \(str\)"):
        runner.check_parameters(runner.find_notebooks(["00"]), "smoke", {"matmul_size": "abc"})
    runner.check_parameters(runner.find_notebooks(["00"]), "smoke", {"matmul_size": 256})
    assert notebooks_dir().name == "notebooks"

import json

import nbformat
import pytest

from llmnb import runner
from llmnb.__main__ import main
from llmnb.runner import injected


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
    assert any(injected(c) for c in executed.cells)


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


@pytest.fixture
def committable(tmp_path, monkeypatch):
    """A checkout of two notebooks that run, a README with the table's markers, and an outputs/ from an earlier run."""
    monkeypatch.setenv("LLMNB_HOME", str(tmp_path))
    (tmp_path / "notebooks").mkdir()
    _notebook(tmp_path / "notebooks" / "00_bars.ipynb", 'preset = "auto"',
              "from tqdm.auto import tqdm\nfor _ in tqdm(range(300), desc='counting', mininterval=0): pass\nprint('')",
              "import llmnb\nfrom llmnb.presets import resolve_preset\nllmnb.record('cost: disk written (GB)', 0.5)\nprint('preset', resolve_preset(preset))")
    _notebook(tmp_path / "notebooks" / "01_two.ipynb", 'preset = "auto"', "print(2)")
    (tmp_path / "README.md").write_text("# x\n\nbefore\n<!-- llmnb run --commit: begin -->\nold table\n<!-- llmnb run --commit: end -->\nafter\n")
    for stale in ("gguf/old.gguf", "models/smollm2-sft/model.safetensors", "models/smollm2-135m-instruct/config.json", "cache/tiktoken/a"):
        (tmp_path / "outputs" / stale).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "outputs" / stale).write_text("x")
    (tmp_path / "outputs" / ".gitkeep").write_text("")   # tracked by git: a clean outputs/ still has it
    return tmp_path


def test_commit_regenerates_the_committed_notebooks_from_a_clean_outputs(committable):
    assert main(["run", "--preset", "cpu", "--commit"]) == 0
    nb = nbformat.read(committable / "notebooks" / "00_bars.ipynb", as_version=4)
    assert not any(injected(c) for c in nb.cells), "no cell pinning the preset"
    assert "widgets" not in nb.metadata and "papermill" not in nb.metadata and not any("papermill" in c.metadata for c in nb.cells)
    streams = [o for o in nb.cells[1].outputs if o.output_type == "stream"]
    assert all(o.text.strip() for o in streams), "no empty stream"
    bar = next(o.text for o in streams if "counting" in o.text)
    assert "widget" not in str(nb.cells[1].outputs) and bar.strip().startswith("counting: 100%") and "\r" not in bar, \
        "tqdm.auto drew a text bar, coalesced to its last state"
    assert "preset cpu" in nb.cells[2].outputs[0].text
    readme = (committable / "README.md").read_text()
    assert "old table" not in readme and "| 00_bars |" in readme and "| 0.50 |" in readme and readme.endswith("end -->\nafter\n")
    reference = json.loads((committable / "notebooks" / runner.REFERENCE_FILE).read_text())
    assert reference["preset"] == "cpu" and reference["metrics"]["00_bars"]["cost: disk written (GB)"]["value"] == 0.5
    kept = committable / "outputs"
    assert (kept / "models/smollm2-135m-instruct/config.json").exists() and (kept / "cache/tiktoken/a").exists()
    assert not (kept / "gguf").exists() and not (kept / "models/smollm2-sft").exists()
    assert (kept / ".gitkeep").exists(), "git's placeholder stays: moving it would delete a tracked file"
    (aside,) = (kept / "previous").iterdir()
    assert (aside / "gguf/old.gguf").read_text() == "x" and (aside / "models/smollm2-sft/model.safetensors").exists(), "moved, not deleted"


def test_a_notebook_re_run_alone_is_written_back_without_the_cell_that_pins_its_preset(committable, tmp_path):
    """`llmnb run --only` injects `preset = ...`; written back with it, the notebook would run at that preset under
    `make test` and for every user, whatever LLMNB_PRESET or the machine says."""
    assert main(["run", "--preset", "smoke", "--only", "01", "--out", str(tmp_path / "alone")]) == 0
    executed = nbformat.read(tmp_path / "alone" / "01_two.ipynb", as_version=4)
    assert any(injected(c) for c in executed.cells), "papermill injected the preset"
    runner.write_committed(tmp_path / "alone" / "01_two.ipynb", committable / "notebooks" / "01_two.ipynb")
    written = nbformat.read(committable / "notebooks" / "01_two.ipynb", as_version=4)
    assert not any(injected(c) for c in written.cells)
    assert [c.source for c in written.cells] == [c.source for c in executed.cells if not injected(c)]


def test_commit_is_refused_for_a_partial_run_and_writes_nothing_when_a_notebook_fails(committable, capsys):
    before = (committable / "notebooks" / "01_two.ipynb").read_bytes()
    assert main(["run", "--preset", "smoke", "--commit"]) == 2 and "use --preset cpu" in capsys.readouterr().err
    assert main(["run", "--preset", "cpu", "--only", "01", "--commit"]) == 2
    _notebook(committable / "notebooks" / "02_fails.ipynb", 'preset = "auto"', "raise ValueError('broken')")
    assert main(["run", "--preset", "cpu", "--commit"]) == 1
    assert (committable / "notebooks" / "01_two.ipynb").read_bytes() == before, "a failed run writes no notebook back"
    assert "old table" in (committable / "README.md").read_text()


def test_the_report_says_which_figures_are_normal_against_the_committed_reference_run(home):
    """A reference run with steps_seen 3 on another processor and torch: 3 is normal, 5 is flagged, and the report names
    what differs (the processor, the library) as what usually moves a figure."""
    context = runner.run_context("smoke")
    reference = {**context, "machine": "Some Other CPU, 64 cores | torch 0.0", "libraries": {**context["libraries"], "torch": "0.0"},
                 "written": "2026-01-01", "metrics": {"00_ok": {"steps_seen": {"value": 3, "unit": "steps", "tolerance": 0.1}}}}
    (home / "notebooks" / runner.REFERENCE_FILE).write_text(json.dumps(reference))
    out = home / "outputs" / "smoke" / "runs" / "smoke"
    assert main(["run", "--preset", "smoke", "--only", "00", "-p", "steps", "3"]) == 0
    report = (out / "report.md").read_text()
    assert "1 of 1 figures lie within their tolerance" in report and "| steps_seen | 3 | steps | 3 | normal |" in report
    assert main(["run", "--preset", "smoke", "--only", "00", "-p", "steps", "5"]) == 0
    report = (out / "report.md").read_text()
    assert "0 of 1 figures" in report and "+67% (outside ±10%)" in report
    assert "machine: Some Other CPU, 64 cores | torch 0.0 there" in report and "torch 0.0 there" in report
    reference["preset"] = "cpu"  # a reference of another preset is not compared with
    (home / "notebooks" / runner.REFERENCE_FILE).write_text(json.dumps(reference))
    assert main(["run", "--preset", "smoke", "--only", "00", "-p", "steps", "5"]) == 0
    assert "Is my number normal" not in (out / "report.md").read_text()

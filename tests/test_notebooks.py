"""Every numbered notebook runs under papermill with the smoke preset, and the committed ones show a real run."""
import nbformat
import pytest

from llmnb import runner
from llmnb.paths import notebooks_dir

NOTEBOOKS = runner.find_notebooks()


def test_the_runner_runs_a_real_notebook_under_the_smoke_preset(tmp_path):
    """papermill's parameter injection and the report on a real notebook. Every notebook is executed in order
    by nbval in this same suite (`--nbval-lax` over notebooks/), so running all of them here again would
    only double CI's time."""
    results, report = runner.run("smoke", only=["00"], out=tmp_path)
    failed = {r.name: r.error for r in results if r.status != "ok"}
    assert not failed, f"notebooks failed: {failed}"
    assert report.exists() and "| ok |" in report.read_text() and '"preset": "smoke"' in report.read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_carries_outputs_and_no_errors(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].source.lstrip().startswith("# On Colab or Kaggle"), "first code cell installs llmnb on Colab/Kaggle only"
    assert any("parameters" in c.metadata.get("tags", []) for c in code), "a cell tagged 'parameters'"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "a title"
    assert all(c.execution_count for c in code[1:]), "every cell executed (committed from a real run)"
    assert any(c.outputs for c in code), "outputs are committed"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"error outputs: {[e.ename for e in errors]}"


def test_notebooks_folder_has_only_numbered_notebooks():
    assert all(p.name[:2].isdigit() for p in notebooks_dir().glob("*.ipynb"))

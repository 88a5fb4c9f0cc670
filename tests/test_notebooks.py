"""Every numbered notebook runs under papermill with the smoke preset, and the committed ones show a real run."""
from pathlib import Path

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


def test_every_install_cell_installs_from_the_address_in_the_package_metadata():
    import re
    import tomllib

    from llmnb.paths import project_root

    source = tomllib.loads((project_root() / "pyproject.toml").read_text())["project"]["urls"]["Source"]
    for path in NOTEBOOKS:
        cell = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code").source
        assert re.search(r'os\.environ\.get\("LLMNB_SOURCE", "git\+([^"]+)"\)', cell).group(1) == source, path.name
        assert 'f"llmnb[notebooks] @ {source}"' in cell, f"{path.name}: the install uses the LLMNB_SOURCE override"


def test_a_notebook_runs_from_outside_the_repository_against_a_non_editable_install(tmp_path):
    """As on Colab: the package installed from a built wheel (not this checkout), the notebook in a folder of its own,
    its install cell taking the Kaggle branch with LLMNB_SOURCE pointing at this checkout, offline."""
    import os
    import site
    import subprocess
    import sys

    from llmnb.paths import project_root

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    # the third-party stack is visible as a plain path entry: this checkout's editable-install hook (a .pth there) is not run
    (Path(packages) / "stack.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    work = tmp_path / "colab"
    work.mkdir()
    notebook = work / "00.ipynb"
    notebook.write_bytes((project_root() / "notebooks" / "00_can_my_machine_do_it.ipynb").read_bytes())
    env = {**os.environ, "KAGGLE_KERNEL_RUN_TYPE": "Interactive", "LLMNB_SOURCE": f"file://{project_root()}", "LLMNB_PRESET": "smoke",
           "HF_HUB_OFFLINE": "1", "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1", "PYTHONPATH": "",
           "PIP_NO_BUILD_ISOLATION": "0"}  # pip reads its "no-" switches inverted: 0 turns build isolation off (the offline build)
    env.pop("LLMNB_HOME", None)
    subprocess.run([python, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"], check=True, env=env, capture_output=True)
    run = subprocess.run([python, "-m", "papermill", notebook.name, "out.ipynb", "-k", "python3", "--cwd", str(work)],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    where = subprocess.run([python, "-c", "import llmnb; print(llmnb.__file__)"], cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(packages) and "__editable__" not in where, f"llmnb imported from {where}, not the installed wheel"
    assert (work / "outputs").is_dir(), "outputs land beside the notebook, not in the checkout"

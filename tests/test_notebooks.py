"""Every numbered notebook runs under papermill with the smoke preset (nbval runs them in order, the Colab-like test runs 00
through papermill with an injected preset), and the committed ones show a real run that reads cleanly."""
import re
from pathlib import Path

import nbformat
import pytest

from llmnb import runner
from llmnb.paths import notebooks_dir
from llmnb.runner import injected

NOTEBOOKS = runner.find_notebooks()


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_sees_every_name_of_the_parameters_cell(path):
    """`llmnb run -p NAME VALUE` accepts only what papermill's parser finds: a line it cannot parse (05's dpo_sft had an
    `=` in its comment) would refuse a real parameter as unknown."""
    import papermill

    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    assigned = set(re.findall(r"^(\w+)\s*=", cell.source, re.M))
    assert set(papermill.inspect_notebook(str(path))) == assigned


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


@pytest.mark.long
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
    # notebook 02: the install cell every notebook shares, the package and the offline assets, and the quickest smoke run
    notebook = work / "02.ipynb"
    notebook.write_bytes((project_root() / "notebooks" / "02_gpt_from_scratch.ipynb").read_bytes())
    env = {**os.environ, "KAGGLE_KERNEL_RUN_TYPE": "Interactive", "LLMNB_SOURCE": f"file://{project_root()}", "LLMNB_PRESET": "smoke",
           "HF_HUB_OFFLINE": "1", "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1", "PYTHONPATH": "",
           "PIP_NO_BUILD_ISOLATION": "0"}  # pip reads its "no-" switches inverted: 0 turns build isolation off (the offline build)
    env.pop("LLMNB_HOME", None)
    subprocess.run([python, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"], check=True, env=env, capture_output=True)
    # SmolLM2 as a second notebook run finds it, converted: the conversion itself is tests/test_assets.py's, and the
    # install cell's `llmnb assets` still runs from the wheel (it finds the model and writes tiktoken's cache)
    from llmnb.assets import PREPARED, prepare_smollm2

    (work / "outputs" / PREPARED[0][0]).mkdir(parents=True)
    (work / "outputs" / PREPARED[0][0] / PREPARED[0][1]).symlink_to(prepare_smollm2(), target_is_directory=True)
    # papermill injects the preset into the real notebook's parameters cell, as `llmnb run` does
    run = subprocess.run([python, "-m", "papermill", notebook.name, "out.ipynb", "-k", "python3", "--cwd", str(work), "-p", "preset", "smoke"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    where = subprocess.run([python, "-c", "import llmnb; print(llmnb.__file__)"], cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(packages) and "__editable__" not in where, f"llmnb imported from {where}, not the installed wheel"
    assert any((work / "outputs").rglob("02_kv_cache.png")), "outputs land beside the notebook, not in the checkout"
    executed = nbformat.read(work / "out.ipynb", as_version=4)
    assert any(injected(c) and 'preset = "smoke"' in c.source for c in executed.cells)


# --- the committed notebooks read cleanly: what a reader sees on GitHub or Colab is the run's final state ------------

def _outputs(nb):
    return [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.outputs]


def _bar_states(text: str) -> dict[str, tuple[int, int]]:
    """The last state (n, total) of every tqdm bar in a stream's text, by its description."""
    states = {}
    for line in re.split(r"[\r\n]", text):
        if m := re.match(r"\s*(.*?):\s+\d+%\|.*?\|\s*(\d+)/(\d+)", line):
            states[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return states


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_shows_each_results_final_state_as_text(path):
    nb = nbformat.read(path, as_version=4)
    assert "widgets" not in nb.metadata, "widget state in the metadata (llmnb run --commit strips it)"
    assert not any(injected(c) for c in nb.cells), \
        "an injected parameters cell pins the preset for every run (runner.write_committed drops it)"
    bars, problems = {}, []
    for i, out in _outputs(nb):
        if out.output_type in ("display_data", "execute_result"):
            text = out.data.get("text/plain", "")
            if "application/vnd.jupyter.widget-view+json" in out.data:
                problems.append(f"cell {i}: a widget, whose saved text is its first state: {text[:60]!r}")
            elif not text.strip() or re.fullmatch(r"<[\w.]+ (object )?at 0x[0-9a-f]+>", text.strip()):
                problems.append(f"cell {i}: an output with no text form ({text[:60]!r}): llmnb.record.styled for a Styler")
        if out.output_type == "stream":
            if not out.text.strip():
                problems.append(f"cell {i}: an empty {out.name} stream")
            bars.update({(i, d): s for d, s in _bar_states(out.text).items()})
    problems += [f"cell {i}: the bar {d!r} stops at {n}/{total}" for (i, d), (n, total) in bars.items() if n != total]
    assert not problems, "\n".join(problems)


def test_bar_states_read_the_last_state_of_each_bar():
    text = "SmolLM2: 100%|██| 9/9 [01:58<00:00]\nours:  44%|████▍     | 4/9 [00:02<00:03]\rours: 100%|█| 9/9 [00:05<00:00]\nPPO:   1%|  | 7/1000 [01:24<3:19:18]"
    assert _bar_states(text) == {"SmolLM2": (9, 9), "ours": (9, 9), "PPO": (7, 1000)}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_opens_with_a_colab_badge_and_its_neighbours(path):
    import tomllib

    from llmnb.paths import project_root

    repo = tomllib.loads((project_root() / "pyproject.toml").read_text())["project"]["urls"]["Source"].removeprefix("https://github.com/")
    header = nbformat.read(path, as_version=4).cells[0].source
    assert f"](https://colab.research.google.com/github/{repo}/blob/main/notebooks/{path.name})" in header, "the Colab badge"
    k = NOTEBOOKS.index(path)
    for word, neighbour in (("previous", k - 1), ("next", k + 1)):
        if 0 <= neighbour < len(NOTEBOOKS):
            assert f"{word}: [{NOTEBOOKS[neighbour].stem}]({NOTEBOOKS[neighbour].name})" in header, f"a link to the {word} notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_closes_with_what_it_tells_and_what_it_cost(path):
    nb = nbformat.read(path, as_version=4)
    headings = [line for c in nb.cells if c.cell_type == "markdown" for line in c.source.splitlines() if line.startswith("#")]
    assert any(re.match(r"##+ (\d+ · )?What this tells you", h) for h in headings), "a closing 'What this tells you'"
    costs = [o for c in nb.cells if c.cell_type == "code" and "cost(started" in c.source for o in c.outputs]
    assert any("wall time (s)" in str(o.get("data", {}).get("text/plain", "")) for o in costs), "a 'what this cost' table from llmnb.record.cost"


def _shown_text(nb) -> str:
    parts = [c.source for c in nb.cells if c.cell_type == "code"]
    for _, out in _outputs(nb):
        parts.append(str(out.get("text", "")))
        parts += [str(v) for k, v in out.get("data", {}).items() if k.startswith("text/")]
    return "\n".join(parts)


FIGURE = re.compile(r"(?<![\w.,/-])(\d[\d,]*\.\d+|\d{3,}(?:,\d{3})*)(?![\w.-]?\d)")
NOT_RESULTS = {"503"}  # the HTTP status a loading server answers


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_figure_in_the_prose_is_typed_by_hand(path):
    """Best effort: a number of 3+ significant digits in a markdown cell (links, code spans and years aside) must
    appear in the notebook's code or outputs, where the run produced it; prose that states a result renders it."""
    nb = nbformat.read(path, as_version=4)
    shown = _shown_text(nb)
    typed = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        prose = re.sub(r"`[^`]*`|\]\([^)]*\)|\b\d+\.\d+\.\d+\.\d+\b", " ", cell.source)  # code, link targets, addresses
        for m in FIGURE.finditer(prose):
            figure = m.group(1)
            digits = figure.replace(",", "").replace(".", "").lstrip("0")
            if len(digits) < 3 or re.fullmatch(r"(19|20)\d\d", figure) or figure in NOT_RESULTS:
                continue
            if figure not in shown and figure.replace(",", "") not in shown:
                typed.append(f"cell {i}: {figure} in '…{prose[max(0, m.start() - 50):m.end() + 20]}…'")
    assert not typed, "\n".join(typed)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papers_are_cited_as_links_and_no_unexplained_words(path):
    nb = nbformat.read(path, as_version=4)
    prose = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    unlinked = [m.group(0) for m in re.finditer(r"[\w-]+ et al\.?,? \(?\d{4}\)?(?!\]\(http)(?![^\[\]]*\]\(http)", prose)]
    assert not unlinked, f"papers cited without a link: {unlinked}"
    assert "arXiv:" not in prose, "an arXiv number as plain text: link it"
    assert not re.search(r"\bseeds\b", prose + _shown_text(nb)), "'seeds' (our word for the guides users came with) means nothing to a reader"


def test_every_time_estimate_uses_the_machines_shared_figures():
    """One matmul peak and one utilisation per machine (hardware.peak_flops, measure.loop_utilisation) and one assumed
    GPU utilisation (budget.GPU_MFU): no notebook measures its own peak for an estimate or types a utilisation."""
    for path in NOTEBOOKS:
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert not re.search(r"mfu\s*=\s*0\.\d|\*\s*0\.4\b", code), f"{path.name}: a typed utilisation; use measure.loop_utilisation or budget.GPU_MFU"
        assert "measure_matmul_flops(" not in code, f"{path.name}: a peak of its own; use hardware.peak_flops (measured once per machine)"

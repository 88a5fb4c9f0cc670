"""`llmnb run`: execute the numbered notebooks with papermill, in order, and write a report.

Each notebook gets the preset (and any `-p NAME VALUE`) as papermill parameters and
writes its key numbers with `llmnb.record`; the runner adds status, wall time and the
peak memory of the kernel with the processes it starts, and writes `report.md` and
`report.html` under `outputs/runs/<preset>/`, also when a notebook fails.

`llmnb run --preset cpu --commit` (`make notebooks`) regenerates the committed notebooks: all of them, in order, from
a clean `outputs/` (the previous one is moved aside, not deleted), each written back to `notebooks/` cleaned for
reading (streams coalesced, no widget state, no papermill bookkeeping), and the run's table written into the README.
"""
from __future__ import annotations

import ast
import html
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm  # text bars: a notebook saved by a batch run keeps their last state (a widget keeps its first)

from .assets import PREPARED
from .hardware import machine_fingerprint, machine_info
from .paths import RUNS, notebooks_dir, outputs_dir, project_root, set_aside_outputs
from .presets import PRESETS, configure, resolve_preset
from .record import TreeMemory, read_records

COMMITTED_PRESET = "cpu"  # the committed notebooks are this preset's run
# Libraries that draw `tqdm.auto` bars (datasets, trl, transformers' GGUF loader) draw text bars in a batch run: a saved
# notebook keeps a text bar's last state, a widget its first ("0 %"). Run by the kernel before the first cell.
TEXT_BARS = ("import tqdm.auto, tqdm.autonotebook, tqdm.std; tqdm.autonotebook.tqdm = tqdm.auto.tqdm = tqdm.std.tqdm; "
             "tqdm.autonotebook.trange = tqdm.auto.trange = tqdm.std.trange")
README_TABLE = ("<!-- llmnb run --commit: begin -->", "<!-- llmnb run --commit: end -->")
REFERENCE_FILE = "reference_run.json"  # in notebooks/: the committed run's key figures, and where and with what they were made
DEFAULT_TOLERANCE = 0.25  # relative, for a figure recorded without its own
MACHINE_UNITS = {"s", "ms", "s/step", "tok/s", "tokens/s", "GFLOP/s", "GB", "MB"}  # figures that move with the processor


@dataclass
class NotebookResult:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    error: str = ""
    records: list[dict] = field(default_factory=list)


def find_notebooks(only: list[str] | None = None, folder: Path | None = None) -> list[Path]:
    """The numbered notebooks `NN_*.ipynb`, in order; `only` keeps those whose number is listed."""
    folder = folder or notebooks_dir()
    notebooks = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {n.strip().zfill(2) for n in only if n.strip()}
        unknown = wanted - {p.name[:2] for p in notebooks}
        if unknown:
            raise ValueError(f"no notebook numbered {sorted(unknown)} in {folder}; have {[p.name[:2] for p in notebooks]}")
        notebooks = [p for p in notebooks if p.name[:2] in wanted]
    if not notebooks:
        raise FileNotFoundError(f"no numbered notebooks (NN_*.ipynb) in {folder}")
    return notebooks


def parse_parameter(value: str):
    """A `-p` value as a Python literal when it is one (5, 0.1, True, [1, 2]), else the string."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def run_notebook(path: Path, out_dir: Path, parameters: dict, kernel: str = "python3") -> NotebookResult:
    """Execute one notebook under papermill; never raises for a failing cell."""
    import papermill

    result = NotebookResult(path.stem)
    record_file = out_dir / "records" / f"{path.stem}.jsonl"
    record_file.parent.mkdir(parents=True, exist_ok=True)
    record_file.unlink(missing_ok=True)
    os.environ["LLMNB_RECORD_FILE"] = str(record_file)
    os.environ["LLMNB_FIGURE_DIR"] = str(out_dir / "figures")
    start = time.perf_counter()
    try:
        memory = TreeMemory(interval=0.1, include_self=False)  # the kernel and every process it starts, summed
        papermill.execute_notebook(str(path), str(out_dir / path.name), parameters=parameters, kernel_name=kernel,
                                   cwd=str(path.parent), progress_bar=False, log_output=False,
                                   # the kernel's start-up warnings (plain-TCP transport, on loopback here) are not a user's business
                                   extra_arguments=["--IPKernelApp.log_level=ERROR", f"--IPKernelApp.exec_lines={TEXT_BARS}"])
        result.status = "ok"
    except papermill.PapermillExecutionError as exc:
        result.status = "failed"
        result.error = f"the cell [{exc.exec_count}] of {out_dir / path.name} (`{_first_line(out_dir / path.name, exc.exec_count)}`): {exc.ename}: {exc.evalue}"
    except Exception as exc:  # kernel death, missing kernel, unreadable notebook
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        for name in ("LLMNB_RECORD_FILE", "LLMNB_FIGURE_DIR"):
            os.environ.pop(name, None)
    result.seconds = time.perf_counter() - start
    result.peak_memory_bytes = memory.stop() if "memory" in locals() else 0
    result.records = read_records(record_file)
    return result


def _first_line(notebook: Path, execution_count: int) -> str:
    """The first line of the executed cell numbered `execution_count`, to name it in words."""
    import nbformat

    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type == "code" and cell.execution_count == execution_count:
            return cell.source.strip().splitlines()[0][:80] if cell.source.strip() else ""
    return ""


def run(preset: str = "auto", only: list[str] | None = None, parameters: dict | None = None, out: Path | None = None,
        commit: bool = False) -> tuple[list[NotebookResult], Path]:
    """Run the collection; return the results and the report's path. Stops at the first failure.

    `commit`: regenerate the committed notebooks (see the module's docstring); they are written back only when every
    notebook ran, so that the committed set always comes from one run in order."""
    preset = resolve_preset(preset)
    if commit and (only or parameters or preset != COMMITTED_PRESET):
        raise ValueError(f"--commit regenerates the committed notebooks, which are one run of every notebook at the "
                         f"{COMMITTED_PRESET} preset with its own values: use --preset {COMMITTED_PRESET}, without --only or -p")
    os.environ["LLMNB_PRESET"] = preset  # the kernels inherit it: a smoke run writes under outputs/smoke/ (paths.outputs_dir)
    out_dir = Path(out) if out else outputs_dir(RUNS, preset)
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = find_notebooks(only)
    check_parameters(notebooks, preset, parameters or {})
    # a committed notebook must not carry an injected cell that pins its preset: its `preset = "auto"` reads LLMNB_PRESET
    params = {} if commit else {"preset": preset, **(parameters or {})}
    if commit and (aside := set_aside_outputs(list(PREPARED))):
        print(f"llmnb run: the previous outputs/ (all but the prepared assets) moved to {aside}")
    results = [NotebookResult(p.stem) for p in notebooks]
    bar = tqdm(notebooks, desc=f"llmnb run ({preset})", unit="notebook")
    for i, path in enumerate(bar):
        bar.set_postfix_str(path.stem)
        results[i] = run_notebook(path, out_dir, params)
        if results[i].status != "ok":
            break
    report = write_report(results, out_dir, preset, params)
    if commit and all(r.status == "ok" for r in results):
        for path in notebooks:
            write_committed(out_dir / path.name, path)
        write_readme_table(results, project_root() / "README.md")
        write_reference(results, notebooks_dir() / REFERENCE_FILE, preset)
    return results, report


def injected(cell) -> bool:
    """Whether `cell` is the parameters cell papermill inserted (tagged `injected-parameters`)."""
    return "injected-parameters" in cell.metadata.get("tags", [])


def write_committed(executed: Path, target: Path) -> None:
    """An executed notebook written to `target` as it is committed: each cell's streams coalesced (a progress bar's
    last state, not every update), no empty streams, no widget state, no papermill bookkeeping (local paths), and no
    injected parameters cell: one (`preset = "cpu"` from a `--only` re-run) would pin every later run to its preset."""
    import nbformat
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    nb = nbformat.read(executed, as_version=4)
    nb.cells = [c for c in nb.cells if not injected(c)]
    nb, _ = CoalesceStreamsPreprocessor(enabled=True).preprocess(nb, {})
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and not o.text.strip())]
    nbformat.write(nb, target)


def write_readme_table(results: list[NotebookResult], readme: Path) -> None:
    """The committed run's table (wall time, peak memory of the process tree, disk written) between the README's
    markers, so that the README's claim about how the notebooks were made is the output of the command that made them."""
    text = readme.read_text(encoding="utf-8")
    begin, end = README_TABLE
    if begin not in text or end not in text:
        raise ValueError(f"{readme} has no {begin} ... {end} markers for the run's table")
    rows = [f"Regenerated by `make notebooks` on {time.strftime('%Y-%m-%d')}, in order, from a clean `outputs/`:", "",
            "| notebook | wall time (min) | peak memory, kernel and its subprocesses (GB) | disk written (GB) |", "|---|---:|---:|---:|"]
    for r in results:
        disk = next((m["value"] for m in r.records if m.get("name") == "cost: disk written (GB)"), float("nan"))
        rows.append(f"| {r.name} | {r.seconds / 60:.1f} | {r.peak_memory_bytes / 1e9:.2f} | {disk:.2f} |")
    rows.append(f"| all | {sum(r.seconds for r in results) / 60:.1f} | {max(r.peak_memory_bytes for r in results) / 1e9:.2f} | |")
    head, tail = text.split(begin, 1)[0], text.split(end, 1)[1]
    readme.write_text(head + begin + "\n" + "\n".join(rows) + "\n" + end + tail, encoding="utf-8")


def check_parameters(notebooks: list[Path], preset: str, parameters: dict) -> None:
    """Refuse, before any notebook runs, a parameter no selected notebook's parameters cell has, or one of the wrong type."""
    import papermill

    known = {path.stem: set(papermill.inspect_notebook(str(path))) for path in notebooks}
    unknown = sorted(set(parameters) - set().union(*known.values()))
    if unknown:
        names = "; ".join(f"{nb}: {', '.join(sorted(n - {'preset'}))}" for nb, n in known.items())
        raise ValueError(f"unknown parameter(s) {unknown}: no selected notebook has them. Known parameters — {names}")
    for path in notebooks:
        typed = PRESETS[preset].get(path.name[:2], {})
        configure(path.name[:2], preset, **{k: v for k, v in parameters.items() if k in typed and k in known[path.stem]})  # raises for a wrong type


def run_context(preset: str) -> dict:
    """What a figure depends on besides the code: the preset, the processor, the libraries' versions."""
    return {"preset": preset, "machine": machine_fingerprint("cpu"), "libraries": machine_info().libraries}


def write_reference(results: list[NotebookResult], path: Path, preset: str) -> None:
    """The committed run's numeric figures, their units and tolerances, with `run_context`: what a user's run is compared with."""
    metrics = {r.name: {m["name"]: {k: m.get(k) for k in ("value", "unit", "tolerance")} for m in r.records
                        if m.get("kind") == "metric" and _numeric(m["value"])} for r in results}
    path.write_text(json.dumps({**run_context(preset), "written": time.strftime("%Y-%m-%d"), "metrics": metrics}, indent=1) + "\n")


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_reference(preset: str) -> dict | None:
    """The committed reference run, if there is one for `preset`."""
    path = notebooks_dir() / REFERENCE_FILE
    reference = json.loads(path.read_text()) if path.exists() else None
    return reference if reference and reference.get("preset") == preset else None


def judged(metric: dict, reference: dict | None) -> str:
    """"normal", or how far `metric` lies from the reference run's figure of the same name ("" when there is none)."""
    if not reference or not _numeric(metric["value"]):
        return ""
    tolerance, gap = reference.get("tolerance") or DEFAULT_TOLERANCE, metric["value"] - reference["value"]
    relative = gap / abs(reference["value"]) if reference["value"] else gap  # a zero reference: the gap itself
    return "normal" if abs(relative) <= tolerance else f"{relative:+.0%} (outside ±{tolerance:.0%})"


def what_differs(context: dict, reference: dict) -> list[str]:
    """What usually moves a figure, where this run differs from the reference run: preset, processor, library versions."""
    differs = [f"{key}: {reference[key]} there, {context[key]} here" for key in ("preset", "machine") if reference.get(key) != context[key]]
    libraries = [f"{name} {version} there, {context['libraries'].get(name)} here" for name, version in reference.get("libraries", {}).items()
                 if context["libraries"].get(name) != version]
    return differs + libraries


def normal_section(results: list[NotebookResult], reference: dict, context: dict) -> list[str]:
    """The report's answer to "is my number normal?": how many figures land within tolerance of the reference run, the
    ones that do not, and what differs between the two runs that usually explains it."""
    verdicts = [(r.name, m, judged(m, reference["metrics"].get(r.name, {}).get(m["name"]))) for r in results for m in r.records if m.get("kind") == "metric"]
    compared = [v for v in verdicts if v[2]]
    outside = [v for v in compared if v[2] != "normal"]
    rows = ["## Is my number normal?", "", f"{len(compared) - len(outside)} of {len(compared)} figures lie within their tolerance of the committed "
            f"reference run ({reference.get('written', '?')}, {reference['machine']})."]
    if outside:
        rows += ["", "| notebook | figure | here | reference | |", "|---|---|---:|---:|---|"]
        rows += [f"| {nb} | {m['name']} | {_fmt_value(m['value'])} {m['unit']} | {_fmt_value(reference['metrics'][nb][m['name']]['value'])} | {verdict} |"
                 for nb, m, verdict in outside]
        differs = what_differs(context, reference)
        machine_only = all(m["unit"] in MACHINE_UNITS for _, m, _ in outside)
        rows += ["", "What differs from the reference run: " + ("; ".join(differs) if differs else
                 "nothing it records (same preset, processor and libraries): a change in the code or data, or noise (each notebook states its interval)")
                 + (". All of these are times, speeds or memory: another processor, or another load on this one, moves them." if machine_only else ".")]
    return rows


def _fmt_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(results: list[NotebookResult], out_dir: Path, preset: str, parameters: dict) -> Path:
    """`report.md` and `report.html`: per notebook status, wall time, peak memory, metrics, figures."""
    rows = [f"# llmnb run: preset `{preset}`", "", f"Parameters: `{json.dumps(parameters)}`  ", f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}", "",
            "| notebook | status | wall time (s) | peak memory (MB) |", "|---|---|---:|---:|"]
    for r in results:
        link = f"[{r.name}]({r.name}.ipynb)" if r.status != "not run" else r.name
        rows.append(f"| {link} | {r.status} | {r.seconds:.1f} | {r.peak_memory_bytes / 1e6:.0f} |")
    reference = read_reference(preset)
    if reference:
        rows += [""] + normal_section(results, reference, run_context(preset))
    for r in results:
        if r.error:
            rows += ["", f"**{r.name} failed** at {r.error}"]
        metrics = [x for x in r.records if x.get("kind") == "metric"]
        figures = [x for x in r.records if x.get("kind") == "figure"]
        if metrics or figures:
            rows += ["", f"## {r.name}", ""]
        if metrics:
            theirs = (reference or {}).get("metrics", {}).get(r.name, {})
            rows += ["| metric | value | unit | reference run | |", "|---|---:|---|---:|---|"]
            rows += [f"| {m['name']} | {_fmt_value(m['value'])} | {m['unit']} | {_fmt_value(theirs[m['name']]['value']) if m['name'] in theirs else ''} "
                     f"| {judged(m, theirs.get(m['name']))} |" for m in metrics]
        for fig in figures:
            rows += ["", f"![{fig['name']}]({os.path.relpath(fig['path'], out_dir)})"]
    report = out_dir / "report.md"
    report.write_text("\n".join(rows) + "\n", encoding="utf-8")
    (out_dir / "report.html").write_text(_markdown_table_html(rows), encoding="utf-8")
    return report


def _markdown_table_html(rows: list[str]) -> str:
    """A minimal HTML rendering of the report's own Markdown (headings, tables, images, text)."""
    out, in_table = ["<!doctype html><meta charset='utf-8'><title>llmnb run</title><style>body{font-family:sans-serif;max-width:60em;margin:auto}td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style>"], False
    for row in rows:
        if row.startswith("|"):
            cells = [c.strip() for c in row.strip("|").split("|")]
            if set("".join(cells)) <= set("-:"):
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if m := re.match(r"!\[(.*?)\]\((.*?)\)", row):
            out.append(f"<p><img alt='{html.escape(m[1])}' src='{html.escape(m[2])}' width='640'></p>")
        elif row.startswith("#"):
            level = len(row) - len(row.lstrip("#"))
            out.append(f"<h{level}>{_inline(row.lstrip('# '))}</h{level}>")
        elif row:
            out.append(f"<p>{_inline(row)}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out) + "\n"


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\[(.*?)\]\((.*?)\)", r"<a href='\2'>\1</a>", text)
    text = re.sub(r"\*\*(.*?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.*?)`", r"<code>\1</code>", text)

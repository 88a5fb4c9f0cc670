"""`llmnb run`: execute the numbered notebooks with papermill, in order, and write a report.

Each notebook gets the preset (and any `-p NAME VALUE`) as papermill parameters and
writes its key numbers with `llmnb.record`; the runner adds status, wall time and the
kernel's peak memory, and writes `report.md` and `report.html` under
`outputs/runs/<preset>/`, also when a notebook fails.
"""
from __future__ import annotations

import ast
import html
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from tqdm import tqdm  # text bars: a notebook saved by a batch run keeps their last state (a widget keeps its first)

from .hardware import resident_bytes
from .paths import notebooks_dir, outputs_dir
from .presets import PRESETS, configure, resolve_preset
from .record import read_records


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


class PeakMemory:
    """Polls the peak resident memory of this process's children (the kernel) in a thread."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for child in me.children(recursive=True):
                try:
                    self.peak = max(self.peak, resident_bytes(child.pid)[1])
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


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
        with PeakMemory() as memory:
            papermill.execute_notebook(str(path), str(out_dir / path.name), parameters=parameters, kernel_name=kernel,
                                       cwd=str(path.parent), progress_bar=False, log_output=False,
                                       # the kernel's start-up warnings (plain-TCP transport, on loopback here) are not a user's business
                                       extra_arguments=["--IPKernelApp.log_level=ERROR"])
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
    result.peak_memory_bytes = memory.peak if "memory" in locals() else 0
    result.records = read_records(record_file)
    return result


def _first_line(notebook: Path, execution_count: int) -> str:
    """The first line of the executed cell numbered `execution_count`, to name it in words."""
    import nbformat

    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type == "code" and cell.execution_count == execution_count:
            return cell.source.strip().splitlines()[0][:80] if cell.source.strip() else ""
    return ""


def run(preset: str = "auto", only: list[str] | None = None, parameters: dict | None = None, out: Path | None = None) -> tuple[list[NotebookResult], Path]:
    """Run the collection; return the results and the report's path. Stops at the first failure."""
    preset = resolve_preset(preset)
    os.environ["LLMNB_PRESET"] = preset  # the kernels inherit it: a smoke run writes under outputs/smoke/ (paths.outputs_dir)
    out_dir = Path(out) if out else outputs_dir("runs", preset)
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = find_notebooks(only)
    check_parameters(notebooks, preset, parameters or {})
    params = {"preset": preset, **(parameters or {})}
    results = [NotebookResult(p.stem) for p in notebooks]
    bar = tqdm(notebooks, desc=f"llmnb run ({preset})", unit="notebook")
    for i, path in enumerate(bar):
        bar.set_postfix_str(path.stem)
        results[i] = run_notebook(path, out_dir, params)
        if results[i].status != "ok":
            break
    report = write_report(results, out_dir, preset, params)
    return results, report


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
    for r in results:
        if r.error:
            rows += ["", f"**{r.name} failed** at {r.error}"]
        metrics = [x for x in r.records if x.get("kind") == "metric"]
        figures = [x for x in r.records if x.get("kind") == "figure"]
        if metrics or figures:
            rows += ["", f"## {r.name}", ""]
        if metrics:
            rows += ["| metric | value | unit |", "|---|---:|---|"]
            rows += [f"| {m['name']} | {_fmt_value(m['value'])} | {m['unit']} |" for m in metrics]
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

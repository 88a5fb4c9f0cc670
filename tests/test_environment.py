"""The set-up files agree with each other: conda and pip name the same requirements, torch is pinned for CI."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_installs_pyprojects_requirements_and_names_no_other():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip_section == ["-e .[all]"], "the requirements are listed once, in pyproject.toml"
    assert any(str(d).startswith("python=3.1") for d in env["dependencies"])
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["all"] == ["llmnb[serve,notebooks,test]"] and "llmnb[serve]" in extras["notebooks"]
    assert not any(r.split(">")[0] in ("jupyterlab", "papermill", "trl", "bitsandbytes", "peft") for r in extras["serve"])
    assert '".[serve]"' in (ROOT / "deploy" / "Dockerfile").read_text(), "the serving image installs the serve extra only"


def test_torch_is_a_range_in_pyproject_and_pinned_in_constraints():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(d for d in deps if d.startswith("torch"))
    assert "==" not in torch_req
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch")]
    assert pins == ["torch==2.13.0"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make run" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _fake_pythons(folder: Path, versions: dict[str, str | None]) -> dict[str, str]:
    """Executables named like interpreters: a version string makes a stand-in that reports it and fails the range check
    (as Fedora's Python 3.14 would); None links the interpreter running this test, which is in the range."""
    for name, version in versions.items():
        if version is None:
            (folder / name).symlink_to(sys.executable)
        else:
            (folder / name).write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && echo 'Python {version}' && exit 0\nexit 1\n")
            (folder / name).chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:/usr/bin:/bin", "MAKEFLAGS": ""}


def test_make_picks_a_supported_python_when_python3_is_too_new(tmp_path):
    env = _fake_pythons(tmp_path, {"python3": "3.14.0", "python3.13": "3.14.0", "python3.12": None})
    env.pop("PYTHON", None)
    run = subprocess.run(["make", "-s", "-C", str(ROOT), "python"], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("python3.12 ("), run.stdout + run.stderr


def test_make_stops_with_the_command_that_installs_a_supported_python(tmp_path):
    env = _fake_pythons(tmp_path, {name: "3.14.0" for name in ("python3", "python3.13", "python3.12", "python3.11", "python3.10")})
    env.pop("PYTHON", None)
    run = subprocess.run(["make", "-s", "-C", str(ROOT), "python"], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert "python3 is Python 3.14.0" in run.stderr and "sudo dnf install python3.13" in run.stderr
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f"No Python {spec}," in run.stderr, "the range comes from pyproject.toml's requires-python"


def test_the_tools_map_names_every_tool_the_documents_name_and_readme_shows_it():
    from llmnb import tools

    names = {t.name for t in tools.TOOLS}
    assert set(tools.NAMED_BY_THE_DOCUMENTS) <= names, set(tools.NAMED_BY_THE_DOCUMENTS) - names
    assert len(names) == len(tools.TOOLS), "one row per tool"
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- tools:start -->\n", 1)[1].split("\n<!-- tools:end -->", 1)[0]
    assert section == tools.markdown_table(), "README's tools section is rendered from llmnb/tools.py: paste markdown_table() there"
    assert all("http" in t.state for t in tools.TOOLS if "maintenance" in t.state), "a maintenance notice comes with its source"

    servers = readme.split("<!-- servers:start -->\n", 1)[1].split("\n<!-- servers:end -->", 1)[0]
    assert servers == tools.serving_table(), "README's server table is rendered from llmnb/tools.py: paste serving_table() there"
    assert {"TorchServe", "Text Generation Inference", "OpenLLM", "vLLM", "TensorRT-LLM", "LM Studio", "GPT4All", "Ollama"} <= {s.name for s in tools.SERVERS}

# The two commands a new user needs, each idempotent and doing its own set-up:
#   make run   - create .venv, install llmnb and the offline assets, run every notebook (preset auto)
#   make test  - the same set-up plus the test extras, then the whole test suite
# Also: make lab (JupyterLab on the notebooks), make smoke (the CI-sized run), make clean.
# TORCH_INDEX=<index url> installs torch from another index (a CPU-only or a CUDA build).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt
PRESET ?= auto
STAMP  := $(VENV)/.llmnb-installed

.PHONY: setup test-setup run smoke test lab clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall only when the requirements change; torch is pinned through constraints.txt.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) torch $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) -e ".[test]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

setup: $(STAMP)
	$(PY) -m llmnb assets

run: setup
	$(PY) -m llmnb run --preset $(PRESET)

smoke: setup
	$(PY) -m llmnb run --preset smoke

test: setup
	HF_HUB_OFFLINE=1 LLMNB_PRESET=smoke $(PY) -m pytest

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf $(VENV) outputs/runs outputs/figures

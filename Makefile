# The two commands a new user needs, each idempotent and doing its own set-up:
#   make run   - create .venv, install llmnb and the offline assets, run every notebook (preset auto)
#   make test  - the same set-up plus the test extras, then the test suite but for its long checks (under 15 minutes on 2 cores)
#   make test-long - those long checks: torchrun runs, the lower kernel path, a notebook against a built wheel (CI runs both)
# Also: make lab (JupyterLab on the notebooks), make smoke (the CI-sized run), make clean,
#   make notebooks (regenerate the committed notebooks: all, in order, cpu preset, from a clean outputs/; run it alone).
# TORCH_INDEX=<index url> installs torch from another index (a CPU-only or a CUDA build).
# The interpreter: python3 when pyproject's requires-python accepts it, else the newest python3.X that it accepts
# (Fedora's python3 may be newer than the range); `make python` says which. PYTHON=/path/to/python overrides.
PY_SPEC  := $(shell sed -n 's/^requires-python = "\(.*\)"/\1/p' pyproject.toml)
PY_RANGE := $(shell echo '$(PY_SPEC)' | sed 's/>=\([0-9]*\)\.\([0-9]*\),<\([0-9]*\)\.\([0-9]*\)/(\1,\2) <= sys.version_info[:2] < (\3,\4)/')
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell for p in python3 python3.13 python3.12 python3.11 python3.10; do \
              command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not ($(PY_RANGE)))' 2>/dev/null && { echo $$p; break; }; done)
endif
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt
PRESET ?= auto
STAMP  := $(VENV)/.llmnb-installed

.PHONY: python setup test-setup run smoke notebooks test test-long lab clean

python:
	@test -n "$(PYTHON)" || { echo "No Python $(PY_SPEC), which llmnb supports, is on PATH; python3 is $$(python3 --version 2>&1)." >&2; \
	  echo "Install one, then run make again: sudo dnf install python3.13 (Fedora), sudo apt install python3.12 (Debian/Ubuntu)," >&2; \
	  echo "brew install python@3.13 (macOS), or uv python install 3.13 and make PYTHON=\$$(uv python find 3.13)." >&2; exit 1; }
	@echo "$(PYTHON) ($$($(PYTHON) --version 2>&1))"

$(PY): | python
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall only when the requirements change; torch is pinned through constraints.txt.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) torch $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) -e ".[all]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

setup: $(STAMP)
	$(PY) -m llmnb assets

run: setup
	$(PY) -m llmnb run --preset $(PRESET)

smoke: setup
	$(PY) -m llmnb run --preset smoke

notebooks: setup
	$(PY) -m llmnb run --preset cpu --commit

test: setup
	HF_HUB_OFFLINE=1 LLMNB_PRESET=smoke $(PY) -m pytest -m "not long"

test-long: setup
	HF_HUB_OFFLINE=1 LLMNB_PRESET=smoke $(PY) -m pytest -m long tests

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf $(VENV) outputs/runs outputs/figures

# Two commands on a fresh machine: `make demo` and `make test`. Each creates the virtual
# environment it needs (.venv) and installs everything into it; nothing is assumed installed.
#
# torch: TORCH picks the build. The default, torch==2.13.0, is the CPU build this kind of
# machine has locally. Elsewhere choose your CUDA build, e.g.
#   make demo TORCH="torch==2.13.0" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# The installed torch is then pinned while the rest installs, so nothing replaces it.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX_URL ?=
EXTRAS ?= dev
STATE ?= $(CURDIR)/.state

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

# Every tool keeps its state in this checkout and stays offline.
export DO_NOT_TRACK := 1
export MPLCONFIGDIR := $(STATE)/matplotlib
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: demo test bench venv browser clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH)" 2> >(grep -v 'is ignored' >&2)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt 2>/dev/null
	$(PIP) install -c $(VENV)/torch-pin.txt -e ".[$(EXTRAS)]" 2> >(grep -v 'is ignored' >&2)
	$(BIN)/python -c "import torch, tracin_tasks; print('installed tracin-tasks', tracin_tasks.__version__, 'with torch', torch.__version__)"
	touch $@

# Browser tests drive Debian's Chromium (Playwright's own browser download cannot run offline).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is not installed and cannot be installed here: browser tests will be skipped"; fi; }

demo: venv
	$(BIN)/tracin-tasks demo --workdir .demo

test: venv browser
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) $(STATE) .pytest_cache

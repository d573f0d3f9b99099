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
# torch comes from pip (which knows where this machine keeps its build); everything else from uv,
# in seconds where pip takes minutes. uv uses the system's certificates, as pip does here, and compiles
# the bytecode as pip does (the tests start many Python processes, and PYTHONDONTWRITEBYTECODE is set).
UV ?= uv>=0.13,<0.14
UV_FLAGS ?= -q --native-tls --compile-bytecode

# Every tool keeps its state in this checkout and stays offline.
export DO_NOT_TRACK := 1
export MPLCONFIGDIR := $(STATE)/matplotlib
export PYTHONDONTWRITEBYTECODE := 1

LS_VENV ?= $(STATE)/label-studio/venv
LABEL_STUDIO ?= label-studio==1.23.2

# torchvision's wheels each match one torch release; PyPI's do not load beside the CPU build of
# torch above. The ResNet-18 test (tests/core/test_resnet18.py) runs in this environment instead:
# the torch/torchvision pair below (a CUDA build, which runs on the CPU too), numpy and pandas; the
# test puts this checkout on its PYTHONPATH. Elsewhere, install the pair that matches your torch build in the main venv.
VISION_VENV ?= $(STATE)/vision/venv
VISION_TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench venv browser postgres label-studio vision test-deps clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH)" "$(UV)" 2> >(grep -v 'is ignored' >&2)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt 2>/dev/null
	$(BIN)/uv pip install $(UV_FLAGS) --python $(BIN)/python -c $(VENV)/torch-pin.txt -e ".[$(EXTRAS)]"
	$(BIN)/python -c "import torch, tracin_tasks; print('installed tracin-tasks', tracin_tasks.__version__, 'with torch', torch.__version__)"
	touch $@

# Browser tests drive Debian's Chromium (Playwright's own browser download cannot run offline).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is not installed and cannot be installed here: browser tests will be skipped"; fi; }

# The relabel tests run a real PostgreSQL server (Debian's package; the tests initdb their own
# clusters) and a real Label Studio. Label Studio pins python-json-logger==2.0.4 and Prefect
# needs >=2.0.7, so the server gets its own virtual environment; the project talks to it only
# through label-studio-sdk.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "PostgreSQL is not installed and cannot be installed here: Postgres queue tests will be skipped"; fi; }

label-studio: $(LS_VENV)/.installed

$(LS_VENV)/.pip-installed:
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip --disable-pip-version-check -q install "$(UV)" 2> >(grep -v 'is ignored' >&2)
	$(LS_VENV)/bin/uv pip install $(UV_FLAGS) --python $(LS_VENV)/bin/python "$(LABEL_STUDIO)"
	touch $@

# migrate a data folder once (about a minute); each test session starts from a copy of it. The
# script uses the test harness (pytest, numpy), so it runs in the project's environment.
$(LS_VENV)/.installed: $(LS_VENV)/.pip-installed $(VENV)/.installed
	TRACIN_LABEL_STUDIO_VENV=$(LS_VENV) $(BIN)/python tests/relabel/_labelstudio.py
	touch $@

vision: $(VISION_VENV)/.installed

$(VISION_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VISION_VENV)
	$(VISION_VENV)/bin/python -m pip --disable-pip-version-check -q install "$(UV)" 2> >(grep -v 'is ignored' >&2)
	$(VISION_VENV)/bin/uv pip install $(UV_FLAGS) --python $(VISION_VENV)/bin/python $(VISION_TORCH) "numpy>=1.26,<3" "pandas>=2.1,<4"
	touch $@

# the slow installs are independent: run them side by side
test-deps:
	$(MAKE) -j5 --no-print-directory venv browser postgres label-studio vision

demo: venv
	$(BIN)/tracin-tasks demo --workdir .demo

# Two test processes, each taking whole test modules (module-scoped fixtures stay in one process);
# each process has its own state folder and starts the servers its modules need. TEST_WORKERS=0
# runs everything in this process.
TEST_WORKERS ?= 2

test: test-deps
	TRACIN_LABEL_STUDIO_VENV=$(LS_VENV) TRACIN_VISION_VENV=$(VISION_VENV) $(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

bench: venv
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) $(STATE) .pytest_cache

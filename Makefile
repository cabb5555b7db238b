# Two entry points for a fresh machine: `make demo` and `make test` (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
# Machines without an NVIDIA GPU install this torch first. Here it is the CPU wheel on local disk;
# elsewhere pass e.g. TORCH_CPU_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
# Machines with nvidia-smi skip it and pip picks the default (CUDA) torch build.
TORCH_CPU_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test lint format clean

# pip's own output goes to $(VENV)/install.log, shown only when the install fails.
INSTALL_LOG := $(VENV)/install.log
LOGGED = >>$(INSTALL_LOG) 2>&1 || { cat $(INSTALL_LOG); echo "install failed (log: $(INSTALL_LOG))"; exit 1; }

$(VENV)/.installed: pyproject.toml Makefile
	@echo "installing icm-fusion and its dependencies into $(VENV) (a few minutes the first time; log: $(INSTALL_LOG))"
	@test -x $(PY) || python3 -m venv $(VENV)
	@: > $(INSTALL_LOG)
	@$(PY) -m pip install -q --upgrade pip $(LOGGED)  # old pips backtrack for many minutes on this tree
	@if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q $(TORCH_CPU_SPEC) $(LOGGED); fi
	@$(PY) -m pip install -q -e ".[dev,lab]" $(LOGGED)
	@touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/icmf demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) icmf-demo .pytest_cache .ruff_cache

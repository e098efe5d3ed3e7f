# The two commands a new user needs:  `make serve`  and  `make test`.
# Both create (or reuse) ./.venv and install what they need from the package registries.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Without an NVIDIA GPU take the CPU build of torch; with one, a CUDA build. Override with TORCH_SPEC=...
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)

# pytest-xdist workers for `make test` (auto: one per core, at most 4; 0 runs the suite in this process).
TEST_WORKERS ?= auto

.PHONY: install serve test lint

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(VENV)/bin/weir serve $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check app engine ops tests loadtest tools
	# Spread over the cores, then the tests marked `serial` alone (their bounds are latencies, which a
	# second worker on the same cores would make): exit status 5 is "no test selected" (PYTEST_ARGS).
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 -m "not serial" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest -q -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check app engine ops tests loadtest tools
	$(VENV)/bin/ruff format --check app engine ops tests loadtest tools

# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need Python 3.11 on PATH (or: make PYTHON=/path/to/python3.11 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Exact versions from requirements.lock, then the project itself (editable) without re-resolving.
$(STAMP): $(PY) requirements.lock setup.cfg pyproject.toml
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.lock
	$(PIP) install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m ssm train --config experiments/lra/listops.py:cpu --workdir runs/demo_listops

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15 tests

bench: $(STAMP)
	$(PY) -m ssm bench

clean:
	rm -rf $(VENV) runs .pytest_cache

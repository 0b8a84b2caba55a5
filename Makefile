# fedge — the two entry points are `make demo` and `make test`; both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedge-installed
# The CPU build of torch that lies on this disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test lint bench-compression mosquitto venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

mosquitto:
	@bash scripts/ensure-mosquitto.sh

demo: venv mosquitto
	$(VENV)/bin/fedge simulate --dataset digits --devices 10 --partition dirichlet:0.5 \
		--seed 0 --rounds 30 --epochs 5 --lr 0.1 --out runs/demo

test: venv mosquitto
	@bash scripts/ensure-test-tools.sh
	@# pytest exits 5 when it collected nothing: a suite that runs nothing is a failure.
	$(VENV)/bin/pytest || { rc=$$?; [ $$rc -eq 5 ] && echo 'make test: pytest collected no tests' >&2; exit $$rc; }

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf runs .pytest_cache .ruff_cache

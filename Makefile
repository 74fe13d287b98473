# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,tracking,dicom,rtstruct,plots,distributed,server]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/medseg demo --out demo_out

lint: $(STAMP)
	$(VENV)/bin/ruff check medseg tests benchmarks
	$(VENV)/bin/ruff format --check medseg tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_io.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache

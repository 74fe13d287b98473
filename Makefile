# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install check-torch test demo lint typecheck bench clean

# torch is installed first, pinned. Where pip resolves torch==2.13.0 to the CPU build (as the wheel
# cache this project is built with does) that is all; on PyPI, Linux x86_64, the same line gets the
# multi-GB CUDA build, and check-torch below stops the install saying how to get the CPU one (README).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,dicom,rtstruct,plots,distributed,server,pacs,nnunet]' nnunetv2
	$(MAKE) --no-print-directory check-torch
	touch $(STAMP)

install: $(STAMP)

# Fails unless the torch in .venv is the CPU build (no CUDA runtime, a "+cpu" version).
check-torch:
	@$(PY) -c "import sys, torch; cpu = torch.version.cuda is None and '+cpu' in torch.__version__; \
	sys.exit(0 if cpu else f'make: torch {torch.__version__} in $(VENV) is not the CPU build (CUDA {torch.version.cuda}); \
	install it with: $(PY) -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu')"
	@echo "torch in $(VENV): CPU build"

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/medseg demo --out demo_out

lint: $(STAMP)
	$(VENV)/bin/ruff check medseg tests benchmarks
	$(VENV)/bin/ruff format --check medseg tests benchmarks
	$(VENV)/bin/mypy

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/bench_io.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .mypy_cache

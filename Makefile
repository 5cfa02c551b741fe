# One-command set-up: `make demo` runs the main job, `make test` runs the suite.
# Both create .venv on a fresh machine (with the Ray and zoo extras, so the Ray and
# third-party-model tests run in CI).
# torch is installed first with its exact pin:
# any looser request would pull the multi-gigabyte CUDA build onto a CPU-only machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fxsculpt-installed
PYTEST_WORKERS ?= 2

.PHONY: demo test lint bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,distributed,zoo]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) cli.py optimize builtin:resnet --data digits --passes train,fold_bn,dce --epochs 4 --out out/demo

test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) -q
	$(MAKE) --no-print-directory lint

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy -p fxsculpt.ir -p fxsculpt.passes -p fxsculpt.hardware

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache

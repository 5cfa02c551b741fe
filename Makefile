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

# The main job on scikit-learn's digits in about two minutes on 2 cores: train, prune (DSO-NAS),
# mixed-precision HAQ under a size budget of 0.7 x the uniform 8-bit model (5-8 bits, which run on
# int8 kernels), export, then the hardware check of the exported file against that ratio and a
# latency budget, ending with the before/after table (also in out/demo/report.md and report.json).
DEMO_PRUNE := --set prune.pretrain_epochs=0 --set prune.search_epochs=2 --set prune.measure=false
DEMO_HAQ := --set quantize.method=haq --set quantize.size_ratio=0.7 --set quantize.haq_min_bits=5 \
	--set quantize.episodes=16 --set quantize.haq_warmup=4 --set quantize.haq_search_samples=1000
demo: $(STAMP)
	$(PY) cli.py optimize builtin:resnet --data digits --passes train,prune,quantize --epochs 4 \
		$(DEMO_PRUNE) $(DEMO_HAQ) --budget latency=1ms --out out/demo

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

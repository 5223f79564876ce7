# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo figures compat-table test test-torch-control lint typecheck bench gpu-check clean

# The native kernels (setup.py, csrc/) build against the installed torch, so without pip's build
# isolation: torch and the build tools first, then the package.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h) constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt setuptools wheel torch
	$(BIN)/python -m pip install --quiet --no-build-isolation -c constraints.txt -e '.[experiments,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/batchnorm demo

# The README's figure and the numbers of docs/experiments.md and the README's demo paragraph,
# all from one default run (docs/experiments.md).
figures: $(STAMP)
	$(BIN)/batchnorm demo --out bn-report
	cp bn-report/paper_mlp.png docs/figures/paper_mlp.png
	cp bn-report/summary.json docs/figures/summary.json
	$(BIN)/python -m batchnorm.experiments.docs docs/figures/summary.json README.md docs/experiments.md

# The module-by-operation table of docs/compat.md, from the data tests/test_matrix.py checks.
compat-table: $(STAMP)
	$(BIN)/python -m tests.matrix docs/compat.md

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# PyTorch's own batch-norm tests aimed at torch's classes: proves the port in tests/test_torch_suite_*.py.
test-torch-control: $(STAMP)
	BATCHNORM_TORCH_SUITE=torch $(BIN)/python -m pytest -q tests/test_torch_suite_modules.py tests/test_torch_suite_ops.py tests/test_torch_suite_nn.py

bench: $(STAMP)
	$(BIN)/batchnorm bench

# Every check that needs a CUDA device, in at most 8 minutes (scripts/gpu_check.sh): the CUDA
# test cases, the benchmark on CUDA in float32 and bfloat16, the CUDA memory benchmark. Results
# and a markdown block for docs/benchmarks.md under gpu-check/ (or the folder in $OUT).
gpu-check: $(STAMP)
	PYTHON=$(BIN)/python scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build gpu-check src/batchnorm/_C.*.so bn-report .pytest_cache .mypy_cache .ruff_cache

# One entry point for set-up, the main job and the tests. Every target builds its own environment
# first (virtual environment, pinned torch, dependencies, the native kernels), so on a fresh machine
# `make demo` and `make test` are all there is to type.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ecp_fast_installed

.PHONY: setup demo test lint bench bench-gpu clean

$(STAMP): requirements.txt pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-build-isolation -e .
	$(PY) -c "import ecp_fast.ops as ops; assert ops.NATIVE_CPU, 'native CPU kernels failed to load'"
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ecp-fast demo

test: lint
	$(PY) -m pytest

# Style, types and C++ formatting of the whole package (configured in pyproject.toml and .clang-format).
lint: $(STAMP)
	$(VENV)/bin/ruff check ecp_fast tests bench examples
	$(VENV)/bin/ruff format --check ecp_fast tests bench examples
	$(VENV)/bin/mypy ecp_fast
	$(VENV)/bin/clang-format --dry-run --Werror csrc/*.cpp csrc/*.h

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only --benchmark-columns=min,median,mean,rounds

# The ops against cuBLAS (bf16 and float32 without TF32), then 2:4 exports against dense layers.
bench-gpu: $(STAMP)
	$(PY) bench/triton_table.py
	$(PY) bench/two_four_gpu.py

clean:
	rm -rf build ecp_fast/_C*.so *.egg-info

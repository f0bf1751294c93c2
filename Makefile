# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-cpp test-gpu gpu-deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

# Installs torch, the test/demo dependencies and torch_varlen itself (editable, built against
# that torch). A stamp file keeps a second `make test` from reinstalling.
$(VENV)/.installed: $(PY) pyproject.toml setup.py CMakeLists.txt requirements-dev.txt requirements-nodeps.txt
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

# The main job: embed demo/corpus_kjv.txt with MiniLM, torch_varlen's PackedEncoder against HF
# padded (corpus order, length-sorted, compiled) and sentence-transformers, 3 timed passes each.
# Options: DEMO_ARGS="--help".
demo: install
	$(PY) -m pip install -q -r requirements-demo.txt
	$(PY) demo/minilm_demo.py $(DEMO_ARGS)

test: install test-cpp
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The complete suite on a CUDA machine, with that machine's python3 (not the venv): builds the
# CUDA sources, installs missing test dependencies (from .gpu/ when there, else PyPI) and writes
# benchmarks/results/gpu_tests.json. See tools/test_gpu.sh.
test-gpu:
	bash tools/test_gpu.sh

# For a CUDA machine without network: wheels and a float16 MiniLM copy into .gpu/ (carry it).
gpu-deps: $(VENV)/.installed
	$(PY) tools/gpu_deps.py

# The C++ user's path, no Python at run time: CMakeLists.txt builds the operator library and
# examples/cpp/call_op.cpp, which loads it and calls ops through the dispatcher. Only torch's
# CMake files come from the venv.
CPP_BUILD ?= build/cpp
JOBS ?= 2
test-cpp: $(VENV)/.installed
	cmake -S . -B $(CPP_BUILD) -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(CPP_BUILD) -j $(JOBS)
	$(CPP_BUILD)/varlen_cpp_example $(CPP_BUILD)/libtorch_varlen.so

clean:
	rm -rf build $(VENV) torch_varlen/_C/_kernels*.so *.egg-info

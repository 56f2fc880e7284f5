# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, from the pinned CPU build: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,demo,onnx,quant]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python tools/demo.py

# two worker processes (capture and export are Python-bound); slow tests (multi-process, long grids) are left out
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests -n 2

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests -n 2 -m "slow or not slow"

clean:
	rm -rf $(VENV) build *.egg-info

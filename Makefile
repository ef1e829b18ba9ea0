# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install torch==2.13.0 FIRST (a CPU wheel; an unpinned
# torch pulls gigabytes of CUDA), then this package with its test extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where the real sample sets live (read, never copied).
export INRLDDMM_DATA ?= $(abspath ../shared/data)
export NIPYPE_NO_ET := 1

.PHONY: install demo test clean

$(BIN)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[tests]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/inrlddmm demo --out-dir inrlddmm-demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) inrlddmm-demo

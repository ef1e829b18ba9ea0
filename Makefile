# Entry points for a fresh machine: `make demo`, `make test` and `make docs`.
# Each creates .venv, installs torch==2.13.0 FIRST (a CPU wheel; an unpinned
# torch pulls gigabytes of CUDA), then this package with the extras it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where the real sample sets live (read, never copied).
export INRLDDMM_DATA ?= $(abspath ../shared/data)
export NIPYPE_NO_ET := 1

.PHONY: install demo test docs clean

$(BIN)/.installed: setup.py nipype_inrlddmm/kernels/_sincos.c nipype_inrlddmm/kernels/_siren.c \
		nipype_inrlddmm/kernels/_sine_poly.h
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[tests]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/inrlddmm demo --out-dir inrlddmm-demo

# The SLURM tests need a running cluster: scripts/with-local-slurm.sh starts a private single-node
# one (installing slurm-wlm and munge with apt when missing; root only) and stops it afterwards, even
# when tests fail.  Where it cannot, the SLURM tests skip with the reason.
# The report test opens report.html in headless Chromium: scripts/ensure-package.sh installs Debian's
# chromium when missing (root with apt); where it cannot, the tests run and that one skips with the reason.
# The DICOM tests check the written files with dciodvfy, from Debian's dicom3tools, installed the same way.
test: install
	scripts/ensure-package.sh chromium chromium chromium-browser || echo "the headless-browser report test will skip"
	scripts/ensure-package.sh dicom3tools dciodvfy || echo "the DICOM validator test will skip"
	scripts/with-local-slurm.sh $(BIN)/python -m pytest -q

# The documentation (Sphinx, furo theme) in docs/_build/html, warnings as errors.  The workflow graphs
# need Graphviz's `dot`: scripts/ensure-package.sh installs Debian's graphviz when missing (root with
# apt) and fails, saying why, where it cannot.  No network, GPU or data is needed by the build itself.
$(BIN)/.docs-installed: $(BIN)/.installed setup.py
	$(BIN)/pip install --quiet -e '.[docs]'
	touch $@

docs: $(BIN)/.docs-installed
	scripts/ensure-package.sh graphviz dot
	rm -rf docs/_build
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) inrlddmm-demo docs/_build

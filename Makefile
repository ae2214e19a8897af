# The README's two commands: `make demo` (the main job) and `make test`. Both set up a
# virtual environment on first use: torch, the test/demo requirements, then this package
# built in place (C++ CPU kernels, and the CUDA kernels when a CUDA toolkit is present).
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1
export CUDA_HOME ?= /usr/local/cuda

SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: install demo test clean

install: $(VENV)/.built

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: install
	$(PY) examples/train_digits.py --out demo_out

test: install
	$(PY) -m pytest -q

clean:
	rm -rf build $(VENV) *.egg-info adai_kernels/*.so

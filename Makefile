# The README's two commands: `make demo` (the main job) and `make test`. Both set up a
# virtual environment on first use: torch, the test/demo requirements, then this package
# built in place (C++ CPU kernels, and the CUDA kernels when a CUDA toolkit is present).
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1
export CUDA_HOME ?= /usr/local/cuda

SOURCES := setup.py pyproject.toml $(shell find csrc -type f -not -path 'csrc/emu/*' 2>/dev/null)

.PHONY: install demo test test-emu clean

install: $(VENV)/.built

# A line per stage: the first run takes a few minutes, most of it quiet pip work.
$(VENV)/.deps: requirements-dev.txt
	@echo "==> $(VENV): a virtual environment, pip, $(TORCH) (a CUDA build, ~5 GB, about a minute)"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	@echo "==> the test and demo requirements (requirements-dev.txt)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	@echo "==> building adai_kernels: the CPU kernels (3 ISA variants) and, with a CUDA toolkit, the CUDA kernels for sm_80 and sm_90 (about 2 minutes on 2 cores)"
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: install
	$(PY) examples/train_digits.py --out demo_out

# Then the CUDA kernels executed on the CPU by their emulator (csrc/emu/, built from the
# current tree): the op matrix of tests/test_cuda_gpu.py, the emulator's own checks, and its
# AddressSanitizer build.
test: install
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-emu

test-emu: install
	@echo "==> the CUDA kernels on the CPU emulator (builds build/emu and build/emu-asan first)"
	ADAI_GPU_TEST_DEVICE=emu $(PY) -m pytest -q tests/test_cuda_gpu.py tests/test_cuda_emu.py tests/test_cuda_options.py

clean:
	rm -rf build $(VENV) *.egg-info adai_kernels/*.so

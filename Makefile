# Two-command quick start: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all venv demo test test-slow bench bench-gpu clean

all: test

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,hf,mini]"
	# A broken CUDA torchaudio makes Lhotse and transformers fail at import; the core never needs it.
	-$(BIN)/python -m pip uninstall -q -y torchaudio 2>/dev/null
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash egs/mini/run.sh

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q -p no:cacheprovider

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q -p no:cacheprovider

bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# On a CUDA machine: every GPU benchmark plus the whole suite, logs in gpu_results/. Needs a CUDA build of torch:
# GPU_PYTHON=python3 uses an interpreter that has one (the repository goes on PYTHONPATH).
GPU_PYTHON ?= $(BIN)/python
bench-gpu:
	PYTHON="$(GPU_PYTHON)" bash bench/gpu.sh gpu_results

clean:
	rm -rf $(VENV) egs/mini/data egs/mini/exp

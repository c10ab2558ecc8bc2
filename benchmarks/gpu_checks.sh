#!/usr/bin/env bash
# Everything issue 7 asks of a GPU, in one call: the CUDA-only tests (the transfer never makes the host wait, the
# captured solver and the graphed transfer match the eager ones) and the base-size training step against plain
# CTC, eager and graphed, with the peak memory of each.
#
#   bash benchmarks/gpu_checks.sh [OUTPUT_DIR]        # from the repository root, on a machine with a CUDA GPU
#
# The tests need POT (tests/reference.py uses it); the benchmarks need only torch and transformers.
set -uo pipefail
out=${1:-gpu_checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
bench="$python benchmarks/bench_train_step.py --size base --device cuda --bf16 --steps 20"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/device.txt"
$python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)" \
    2>&1 | tee -a "$out/device.txt"
$python -m pytest -q tests/test_solver.py tests/test_modeling.py -k "cuda or never_waits or captured or activations" -rs 2>&1 \
    | tee "$out/tests.log"
$bench --no-memory --variants "uot cached" "uot uniform plan" "uot graphed" 2>&1 | tee "$out/bench_graphed.log"
$bench --no-memory --graph-iterations 12 --variants "uot cached" "uot graphed" 2>&1 \
    | tee "$out/bench_graphed_12_iterations.log"
$bench --variants "uot cached" "uot graphed" 2>&1 | tee "$out/bench_graphed_again_with_memory.log"

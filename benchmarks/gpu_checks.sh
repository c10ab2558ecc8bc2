#!/usr/bin/env bash
# Everything issue 7 asks of a GPU, in one call: the CUDA-only tests (the transfer never makes the host wait), the
# base-size training step against plain CTC at the default and a looser solver tolerance, and a profile.
#
#   bash benchmarks/gpu_checks.sh [OUTPUT_DIR]        # from the repository root, on a machine with a CUDA GPU
#
# The tests need POT (tests/reference.py uses it); the benchmarks need only torch and transformers.
set -uo pipefail
out=${1:-gpu_checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/device.txt"
$python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)" \
    2>&1 | tee -a "$out/device.txt"
$python -m pytest -q tests/test_solver.py tests/test_modeling.py -k never_waits -rs 2>&1 | tee "$out/tests.log"
$python benchmarks/bench_train_step.py --size base --device cuda --bf16 --steps 20 --profile "$out/profile" \
    2>&1 | tee "$out/bench_default.log"
$python benchmarks/bench_train_step.py --size base --device cuda --bf16 --steps 20 --alignment-tol 1e-3 --no-memory \
    2>&1 | tee "$out/bench_tol_1e-3.log"

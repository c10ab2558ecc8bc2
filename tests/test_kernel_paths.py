"""The solver converges, and to the same plans, on every CPU kernel path torch offers on this machine.

torch picks its vectorised kernels (`ATEN_CPU_CAPABILITY`: `default`, `avx2`, `avx512`) once per process, by what
the CPU can do; float32 sums then round differently, and an iteration stops at slightly different points on
different machines. `kernel_path_cases.py` runs the cases in a fresh process per path; this test compares them.
"""

import os
import platform
import subprocess
import sys

import pytest
import torch

from kernel_path_cases import SOLVER_CASES

HERE = os.path.dirname(os.path.abspath(__file__))
# The paths to try: the portable one, x86's vector widths, and the one this process runs. A path the CPU cannot run
# falls back to a lower one, and is then left out.
X86_PATHS = ("avx2", "avx512") if platform.machine().lower() in ("x86_64", "amd64") else ()
CANDIDATE_PATHS = tuple(dict.fromkeys(("default", *X86_PATHS, torch.backends.cpu.get_cpu_capability().lower())))
# Plans from different paths agree to float32 rounding amplified by the iteration, far below any plan entry that
# matters (entries are about 1 / (T N), here 5e-4 and more).
PLAN_TOLERANCE = dict(rtol=1e-4, atol=1e-6)


def run_on_path(path: str, out) -> dict:
    # The case script sits beside the test modules it imports; the package comes from the checkout.
    env = {**os.environ, "ATEN_CPU_CAPABILITY": path, "PYTHONPATH": os.path.dirname(HERE)}
    done = subprocess.run([sys.executable, os.path.join(HERE, "kernel_path_cases.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def results_by_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kernel_paths")
    results = {}
    for path in CANDIDATE_PATHS:
        result = run_on_path(path, folder / f"{path}.pt")
        if result["capability"].lower() == path:  # else the CPU lacks it and torch fell back
            results[path] = result
    return results


def test_the_portable_path_and_this_machines_own_are_compared(results_by_path):
    assert {"default", torch.backends.cpu.get_cpu_capability().lower()} <= set(results_by_path)


@pytest.mark.parametrize("case", list(SOLVER_CASES) + ["model"])
def test_converges_to_the_same_plans_on_every_kernel_path(results_by_path, case):
    reference = results_by_path["default"][case]
    for path, results in results_by_path.items():
        assert bool(results[case]["converged"].all()), (path, results[case]["converged"])
        torch.testing.assert_close(results[case]["plan"], reference["plan"], **PLAN_TOLERANCE, msg=path)


def test_the_model_converges_on_every_kernel_path_and_a_tiny_budget_does_not(results_by_path):
    for path, results in results_by_path.items():
        assert results["model"]["converged"].item() == 1.0, path
        assert results["model, 2 iterations"]["converged"].item() == 0.0, path
        torch.testing.assert_close(results["model"]["kt_loss"], results_by_path["default"]["model"]["kt_loss"],
                                   rtol=1e-6, atol=0, msg=path)

"""The solver's and the model's convergence cases, run once in this process and saved for comparison.

`python tests/kernel_path_cases.py OUT.pt` under `ATEN_CPU_CAPABILITY=default`, `avx2` or `avx512` runs every case on
that CPU kernel path (torch picks the path when it starts, so each path needs a process of its own) and saves, per
case, the convergence flags and the plans; `test_kernel_paths.py` launches it once per path and compares.
"""

import math
import sys

import torch

from test_modeling import make_batch, tiny_config
from test_solver import padded_batch

from modeling_uot_ctc import Wav2Vec2ForCTCWithUOT, solve_uot

# Float32 problems at tolerances from the model's default down to below float32's resolution, in each iteration.
SIZES = [(37, 5), (29, 3), (19, 4), (120, 17)]
SOLVER_CASES = {
    "relaxed frames, tol 1e-7": dict(eps=0.1, rho_frames=0.5, tol=1e-7, max_iter=5000),
    "relaxed frames, model default tol": dict(eps=0.1, rho_frames=1.0, tol=1e-4, max_iter=200),
    "anchored recipe, temporal prior": dict(eps=0.05, rho_frames=0.1, temporal_order_weight=1.0, tol=1e-7,
                                            max_iter=5000),
    "balanced": dict(eps=0.1, rho_frames=math.inf, tol=1e-7, max_iter=5000),
    "both relaxed": dict(eps=0.05, rho_frames=1.0, rho_tokens=1.0, tol=1e-7, max_iter=5000),
    "sync-free": dict(eps=0.1, rho_frames=0.5, tol=1e-7, max_iter=5000, sync_free=True),
    "log domain": dict(eps=0.1, rho_frames=0.5, tol=1e-7, max_iter=5000, method="log"),
    "unrolled": dict(eps=0.1, rho_frames=0.5, tol=1e-7, max_iter=5000, grad_mode="unrolled"),
}


def run_cases() -> dict:
    results = {"capability": torch.backends.cpu.get_cpu_capability()}
    cost, frame_mask, token_mask = padded_batch(SIZES, seed=3, dtype=torch.float32)
    for name, settings in SOLVER_CASES.items():
        result = solve_uot(cost, frame_mask, token_mask, **settings)
        results[name] = dict(converged=result.converged, plan=result.plan.detach())

    # The model's own case (tests/test_modeling.py::test_loss_is_ctc_plus_weighted_transfer), and the same with a
    # budget too small to converge.
    for name, overrides in (("model", {}), ("model, 2 iterations", dict(alignment_max_iter=2))):
        torch.manual_seed(0)
        model = Wav2Vec2ForCTCWithUOT(tiny_config(**overrides)).eval()
        with torch.no_grad():
            out = model(**make_batch(), output_alignments=True)
        results[name] = dict(converged=out.alignment_converged, plan=out.alignments, kt_loss=out.kt_loss)
    return results


if __name__ == "__main__":
    torch.save(run_cases(), sys.argv[1])

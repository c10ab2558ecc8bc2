"""Batched UOT solver against a per-example loop over POT, side by side in one process.

    python benchmarks/bench_uot.py                  # CPU, one thread
    python benchmarks/bench_uot.py --device cuda    # the solver on a GPU, POT on the CPU as before

Prints, for the main setting (B=32, T up to 300 with at least 30 % padding, N up to 30, float32, tolerance 1e-4):
the median time of each (runs alternated), their ratio, iteration counts, and how far each result is from a tight
float64 reference (objective and plan); then how the time grows with T and N; then what each ingredient of the
solver contributes (log domain or scaling, with or without the translation step). Timings on shared machines are
noisy: trust the ratios of one run, not absolute times.
"""

from __future__ import annotations

import argparse
import os

# One thread for both sides; must be set before NumPy and torch load their thread pools.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import ot  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from modeling_uot_ctc import solve_uot  # noqa: E402

INF = math.inf


def make_batch(batch, max_frames, max_tokens, seed, device):
    """Random costs in [0, 2]; lengths drawn so that about a third of the frame cells are padding."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(max_frames // 3, max_frames + 1, batch)
    tokens = rng.integers(max(1, max_tokens // 3), max_tokens + 1, batch)
    frames[0], tokens[0] = max_frames, max_tokens
    cost = torch.from_numpy(rng.uniform(0, 2, (batch, max_frames, max_tokens)).astype(np.float32))
    frame_mask = torch.arange(max_frames)[None] < torch.from_numpy(frames)[:, None]
    token_mask = torch.arange(max_tokens)[None] < torch.from_numpy(tokens)[:, None]
    unpadded = [cost[k, : frames[k], : tokens[k]].numpy().copy() for k in range(batch)]
    return cost.to(device), frame_mask.to(device), token_mask.to(device), unpadded


def pot_loop(unpadded, eps, rho_frames, rho_tokens, tol, dtype=np.float32, max_iter=100_000):
    plans = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cost in unpadded:
            t, n = cost.shape
            a, b = np.full(t, 1 / t, dtype=dtype), np.full(n, 1 / n, dtype=dtype)
            plans.append(
                ot.unbalanced.sinkhorn_knopp_unbalanced(
                    a, b, cost.astype(dtype), eps, (rho_frames, rho_tokens), numItermax=max_iter, stopThr=tol
                )
            )
    return plans


def objective(plan, cost, eps, rho_frames, rho_tokens):
    """The full UOT objective in float64 (generalised KL with mass terms), uniform marginals."""
    plan, cost = plan.astype(np.float64), cost.astype(np.float64)
    t, n = cost.shape
    a, b = np.full(t, 1 / t), np.full(n, 1 / n)

    def kl(p, q):
        pos = p > 0
        return np.sum(p[pos] * np.log(p[pos] / q[pos])) - p.sum() + q.sum()

    value = np.sum(plan * cost) + eps * kl(plan.ravel(), np.outer(a, b).ravel())
    if rho_frames < INF:
        value += rho_frames * kl(plan.sum(1), a)
    if rho_tokens < INF:
        value += rho_tokens * kl(plan.sum(0), b)
    return value


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def compare(batch, max_frames, max_tokens, eps, rho_frames, rho_tokens, tol, repeats, device, seed=0, **solver_kw):
    """Alternate the two solvers `repeats` times; return medians, iterations and errors against a tight reference."""
    cost, frame_mask, token_mask, unpadded = make_batch(batch, max_frames, max_tokens, seed, device)
    settings = dict(eps=eps, rho_frames=rho_frames, rho_tokens=rho_tokens)

    def ours():
        return solve_uot(cost, frame_mask, token_mask, tol=tol, max_iter=100_000, **settings, **solver_kw)

    def theirs():
        return pot_loop(unpadded, eps, rho_frames, rho_tokens, tol)

    ours()  # warm-up (allocator, kernels)
    our_times, pot_times = [], []
    for _ in range(repeats):
        elapsed, result = timed(ours, device)
        our_times.append(elapsed)
        elapsed, pot_plans = timed(theirs, torch.device("cpu"))
        pot_times.append(elapsed)

    reference = pot_loop(unpadded, eps, rho_frames, rho_tokens, 1e-13, dtype=np.float64)
    ref_values = [objective(p, c, eps, rho_frames, rho_tokens) for p, c in zip(reference, unpadded)]
    plans = result.plan.detach().cpu().numpy()
    ours_err, pot_err, ours_plan_err, pot_plan_err, agreement = [], [], [], [], []
    for k, (c, ref, ref_value) in enumerate(zip(unpadded, reference, ref_values)):
        t, n = c.shape
        mine = plans[k, :t, :n]
        ours_value = objective(mine, c, eps, rho_frames, rho_tokens)
        pot_value = objective(pot_plans[k], c, eps, rho_frames, rho_tokens)
        ours_err.append(abs(ours_value - ref_value) / abs(ref_value))
        pot_err.append(abs(pot_value - ref_value) / abs(ref_value))
        agreement.append(abs(ours_value - pot_value) / abs(pot_value))
        ours_plan_err.append(np.abs(mine - ref).max())
        pot_plan_err.append(np.abs(pot_plans[k] - ref).max())
    return dict(
        ours=statistics.median(our_times),
        pot=statistics.median(pot_times),
        iterations=int(result.n_iter.max()),
        mean_iterations=float(result.n_iter.float().mean()),
        ours_objective_error=max(ours_err),
        pot_objective_error=max(pot_err),
        agreement=max(agreement),
        ours_plan_error=max(ours_plan_err),
        pot_plan_error=max(pot_plan_err),
        padding=1 - float(frame_mask.float().mean()),
    )


def exp_floor(batch, max_frames, max_tokens, device, repeats=20):
    """Seconds for 2 B T N exponentials on the device: a lower bound for one log-domain iteration."""
    x = -torch.rand(batch, max_tokens, max_frames, device=device)
    times = []
    for _ in range(repeats):
        elapsed, _ = timed(lambda: (x.exp(), x.exp()), device)
        times.append(elapsed)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="where the batched solver runs (POT always on the CPU)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each solver, alternated")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--rho-frames", type=float, default=1.0)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    repeats = 3 if args.quick else args.repeats
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, 1 thread"
    print(f"device: {name}; torch {torch.__version__}, POT {ot.__version__}; float32, tolerance {args.tol}")

    print("\n== main setting: B=32, T<=300, N<=30 ==")
    header = (
        f"{'eps':>6} {'rho_f':>6} {'rho_t':>6} | {'ours ms':>8} {'POT ms':>8} {'ratio':>6} | {'iters':>5} "
        f"| {'obj err ours':>12} {'obj err POT':>11} {'ours vs POT':>11} | {'plan err ours':>13} {'POT':>8}"
    )
    print(header)
    main_settings = [
        (args.eps, args.rho_frames, INF),
        (0.1, 10.0, INF),
        (0.05, 1.0, INF),
        (0.1, INF, INF),
        (0.1, 1.0, 1.0),
    ]
    for eps, rho_frames, rho_tokens in main_settings:
        r = compare(32, 300, 30, eps, rho_frames, rho_tokens, args.tol, repeats, device)
        print(
            f"{eps:>6} {rho_frames:>6} {rho_tokens:>6} | {1e3 * r['ours']:>8.1f} {1e3 * r['pot']:>8.1f} "
            f"{r['pot'] / r['ours']:>6.1f} | {r['iterations']:>5} | {r['ours_objective_error']:>12.1e} "
            f"{r['pot_objective_error']:>11.1e} {r['agreement']:>11.1e} | {r['ours_plan_error']:>13.1e} "
            f"{r['pot_plan_error']:>8.1e}"
        )
    print(f"(padding: {r['padding']:.0%} of frames; errors are maxima over the batch, relative for objectives)")

    print(f"\n== growth with T and N (B=32, eps={args.eps}, rho_frames={args.rho_frames}) ==")
    print(f"{'T':>5} {'N':>4} | {'ours ms':>8} {'POT ms':>8} {'ratio':>6} | {'iters':>5} {'ms/iter':>8} {'floor ms':>8}")
    sizes = [(100, 30), (300, 30), (600, 30), (300, 10), (300, 60)]
    if device.type == "cuda":
        sizes += [(1000, 60), (1500, 100)]  # 20 to 30 s of audio at 50 frames a second
    if args.quick:
        sizes = sizes[:2]
    for max_frames, max_tokens in sizes:
        r = compare(32, max_frames, max_tokens, args.eps, args.rho_frames, INF, args.tol, max(3, repeats // 2), device)
        floor = exp_floor(32, max_frames, max_tokens, device)
        print(
            f"{max_frames:>5} {max_tokens:>4} | {1e3 * r['ours']:>8.1f} {1e3 * r['pot']:>8.1f} "
            f"{r['pot'] / r['ours']:>6.1f} | {r['iterations']:>5} {1e3 * r['ours'] / r['iterations']:>8.3f} "
            f"{1e3 * floor:>8.3f}"
        )
    print("(floor: time of 2*B*T*N exponentials on the device, one log-domain iteration's unavoidable work)")

    print("\n== what each ingredient gives (B=32, T<=300, N<=30, eps=0.1, rho_frames=1 and 10) ==")
    for rho_frames in (1.0, 10.0):
        for method, translation in (("log", False), ("log", True), ("scaling", False), ("scaling", True)):
            r = compare(
                32, 300, 30, 0.1, rho_frames, INF, args.tol, max(3, repeats // 2), device,
                method=method, translation_invariant=translation,
            )
            print(
                f"rho_frames={rho_frames:<5} method={method:<8} translation={str(translation):<5} | "
                f"ours {1e3 * r['ours']:7.1f} ms, POT {1e3 * r['pot']:7.1f} ms, ratio {r['pot'] / r['ours']:5.1f}, "
                f"iterations {r['iterations']}"
            )


if __name__ == "__main__":
    main()

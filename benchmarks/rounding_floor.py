"""How far float32 iterates keep moving once the solver has converged: the measurement behind `_ROUNDING_ULPS`.

    ATEN_CPU_CAPABILITY=default python benchmarks/rounding_floor.py --method scaling --problems 150 --seed 11
    ATEN_CPU_CAPABILITY=default python benchmarks/rounding_floor.py --method log --problems 150 --tols 1e-4 1e-5 1e-6 1e-7

Solves random problems (cosine or uniform costs, 4 to 300 frames, 2 to 30 tokens, eps from 0.01 to 0.5, every kind
of marginal, with and without the temporal prior) for `--iterations` iterations without ever stopping, and records at
every check the largest change of a log-scaling, over the coordinates that carry mass, in units of the rounding
scale the stopping rule uses (`eps_dtype * magnitude`, see `_solver_numerics._moved_beyond_rounding`; in the log
domain, the change since the previous check). Over the last 50 checks that is the stagnation level: changes that
rounding alone makes (0 for a run that reaches an exact fixed point, which stops early). It prints the problems with
the highest levels; the level 600 iterations earlier tells a problem still converging from one cycling in its last
bits. With `--tols`, it instead solves the same problems with the real stopping rule at each tolerance and counts
those that converge within `--iterations`. Run it under each `ATEN_CPU_CAPABILITY` the machine offers.
"""

import argparse
import math

import torch

import modeling_uot_ctc._solver_log_domain as log_domain
import modeling_uot_ctc._solver_scaling as scaling
from modeling_uot_ctc import _solver_numerics, solve_uot

CHOICES = dict(
    eps=(0.01, 0.02, 0.05, 0.1, 0.5),
    rho_frames=(0.01, 0.1, 0.5, 1.0, 10.0, math.inf),
    rho_tokens=(math.inf, math.inf, 1.0, 0.1),
    temporal_order_weight=(0.0, 0.0, 1.0),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("scaling", "log", "unrolled"), default="scaling")
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--show", type=int, default=5, help="problems to print, highest level first")
    parser.add_argument("--tols", type=float, nargs="+", help="count the problems that converge at these tolerances")
    args = parser.parse_args()
    mode = dict(grad_mode="unrolled") if args.method == "unrolled" else dict(method=args.method)
    if args.tols:
        converged = {tol: 0 for tol in args.tols}
        for cost, settings in random_problems(args.problems, args.seed):
            for tol in args.tols:
                result = solve_uot(cost, max_iter=args.iterations, tol=tol, **settings, **mode)
                converged[tol] += int(result.converged.all())
        print(f"{torch.backends.cpu.get_cpu_capability()} {args.method}: {args.problems} problems, at most "
              f"{args.iterations} iterations; converged: "
              + ", ".join(f"{count}/{args.problems} at tol {tol:g}" for tol, count in converged.items()))
        return

    levels = []
    measured = _solver_numerics._moved_beyond_rounding

    def recording(mass, change, magnitude, dtype):
        alive = mass.detach() > 1e-12
        levels.append(((change.detach().abs() / (torch.finfo(dtype).eps * magnitude)) * alive).amax(-1))
        return measured(mass, change, magnitude, dtype) + 1.0  # never below any tol: iterate to the end

    scaling._moved_beyond_rounding = log_domain._moved_beyond_rounding = recording
    rows = []
    for cost, settings in random_problems(args.problems, args.seed):
        levels.clear()
        solve_uot(cost, max_iter=args.iterations, tol=1e-30, **settings, **mode)
        per_check = torch.stack(levels).view(-1, 2).amax(-1)  # the frame and the token update of each check
        earlier = per_check[-200:-150].amax().item() if len(per_check) > 200 else math.nan
        # Stopping before the end means an iteration moved nothing at all: an exact fixed point.
        ran_out = len(per_check) >= args.iterations // 4
        rows.append((per_check[-50:].amax().item() if ran_out else 0.0, earlier, *cost.shape[1:], settings))
    rows.sort(key=lambda row: row[0], reverse=True)
    print(f"{torch.backends.cpu.get_cpu_capability()} {args.method}: {args.problems} problems, {args.iterations} "
          f"iterations; stagnation level in units of the rounding scale (the stopping rule discounts "
          f"{_solver_numerics._ROUNDING_ULPS:g})")
    for level, earlier, n_frames, n_tokens, settings in rows[: args.show]:
        print(f"  {level:6.2f} (600 iterations earlier {earlier:6.2f})  T={n_frames} N={n_tokens} {settings}")


def random_problems(count: int, seed: int):
    """`(cost, settings)` of `count` random problems, the same ones for the same seed."""
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=gen))]

    for _ in range(count):
        n_frames = int(torch.randint(4, 300, (1,), generator=gen))
        n_tokens = int(torch.randint(2, 30, (1,), generator=gen))
        settings = {name: pick(options) for name, options in CHOICES.items()}
        if pick((0, 1)):
            cost = 2 * torch.rand(1, n_frames, n_tokens, generator=gen)
        else:
            frames, tokens = torch.randn(1, n_frames, 16, generator=gen), torch.randn(1, n_tokens, 16, generator=gen)
            cost = 1 - torch.nn.functional.cosine_similarity(frames[:, :, None], tokens[:, None], dim=-1)
        yield cost, settings


if __name__ == "__main__":
    main()

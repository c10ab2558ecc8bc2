"""Reference computations written independently of the package: NumPy, float64, straight from METHOD.md."""

import warnings

import numpy as np
import ot


def generalised_kl(p, q):
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    positive = p > 0
    return float(np.sum(p[positive] * np.log(p[positive] / q[positive])) - p.sum() + q.sum())


def uot_objective(plan, cost, a, b, eps, rho_frames, rho_tokens):
    """<C, P> + eps KL(P | a b^T) + rho_f KL(P 1 | a) + rho_t KL(P^T 1 | b), hard sides dropped."""
    value = float(np.sum(plan * cost)) + eps * generalised_kl(plan.ravel(), np.outer(a, b).ravel())
    if 0 < rho_frames < np.inf:
        value += rho_frames * generalised_kl(plan.sum(1), a)
    if 0 < rho_tokens < np.inf:
        value += rho_tokens * generalised_kl(plan.sum(0), b)
    return value


def pot_plan(cost, a, b, eps, rho_frames, rho_tokens, stop=1e-15, max_iter=300_000):
    """POT's generalised Sinkhorn run to a tight tolerance in float64."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ot.unbalanced.sinkhorn_knopp_unbalanced(
            np.asarray(a, np.float64),
            np.asarray(b, np.float64),
            np.asarray(cost, np.float64),
            reg=eps,
            reg_m=(rho_frames, rho_tokens),
            reg_type="kl",
            numItermax=max_iter,
            stopThr=stop,
        )


def order_penalty(n_frames, n_tokens):
    i = (np.arange(n_frames) + 0.5) / n_frames
    j = (np.arange(n_tokens) + 0.5) / n_tokens
    return (i[:, None] - j[None, :]) ** 2

"""Plain log-domain generalised Sinkhorn: the iteration of the unrolled gradient mode and of `method="log"`."""

from __future__ import annotations

import torch

from ._solver_numerics import INF, _moved_beyond_rounding
from ._solver_problem import _Problem


def _iterate_log_domain(problem: _Problem, max_iter, tol, translation_invariant, check_every):
    """Plain log-domain generalised Sinkhorn, all examples in lock-step; finished examples are frozen."""
    batch = problem.a.shape[0]
    device = problem.a.device
    eps = problem.eps
    use_translation = translation_invariant and problem.uses_translation
    f, _ = problem.frame_update(torch.zeros_like(problem.b))
    g, _ = problem.token_update(f)
    done = ~problem.nonempty
    n_iter = torch.zeros(batch, dtype=torch.long, device=device)
    error = torch.where(done, 0.0, INF).to(problem.a.dtype)
    # The log-sum-exp of each update adds `-C / eps`, the other side's potential over `eps` and its log weights
    # before it cancels them: its rounding is relative to their size (see `_moved_beyond_rounding`).
    cost_size = problem.cost_magnitude / eps + 1.0
    log_a_size = problem.log_a.abs().amax(-1, keepdim=True)
    log_b_size = problem.log_b.abs().amax(-1, keepdim=True)
    dtype = problem.a.dtype
    for it in range(1, max_iter + 1):
        check = it % check_every == 0 or it == max_iter
        f_new, log_row = problem.frame_update(g)
        if check:
            # Mass moved by the update: row mass before it times the relative change exp(|df| / eps) - 1 ~ |df| / eps.
            row_mass = torch.exp(problem.log_a + f / eps + log_row) * problem.frame_mask
            magnitude = (f_new.abs() + f.abs()) / eps + problem.kappa_frames * (
                cost_size + g.detach().abs().amax(-1, keepdim=True) / eps + log_b_size
            )
            moved = _moved_beyond_rounding(row_mass, ((f_new - f) / eps).clamp(-1e30, 1e30), magnitude, dtype)
        f = torch.where(done[:, None], f, f_new)
        if use_translation:
            lam = torch.where(done, 0.0, problem.translation(f, g))
            f = torch.where(problem.frame_mask, f + lam[:, None], 0.0)
            g = torch.where(problem.token_mask, g - lam[:, None], 0.0)
        g_new, log_col = problem.token_update(f)
        if check:
            col_mass = torch.exp(problem.log_b + g / eps + log_col) * problem.token_mask
            magnitude = (g_new.abs() + g.abs()) / eps + problem.kappa_tokens * (
                cost_size + f.detach().abs().amax(-1, keepdim=True) / eps + log_a_size
            )
            moved = moved + _moved_beyond_rounding(col_mass, ((g_new - g) / eps).clamp(-1e30, 1e30), magnitude, dtype)
        g = torch.where(done[:, None], g, g_new)
        n_iter = n_iter + (~done).long()
        if check:
            moved = moved.detach()
            error = torch.where(done, error, moved)
            done = done | (moved < tol)
            if bool(done.all()):
                break
    return f, g, n_iter, done, error

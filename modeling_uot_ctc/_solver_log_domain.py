"""Plain log-domain generalised Sinkhorn: the iteration of the unrolled gradient mode and of `method="log"`."""

from __future__ import annotations

import torch

from ._solver_numerics import INF, _moved_beyond_rounding
from ._solver_problem import _Problem


def _iterate_log_domain(problem: _Problem, max_iter, tol, translation_invariant, check_every):
    """Plain log-domain generalised Sinkhorn, all examples in lock-step; finished examples are frozen.

    Stopping: the mass moved by the checked iteration's updates (`|df| / eps` weighted by the row masses, likewise
    for the tokens) below `tol`, or potentials that stand still: no potential moved beyond rounding (see
    `_moved_beyond_rounding`) since the previous check, `check_every` iterations earlier. The potentials here are
    the raw ones, often large numbers whose float32 spacing, divided by `eps`, is coarse; one iteration cannot tell
    slow progress from rounding, but progress adds up over an interval while rounding does not. The reported error
    is then 0.
    """
    batch = problem.a.shape[0]
    device = problem.a.device
    eps = problem.eps
    use_translation = translation_invariant and problem.uses_translation
    f, _ = problem.frame_update(torch.zeros_like(problem.b))
    g, _ = problem.token_update(f)
    done = ~problem.nonempty
    n_iter = torch.zeros(batch, dtype=torch.long, device=device)
    error = torch.where(done, 0.0, INF).to(problem.a.dtype)
    # What changes from one iteration to the next, and so rounds differently each time: the potentials over `eps`,
    # those of the updated side and those of the other side, which the log-sum-exp adds to the fixed `-C / eps` and
    # log weights. The fixed terms are rounded once, which shifts the problem but makes no iteration move.
    log_a_size = problem.log_a.abs().amax(-1, keepdim=True) + 1.0
    log_b_size = problem.log_b.abs().amax(-1, keepdim=True) + 1.0
    dtype = problem.a.dtype
    f_checked, g_checked = f.detach(), g.detach()  # the potentials at the previous check
    for it in range(1, max_iter + 1):
        check = it % check_every == 0 or it == max_iter
        f_new, log_row = problem.frame_update(g)
        if check:
            # Mass moved by the update: row mass before it times the relative change exp(|df| / eps) - 1 ~ |df| / eps.
            row_mass = (torch.exp(problem.log_a + f / eps + log_row) * problem.frame_mask).detach()
            moved = (row_mass * ((f_new - f).detach() / eps).abs().clamp_max(1e30)).sum(-1)
            size = (f_new.detach().abs() + f_checked.abs()) / eps + problem.kappa_frames * (
                g.detach().abs().amax(-1, keepdim=True) / eps + log_b_size
            )
            change = ((f_new.detach() - f_checked) / eps).clamp(-1e30, 1e30)
            drift = _moved_beyond_rounding(row_mass, change, size, dtype)
        f = torch.where(done[:, None], f, f_new)
        if use_translation:
            lam = torch.where(done, 0.0, problem.translation(f, g))
            f = torch.where(problem.frame_mask, f + lam[:, None], 0.0)
            g = torch.where(problem.token_mask, g - lam[:, None], 0.0)
        g_new, log_col = problem.token_update(f)
        if check:
            col_mass = (torch.exp(problem.log_b + g / eps + log_col) * problem.token_mask).detach()
            moved = moved + (col_mass * ((g_new - g).detach() / eps).abs().clamp_max(1e30)).sum(-1)
            size = (g_new.detach().abs() + g_checked.abs()) / eps + problem.kappa_tokens * (
                f.detach().abs().amax(-1, keepdim=True) / eps + log_a_size
            )
            drift = drift + _moved_beyond_rounding(
                col_mass, ((g_new.detach() - g_checked) / eps).clamp(-1e30, 1e30), size, dtype
            )
        g = torch.where(done[:, None], g, g_new)
        n_iter = n_iter + (~done).long()
        if check:
            moved = torch.where(drift == 0, 0.0, moved)  # standing still: converged to float resolution
            error = torch.where(done, error, moved)
            done = done | (moved < tol)
            f_checked, g_checked = f.detach(), g.detach()
            if bool(done.all()):
                break
    return f, g, n_iter, done, error

"""Batched entropic unbalanced optimal transport between acoustic frames and text tokens.

This module is the solver's public surface: `solve_uot`, `solve_ot`, the aligner registry and the rho helpers. The
iterations live beside it, one module each (`_solver_scaling`, `_solver_log_domain`), on a shared problem set-up
(`_solver_problem`) and shared numerics (`_solver_numerics`); they are flat modules rather than a sub-package so that
a saved model's folder can carry them as remote code. Everything is a pure function of its inputs.

Why a hand-written solver: POT solves one example at a time on NumPy or torch and serves here as the oracle; its
batched solvers are balanced only and know no padding masks; GeomLoss and OTT-JAX cannot keep one marginal hard
while relaxing the other. Training needs all three: a batch of padded utterances, a hard token side and a relaxed
frame side, at every step.

Adding an aligner: write a function with the signature of :func:`solve_uot` (cost, masks, weights and keyword
settings in, :class:`UOTResult` out); the model looks aligners up by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from ._solver_log_domain import _iterate_log_domain
from ._solver_numerics import INF, _autocast_disabled, _capturing
from ._solver_problem import _Problem, _ValueWithEnvelopeGradient
from ._solver_scaling import _iterate_scaling, _iterate_scaling_sync_free
from .costs import temporal_order_penalty

__all__ = [
    "ALIGNERS",
    "UOTResult",
    "register_aligner",
    "solve_ot",
    "solve_uot",
    "rho_from_fraction",
    "fraction_from_rho",
    "temporal_order_penalty",
]


@dataclass
class UOTResult:
    """What :func:`solve_uot` returns.

    Attributes:
        plan (`torch.Tensor` of shape `(B, T, N)`):
            The transport plan `P`. Zero on padded and forbidden (`cost = inf`) cells and for examples without a
            valid frame or token. Detached from the graph in the `"detach"` gradient mode.
        value (`torch.Tensor` of shape `(B,)`):
            The full objective of the problem (transport cost, entropic term and marginal penalties, each
            generalised KL with its mass terms) at `plan`. Carries gradients to `cost` in both gradient modes.
        frame_potentials (`torch.Tensor` of shape `(B, T)`):
            The dual potential `f` (same unit as the cost); zero on padding.
        token_potentials (`torch.Tensor` of shape `(B, N)`):
            The dual potential `g`; zero on padding.
        n_iter (`torch.Tensor` of shape `(B,)`, int64):
            Sinkhorn iterations (one frame and one token update each) run for every example.
        converged (`torch.Tensor` of shape `(B,)`, bool):
            Whether the example met the stopping rule (see `tol` in :func:`solve_uot`) within `max_iter`: its
            `marginal_error` fell below `tol`. Examples with nothing to align count as converged.
        marginal_error (`torch.Tensor` of shape `(B,)`):
            The last measured stopping criterion: the mass moved beyond rounding by the last update of each side,
            summed (`inf` if it was never measured).
    """

    plan: torch.Tensor
    value: torch.Tensor
    frame_potentials: torch.Tensor
    token_potentials: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor
    marginal_error: torch.Tensor

def solve_uot(
    cost: torch.Tensor,
    frame_mask: Optional[torch.Tensor] = None,
    token_mask: Optional[torch.Tensor] = None,
    frame_weights: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    *,
    eps: float = 0.1,
    rho_frames: float = 1.0,
    rho_tokens: float = INF,
    temporal_order_weight: float = 0.0,
    max_iter: int = 1000,
    tol: float = 1e-5,
    grad_mode: Literal["detach", "unrolled"] = "detach",
    method: Literal["scaling", "log"] = "scaling",
    translation_invariant: bool = True,
    check_every: int = 4,
    sync_free: Optional[bool] = None,
) -> UOTResult:
    r"""Solve a batch of entropic unbalanced optimal-transport problems with padding masks.

    For each example, with frame weights :math:`a` (length `T`) and token weights :math:`b` (length `N`):

    .. math::
        \min_{P \ge 0} \; \langle C, P \rangle + \varepsilon\,\mathrm{KL}(P \,|\, a b^\top)
        + \rho_f\,\mathrm{KL}(P \mathbf{1} \,|\, a) + \rho_t\,\mathrm{KL}(P^\top \mathbf{1} \,|\, b)

    where :math:`\mathrm{KL}(p | q) = \sum p \log(p / q) - p + q` is the generalised KL divergence and a weight of
    `inf` makes that marginal a hard equality. The default (`rho_tokens = inf`, finite `rho_frames`) grounds every
    token with its full mass while frames may carry more or less than their share, or drop out.

    The optimum is :math:`P_{ij} = a_i b_j \exp((f_i + g_j - C_{ij}) / \varepsilon)`. Generalised Sinkhorn
    alternates the exact maximisation of the dual over each potential,

    .. math::
        f_i \leftarrow -\kappa_f\,\varepsilon \log \sum_j b_j e^{(g_j - C_{ij})/\varepsilon}, \qquad
        g_j \leftarrow -\kappa_t\,\varepsilon \log \sum_i a_i e^{(f_i - C_{ij})/\varepsilon}, \qquad
        \kappa = \frac{\rho}{\rho + \varepsilon} \;(1 \text{ for } \rho = \infty),

    and, with `translation_invariant`, an exact maximisation along :math:`(f + \lambda, g - \lambda)`
    (Séjourné et al., 2022), which removes the slow mode that makes plain unbalanced Sinkhorn crawl when
    :math:`\rho \gg \varepsilon`.

    Relation to POT: with `a`, `b`, `M = cost` of one unpadded example, ours equals
    `ot.unbalanced.sinkhorn_knopp_unbalanced(a, b, M, reg=eps, reg_m=(rho_frames, rho_tokens), reg_type="kl")`
    (POT's `c = a b^T` is our reference measure `a b^T`; POT's `reg_m1` weighs the row marginal, as our
    `rho_frames` does; POT's scalings are `u = exp(f / eps)`, `v = exp(g / eps)`). POT's `log["total_cost"]` drops
    the mass terms `- p + q` of each KL; our `value` keeps them.

    Parameters
    ----------
    cost : tensor of shape `(B, T, N)`
        Cost between frame `i` and token `j`. On a valid cell (frame and token both unmasked), `+inf` forbids the
        pair: the plan is exactly zero there and the rest of the problem is solved as POT solves it, with a kernel
        entry `exp(-inf) = 0`. A valid frame or token whose every cell is forbidden can carry no mass and is treated
        as padding: its row or column of the plan and its potential are zero, and `value` is that of the problem
        without it (a hard side that cannot be met is thus met on the rest). NaN or `-inf` on a valid cell raises a
        `ValueError`, except in the sync-free iteration on CUDA (including CUDA graph capture), where checking would
        make the host wait for the device: there that example's outputs become NaN (and it does not converge)
        instead of silently wrong. Padded cells are ignored whatever they hold, NaN and inf included.
        Half-precision input is solved in float32; float32 and float64 are solved in their own precision.
    frame_mask, token_mask : bool tensors of shape `(B, T)` and `(B, N)`, optional
        `True` on valid positions. Default: everything valid.
    frame_weights, token_weights : tensors of shape `(B, T)` and `(B, N)`, optional
        Reference marginals `a` and `b`, non-negative. Default: uniform over each example's valid positions (each
        sums to 1). A position with weight zero is treated as padding.
    eps : float
        Entropic regularisation (> 0), in the unit of the cost.
    rho_frames, rho_tokens : float in `[0, inf]`
        Weights of the KL penalties on the frame-side and token-side marginals. `inf` makes the side hard, `0`
        leaves it free. Use :func:`rho_from_fraction` for the `rho / (rho + eps)` parameterisation.
    temporal_order_weight : float
        If positive, adds `temporal_order_weight * temporal_order_penalty(...)` to the cost: transport far from the
        diagonal in normalised time becomes expensive. `value` includes this term.
    max_iter : int
        Largest number of iterations per example. Under CUDA graph capture (`torch.cuda.graph`,
        `torch.cuda.make_graphed_callables`) a graph cannot stop early, so the sync-free iteration runs exactly
        `max_iter` iterations there; each example's result is still frozen at the check where it converged.
    tol : float
        Stop an example once the mass moved by one iteration's updates, beyond rounding, falls below `tol`; that
        mass is reported as `marginal_error`. Measured every `check_every` iterations, as

        .. math::
            \sum_i m_i \max\big(|\Delta f_i| / \varepsilon - 4\,u\,s_i,\; 0\big)
            + \sum_j m_j \max\big(|\Delta g_j| / \varepsilon - 4\,u\,s_j,\; 0\big),

        the L1 change of the marginals to first order (`m` the row and column masses, in the unit of the weights,
        which sum to 1 by default), where a change smaller than four units in the last place of the terms the
        update adds up counts as none (`u` the dtype's machine epsilon, `s` the size of those terms: potentials
        over `eps` and log-weights). Floating-point iterations do not always reach an exact fixed point: with
        another CPU's kernels (another summation order, another vector width) they may cycle by a few units in the
        last place: at most 1.51 in float32, 150 random problems each run 4000 iterations on the AVX-512, AVX2 and
        baseline kernels (`benchmarks/rounding_floor.py`). Without the floor, a `tol` below float32's resolution
        would be met on some machines and never on others; with it the same problems converge on every machine, to
        plans that agree to rounding. Summed over a side, the floor is about `5e-6` of mass in float32 and `1e-14`
        in float64: a `tol` well above it (the model's default is `1e-4`) means what it says.

        The log domain (`method="log"` and `grad_mode="unrolled"`) works on raw potentials, whose float32 spacing
        over `eps` can be coarser than the change one iteration makes; it stops when the mass moved (no floor)
        falls below `tol`, or when no potential moved beyond four units in the last place over the `check_every`
        iterations since the previous check (the error is then 0). Its rounding cycles can exceed that: of the same
        150 problems, all converge at `tol` 1e-5 and above on all three kernel paths, 148 to 149 at 1e-6 and 144 at
        1e-7 (`benchmarks/rounding_floor.py --method log --tols ...`). Below 1e-5 in float32, use the scaling
        iteration or float64.
    grad_mode : {"detach", "unrolled"}
        `"detach"` (default): iterations run without autograd, the plan is a constant, and `value` has the gradient
        of the optimal value, `d value / d cost = plan` (what POT calls the envelope gradient; POT's own
        `"detach"` gives no gradient at all); memory does not grow with the iterations. `"unrolled"`:
        autograd follows every iteration (log-domain updates), so `plan` depends on `cost`; memory grows with the
        iterations.
    method : {"scaling", "log"}
        Iteration in the `"detach"` mode. `"scaling"` (default): matrix scaling on a kernel re-centred on the
        current potentials whenever the scalings leave a safe range, which keeps it exact at small `eps` while
        every iteration costs two batched matrix-vector products instead of two passes of exponentials. `"log"`:
        plain log-domain updates (the unrolled mode always uses these).
    translation_invariant : bool
        Add the translation step described above (ignored when a side has `rho` equal to 0 or both are hard).
    check_every : int
        Iterations between two measurements of the stopping criterion.
    sync_free : bool, optional
        Run the `"scaling"` iteration without making the host wait for each convergence check. All examples then
        iterate in lock-step (each one's result is frozen at the check where it converges), kernels are refreshed
        by masking rather than by branching, and the stopping test is read back asynchronously: the host waits only
        when it has run more than four checks ahead of the device, and then for the oldest check alone. The
        iteration may thus run a few checks past the last example's convergence (device work that `n_iter` does
        not count), with no effect on the results. On a GPU this lets the host queue the solver's small kernels
        behind the model's forward pass instead of paying their launch latency one by one. Default (`None`): on
        for CUDA tensors, off elsewhere (on a CPU the blocking iteration can drop finished examples from the batch,
        which is faster there). Ignored by `method="log"` and the unrolled mode. Masks on another device than
        `cost`, and explicit weights (validated on the host), each cost one wait before the iteration starts.
        The only iteration that can be captured in a CUDA graph (see `max_iter`).

    Returns
    -------
    UOTResult
        `plan`, `value`, `frame_potentials`, `token_potentials`, `n_iter`, `converged`, `marginal_error`. Outputs
        are in the computation dtype (float32 for half-precision input).

    Examples
    --------
    >>> cost = torch.rand(2, 50, 8)
    >>> result = solve_uot(cost, eps=0.1, rho_frames=1.0)
    >>> torch.allclose(result.plan.sum(1), torch.full((2, 8), 1 / 8), atol=1e-5)
    True

    References
    ----------
    Chizat, Peyré, Schmitzer, Vialard (2018). Scaling algorithms for unbalanced optimal transport problems.
    Schmitzer (2019). Stabilized sparse scaling algorithms for entropy regularized transport problems.
    Séjourné, Vialard, Peyré (2022). Faster unbalanced optimal transport: translation invariant Sinkhorn and 1-D
    Frank-Wolfe.
    """
    _check_inputs(cost, frame_mask, token_mask, frame_weights, token_weights)
    _check_settings(
        eps, rho_frames, rho_tokens, temporal_order_weight, max_iter, tol, grad_mode, method, check_every, sync_free
    )
    if math.isinf(rho_frames) and not math.isinf(rho_tokens):
        # Both iterations end on a token-side update, which makes the token marginal exact. When only the frame
        # side is hard, solve the transposed problem so that the hard side is again the one updated last (the
        # temporal-order penalty is symmetric under the transpose).
        result = solve_uot(
            cost.transpose(1, 2),
            token_mask,
            frame_mask,
            token_weights,
            frame_weights,
            eps=eps,
            rho_frames=rho_tokens,
            rho_tokens=rho_frames,
            temporal_order_weight=temporal_order_weight,
            max_iter=max_iter,
            tol=tol,
            grad_mode=grad_mode,
            method=method,
            translation_invariant=translation_invariant,
            check_every=check_every,
            sync_free=sync_free,
        )
        return UOTResult(
            plan=result.plan.transpose(1, 2),
            value=result.value,
            frame_potentials=result.token_potentials,
            token_potentials=result.frame_potentials,
            n_iter=result.n_iter,
            converged=result.converged,
            marginal_error=result.marginal_error,
        )

    # Autocast would run the iteration's matrix products in half precision; the solver's accuracy is float32's.
    with _autocast_disabled(cost.device):
        if grad_mode == "unrolled":
            if _capturing(cost.device):
                raise ValueError(
                    "grad_mode='unrolled' cannot be captured in a CUDA graph: its iteration reads convergence "
                    "checks on the host. Use grad_mode='detach'."
                )
            problem = _Problem(
                cost, frame_mask, token_mask, frame_weights, token_weights, eps, rho_frames, rho_tokens,
                temporal_order_weight,
            )
            f, g, n_iter, converged, error = _iterate_log_domain(
                problem, max_iter, tol, translation_invariant, check_every
            )
            g, plan, value = problem.finish(f)
            plan = plan.transpose(1, 2)
        else:
            with torch.no_grad():
                if sync_free is None:
                    sync_free = cost.device.type == "cuda"
                sync_free = sync_free and method == "scaling"
                if _capturing(cost.device) and not sync_free:
                    raise ValueError(
                        "Under CUDA graph capture the solver needs method='scaling' with sync_free left on: the "
                        "other iterations read their convergence checks on the host, which a graph cannot do."
                    )
                problem = _Problem(
                    cost, frame_mask, token_mask, frame_weights, token_weights, eps, rho_frames, rho_tokens,
                    temporal_order_weight, sync_free,
                )
                if method == "log":
                    iterate = _iterate_log_domain
                else:
                    iterate = _iterate_scaling_sync_free if sync_free else _iterate_scaling
                f, g, n_iter, converged, error = iterate(problem, max_iter, tol, translation_invariant, check_every)
                g, plan, value = problem.finish(f)
                plan = plan.transpose(1, 2)
            if torch.is_grad_enabled() and cost.requires_grad:
                # At the optimum the derivative of the optimal value with respect to the cost is the plan, so no graph
                # through the iterations is needed.
                value = _ValueWithEnvelopeGradient.apply(cost, value, plan)
    return UOTResult(
        plan=plan,
        value=value,
        frame_potentials=f,
        token_potentials=g,
        n_iter=n_iter,
        converged=converged,
        marginal_error=error,
    )

def solve_ot(
    cost: torch.Tensor,
    frame_mask: Optional[torch.Tensor] = None,
    token_mask: Optional[torch.Tensor] = None,
    frame_weights: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    **settings,
) -> UOTResult:
    """Balanced entropic OT (every frame and every token matched in full): :func:`solve_uot` with both sides hard.

    `rho_frames` and `rho_tokens` in `settings` are ignored; every other setting is passed on.
    """
    settings.update(rho_frames=INF, rho_tokens=INF)
    return solve_uot(cost, frame_mask, token_mask, frame_weights, token_weights, **settings)

# The aligners a model can use, by the name its config gives. An aligner takes the arguments of `solve_uot` and
# returns a `UOTResult`; adding one is writing that function and one entry here (or calling `register_aligner`).
ALIGNERS = {"uot": solve_uot, "ot": solve_ot}

def register_aligner(name: str, aligner) -> None:
    """Make `aligner` available to models whose config says `aligner=name`."""
    if name == "none":
        raise ValueError("'none' is reserved: it switches the transfer loss off.")
    ALIGNERS[name] = aligner

def rho_from_fraction(fraction: float, eps: float) -> float:
    """Turn the damping exponent `fraction = rho / (rho + eps)` in `[0, 1]` into the marginal weight `rho`.

    Some papers quote the exponent of the generalised Sinkhorn update instead of the KL weight; `fraction = 1` is a
    hard marginal (`rho = inf`), `fraction = 0` no marginal penalty at all (`rho = 0`).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"`fraction` must lie in [0, 1], got {fraction}.")
    if eps <= 0:
        raise ValueError(f"`eps` must be positive, got {eps}.")
    return INF if fraction == 1.0 else eps * fraction / (1.0 - fraction)

def fraction_from_rho(rho: float, eps: float) -> float:
    """Inverse of :func:`rho_from_fraction`: `rho / (rho + eps)`, with `rho = inf` giving 1."""
    if not rho >= 0:
        raise ValueError(f"`rho` must lie in [0, inf], got {rho}.")
    if eps <= 0:
        raise ValueError(f"`eps` must be positive, got {eps}.")
    return 1.0 if math.isinf(rho) else rho / (rho + eps)

def _check_inputs(cost, frame_mask, token_mask, frame_weights, token_weights):
    if not isinstance(cost, torch.Tensor) or cost.dim() != 3:
        raise ValueError(f"`cost` must be a tensor of shape (batch, frames, tokens), got {_describe(cost)}.")
    if not cost.is_floating_point():
        raise ValueError(f"`cost` must be a floating-point tensor, got {cost.dtype}.")
    batch, n_frames, n_tokens = cost.shape
    for name, x, shape in (
        ("frame_mask", frame_mask, (batch, n_frames)),
        ("token_mask", token_mask, (batch, n_tokens)),
        ("frame_weights", frame_weights, (batch, n_frames)),
        ("token_weights", token_weights, (batch, n_tokens)),
    ):
        if x is not None and (not isinstance(x, torch.Tensor) or tuple(x.shape) != shape):
            raise ValueError(f"`{name}` must be a tensor of shape {shape}, got {_describe(x)}.")

def _check_settings(eps, rho_frames, rho_tokens, w_order, max_iter, tol, grad_mode, method, check_every, sync_free):
    if not (isinstance(eps, (int, float)) and 0 < eps < INF):
        raise ValueError(f"`eps` must be a positive finite number, got {eps!r}.")
    for name, rho in (("rho_frames", rho_frames), ("rho_tokens", rho_tokens)):
        if not (isinstance(rho, (int, float)) and rho >= 0):
            raise ValueError(f"`{name}` must lie in [0, inf] (inf = hard marginal), got {rho!r}.")
    if not (isinstance(w_order, (int, float)) and 0 <= w_order < INF):
        raise ValueError(f"`temporal_order_weight` must be a non-negative number, got {w_order!r}.")
    if grad_mode not in ("detach", "unrolled"):
        raise ValueError(f"`grad_mode` must be 'detach' or 'unrolled', got {grad_mode!r}.")
    if method not in ("scaling", "log"):
        raise ValueError(f"`method` must be 'scaling' or 'log', got {method!r}.")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"`max_iter` must be a positive integer, got {max_iter!r}.")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"`tol` must be a positive number, got {tol!r}.")
    if not (isinstance(check_every, int) and check_every >= 1):
        raise ValueError(f"`check_every` must be a positive integer, got {check_every!r}.")
    if sync_free not in (None, True, False):
        raise ValueError(f"`sync_free` must be None, True or False, got {sync_free!r}.")

def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__

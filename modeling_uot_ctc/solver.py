"""Batched entropic unbalanced optimal transport between acoustic frames and text tokens.

This module is the project's one place for the alignment solver. Everything in it is a pure function of its inputs.

Why a hand-written solver: POT solves one example at a time on NumPy or torch and serves here as the oracle; its
batched solvers are balanced only and know no padding masks; GeomLoss and OTT-JAX cannot keep one marginal hard
while relaxing the other. Training needs all three: a batch of padded utterances, a hard token side and a relaxed
frame side, at every step.

Adding an aligner: write a function with the signature of :func:`solve_uot` (cost, masks, weights and keyword
settings in, :class:`UOTResult` out); the model looks aligners up by name.
"""

from __future__ import annotations

import collections
import contextlib
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

INF = float("inf")

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
            Whether the example met `tol` within `max_iter`. Examples with nothing to align count as converged.
        marginal_error (`torch.Tensor` of shape `(B,)`):
            The last measured stopping criterion: the mass moved by the last update of each side, summed
            (`inf` if it was never measured).
    """

    plan: torch.Tensor
    value: torch.Tensor
    frame_potentials: torch.Tensor
    token_potentials: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor
    marginal_error: torch.Tensor


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


def temporal_order_penalty(
    frame_mask: torch.Tensor, token_mask: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Squared distance to the diagonal in normalised time, `((i + 0.5) / T - (j + 0.5) / N) ** 2`, shape `(B, T, N)`.

    `i` and `j` count valid positions only (a frame after a masked hole keeps its rank among the valid frames) and
    `T`, `N` are each example's numbers of valid frames and tokens. Zero wherever either side is masked. Computed
    in `dtype`.
    """
    frame_rank = frame_mask.cumsum(-1).to(dtype) - 0.5
    token_rank = token_mask.cumsum(-1).to(dtype) - 0.5
    frame_time = frame_rank / frame_mask.sum(-1, keepdim=True).clamp_min(1)
    token_time = token_rank / token_mask.sum(-1, keepdim=True).clamp_min(1)
    penalty = (frame_time[:, :, None] - token_time[:, None, :]) ** 2
    return penalty * (frame_mask[:, :, None] & token_mask[:, None, :]).to(dtype)


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
        Stop an example once the mass moved by one iteration's updates (L1, in the unit of the weights, which sum
        to 1 by default) falls below `tol`. Measured every `check_every` iterations.
    grad_mode : {"detach", "unrolled"}
        `"detach"` (default): iterations run without autograd, the plan is a constant, and `value` has the gradient
        of the optimal value, `d value / d cost = plan`; memory does not grow with the iterations. `"unrolled"`:
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


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _autocast_disabled(device: torch.device):
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


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


def _kappa(rho: float, eps: float) -> float:
    return 1.0 if math.isinf(rho) else rho / (rho + eps)


class _Problem:
    """The inputs of one call in the computation dtype, and the formulas both iterations share.

    Cell tensors are stored token-major, `(B, N, T)`: on CPU, reductions over either axis are then fast (the frame
    axis is the long contiguous one), while reductions over a short last axis are several times slower.
    """

    def __init__(
        self, cost, frame_mask, token_mask, frame_weights, token_weights, eps, rho_frames, rho_tokens, w_order,
        sync_free=False,
    ):
        batch, n_frames, n_tokens = cost.shape
        dtype = cost.dtype if cost.dtype in (torch.float32, torch.float64) else torch.float32
        self.eps = float(eps)
        self.rho_frames, self.rho_tokens = float(rho_frames), float(rho_tokens)
        self.kappa_frames, self.kappa_tokens = _kappa(self.rho_frames, eps), _kappa(self.rho_tokens, eps)

        frame_mask = _mask(frame_mask, (batch, n_frames), cost.device)
        token_mask = _mask(token_mask, (batch, n_tokens), cost.device)
        a = _weights(frame_weights, frame_mask, "frame_weights", dtype)
        b = _weights(token_weights, token_mask, "token_weights", dtype)
        # A zero weight on a hard side forces a zero row or column; treating it as padding keeps logs finite.
        frame_mask, token_mask = frame_mask & (a > 0), token_mask & (b > 0)

        # log of the Gibbs kernel without its a_i b_j factor, -C / eps, and -inf on padding and forbidden cells, in
        # token-major memory (elementwise results inherit their inputs' strides, so the copy comes first). Padded
        # cells may hold anything, NaN included: nan_to_num and the mask multiplications keep them out of values and
        # gradients. Without a graph to record, everything happens in one buffer: on machines where fresh pages are
        # costly, every allocation of this size counts.
        inplace = not (torch.is_grad_enabled() and cost.requires_grad)
        if inplace:
            log_kernel = torch.empty((batch, n_tokens, n_frames), dtype=dtype, device=cost.device)
            log_kernel.copy_(cost.transpose(1, 2))
        else:
            log_kernel = cost.transpose(1, 2).contiguous().to(dtype)
        # Non-finite values become the dtype's extremes, which survive on valid cells and vanish on padded ones;
        # finding them there is then part of the spread's `aminmax`, free when the cost is finite (on a CPU,
        # elementwise tests and masked writes cost many times an arithmetic pass: they are left to the rare other
        # case). A finite cost at an extreme counts as infinite, as `-C / eps` would in most cases anyway.
        big = torch.finfo(dtype).max
        log_kernel = _op(torch.nan_to_num, log_kernel, inplace, nan=-big, posinf=big, neginf=-big)
        token_f, frame_f = token_mask.to(dtype)[:, :, None], frame_mask.to(dtype)[:, None, :]
        log_kernel = _op(torch.mul, _op(torch.mul, log_kernel, inplace, token_f), inplace, frame_f)
        if w_order > 0:
            penalty = temporal_order_penalty(token_mask, frame_mask, dtype)  # symmetric: this is its transpose
            log_kernel = _op(torch.add, log_kernel, inplace, penalty, alpha=w_order)
        low = high = torch.zeros((), dtype=dtype, device=cost.device)
        if log_kernel.numel():
            low, high = torch.aminmax(log_kernel.detach())  # padding holds 0 here: the spread can only be overstated
        # `allowed_t * allowed_f` is 1 where a pair may carry mass and 0 where the exponential's floor leaves tiny
        # values to be zeroed. The first factor is widened to all cells only when some are forbidden: a fresh buffer
        # of that size costs more than a second multiplication.
        self.allowed_t, self.allowed_f = token_f, frame_f
        # The sync-free iteration on CUDA must not wait to learn whether a cell is extreme: it always looks.
        host_checks = not (sync_free and cost.device.type == "cuda")
        extreme = None
        if not host_checks or float(torch.maximum(high, -low)) >= big:
            forbidden, invalid = log_kernel.detach() >= big, log_kernel.detach() <= -big
            if host_checks and bool(invalid.any()):
                raise ValueError(
                    "`cost` is NaN or -inf on a valid cell (frame and token both unmasked); only +inf, which forbids "
                    "the pair, is allowed there."
                )
            extreme = forbidden | invalid
            log_kernel = _masked_fill(log_kernel, extreme, 0.0, inplace)  # the spread is that of the finite cells
            low, high = torch.aminmax(log_kernel.detach())
            self.allowed_t = (token_f * frame_f).masked_fill_(forbidden, 0.0)
            # A frame or token with every cell forbidden can carry no mass. Left out like padding, it keeps logs
            # finite and, on a hard side, keeps its unreachable mass out of the translation step's balance.
            frame_mask = frame_mask & (self.allowed_t.amax(1) > 0)
            token_mask = token_mask & (self.allowed_t.amax(2) > 0)
        # A 0-d tensor where the host must not wait for the device, else a float.
        self.cost_spread = high - low if sync_free else float(high - low)
        self.max_shift = self.cost_spread + self.eps

        self.frame_mask, self.token_mask = frame_mask, token_mask
        self.nonempty = frame_mask.any(-1) & token_mask.any(-1)
        self.a, self.b = a * frame_mask, b * token_mask
        tiny = torch.finfo(dtype).tiny
        self.log_a = torch.where(frame_mask, self.a.clamp_min(tiny).log(), 0.0)
        self.log_b = torch.where(token_mask, self.b.clamp_min(tiny).log(), 0.0)
        self.mass_a, self.mass_b = self.a.sum(-1), self.b.sum(-1)

        log_frame_mask = torch.zeros_like(self.log_a).masked_fill_(~frame_mask, -INF)
        log_token_mask = torch.zeros_like(self.log_b).masked_fill_(~token_mask, -INF)
        log_kernel = _op(torch.mul, log_kernel, inplace, -1.0 / self.eps)
        log_kernel = _op(torch.add, log_kernel, inplace, log_token_mask[:, :, None])
        log_kernel = _op(torch.add, log_kernel, inplace, log_frame_mask[:, None, :])
        if extreme is not None:
            log_kernel = _masked_fill(log_kernel, forbidden, -INF, inplace)
            # Invalid cells get this far unchecked only on CUDA's sync-free path. NaN spreads through their example's
            # results and no further: a visible failure instead of a wrong plan.
            log_kernel = _masked_fill(log_kernel, invalid, math.nan, inplace)
        self.log_kernel = log_kernel

    # The exact block updates, in the log domain.
    def frame_update(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the new `f` and `log sum_j b_j exp((g_j - C_ij) / eps)`."""
        log_sum = _masked_logsumexp(self.log_kernel + (g / self.eps + self.log_b)[:, :, None], dim=1)
        f = torch.where(self.frame_mask, -self.kappa_frames * self.eps * log_sum, 0.0)
        return f, log_sum

    def token_update(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the new `g` and `log sum_i a_i exp((f_i - C_ij) / eps)`."""
        log_sum = _masked_logsumexp(self.log_kernel + (f / self.eps + self.log_a)[:, None, :], dim=2)
        g = torch.where(self.token_mask, -self.kappa_tokens * self.eps * log_sum, 0.0)
        return g, log_sum

    @property
    def uses_translation(self) -> bool:
        finite = [not math.isinf(r) for r in (self.rho_frames, self.rho_tokens)]
        return any(finite) and self.rho_frames > 0 and self.rho_tokens > 0

    def translation(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The shift `lam` that maximises the dual along `(f + lam, g - lam)`, shape `(B,)`.

        Only the two marginal terms of the dual move along that line; setting the derivative of
        `-rho_f <a, exp(-(f + lam) / rho_f)> - rho_t <b, exp(-(g - lam) / rho_t)>` to zero gives the closed form
        below (a hard side contributes `<b, g - lam>` instead). When `rho` is large and the masses are off, the
        maximiser can lie far away, and potentials that swing far and back lose float32 precision in `f + g`; the
        step is therefore capped at `max_shift` (the cost's spread plus `eps`, the scale of optimal potentials).
        Any step towards the maximiser of a concave function still increases it, so the iteration stays an ascent.
        """
        side_terms = []
        for pot, log_w, w_mask, mass, rho in (
            (f, self.log_a, self.frame_mask, self.mass_a, self.rho_frames),
            (g, self.log_b, self.token_mask, self.mass_b, self.rho_tokens),
        ):
            if math.isinf(rho):
                side_terms.append(mass.clamp_min(torch.finfo(f.dtype).tiny).log())
            else:
                side_terms.append(_masked_logsumexp(torch.where(w_mask, log_w - pot / rho, -INF), dim=-1))
        if math.isinf(self.rho_tokens):
            scale = self.rho_frames
        elif math.isinf(self.rho_frames):
            scale = self.rho_tokens
        else:
            scale = self.rho_frames * self.rho_tokens / (self.rho_frames + self.rho_tokens)
        lam = (scale * (side_terms[0] - side_terms[1])).clamp(-self.max_shift, self.max_shift)
        return torch.where(self.nonempty, lam, 0.0)

    def finish(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One last exact token update from `f`, and the plan `(B, N, T)` and primal objective it gives.

        Building the plan inside the token update (normalised exponentials times a per-token factor) makes a hard
        token marginal exact to rounding, whatever precision the potentials were carried in. The entropic term is
        computed from the potentials rather than from `P log P`: since `log(P_ij / (a_i b_j)) = (f_i + g_j - C_ij)
        / eps` on valid cells, `eps KL(P | a b^T) = <r, f> + <c, g> - <C, P> - eps (sum P - m_a m_b)`, which keeps
        gradients finite where the plan underflows to zero.

        Returns `(g, plan, value)`.
        """
        eps = self.eps
        shifted = self.log_kernel + (f / eps + self.log_a)[:, None, :]
        inplace = not (torch.is_grad_enabled() and shifted.requires_grad)
        peak = shifted.detach().amax(2, keepdim=True).clamp_min(-1e30)  # an all-padding token has peak -inf
        plan = _exp(_op(torch.sub, shifted, inplace, peak))
        plan = _op(torch.mul, _op(torch.mul, plan, inplace, self.allowed_t), inplace, self.allowed_f)
        g, factor = _token_factor(plan, peak[:, :, 0], self.log_b, self.token_mask, self.kappa_tokens, eps)
        plan = _op(torch.mul, plan, inplace, factor[:, :, None])

        row_mass, col_mass = plan.sum(1), plan.sum(2)
        total = row_mass.sum(-1)
        value = (row_mass * f).sum(-1) + (col_mass * g).sum(-1) - eps * (total - self.mass_a * self.mass_b)
        for rho, mass, ref in ((self.rho_frames, row_mass, self.a), (self.rho_tokens, col_mass, self.b)):
            if 0 < rho < INF:
                value = value + rho * _generalised_kl(mass, ref)
        value = torch.where(self.nonempty, value, 0.0)
        return g, plan, value


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
    for it in range(1, max_iter + 1):
        check = it % check_every == 0 or it == max_iter
        f_new, log_row = problem.frame_update(g)
        if check:
            # Mass moved by the update: row mass before it times the relative change exp(|df| / eps) - 1 ~ |df| / eps.
            row_mass = torch.exp(problem.log_a + f / eps + log_row) * problem.frame_mask
            moved = (row_mass * ((f_new - f) / eps).abs().clamp_max(1e30)).sum(-1)
        f = torch.where(done[:, None], f, f_new)
        if use_translation:
            lam = torch.where(done, 0.0, problem.translation(f, g))
            f = torch.where(problem.frame_mask, f + lam[:, None], 0.0)
            g = torch.where(problem.token_mask, g - lam[:, None], 0.0)
        g_new, log_col = problem.token_update(f)
        if check:
            col_mass = torch.exp(problem.log_b + g / eps + log_col) * problem.token_mask
            moved = moved + (col_mass * ((g_new - g) / eps).abs().clamp_max(1e30)).sum(-1)
        g = torch.where(done[:, None], g, g_new)
        n_iter = n_iter + (~done).long()
        if check:
            moved = moved.detach()
            error = torch.where(done, error, moved)
            done = done | (moved < tol)
            if bool(done.all()):
                break
    return f, g, n_iter, done, error


class _ScalingState:
    """The state of the stabilised scaling iteration on a batch of problems, and its updates.

    State: absorbed potentials `(f0, g0)`, a kernel `K_ij = a_i b_j exp((f0_i + g0_j - C_ij) / eps)` built from
    them, and scalings `u = exp(log_u)`, `v = exp(log_v)` so that the current potentials are `f0 + eps log_u`,
    `g0 + eps log_v` and the current plan is `u_i K_ij v_j`. In those terms the exact frame update is
    `log_u = kappa_f log a + (kappa_f - 1) f0 / eps - kappa_f log(K v)` (likewise for tokens): two batched
    matrix-vector products per iteration instead of two passes of exponentials. When a scaling on a row or column
    that carries mass leaves `[-bound / 2, bound / 2]`, the scalings are absorbed into `(f0, g0)` and the kernel is
    rebuilt from the log domain, so it never under- or overflows where it matters. Rows or columns whose kernel
    underflowed entirely (frames that dropped out) are clamped at `bound`, not updated, until the next rebuild.

    The translation step needs no extra pass: right after an exact update of a relaxed side, its marginal is
    `a_i exp(-f_i / rho)`, so the sum in the closed form of `lam` is the current total mass `sum_i u_i (K v)_i`.
    The frame side is never the only hard one here (`solve_uot` transposes that case away).

    Every tensor attribute listed in `_BATCHED` has the batch as its first dimension; :meth:`select` keeps a subset
    of the examples. The drivers (`_iterate_scaling`, `_iterate_scaling_sync_free`) decide when to check, rebuild
    and stop.
    """

    _BATCHED = (
        "log_kernel", "log_a", "log_b", "frame_mask", "token_mask", "allowed_t", "allowed_f", "log_mass_b",
        "kernel_t", "kernel", "f0", "g0", "base_f", "base_g", "offset_f", "offset_g", "log_u", "log_v", "u", "v",
        "shift", "log_col_term",
    )
    # The problem's own tensors, the part of the state that a sub-batch starts from.
    _INPUTS = _BATCHED[:8]
    # What the iteration carries beyond the kernel and the absorbed potentials.
    _ITERATES = ("offset_f", "offset_g", "log_u", "log_v", "u", "v", "shift", "log_col_term")

    def __init__(
        self, problem: _Problem, index: Optional[torch.Tensor], translation_invariant: bool, branchless: bool
    ):
        self.eps = eps = problem.eps
        dtype = problem.a.dtype
        self.tiny = torch.finfo(dtype).tiny
        # Scalings stay within exp(+-bound): plan entries lost to the kernel's floor are below exp(floor + 2 bound),
        # and rows or columns carrying less than that are "dead" (their clamped scalings do not ask for a rebuild).
        self.bound = _SCALING_BOUND[dtype]
        self.dead_mass = math.exp(_exp_floor(dtype) + 2 * self.bound)
        self.kappa_f, self.kappa_g = problem.kappa_frames, problem.kappa_tokens
        self.rho_g = problem.rho_tokens
        self.use_translation = translation_invariant and problem.uses_translation
        rho_f = problem.rho_frames
        if self.use_translation:  # both rho positive, at least one finite
            self.scale = rho_f if math.isinf(self.rho_g) else rho_f * self.rho_g / (rho_f + self.rho_g)
            self.max_shift, self.min_shift = problem.max_shift, -problem.max_shift

        self.log_kernel, self.log_a, self.log_b = problem.log_kernel, problem.log_a, problem.log_b
        self.frame_mask, self.token_mask = problem.frame_mask, problem.token_mask
        self.allowed_t, self.allowed_f = problem.allowed_t, problem.allowed_f
        self.log_mass_b = problem.mass_b.clamp_min(self.tiny).log()
        if index is not None:
            for name in self._INPUTS:
                setattr(self, name, getattr(self, name)[index])

        # Start from exact log-domain updates so that no row or column of the first kernel underflows as a whole;
        # the token update's normalised exponentials are that kernel up to a per-token factor. The frame update is
        # needed only when the spread of -C / eps could push a whole frame below the exponential's floor; without
        # host synchronisation that test is a tensor, so both starts are computed and one is kept.
        needs_frame_update = problem.cost_spread / eps >= 0.7 * abs(math.log(self.tiny))
        f0 = torch.zeros_like(self.log_a)
        if branchless or needs_frame_update:
            exact_f0, _ = _SubProblem(problem, self).frame_update(torch.zeros_like(self.log_b))
            f0 = torch.where(needs_frame_update, exact_f0, f0) if branchless else exact_f0
        shifted = self.log_kernel + (f0 / eps + self.log_a)[:, None, :]
        peak = shifted.amax(2, keepdim=True).clamp_min(-1e30)  # an all-padding token has peak -inf
        kernel_t = self._masked(_exp(shifted.sub_(peak)))
        g0, factor = _token_factor(kernel_t, peak[:, :, 0], self.log_b, self.token_mask, self.kappa_g, eps)
        self.kernel_t = kernel_t.mul_(factor[:, :, None])
        self._reset(f0, g0)

    def _masked(self, kernel_t):
        # The exponential's floor leaves tiny values on padded and forbidden cells: zero them, so that they carry
        # no mass.
        return kernel_t.mul_(self.allowed_t).mul_(self.allowed_f)

    def _reset(self, f0, g0):
        eps, kappa_f, kappa_g = self.eps, self.kappa_f, self.kappa_g
        self.f0, self.g0 = f0, g0
        self.kernel = self.kernel_t.transpose(1, 2).contiguous()
        # The offsets of the scaling updates, `kappa log a + (kappa - 1) f0 / eps`. The translation step moves the
        # absorbed potentials by the accumulated `shift`; the offsets are recomputed from a fixed base and `shift`,
        # never accumulated, so that float32 rounding cannot drift between them over long runs.
        self.base_f = kappa_f * self.log_a + ((kappa_f - 1.0) / eps) * f0
        self.base_g = kappa_g * self.log_b + ((kappa_g - 1.0) / eps) * g0
        self.offset_f, self.offset_g = self.base_f, self.base_g
        self.log_u, self.log_v = torch.zeros_like(f0), torch.zeros_like(g0)
        self.u, self.v = torch.ones_like(f0), torch.ones_like(g0)
        self.shift = torch.zeros_like(self.log_mass_b)
        if self.use_translation and kappa_g < 1.0:
            # log sum_j b_j exp(-g_j / rho_t); after every token update it is the log of the token-side mass.
            log_terms = torch.where(self.token_mask, self.log_b - g0 / self.rho_g, -INF)
            self.log_col_term = _masked_logsumexp(log_terms, -1)
        else:
            self.log_col_term = self.log_mass_b

    def potentials(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current `(f, g)`, zero on padding."""
        shift = self.shift[:, None]
        f = torch.where(self.frame_mask, self.f0 + shift + self.eps * self.log_u, 0.0)
        g = torch.where(self.token_mask, self.g0 - shift + self.eps * self.log_v, 0.0)
        return f, g

    def rebuild(self, rows: Optional[torch.Tensor] = None) -> None:
        """Absorb the scalings into the potentials and rebuild the kernel: of every example, or of `rows` only."""
        if rows is not None and rows.device.type == "cpu" and not bool(rows.any()):
            return  # reading a CPU tensor costs nothing, and skips work that would change nothing
        f0, g0 = self.potentials()
        log_kernel = self.log_kernel + (g0 / self.eps + self.log_b)[:, :, None]
        kernel_t = self._masked(_exp(log_kernel.add_((f0 / self.eps + self.log_a)[:, None, :])))
        if rows is None:
            self.kernel_t = kernel_t
            self._reset(f0, g0)
            return
        # Masked instead of indexed, so that the host never has to learn which rows: every tensor of the state
        # takes the rebuilt value on `rows` and keeps its own elsewhere.
        # The kernel, its transpose and the bases follow from (kernel_t, f0, g0); the rest is merged by hand.
        kept = {name: getattr(self, name) for name in self._ITERATES}
        self.kernel_t = torch.where(rows[:, None, None], kernel_t, self.kernel_t)
        self._reset(torch.where(rows[:, None], f0, self.f0), torch.where(rows[:, None], g0, self.g0))
        for name, previous in kept.items():
            rebuilt = getattr(self, name)
            setattr(self, name, torch.where(rows.view(-1, *[1] * (previous.dim() - 1)), rebuilt, previous))

    def step(self, measure: bool) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        """One frame update, translation step and token update.

        Returns the mass moved by the two updates (when `measure`, else `None`) and the new row and column masses.
        """
        tiny, bound, kappa_f, kappa_g, eps = self.tiny, self.bound, self.kappa_f, self.kappa_g, self.eps
        moved = None
        kv = torch.bmm(self.v[:, None, :], self.kernel_t)[:, 0, :].clamp_min_(tiny)
        log_u = torch.add(self.offset_f, kv.log(), alpha=-kappa_f).clamp_(-bound, bound)
        if measure:
            moved = (self.u * kv * (log_u - self.log_u).abs()).sum(-1)
        self.log_u, self.u = log_u, log_u.exp()
        row_mass = self.u * kv
        if self.use_translation:
            log_row_mass = row_mass.sum(-1).clamp_min(tiny).log()
            lam = (self.scale * (log_row_mass - self.log_col_term)).clamp_(self.min_shift, self.max_shift)
            # The plan and the kernel are invariant along (f + lam, g - lam); only the offsets see the shift.
            self.shift = self.shift + lam
            shift = self.shift[:, None]
            self.offset_f = torch.add(self.base_f, shift, alpha=(kappa_f - 1.0) / eps)
            if kappa_g < 1.0:
                self.offset_g = torch.add(self.base_g, shift, alpha=-(kappa_g - 1.0) / eps)
        ktu = torch.bmm(self.u[:, None, :], self.kernel)[:, 0, :].clamp_min_(tiny)
        log_v = torch.add(self.offset_g, ktu.log(), alpha=-kappa_g).clamp_(-bound, bound)
        if measure:
            moved = moved + (self.v * ktu * (log_v - self.log_v).abs()).sum(-1)
        self.log_v, self.v = log_v, log_v.exp()
        col_mass = self.v * ktu
        if self.use_translation and kappa_g < 1.0:
            self.log_col_term = col_mass.sum(-1).clamp_min(tiny).log()
        return moved, row_mass, col_mass

    def needs_rebuild(self, row_mass: torch.Tensor, col_mass: torch.Tensor) -> torch.Tensor:
        """`(B,)` bool: a scaling of a row or column that carries mass has left `[-bound / 2, bound / 2]`."""
        alive_rows, alive_cols = row_mass > self.dead_mass, col_mass > self.dead_mass
        largest = torch.maximum((self.log_u.abs() * alive_rows).amax(-1), (self.log_v.abs() * alive_cols).amax(-1))
        return largest > self.bound / 2

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the examples where `keep` is true."""
        for name in self._BATCHED:
            setattr(self, name, getattr(self, name)[keep])


def _iterate_scaling(problem: _Problem, max_iter, tol, translation_invariant, check_every):
    """Stabilised matrix scaling with absorption (see :class:`_ScalingState`), with finished examples removed.

    Every check reads its outcome on the host: which examples finished, whether a kernel needs rebuilding. On a CPU
    that costs nothing and lets finished examples leave the batch; on a GPU each read waits for all queued work
    (see :func:`_iterate_scaling_sync_free`).
    """
    batch = problem.a.shape[0]
    index = problem.nonempty.nonzero().flatten()
    state = _ScalingState(problem, index if index.numel() < batch else None, translation_invariant, branchless=False)

    out_f, out_g = torch.zeros_like(problem.a), torch.zeros_like(problem.b)
    n_iter = torch.zeros(batch, dtype=torch.long, device=problem.a.device)
    converged = ~problem.nonempty
    error = torch.where(converged, 0.0, INF).to(problem.a.dtype)

    def record(rows):
        f, g = state.potentials()
        out_f[index[rows]], out_g[index[rows]] = f[rows], g[rows]

    done = torch.zeros_like(index, dtype=torch.bool)
    for it in range(1, max_iter + 1):
        if not index.numel():
            break
        check = it % check_every == 0 or it == max_iter
        moved, row_mass, col_mass = state.step(measure=check)
        if not check:
            continue

        # Finished examples are recorded at once and leave the sub-batch once half of it has finished: removing them
        # copies three kernel-sized tensors, worth it only when it saves much work (and lingering examples come to
        # no harm from further iterations).
        needs_rebuild = state.needs_rebuild(row_mass, col_mass)
        # A scaling held at the clamp moves nothing and so reads as converged; only a fresh kernel can tell.
        newly = (moved < tol) & ~needs_rebuild & ~done
        running = index[~done]
        error[running], n_iter[running] = moved[~done], it
        if bool(newly.any()):
            record(newly)
            converged[index[newly]] = True
            done = done | newly
            if 2 * int(done.sum()) >= done.numel():
                keep = ~done
                index = index[keep]
                state.select(keep)
                needs_rebuild, done = needs_rebuild[keep], done[keep]
        if bool((needs_rebuild & ~done).any()):
            state.rebuild()
    record(~done)
    return out_f, out_g, n_iter, converged, error


def _iterate_scaling_sync_free(problem: _Problem, max_iter, tol, translation_invariant, check_every):
    """The scaling iteration of :func:`_iterate_scaling` without waiting for the device at every check.

    On a GPU the host queues work far ahead of the device, and every value it reads back (did an example finish,
    does a kernel need rebuilding) makes it wait until everything queued has run: the iteration then costs the
    launch latency of its small kernels one by one, and the model's forward pass can no longer hide the solver's
    launches. Here every decision is a tensor: all examples iterate in lock-step, an example's potentials are
    recorded (and so frozen) at the check where it converges, kernels are rebuilt by masking, and whether every
    example has finished is copied to pinned host memory and read only once the copy has landed, up to
    `_MAX_PENDING_CHECKS` checks late. Extra iterations after the last example converged change nothing recorded,
    so the results equal those of `_iterate_scaling` up to rounding. Under CUDA graph capture nothing is read
    back: the captured iteration runs all `max_iter` iterations.
    """
    batch = problem.a.shape[0]
    device = problem.a.device
    capturing = _capturing(device)
    state = _ScalingState(problem, None, translation_invariant, branchless=True)

    out_f, out_g = torch.zeros_like(problem.a), torch.zeros_like(problem.b)
    n_iter = torch.zeros(batch, dtype=torch.long, device=device)
    done = ~problem.nonempty
    error = torch.where(done, 0.0, INF).to(problem.a.dtype)
    if device.type == "cuda" and not capturing:
        # Whether all examples had finished, at each check, copied to the host as the device gets there.
        flags = torch.zeros(max_iter // check_every + 1, dtype=torch.bool, pin_memory=True)
    n_checks = 0
    pending = collections.deque()  # (event, flag) of the checks whose outcome has not been read yet
    for it in range(1, max_iter + 1):
        check = it % check_every == 0 or it == max_iter
        moved, row_mass, col_mass = state.step(measure=check)
        if check:
            needs_rebuild = state.needs_rebuild(row_mass, col_mass)
            newly = (moved < tol) & ~needs_rebuild & ~done
            error = torch.where(done, error, moved)
            n_iter = torch.where(done, n_iter, it)
            f, g = state.potentials()
            out_f = torch.where(newly[:, None], f, out_f)
            out_g = torch.where(newly[:, None], g, out_g)
            done = done | newly
            # As in the blocking iteration, one running example's need rebuilds every running example: fresh
            # scalings keep float32 rounding in the stopping criterion low for all of them.
            state.rebuild((needs_rebuild & ~done).any() & ~done)
            if device.type != "cuda":
                if bool(done.all()):  # computed already: reading it costs nothing
                    break
            elif not capturing:
                flag = flags[n_checks]
                flag.copy_(done.all(), non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))  # the copy's stream, whatever the current device
                pending.append((event, flag))
            n_checks += 1
        if _any_landed_flag_set(pending):
            break
    f, g = state.potentials()
    running = (~done)[:, None]
    return torch.where(running, f, out_f), torch.where(running, g, out_g), n_iter, done, error


def _any_landed_flag_set(pending: collections.deque) -> bool:
    """Read the flags of `(event, flag)` pairs whose copy has landed, oldest first; true once one is set.

    Waits only when more than `_MAX_PENDING_CHECKS` are in flight, and then for the oldest alone: the host may run
    ahead of the device, but not without bound.
    """
    while pending and (len(pending) > _MAX_PENDING_CHECKS or pending[0][0].query()):
        event, flag = pending.popleft()
        event.synchronize()
        if bool(flag):
            return True
    return False


# Checks whose outcome may be in flight before the sync-free iteration waits for the oldest one.
_MAX_PENDING_CHECKS = 4


class _SubProblem(_Problem):
    """The log-domain updates of :class:`_Problem` on a sub-batch, from the tensors of a scaling state."""

    def __init__(self, problem: _Problem, state: "_ScalingState"):
        self.eps = problem.eps
        self.kappa_frames, self.kappa_tokens = problem.kappa_frames, problem.kappa_tokens
        self.log_kernel, self.log_a, self.log_b = state.log_kernel, state.log_a, state.log_b
        self.frame_mask, self.token_mask = state.frame_mask, state.token_mask


def _op(fn, x: torch.Tensor, inplace: bool, *args, **kwargs) -> torch.Tensor:
    """`fn(x, *args)`, written into `x` when `inplace`."""
    return fn(x, *args, out=x, **kwargs) if inplace else fn(x, *args, **kwargs)


def _masked_fill(x: torch.Tensor, mask: torch.Tensor, value: float, inplace: bool) -> torch.Tensor:
    """`x.masked_fill(mask, value)`, written into `x` when `inplace`."""
    return x.masked_fill_(mask, value) if inplace else x.masked_fill(mask, value)


class _ValueWithEnvelopeGradient(torch.autograd.Function):
    """Passes `value` through and gives it the gradient `d value / d cost = plan` (the envelope theorem)."""

    @staticmethod
    def forward(ctx, cost, value, plan):
        ctx.save_for_backward(plan)
        ctx.cost_dtype = cost.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad_value):
        (plan,) = ctx.saved_tensors
        return (grad_value[:, None, None] * plan).to(ctx.cost_dtype), None, None


# Largest |log| of a scaling in the scaling iteration before the kernel is rebuilt.
_SCALING_BOUND = {torch.float32: 15.0, torch.float64: 150.0}


def _exp_floor(dtype: torch.dtype) -> float:
    """Smallest exponent `_exp` produces: a kernel entry there, times the smallest scaling, is still a normal float."""
    return math.log(torch.finfo(dtype).tiny) + _SCALING_BOUND[dtype] + 1.0


def _exp(x: torch.Tensor) -> torch.Tensor:
    """`exp` with its argument floored well above the subnormal range, in place when autograd allows.

    Subnormal numbers make `exp`, and the matrix products that multiply kernel entries by small scalings, tens of
    times slower on x86 CPUs. What the floor adds is below `exp(_exp_floor)` per cell (about 1e-31 in float32,
    1e-242 in float64), far under any tolerance; callers zero padded cells by multiplying with the mask.
    """
    floor = _exp_floor(x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return x.clamp_min(floor).exp()
    return x.clamp_min_(floor).exp_()


def _token_factor(normalised, peak, log_b, token_mask, kappa, eps):
    """The exact token update from exponentials normalised by their per-token `peak`, `(B, N, T)`.

    Returns the new `g` and the per-token factor that turns `normalised` into the plan (or kernel),
    `b_j exp(peak_j + g_j / eps)`. The factor is formed from the normalised sum, not from `g`: with a hard side the
    peak cancels exactly, which matters in float32 when `C / eps` is large.
    """
    log_sum = normalised.sum(2).clamp_min(torch.finfo(normalised.dtype).tiny).log()
    g = torch.where(token_mask, -kappa * eps * (log_sum + peak), 0.0)
    factor = log_b - kappa * log_sum
    if kappa < 1.0:
        factor = factor + (1.0 - kappa) * peak
    return g, factor.exp()


def _masked_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`logsumexp` that stays finite (about `log(tiny)`) for an all `-inf` slice, with finite gradients there.

    Overwrites `x` when autograd does not need it: callers pass temporaries.
    """
    peak = x.detach().amax(dim, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    inplace = not (torch.is_grad_enabled() and x.requires_grad)
    return _exp(_op(torch.sub, x, inplace, peak)).sum(dim).log() + peak.squeeze(dim)


def _generalised_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`sum p log(p / q) - p + q` over the last dimension, with `0 log 0 = 0` and finite gradients at `p = 0`."""
    tiny = torch.finfo(p.dtype).tiny
    log_ratio = p.clamp_min(tiny).log() - q.clamp_min(tiny).log()
    return (p * log_ratio - p + q).sum(-1)


def _mask(mask, shape, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return mask.to(device=device, dtype=torch.bool)


def _weights(weights, mask, name, dtype) -> torch.Tensor:
    if weights is None:
        return mask.to(dtype) / mask.sum(-1, keepdim=True).clamp_min(1).to(dtype)
    weights = torch.where(mask, weights.detach().to(device=mask.device, dtype=dtype), 0.0)
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"`{name}` must be finite and non-negative on valid positions.")
    return weights


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


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

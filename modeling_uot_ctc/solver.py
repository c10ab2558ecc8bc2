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
            The transport plan `P`. Zero on padded cells and for examples without a valid frame or token. Detached
            from the graph in the `"detach"` gradient mode.
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
        Cost between frame `i` and token `j`. Values in padded cells are ignored, even NaN or inf. Half-precision
        input is solved in float32; float32 and float64 are solved in their own precision.
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
        Largest number of iterations per example.
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
    _check_settings(eps, rho_frames, rho_tokens, temporal_order_weight, max_iter, tol, grad_mode, method, check_every)
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

    if grad_mode == "unrolled":
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
            problem = _Problem(
                cost, frame_mask, token_mask, frame_weights, token_weights, eps, rho_frames, rho_tokens,
                temporal_order_weight,
            )
            iterate = _iterate_scaling if method == "scaling" else _iterate_log_domain
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


def _check_settings(eps, rho_frames, rho_tokens, w_order, max_iter, tol, grad_mode, method, check_every):
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


def _kappa(rho: float, eps: float) -> float:
    return 1.0 if math.isinf(rho) else rho / (rho + eps)


class _Problem:
    """The inputs of one call in the computation dtype, and the formulas both iterations share.

    Cell tensors are stored token-major, `(B, N, T)`: on CPU, reductions over either axis are then fast (the frame
    axis is the long contiguous one), while reductions over a short last axis are several times slower.
    """

    def __init__(self, cost, frame_mask, token_mask, frame_weights, token_weights, eps, rho_frames, rho_tokens, w_order):
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
        self.frame_mask, self.token_mask = frame_mask, token_mask
        self.nonempty = frame_mask.any(-1) & token_mask.any(-1)
        self.a, self.b = a * frame_mask, b * token_mask
        tiny = torch.finfo(dtype).tiny
        self.log_a = torch.where(frame_mask, self.a.clamp_min(tiny).log(), 0.0)
        self.log_b = torch.where(token_mask, self.b.clamp_min(tiny).log(), 0.0)
        self.mass_a, self.mass_b = self.a.sum(-1), self.b.sum(-1)

        # log of the Gibbs kernel without its a_i b_j factor, -C / eps, and -inf on padding, in token-major memory
        # (elementwise results inherit their inputs' strides, so the copy comes first). Padded cells may hold NaN
        # or inf: nan_to_num and the mask multiplications keep them out of values and gradients. Without a graph
        # to record, everything happens in one buffer: on machines where fresh pages are costly, every
        # allocation of this size counts.
        inplace = not (torch.is_grad_enabled() and cost.requires_grad)
        if inplace:
            log_kernel = torch.empty((batch, n_tokens, n_frames), dtype=dtype, device=cost.device)
            log_kernel.copy_(cost.transpose(1, 2))
        else:
            log_kernel = cost.transpose(1, 2).contiguous().to(dtype)
        token_f, frame_f = token_mask.to(dtype)[:, :, None], frame_mask.to(dtype)[:, None, :]
        log_kernel = _op(torch.nan_to_num, log_kernel, inplace, nan=0.0, posinf=0.0, neginf=0.0)
        log_kernel = _op(torch.mul, _op(torch.mul, log_kernel, inplace, token_f), inplace, frame_f)
        if w_order > 0:
            penalty = temporal_order_penalty(token_mask, frame_mask, dtype)  # symmetric: this is its transpose
            log_kernel = _op(torch.add, log_kernel, inplace, penalty, alpha=w_order)
        if log_kernel.numel():
            low, high = torch.aminmax(log_kernel.detach())  # padding holds 0 here: the spread can only be overstated
            self.cost_spread = float(high - low)
        else:
            self.cost_spread = 0.0
        self.max_shift = self.cost_spread + self.eps
        log_frame_mask = torch.zeros_like(self.log_a).masked_fill_(~frame_mask, -INF)
        log_token_mask = torch.zeros_like(self.log_b).masked_fill_(~token_mask, -INF)
        log_kernel = _op(torch.mul, log_kernel, inplace, -1.0 / self.eps)
        log_kernel = _op(torch.add, log_kernel, inplace, log_token_mask[:, :, None])
        self.log_kernel = _op(torch.add, log_kernel, inplace, log_frame_mask[:, None, :])
        self.token_mask_f, self.frame_mask_f = token_f, frame_f

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
        plan = _op(torch.mul, _op(torch.mul, plan, inplace, self.token_mask_f), inplace, self.frame_mask_f)
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


def _iterate_scaling(problem: _Problem, max_iter, tol, translation_invariant, check_every):
    """Stabilised matrix scaling with absorption, batched, with finished examples removed from the batch.

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
    """
    eps = problem.eps
    dtype = problem.a.dtype
    tiny = torch.finfo(dtype).tiny
    # Scalings stay within exp(+-bound): plan entries lost to the kernel's floor are below exp(floor + 2 bound),
    # and rows or columns carrying less than that are "dead" (their clamped scalings do not ask for a rebuild).
    bound = _SCALING_BOUND[dtype]
    dead_mass = math.exp(_exp_floor(dtype) + 2 * bound)
    kappa_f, kappa_g = problem.kappa_frames, problem.kappa_tokens
    rho_f, rho_g = problem.rho_frames, problem.rho_tokens
    use_translation = translation_invariant and problem.uses_translation
    if use_translation:
        scale = rho_f if math.isinf(rho_g) else rho_f * rho_g / (rho_f + rho_g)
        max_shift = problem.max_shift
    batch = problem.a.shape[0]
    device = problem.a.device

    index = problem.nonempty.nonzero().flatten()
    st = {
        "log_kernel": problem.log_kernel,
        "log_a": problem.log_a,
        "log_b": problem.log_b,
        "frame_mask": problem.frame_mask,
        "token_mask": problem.token_mask,
        "token_mask_f": problem.token_mask_f,
        "frame_mask_f": problem.frame_mask_f,
        "log_mass_b": problem.mass_b.clamp_min(tiny).log(),
    }
    if index.numel() < batch:
        st = {k: v[index] for k, v in st.items()}

    def masked_kernel(kernel_t):
        # The exponential's floor leaves tiny values on padded cells: zero them, so that padding carries no mass.
        return kernel_t.mul_(st["token_mask_f"]).mul_(st["frame_mask_f"])

    # Start from exact log-domain updates so that no row or column of the first kernel underflows as a whole; the
    # token update's normalised exponentials are that kernel up to a per-token factor. The frame update is needed
    # only when the spread of -C / eps could push a whole frame below the exponential's floor.
    if problem.cost_spread / eps < 0.7 * abs(math.log(tiny)):
        f0 = torch.zeros_like(st["log_a"])
    else:
        f0, _ = _SubProblem(problem, st).frame_update(torch.zeros_like(st["log_b"]))
    shifted = st["log_kernel"] + (f0 / eps + st["log_a"])[:, None, :]
    peak = shifted.amax(2, keepdim=True).clamp_min(-1e30)  # an all-padding token has peak -inf
    kernel_t = masked_kernel(_exp(shifted.sub_(peak)))
    g0, factor = _token_factor(kernel_t, peak[:, :, 0], st["log_b"], st["token_mask"], kappa_g, eps)
    st["kernel_t"] = kernel_t.mul_(factor[:, :, None])

    out_f = torch.zeros_like(problem.a)
    out_g = torch.zeros_like(problem.b)
    n_iter = torch.zeros(batch, dtype=torch.long, device=device)
    converged = ~problem.nonempty
    error = torch.where(converged, 0.0, INF).to(dtype)

    def reset(f0, g0):
        st["f0"], st["g0"] = f0, g0
        st["kernel"] = st["kernel_t"].transpose(1, 2).contiguous()
        # The offsets of the scaling updates, `kappa log a + (kappa - 1) f0 / eps`. The translation step moves the
        # absorbed potentials by the accumulated `shift`; the offsets are recomputed from a fixed base and `shift`,
        # never accumulated, so that float32 rounding cannot drift between them over long runs.
        st["base_f"] = kappa_f * st["log_a"] + ((kappa_f - 1.0) / eps) * f0
        st["base_g"] = kappa_g * st["log_b"] + ((kappa_g - 1.0) / eps) * g0
        st["offset_f"], st["offset_g"] = st["base_f"], st["base_g"]
        st["log_u"], st["log_v"] = torch.zeros_like(f0), torch.zeros_like(g0)
        st["u"], st["v"] = torch.ones_like(f0), torch.ones_like(g0)
        st["shift"] = torch.zeros_like(st["log_mass_b"])
        if use_translation and kappa_g < 1.0:
            # log sum_j b_j exp(-g_j / rho_t); after every token update it is the log of the token-side mass.
            st["log_col_term"] = _masked_logsumexp(torch.where(st["token_mask"], st["log_b"] - g0 / rho_g, -INF), -1)
        else:
            st["log_col_term"] = st["log_mass_b"]

    def current_potentials():
        shift = st["shift"][:, None]
        f = torch.where(st["frame_mask"], st["f0"] + shift + eps * st["log_u"], 0.0)
        g = torch.where(st["token_mask"], st["g0"] - shift + eps * st["log_v"], 0.0)
        return f, g

    def rebuild():
        f0, g0 = current_potentials()
        log_kernel = st["log_kernel"] + (g0 / eps + st["log_b"])[:, :, None]
        st["kernel_t"] = masked_kernel(_exp(log_kernel.add_((f0 / eps + st["log_a"])[:, None, :])))
        reset(f0, g0)

    def record(rows):
        f, g = current_potentials()
        out_f[index[rows]], out_g[index[rows]] = f[rows], g[rows]

    reset(f0, g0)
    done = torch.zeros_like(index, dtype=torch.bool)
    for it in range(1, max_iter + 1):
        if not index.numel():
            break
        check = it % check_every == 0 or it == max_iter
        kv = torch.bmm(st["v"][:, None, :], st["kernel_t"])[:, 0, :].clamp_min_(tiny)
        log_u = torch.add(st["offset_f"], kv.log(), alpha=-kappa_f).clamp_(-bound, bound)
        if check:
            moved = (st["u"] * kv * (log_u - st["log_u"]).abs()).sum(-1)
        st["log_u"], st["u"] = log_u, log_u.exp()
        row_mass = st["u"] * kv
        if use_translation:
            log_row_mass = row_mass.sum(-1).clamp_min(tiny).log()
            lam = (scale * (log_row_mass - st["log_col_term"])).clamp_(-max_shift, max_shift)[:, None]
            # The plan and the kernel are invariant along (f + lam, g - lam); only the offsets see the shift.
            st["shift"] = st["shift"] + lam[:, 0]
            shift = st["shift"][:, None]
            st["offset_f"] = torch.add(st["base_f"], shift, alpha=(kappa_f - 1.0) / eps)
            if kappa_g < 1.0:
                st["offset_g"] = torch.add(st["base_g"], shift, alpha=-(kappa_g - 1.0) / eps)
        ktu = torch.bmm(st["u"][:, None, :], st["kernel"])[:, 0, :].clamp_min_(tiny)
        log_v = torch.add(st["offset_g"], ktu.log(), alpha=-kappa_g).clamp_(-bound, bound)
        if check:
            moved = moved + (st["v"] * ktu * (log_v - st["log_v"]).abs()).sum(-1)
        st["log_v"], st["v"] = log_v, log_v.exp()
        if use_translation and kappa_g < 1.0:
            st["log_col_term"] = (st["v"] * ktu).sum(-1).clamp_min(tiny).log()
        if not check:
            continue

        # Finished examples are recorded at once and leave the sub-batch once half of it has finished: removing them
        # copies three kernel-sized tensors, worth it only when it saves much work (and lingering examples come to
        # no harm from further iterations).
        alive_rows, alive_cols = row_mass > dead_mass, st["v"] * ktu > dead_mass
        largest = torch.maximum((st["log_u"].abs() * alive_rows).amax(-1), (st["log_v"].abs() * alive_cols).amax(-1))
        # A scaling held at the clamp moves nothing and so reads as converged; only a fresh kernel can tell.
        needs_rebuild = largest > bound / 2
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
                st = {k: v[keep] for k, v in st.items()}
                needs_rebuild, done = needs_rebuild[keep], done[keep]
        if bool((needs_rebuild & ~done).any()):
            rebuild()
    record(~done)
    return out_f, out_g, n_iter, converged, error


class _SubProblem(_Problem):
    """The log-domain updates of :class:`_Problem` on a sub-batch, from the tensors of a state dictionary."""

    def __init__(self, problem: _Problem, state: dict):
        self.eps = problem.eps
        self.kappa_frames, self.kappa_tokens = problem.kappa_frames, problem.kappa_tokens
        self.log_kernel, self.log_a, self.log_b = state["log_kernel"], state["log_a"], state["log_b"]
        self.frame_mask, self.token_mask = state["frame_mask"], state["token_mask"]


def _op(fn, x: torch.Tensor, inplace: bool, *args, **kwargs) -> torch.Tensor:
    """`fn(x, *args)`, written into `x` when `inplace`."""
    return fn(x, *args, out=x, **kwargs) if inplace else fn(x, *args, **kwargs)


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

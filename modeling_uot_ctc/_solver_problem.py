"""The solver's problem set-up (`_Problem`: the inputs in the computation dtype, the Gibbs kernel in the log domain),
the exact block updates both iterations share, the final plan and objective, and the envelope gradient."""

from __future__ import annotations

import math

import torch

from ._solver_numerics import (
    INF,
    _exp,
    _generalised_kl,
    _kappa,
    _mask,
    _masked_fill,
    _masked_logsumexp,
    _op,
    _token_factor,
    _weights,
)
from .costs import temporal_order_penalty


def frame_update(log_kernel, log_b, frame_mask, g, eps: float, kappa_frames: float):
    """The exact frame update of the log domain: the new `f` and `log sum_j b_j exp((g_j - C_ij) / eps)`.

    `log_kernel` is `-C / eps` token-major, `(B, N, T)`, with -inf on padding (see `_Problem`).
    """
    log_sum = _masked_logsumexp(log_kernel + (g / eps + log_b)[:, :, None], dim=1)
    f = torch.where(frame_mask, -kappa_frames * eps * log_sum, 0.0)
    return f, log_sum


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
        return frame_update(self.log_kernel, self.log_b, self.frame_mask, g, self.eps, self.kappa_frames)

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

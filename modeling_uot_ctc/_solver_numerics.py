"""Numerical helpers shared by the solver's modules: stable exponentials and log-sum-exps, generalised KL, masks,
marginal weights, and in-place arithmetic where autograd allows it."""

from __future__ import annotations

import contextlib
import math

import torch

INF = float("inf")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()

def _autocast_disabled(device: torch.device):
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()

def _kappa(rho: float, eps: float) -> float:
    return 1.0 if math.isinf(rho) else rho / (rho + eps)

def _op(fn, x: torch.Tensor, inplace: bool, *args, **kwargs) -> torch.Tensor:
    """`fn(x, *args)`, written into `x` when `inplace`."""
    return fn(x, *args, out=x, **kwargs) if inplace else fn(x, *args, **kwargs)

def _masked_fill(x: torch.Tensor, mask: torch.Tensor, value: float, inplace: bool) -> torch.Tensor:
    """`x.masked_fill(mask, value)`, written into `x` when `inplace`."""
    return x.masked_fill_(mask, value) if inplace else x.masked_fill(mask, value)

# Largest |log| of a scaling in the scaling iteration before the kernel is rebuilt.
_SCALING_BOUND = {torch.float32: 15.0, torch.float64: 150.0}

# Units in the last place of its operands below which a change of a potential counts as rounding (see
# `_moved_beyond_rounding`). Run far past convergence, the scaling iteration's float32 iterates kept moving by at most
# 1.51 such units: 150 random problems (cosine and uniform costs, 4 to 300 frames, eps 0.01 to 0.5, every kind of
# marginal, with and without the temporal prior, 4000 iterations) per kernel path,
# `python benchmarks/rounding_floor.py --method scaling --problems 150 --seed 11` under ATEN_CPU_CAPABILITY=default,
# avx2 and avx512. 4 leaves a margin of 2.6. The log domain uses the same floor differently (see
# `_iterate_log_domain`), and its own counts are in `solve_uot`'s `tol`.
_ROUNDING_ULPS = 4.0


def _moved_beyond_rounding(
    mass: torch.Tensor, change: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Mass moved by an update, `sum_i mass_i max(|change_i| - ulps eps_dtype magnitude_i, 0)`, per example.

    `change` is the change of the update's log-scalings (`df / eps`), and `magnitude` the size of the terms it is
    computed from. Floating-point updates from different but equally valid kernels (another summation order, another
    SIMD width) stop at slightly different points, near which they may cycle by a few units in the last place of
    those terms instead of reaching an exact fixed point: such a change moves no mass that any tolerance should see,
    and it is not counted. Without this floor a tolerance below float32's resolution could never be met on some CPUs
    and always on others.
    """
    floor = _ROUNDING_ULPS * torch.finfo(dtype).eps
    beyond = (change.detach().abs() - floor * magnitude.detach()).clamp_min_(0.0)
    return (mass.detach() * beyond).sum(-1)


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


def uniform_weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Weights uniform over each example's valid positions (summing to 1), zero on padding."""
    return mask.to(dtype) / mask.sum(-1, keepdim=True).clamp_min(1).to(dtype)


def _weights(weights, mask, name, dtype) -> torch.Tensor:
    if weights is None:
        return uniform_weights(mask, dtype)
    weights = torch.where(mask, weights.detach().to(device=mask.device, dtype=dtype), 0.0)
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"`{name}` must be finite and non-negative on valid positions.")
    return weights

"""Stabilised matrix scaling (the default iteration of the detached gradient mode), blocking and sync-free."""

from __future__ import annotations

import collections
import math
from typing import Optional

import torch

from ._solver_numerics import (
    INF,
    _SCALING_BOUND,
    _capturing,
    _exp,
    _exp_floor,
    _masked_logsumexp,
    _moved_beyond_rounding,
    _token_factor,
)
from ._solver_problem import _Problem, frame_update


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
            exact_f0, _ = frame_update(
                self.log_kernel, self.log_b, self.frame_mask, torch.zeros_like(self.log_b), eps, problem.kappa_frames
            )
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

        Returns the mass moved by the two updates beyond rounding (when `measure`, else `None`; see
        `_moved_beyond_rounding`) and the new row and column masses.
        """
        tiny, bound, kappa_f, kappa_g, eps = self.tiny, self.bound, self.kappa_f, self.kappa_g, self.eps
        moved = None
        kv = torch.bmm(self.v[:, None, :], self.kernel_t)[:, 0, :].clamp_min_(tiny)
        log_kv = kv.log()
        log_u = torch.add(self.offset_f, log_kv, alpha=-kappa_f).clamp_(-bound, bound)
        if measure:
            magnitude = self._update_magnitude(self.base_f, kappa_f, log_kv)
            moved = _moved_beyond_rounding(self.u * kv, log_u - self.log_u, magnitude, kv.dtype)
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
        log_ktu = ktu.log()
        log_v = torch.add(self.offset_g, log_ktu, alpha=-kappa_g).clamp_(-bound, bound)
        if measure:
            magnitude = self._update_magnitude(self.base_g, kappa_g, log_ktu)
            moved = moved + _moved_beyond_rounding(self.v * ktu, log_v - self.log_v, magnitude, ktu.dtype)
        self.log_v, self.v = log_v, log_v.exp()
        col_mass = self.v * ktu
        if self.use_translation and kappa_g < 1.0:
            self.log_col_term = col_mass.sum(-1).clamp_min(tiny).log()
        return moved, row_mass, col_mass

    def _update_magnitude(self, base: torch.Tensor, kappa: float, log_product: torch.Tensor) -> torch.Tensor:
        """The size of the terms a scaling update adds up: its base offset, the translation's share of the offset
        (none on a hard side), `kappa log(K v)` (or `log(K^T u)`), and 1 for the rounding of the product itself."""
        shift_share = (abs(kappa - 1.0) / self.eps) * self.shift.abs()[:, None]
        return base.abs().add_(log_product.abs(), alpha=kappa).add_(shift_share).add_(1.0)

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

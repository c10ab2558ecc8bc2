"""Detection diagnostics of a transport plan: how many tokens are found, how many frames drop out.

They make the frame-side relaxation ("degree of matching") visible during training; see METHOD.md section 6.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from ._solver_numerics import uniform_weights


@dataclass
class AlignmentDiagnostics:
    """Per-example diagnostics of a batch of plans. Every field has shape `(B,)` unless said otherwise.

    Attributes:
        token_coverage: fraction of valid tokens whose column mass is at least `coverage_threshold` times their
            weight (1.0 whenever the token side is hard).
        dropped_frame_fraction: fraction of valid frames whose normalised mass is below `drop_threshold`.
        mean_frame_mass: mean normalised frame mass (1.0 when every frame carries exactly its share).
        total_mass: `sum P`.
        frame_mass (`(B, T)`): normalised mass of each frame, `sum_j P_ij / a_i` (`sum_j P_ij * T` for uniform
            weights); 0 on padding.
        precision, recall: only when a reference alignment is given, else `None`. The plan assigns each frame
            that is not dropped to its heaviest token; precision is the fraction of assigned frames whose token
            matches the reference, recall the fraction of the reference's aligned frames that the plan assigns to
            the right token. NaN where the denominator is zero.
    """

    token_coverage: torch.Tensor
    dropped_frame_fraction: torch.Tensor
    mean_frame_mass: torch.Tensor
    total_mass: torch.Tensor
    frame_mass: torch.Tensor
    precision: Optional[torch.Tensor] = None
    recall: Optional[torch.Tensor] = None

    def summary(self) -> dict:
        """Batch means of the scalar fields (NaN entries ignored), as Python floats for a logger."""
        out = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None or field.name == "frame_mass":
                continue
            value = value.detach().float()
            out[field.name] = float(value.nanmean()) if value.numel() else float("nan")
        return out


@torch.no_grad()
def alignment_diagnostics(
    plan: torch.Tensor,
    frame_mask: Optional[torch.Tensor] = None,
    token_mask: Optional[torch.Tensor] = None,
    frame_weights: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    reference: Optional[torch.Tensor] = None,
    drop_threshold: float = 0.1,
    coverage_threshold: float = 0.5,
) -> AlignmentDiagnostics:
    """Compute :class:`AlignmentDiagnostics` from plans `(B, T, N)`.

    Args:
        plan: transport plans, zero on padding (as :func:`~modeling_uot_ctc.solver.solve_uot` returns them).
        frame_mask, token_mask: `True` on valid frames `(B, T)` and tokens `(B, N)`; default everything valid.
        frame_weights, token_weights: the reference marginals the plan was solved with; default uniform over the
            valid positions, as in the solver.
        reference: optional `(B, T)` integer tensor giving, for each frame, the index of the token it belongs to
            in a reference alignment (word or character timings, a forced alignment), or -1 for none (silence).
        drop_threshold: a frame whose normalised mass is below this counts as dropped.
        coverage_threshold: a token counts as covered when its mass reaches this fraction of its weight.
    """
    batch, n_frames, n_tokens = plan.shape
    plan = plan.float()
    if frame_mask is None:
        frame_mask = torch.ones(batch, n_frames, dtype=torch.bool, device=plan.device)
    if token_mask is None:
        token_mask = torch.ones(batch, n_tokens, dtype=torch.bool, device=plan.device)
    frame_mask, token_mask = frame_mask.bool(), token_mask.bool()
    a = _weights(frame_weights, frame_mask)
    b = _weights(token_weights, token_mask)
    frame_mask, token_mask = frame_mask & (a > 0), token_mask & (b > 0)
    n_valid_frames = frame_mask.sum(-1).float()
    n_valid_tokens = token_mask.sum(-1).float()

    row_mass, col_mass = plan.sum(2), plan.sum(1)
    frame_mass = torch.where(frame_mask, row_mass / a.clamp_min(1e-30), 0.0)
    dropped = (frame_mass < drop_threshold) & frame_mask
    covered = (col_mass >= coverage_threshold * b) & token_mask

    precision = recall = None
    if reference is not None:
        if reference.shape != (batch, n_frames):
            raise ValueError(f"`reference` must have shape {(batch, n_frames)}, got {tuple(reference.shape)}.")
        reference = reference.to(plan.device).long()
        masked_plan = plan.masked_fill(~token_mask[:, None, :], -1.0)
        predicted = masked_plan.argmax(-1)
        assigned = frame_mask & ~dropped
        aligned_in_reference = frame_mask & (reference >= 0)
        correct = assigned & (predicted == reference)
        precision = correct.sum(-1) / assigned.sum(-1).float()
        recall = (correct & aligned_in_reference).sum(-1) / aligned_in_reference.sum(-1).float()

    return AlignmentDiagnostics(
        token_coverage=covered.sum(-1) / n_valid_tokens,
        dropped_frame_fraction=dropped.sum(-1) / n_valid_frames,
        mean_frame_mass=frame_mass.sum(-1) / n_valid_frames,
        total_mass=row_mass.sum(-1),
        frame_mass=frame_mass,
        precision=precision,
        recall=recall,
    )


def _weights(weights, mask):
    # Unchecked, unlike the solver's: reading values back here would make the host wait for the device.
    if weights is None:
        return uniform_weights(mask, torch.float32)
    return torch.where(mask, weights.float(), 0.0)


def frame_fit_spread(
    cost: torch.Tensor, frame_mask: torch.Tensor, token_mask: torch.Tensor, eps: float
) -> torch.Tensor:
    """How unequally each example's frames fit its transcript, in units of `eps`, shape `(B,)` (NaN without two
    valid frames and a token).

    A frame's fit is the soft minimum of its costs over the tokens, `-eps log mean_j exp(-C_ij / eps)`; the spread is
    the standard deviation of the fits over the valid frames, divided by `eps`. The frame-side relaxation can only
    drop frames that fit clearly worse than the rest: with a spread well below 1 every frame keeps about its share
    whatever `rho_frames` is, and a cost that does not vary across frames (spread 0) gives a rank-one plan.
    """
    frame_mask, token_mask = frame_mask.bool(), token_mask.bool()
    scaled = (-cost.float() / eps).masked_fill(~token_mask[:, None, :], float("-inf"))
    n_tokens = token_mask.sum(-1).clamp_min(1).float()
    fit = -(torch.logsumexp(scaled, dim=-1) - n_tokens.log()[:, None])  # (B, T), in units of eps
    fit = torch.where(frame_mask, fit, 0.0)
    n_frames = frame_mask.sum(-1).float()
    mean = fit.sum(-1) / n_frames.clamp_min(1)
    variance = (((fit - mean[:, None]) ** 2) * frame_mask).sum(-1) / (n_frames - 1).clamp_min(1)
    usable = (n_frames > 1) & token_mask.any(-1)
    return torch.where(usable, variance.sqrt(), float("nan"))


def frames_per_token(plan: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """The effective number of frames each token pools, `exp(entropy)` of its column of the plan normalised to sum
    to 1, averaged over the valid tokens with mass; shape `(B,)`. `T / N` for the diagonal plan, `T` when every token
    pools every frame equally (the rank-one plan of a flat cost)."""
    plan = plan.float()
    column = plan / plan.sum(1, keepdim=True).clamp_min(1e-30)
    entropy = -(column * column.clamp_min(1e-30).log()).sum(1)  # (B, N)
    counted = token_mask.bool() & (plan.sum(1) > 0)
    return (entropy.exp() * counted).sum(-1) / counted.sum(-1)


def token_discrimination(pooled: torch.Tensor, teacher_states: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """The share of each example's valid tokens `j` whose pooled frames are closer (cosine) to `z_j` than to every
    other token state of the utterance; shape `(B,)`. A rank-one plan pools the same frames for every token and
    scores `1 / N` (ties go to the first token), which `1 / token_mask.sum(-1)` gives for comparison."""
    token_mask = token_mask.bool()
    pooled = torch.nn.functional.normalize(pooled.float(), dim=-1, eps=1e-8)
    states = torch.nn.functional.normalize(teacher_states.float(), dim=-1, eps=1e-8)
    similarity = torch.bmm(pooled, states.transpose(1, 2)).masked_fill(~token_mask[:, None, :], float("-inf"))
    own = torch.arange(token_mask.shape[1], device=token_mask.device)
    hits = (similarity.argmax(-1) == own[None, :]) & token_mask
    return hits.sum(-1) / token_mask.sum(-1)

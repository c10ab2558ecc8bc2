"""Plans that no solver computes: the controls of the transfer experiments.

`diagonal_plan` knows nothing but the lengths (the valid frames cut into equal consecutive runs, one per token); it
is registered as the aligner `"diagonal"`. `span_plan` pools each token from the frames of its word, given by the
corpus's word timings (`token_frame_spans`): the model's `"oracle"` aligner, an upper bound on what an alignment can
give the transfer. Both return :class:`~modeling_uot_ctc.solver.UOTResult` so that the model treats them as any
other aligner's plans.
"""

from __future__ import annotations

import torch

from .solver import UOTResult, register_aligner


def _result(plan: torch.Tensor) -> UOTResult:
    batch = plan.shape[0]
    zeros = torch.zeros(batch, device=plan.device)
    return UOTResult(
        plan=plan,
        value=zeros,
        frame_potentials=torch.zeros(plan.shape[:2], device=plan.device),
        token_potentials=torch.zeros(batch, plan.shape[2], device=plan.device),
        n_iter=torch.zeros(batch, dtype=torch.long, device=plan.device),
        converged=torch.ones(batch, dtype=torch.bool, device=plan.device),
        marginal_error=zeros,
    )


def diagonal_plan(cost: torch.Tensor, frame_mask=None, token_mask=None, **settings) -> UOTResult:
    """The no-information plan: valid frame `i` (counted among the valid frames, `T` of them) goes whole to valid
    token `floor(i N / T)`, with mass `1 / T`. The cost and the solver settings are ignored; so is the order of
    padding holes. Differentiable nowhere (a constant)."""
    batch, n_frames, n_tokens = cost.shape
    device = cost.device
    if frame_mask is None:
        frame_mask = torch.ones(batch, n_frames, dtype=torch.bool, device=device)
    if token_mask is None:
        token_mask = torch.ones(batch, n_tokens, dtype=torch.bool, device=device)
    frame_mask, token_mask = frame_mask.bool(), token_mask.bool()
    n_valid_frames = frame_mask.sum(-1, keepdim=True)
    n_valid_tokens = token_mask.sum(-1, keepdim=True)
    frame_rank = frame_mask.cumsum(-1) - 1  # (B, T)
    token_of_frame = frame_rank * n_valid_tokens // n_valid_frames.clamp_min(1)  # rank among the valid tokens
    token_rank = torch.where(token_mask, token_mask.cumsum(-1) - 1, -1)  # (B, N)
    plan = (token_of_frame[:, :, None] == token_rank[:, None, :]) & frame_mask[:, :, None] & token_mask[:, None, :]
    plan = plan.float() / n_valid_frames[:, :, None].clamp_min(1)
    return _result(plan)


def span_mask(token_frame_spans: torch.Tensor, n_frames: int) -> torch.Tensor:
    """`(B, n_frames, N)` bool: frame `i` lies in token `j`'s span `[start, end)` (`token_frame_spans`, `(B, N, 2)`)."""
    positions = torch.arange(n_frames, device=token_frame_spans.device)[None, :, None]
    return (positions >= token_frame_spans[:, None, :, 0]) & (positions < token_frame_spans[:, None, :, 1])


def span_plan(token_frame_spans: torch.Tensor, frame_mask: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Each valid token spread evenly, with mass `1 / N`, over the valid frames `start <= i < end` of its span.

    Args:
        token_frame_spans (`torch.LongTensor` of shape `(B, N, 2)`): `[start, end)` frame indices of each token's
            word (`modeling_uot_ctc.data.token_frame_spans`); an empty span (`end <= start`) gets no mass.
        frame_mask, token_mask: `True` on valid frames `(B, T)` and tokens `(B, N)`.

    Returns:
        `torch.Tensor` of shape `(B, T, N)`, float32.
    """
    inside = span_mask(token_frame_spans.to(frame_mask.device), frame_mask.shape[1])
    inside = inside & frame_mask.bool()[:, :, None] & token_mask.bool()[:, None, :]
    counts = inside.sum(1, keepdim=True).float()  # frames per token
    n_tokens = token_mask.sum(-1).float().clamp_min(1)[:, None, None]
    return inside.float() / counts.clamp_min(1) / n_tokens


register_aligner("diagonal", diagonal_plan)


def oracle_plan(
    cost: torch.Tensor, frame_mask, token_mask, *, token_frame_spans: torch.Tensor, **settings
) -> UOTResult:
    """The `"oracle"` aligner: :func:`span_plan` from the word timings, in the aligners' signature (the cost and the
    solver settings are ignored). Not in `ALIGNERS`: the model binds `token_frame_spans` from its `forward`."""
    batch, n_frames, n_tokens = cost.shape
    if frame_mask is None:
        frame_mask = torch.ones(batch, n_frames, dtype=torch.bool, device=cost.device)
    if token_mask is None:
        token_mask = torch.ones(batch, n_tokens, dtype=torch.bool, device=cost.device)
    return _result(span_plan(token_frame_spans, frame_mask, token_mask))

"""The transfer after the adapter, as functions of tensors: the cost the aligner solves, the teacher's centring, the
pooled frames, the transfer loss (cosine, transport, contrastive) and the diagnostics the Trainer logs.

`Wav2Vec2ForCTCWithUOT` calls :func:`transfer_terms` once per training step, eagerly or replayed from CUDA graphs
(`cuda_graphs.TransferGraphs`); the experiments reuse :func:`alignment_cost` and :func:`centred_states` to score
plans. Nothing here reads a config: every setting is an argument.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .costs import character_anchor_cost, cosine_cost, cost_spread
from .diagnostics import alignment_diagnostics, frame_fit_spread, frames_per_token, token_discrimination
from .reference_plans import span_mask


# The order of the `stats` that `transfer_terms` returns: fields of `Wav2Vec2UOTOutput`.
TRANSFER_STATS = (
    "token_coverage", "dropped_frame_fraction", "transported_mass", "alignment_converged", "token_discrimination",
    "cost_spread_over_eps", "frames_per_token", "padding_mass",
)


def alignment_cost(
    frames: torch.Tensor,
    teacher_states: torch.Tensor,
    frame_mask: torch.Tensor,
    token_mask: torch.Tensor,
    *,
    anchor_weight: float = 0.0,
    cost_scale: str = "none",
    log_probs: Optional[torch.Tensor] = None,
    token_characters: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The cost the aligner solves: the cosine cost between adapted frames and (transformed) teacher states, blended
    with the acoustic anchor (`(1 - anchor_weight) * cosine + anchor_weight * anchor`, see
    `Wav2Vec2UOTConfig.alignment_anchor_weight`), then scaled as `cost_scale` says. Shape `(B, T, N)`, float32."""
    cost = cosine_cost(frames, teacher_states, frame_mask, token_mask)
    if anchor_weight > 0:
        anchor = character_anchor_cost(log_probs, token_characters, frame_mask, token_mask)
        cost = (1.0 - anchor_weight) * cost + anchor_weight * anchor
    if cost_scale == "std":
        cost = cost / cost_spread(cost.detach(), frame_mask, token_mask)[:, None, None]
    return cost


def anchor_inputs(logits: torch.Tensor, token_characters: torch.Tensor, keep_gradient: bool = False) -> dict:
    """The acoustic anchor's inputs from the CTC head's `logits` `(B, T, V)` and the ids spelling each teacher token
    `(B, N, V')`: float32 log-posteriors (detached unless `keep_gradient`) and the characters padded to the head's
    `V` ids, as keyword arguments of :func:`transfer_terms`."""
    log_probs = nn.functional.log_softmax(logits, dim=-1, dtype=torch.float32)
    characters = token_characters.to(logits.device)
    missing = logits.shape[-1] - characters.shape[-1]
    if missing < 0:
        raise ValueError(
            f"`teacher_token_characters` spans {characters.shape[-1]} vocabulary ids but the CTC head has "
            f"{logits.shape[-1]}: build it with the model's tokenizer."
        )
    # A tokenizer may list fewer ids than the head (added tokens, a resized head): those spell nothing.
    return dict(
        log_probs=log_probs if keep_gradient else log_probs.detach(),
        token_characters=nn.functional.pad(characters, (0, missing)),
    )


def centred_states(teacher_states: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Each utterance's valid teacher states minus their mean (`teacher_centering="utterance"`); zero on padding."""
    weights = token_mask.to(teacher_states.dtype)[:, :, None]
    mean = (teacher_states * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1)
    return (teacher_states - mean) * weights


def transfer_terms(
    frames: torch.Tensor,
    frame_mask: torch.Tensor,
    teacher_states: torch.Tensor,
    token_mask: torch.Tensor,
    *,
    aligner: Callable,
    solver_settings: dict,
    kt_loss_type: str = "cosine",
    kt_temperature: float = 0.1,
    teacher_centering: str = "none",
    anchor_weight: float = 0.0,
    cost_scale: str = "none",
    log_probs: Optional[torch.Tensor] = None,
    token_characters: Optional[torch.Tensor] = None,
    token_frame_spans: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The transfer after the adapter: cost, plan, pooled frames, loss and diagnostics.

    A function of tensors only, so that it can be captured as a CUDA graph (see `Wav2Vec2UOTConfig.kt_cuda_graphs`).
    Padding beyond the masks, whatever it holds, changes its results only within the solver's tolerance (the padded
    problem sums in another order, so its iteration may stop at another check).

    Args:
        frames (`torch.Tensor` of shape `(B, T, D)`): adapted acoustic states.
        frame_mask (`torch.BoolTensor` of shape `(B, T)`): `True` on valid frames.
        teacher_states (`torch.Tensor` of shape `(B, N, D)`): the teacher's token states; padding may hold anything.
        token_mask (`torch.BoolTensor` of shape `(B, N)`): `True` on valid tokens.
        aligner: an entry of `modeling_uot_ctc.solver.ALIGNERS`, or any function of that signature.
        solver_settings: its keyword arguments (`Wav2Vec2UOTConfig.solver_settings`).
        kt_loss_type, kt_temperature, teacher_centering: as in the config.
        anchor_weight, cost_scale: the config's `alignment_anchor_weight` and `alignment_cost_scale`.
        log_probs (`(B, T, V)`), token_characters (`(B, N, V)`): the anchor's inputs, when `anchor_weight > 0`.
        token_frame_spans (`(B, N, 2)`, *optional*): each token's word span in frames, for the `padding_mass`
            diagnostic (NaN without them).

    Returns:
        `(kt_loss, plans, stats)`: the loss `()`, the plans `(B, T, N)` in float32, and `stats`, the batch means of
        the diagnostics named in `TRANSFER_STATS`, in that order.
    """
    # Padded teacher positions may hold anything; zeros keep them out of every sum below.
    teacher_states = torch.where(token_mask[:, :, None], teacher_states.to(frames.dtype), 0.0)
    if teacher_centering == "utterance":
        teacher_states = centred_states(teacher_states, token_mask)
    cost = alignment_cost(
        frames, teacher_states, frame_mask, token_mask, anchor_weight=anchor_weight, cost_scale=cost_scale,
        log_probs=log_probs, token_characters=token_characters,
    )
    result = aligner(cost, frame_mask, token_mask, **solver_settings)

    # The pooling and the loss run in float32 whatever the training precision: plan entries are about 1 / (T N) and
    # token masses can be 0, both beyond what float16 holds.
    with torch.autocast(device_type=frames.device.type, enabled=False):
        plans = result.plan.float()
        frames, teacher_states, cost = frames.float(), teacher_states.float(), cost.float()
        # Each token's acoustic counterpart: the plan-weighted mean of the frames that transport to it.
        token_mass = plans.sum(1)  # (B, N)
        pooled = torch.bmm(plans.transpose(1, 2), frames) / token_mass.clamp_min(1e-30)[:, :, None]
        pooled_unit = nn.functional.normalize(pooled, dim=-1, eps=1e-8)
        states_unit = nn.functional.normalize(teacher_states, dim=-1, eps=1e-8)
        n_tokens = token_mask.sum(-1)
        per_example = torch.zeros(frames.shape[0], device=frames.device)
        if kt_loss_type in ("cosine", "cosine+transport", "cosine+infonce"):
            distance = 1.0 - (pooled_unit * states_unit).sum(-1)
            per_example = per_example + (distance * token_mask).sum(-1) / n_tokens.clamp_min(1)
        if kt_loss_type == "cosine+transport":
            per_example = per_example + (cost * plans).sum((1, 2))
        if kt_loss_type in ("infonce", "cosine+infonce"):
            per_example = per_example + _contrastive_loss(pooled_unit, states_unit, token_mask, kt_temperature)
        # An example counts when it has tokens, frames, and a plan (the oracle gives none without word timings).
        # (A NaN plan still counts, so that a failed solve shows in the loss rather than vanishing from it.)
        has_tokens = (n_tokens > 0) & frame_mask.any(-1) & (token_mass.sum(-1) != 0)
        kt_loss = torch.where(has_tokens, per_example, 0.0).sum() / has_tokens.sum().clamp_min(1)

    diagnostics = alignment_diagnostics(result.plan, frame_mask, token_mask)
    with torch.no_grad():
        eps = solver_settings.get("eps", 1.0)
        discrimination = token_discrimination(pooled.detach(), teacher_states, token_mask)
        spread = frame_fit_spread(cost.detach(), frame_mask, token_mask, eps)
        per_token = frames_per_token(plans.detach(), token_mask)
        padding = padding_share(plans.detach(), frame_mask, token_mask, token_frame_spans)

    def batch_mean(values):
        # A masked mean rather than indexing, which would wait for the device (NaN when no example counts).
        usable = has_tokens & ~values.isnan()
        return (torch.where(usable, values, 0.0)).sum() / usable.sum()

    stats = torch.stack([
        batch_mean(diagnostics.token_coverage),
        batch_mean(diagnostics.dropped_frame_fraction),
        batch_mean(diagnostics.total_mass),
        batch_mean(result.converged.float()),
        batch_mean(discrimination.float()),
        batch_mean(spread),
        batch_mean(per_token),
        batch_mean(padding),
    ])
    return kt_loss, plans, stats


def padding_share(
    plans: torch.Tensor, frame_mask: torch.Tensor, token_mask: torch.Tensor, token_frame_spans: Optional[torch.Tensor]
) -> torch.Tensor:
    """Per example, the share of the plan's mass on valid frames inside no valid token's span `[start, end)`: the
    mass on silence and noise, shape `(B,)`. NaN without spans, and for an example whose spans are all empty (no
    word timings)."""
    if token_frame_spans is None:
        return torch.full(plans.shape[:1], float("nan"), device=plans.device)
    spans = token_frame_spans.to(plans.device)
    in_word = span_mask(spans, plans.shape[1]) & token_mask[:, None, :]
    outside = frame_mask & ~in_word.any(-1)
    share = (plans.sum(-1) * outside).sum(-1) / plans.sum((1, 2)).clamp_min(1e-30)
    timed = ((spans[..., 1] > spans[..., 0]) & token_mask).any(-1)
    return torch.where(timed, share, float("nan"))


def _contrastive_loss(pooled_unit, states_unit, token_mask, temperature: float) -> torch.Tensor:
    """Per example, the mean over its valid tokens of the cross-entropy of `cos(xhat_j, z_k) / temperature` over every
    valid token `k` of the batch, the target being its own state; shape `(B,)`."""
    batch, n_tokens, width = states_unit.shape
    candidates = states_unit.reshape(batch * n_tokens, width)
    logits = torch.matmul(pooled_unit, candidates.t()) / temperature  # (B, N, B N)
    logits = logits.masked_fill(~token_mask.reshape(1, 1, -1), float("-inf"))
    own = torch.arange(batch * n_tokens, device=logits.device).reshape(batch, n_tokens)
    log_probs = logits.log_softmax(-1)
    loss = -log_probs.gather(-1, own[:, :, None]).squeeze(-1)  # (B, N); padding rows are -inf - (-inf): masked
    loss = torch.where(token_mask, loss, 0.0)
    return loss.sum(-1) / token_mask.sum(-1).clamp_min(1)

"""Cost matrices between acoustic frames and token states, for :func:`modeling_uot_ctc.solver.solve_uot`."""

from __future__ import annotations

from typing import Optional

import torch

from ._solver_numerics import _autocast_disabled


def cosine_cost(
    frames: torch.Tensor,
    tokens: torch.Tensor,
    frame_mask: Optional[torch.Tensor] = None,
    token_mask: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-8,
) -> torch.Tensor:
    """Cosine distance `C_ij = 1 - cos(x_i, z_j)` between every frame and every token of each example.

    Args:
        frames (`torch.Tensor` of shape `(B, T, D)`):
            Acoustic states, already projected to the token states' width `D`.
        tokens (`torch.Tensor` of shape `(B, N, D)`):
            Token states of the teacher.
        frame_mask (`torch.Tensor` of shape `(B, T)`, *optional*):
            `True` on valid frames. Padded frames may hold anything, NaN included: they are replaced by zeros
            before any arithmetic, so they reach neither the values nor the gradients.
        token_mask (`torch.Tensor` of shape `(B, N)`, *optional*):
            `True` on valid tokens, with the same treatment of padding.
        norm_eps (`float`, defaults to 1e-8):
            Lower bound on a vector's norm before dividing by it: a zero vector has cosine 0 with everything
            (cost 1) and a finite gradient.

    Returns:
        `torch.Tensor` of shape `(B, T, N)`: values in `[0, 2]`, zero on padded cells. Computed in float32 (float64
        if an input is float64) whatever the inputs' precision and the autocast state, and returned in that dtype:
        a half-precision product would move the Gibbs kernel's exponent `-C / eps` by up to about 0.08 at
        `eps = 0.1`, and float16 cannot hold `norm_eps`, so that zero vectors would give 0 / 0. Gradients reach
        half-precision inputs in their own dtype.
    """
    if frames.dim() != 3 or tokens.dim() != 3 or frames.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"`frames` and `tokens` must be (B, T, D) and (B, N, D) with the same B, got {tuple(frames.shape)} "
            f"and {tuple(tokens.shape)}."
        )
    if frames.shape[-1] != tokens.shape[-1]:
        raise ValueError(
            f"Frames have width {frames.shape[-1]} but tokens {tokens.shape[-1]}: project the frames to the token "
            "width first (the model's adapter does this)."
        )
    dtype = torch.promote_types(torch.promote_types(frames.dtype, tokens.dtype), torch.float32)
    with _autocast_disabled(frames.device):
        frames, tokens = frames.to(dtype), tokens.to(dtype)
        if frame_mask is not None:
            frames = torch.where(frame_mask[:, :, None].bool(), frames, 0.0)
        if token_mask is not None:
            tokens = torch.where(token_mask[:, :, None].bool(), tokens, 0.0)
        frames = torch.nn.functional.normalize(frames, dim=-1, eps=norm_eps)
        tokens = torch.nn.functional.normalize(tokens, dim=-1, eps=norm_eps)
        cost = 1.0 - torch.bmm(frames, tokens.transpose(1, 2))
        if frame_mask is not None:
            cost = cost * frame_mask[:, :, None].to(dtype)
        if token_mask is not None:
            cost = cost * token_mask[:, None, :].to(dtype)
    return cost


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


def character_anchor_cost(
    log_probs: torch.Tensor,
    token_characters: torch.Tensor,
    frame_mask: Optional[torch.Tensor] = None,
    token_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The acoustic anchor: `C_ij = 1 - max_{c in units(j)} p_i(c)`, from the CTC head's own posteriors.

    `units(j)` are the CTC vocabulary entries that spell word piece `j`: its characters, or with a word-piece
    vocabulary (`modeling_uot_ctc.word_pieces`) the piece itself where it is a unit. A frame fits a word piece when
    the recogniser hears one of the piece's units in it. Frames where the blank
    (or a character of no piece) dominates cost close to 1 for every token, so that an unbalanced plan can leave them
    out. Unlike the cosine cost it varies across frames from the first step of fine-tuning a trained recogniser,
    whatever the adapter has learnt.

    Args:
        log_probs (`torch.Tensor` of shape `(B, T, V)`):
            Log-probabilities of the CTC vocabulary at each frame (`log_softmax` of the logits).
        token_characters (`torch.Tensor` of shape `(B, N, V)`):
            1 where vocabulary id `c` spells part of token `j` (`modeling_uot_ctc.data.token_characters` builds it
            from the teacher's word pieces); a token without any unit costs 1 everywhere.
        frame_mask, token_mask: `True` on valid frames `(B, T)` and tokens `(B, N)`.

    Returns:
        `torch.Tensor` of shape `(B, T, N)` in float32, values in `[0, 1]`, zero on padded cells.
    """
    if (
        log_probs.dim() != 3 or token_characters.dim() != 3 or log_probs.shape[-1] != token_characters.shape[-1]
        or log_probs.shape[0] != token_characters.shape[0]
    ):
        raise ValueError(
            f"`log_probs` (B, T, V) and `token_characters` (B, N, V) must share B and V, got "
            f"{tuple(log_probs.shape)} and {tuple(token_characters.shape)}."
        )
    with _autocast_disabled(log_probs.device):
        probs = log_probs.float().exp()
        characters = token_characters.to(device=probs.device, dtype=torch.float32)
        # A (B, T, N, U) product for the max over each piece's units, U the units any piece of the batch uses: tens
        # for a character vocabulary, and a word-piece vocabulary's thousand entries would not fit otherwise.
        used = characters.reshape(-1, characters.shape[-1]).ne(0).any(0).nonzero().flatten()
        if not used.numel():  # no piece has a unit: one all-zero column, every cell costs 1 and autograd still flows
            used = used.new_zeros(1)
        affinity = (probs[..., used][:, :, None, :] * characters[..., used][:, None, :, :]).amax(-1)
        cost = 1.0 - affinity
        # `where`, not a product: padded frames' posteriors may hold anything, NaN included.
        if frame_mask is not None:
            cost = torch.where(frame_mask[:, :, None].bool(), cost, 0.0)
        if token_mask is not None:
            cost = torch.where(token_mask[:, None, :].bool(), cost, 0.0)
    return cost


def cost_spread(cost: torch.Tensor, frame_mask: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """The standard deviation of each example's cost over its valid cells, shape `(B,)` (1 where it is 0 or
    undefined, so that dividing by it is always safe)."""
    cells = (frame_mask[:, :, None] & token_mask[:, None, :]).float()
    count = cells.sum((1, 2)).clamp_min(1)
    mean = (cost * cells).sum((1, 2)) / count
    variance = (((cost - mean[:, None, None]) ** 2) * cells).sum((1, 2)) / count
    spread = variance.sqrt()
    return torch.where(spread > 1e-6, spread, torch.ones_like(spread))

"""The transfer's tensor functions (`modeling_uot_ctc.transfer`), alone: the cost the aligner solves, the centred
teacher, the losses, the diagnostics, and what the CUDA graphs rely on (padding beyond the masks changes nothing,
autocast changes nothing). Each is checked against a computation written out here."""

import math

import numpy as np
import pytest
import torch

from modeling_uot_ctc import solve_uot
from modeling_uot_ctc.costs import character_anchor_cost, cost_spread
from modeling_uot_ctc.reference_plans import diagonal_plan, oracle_plan
from modeling_uot_ctc.transfer import alignment_cost, anchor_inputs, centred_states, padding_share, transfer_terms

TEACHER_WIDTH = 24


def test_cost_scale_std_measures_eps_in_units_of_the_cost_spread():
    gen = torch.Generator().manual_seed(1)
    frames, tokens = torch.randn(2, 7, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    frame_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    token_mask = torch.ones(2, 3, dtype=torch.bool)
    scaled = alignment_cost(frames, tokens, frame_mask, token_mask, cost_scale="std")
    for b, n_frames in enumerate((7, 4)):
        cells = scaled[b, :n_frames].flatten().numpy()
        assert np.std(cells) == pytest.approx(1.0, rel=1e-5)
    assert (scaled[1, 4:] == 0).all()
    flat = torch.zeros(1, 3, 2)
    assert cost_spread(flat, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)) == 1


def test_anchor_blend_and_centred_teacher():
    gen = torch.Generator().manual_seed(2)
    frames, tokens = torch.randn(1, 6, 8, generator=gen), torch.randn(1, 4, 8, generator=gen)
    masks = torch.ones(1, 6, dtype=torch.bool), torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    log_probs = torch.randn(1, 6, 5, generator=gen).log_softmax(-1)
    characters = (torch.rand(1, 4, 5, generator=gen) > 0.5).float()
    cosine = alignment_cost(frames, tokens, *masks)
    anchor = character_anchor_cost(log_probs, characters, *masks)
    blended = alignment_cost(
        frames, tokens, *masks, anchor_weight=0.25, log_probs=log_probs, token_characters=characters
    )
    torch.testing.assert_close(blended, 0.75 * cosine + 0.25 * anchor)
    centred = centred_states(tokens, masks[1])
    torch.testing.assert_close(centred[0, :3].mean(0), torch.zeros(8), atol=1e-6, rtol=0)
    assert (centred[0, 3] == 0).all()
    torch.testing.assert_close(centred[0, :3], tokens[0, :3] - tokens[0, :3].mean(0))


def test_contrastive_loss_is_cross_entropy_over_the_batchs_tokens():
    gen = torch.Generator().manual_seed(3)
    frames = torch.randn(2, 6, 8, generator=gen)
    teacher = torch.randn(2, 3, 8, generator=gen)
    frame_mask = torch.ones(2, 6, dtype=torch.bool)
    token_mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    spans = torch.tensor([[[0, 2], [2, 4], [4, 6]], [[0, 3], [3, 6], [0, 0]]])
    settings = dict(aligner=oracle_plan_with(spans), solver_settings={})
    loss, plans, _ = transfer_terms(frames, frame_mask, teacher, token_mask, kt_loss_type="infonce",
                                    kt_temperature=0.2, **settings)
    # Written out: pooled frames per token, cosine logits against the 5 valid states of the batch.
    pooled = [frames[0, 0:2].mean(0), frames[0, 2:4].mean(0), frames[0, 4:6].mean(0), frames[1, 0:3].mean(0),
              frames[1, 3:6].mean(0)]
    valid = [teacher[0, 0], teacher[0, 1], teacher[0, 2], teacher[1, 0], teacher[1, 1]]
    unit = lambda v: v / v.norm()  # noqa: E731
    logits = torch.stack([torch.stack([unit(p) @ unit(z) for z in valid]) for p in pooled]) / 0.2
    per_token = torch.nn.functional.cross_entropy(logits, torch.arange(5), reduction="none")
    expected = (per_token[:3].mean() + per_token[3:].mean()) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    both, _, _ = transfer_terms(frames, frame_mask, teacher, token_mask, kt_loss_type="cosine+infonce",
                                kt_temperature=0.2, **settings)
    cosine, _, _ = transfer_terms(frames, frame_mask, teacher, token_mask, kt_loss_type="cosine", **settings)
    torch.testing.assert_close(both, cosine + expected, rtol=1e-5, atol=1e-6)


def oracle_plan_with(spans):
    return lambda cost, frame_mask, token_mask, **settings: oracle_plan(
        cost, frame_mask, token_mask, token_frame_spans=spans
    )


def test_padding_share_leaves_out_utterances_without_timings():
    plans = torch.full((2, 4, 2), 1 / 8)
    masks = torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool)
    spans = torch.tensor([[[0, 2], [2, 3]], [[0, 0], [0, 0]]])  # the second utterance has no timings
    share = padding_share(plans, *masks, spans)
    assert share[0].item() == pytest.approx(0.25) and math.isnan(share[1].item())
    assert padding_share(plans, *masks, None).isnan().all()
    gen = torch.Generator().manual_seed(6)
    frames, teacher = torch.randn(2, 4, 8, generator=gen), torch.randn(2, 2, 8, generator=gen)
    _, _, stats = transfer_terms(frames, *masks[:1], teacher, masks[1], aligner=diagonal_plan, solver_settings={},
                                 token_frame_spans=spans)
    assert stats[-1].item() == pytest.approx(0.25)  # the mean over the timed utterance only


def test_anchor_inputs_are_float32_log_posteriors_and_characters_padded_to_the_head():
    logits = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    characters = torch.zeros(2, 3, 4)
    characters[0, 0, 1] = 1
    inputs = anchor_inputs(logits, characters)
    torch.testing.assert_close(inputs["log_probs"], torch.log_softmax(logits.detach().float(), -1))
    assert not inputs["log_probs"].requires_grad and anchor_inputs(logits, characters, True)["log_probs"].requires_grad
    assert inputs["token_characters"].shape == (2, 3, 6) and inputs["token_characters"].sum() == 1
    with pytest.raises(ValueError, match="spans 7 vocabulary ids but the CTC head has 6"):
        anchor_inputs(logits, torch.zeros(2, 3, 7))


@pytest.mark.parametrize("kt_loss_type", ["cosine", "cosine+transport", "infonce", "cosine+infonce"])
def test_transfer_terms_do_not_see_padding(kt_loss_type):
    """What the CUDA graphs rely on: padding frames and tokens beyond the masks, with anything in them, changes
    neither the loss, nor the diagnostics, nor the plans, nor the gradient of the valid frames."""
    gen = torch.Generator().manual_seed(4)
    frame_counts, token_counts = (30, 22, 9), (5, 7, 2)
    width, settings = 12, dict(eps=0.1, rho_frames=0.5, tol=1e-9, max_iter=5000)

    def run(n_frames, n_tokens, fill):
        frames = torch.full((3, n_frames, width), fill, dtype=torch.float64)
        teacher = torch.full((3, n_tokens, width), fill, dtype=torch.float64)
        frame_mask = torch.zeros(3, n_frames, dtype=torch.bool)
        token_mask = torch.zeros(3, n_tokens, dtype=torch.bool)
        # Word spans: padding tokens claim every frame, which must not count.
        spans = torch.tensor([0, n_frames]).repeat(3, n_tokens, 1)
        for k, (t, n) in enumerate(zip(frame_counts, token_counts)):
            frames[k, :t], teacher[k, :n] = valid_frames[k, :t], valid_teacher[k, :n]
            frame_mask[k, :t], token_mask[k, :n] = True, True
            spans[k, :n] = torch.tensor([[1 + j, 3 + j] for j in range(n)])
        frames.requires_grad_(True)
        kt_loss, plans, stats = transfer_terms(
            frames, frame_mask, teacher, token_mask, aligner=solve_uot, solver_settings=settings,
            kt_loss_type=kt_loss_type, token_frame_spans=spans,
        )
        assert not stats.isnan().any()
        kt_loss.backward()
        return kt_loss, plans[:, : max(frame_counts), : max(token_counts)], stats, frames.grad

    valid_frames = torch.randn(3, max(frame_counts), width, generator=gen, dtype=torch.float64)
    valid_teacher = torch.randn(3, max(token_counts), width, generator=gen, dtype=torch.float64)
    tight = run(max(frame_counts), max(token_counts), 0.0)
    padded = run(64, 16, 7.0)
    # Equal to float32's rounding (the cost and the solver are float32 whatever the input), amplified by the
    # iteration: the padded problem sums in another order, on another kernel path, and may stop elsewhere. Padding
    # that leaked in would move the loss and the plans by far more (its cells hold 7.0).
    for a, b in zip(tight[:3], padded[:3]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(padded[3][:, : max(frame_counts)], tight[3], rtol=1e-5, atol=1e-7)
    assert (padded[3][:, max(frame_counts) :] == 0).all()
    assert tight[3].abs().sum() > 0


def test_transfer_under_bf16_autocast_solves_the_float32_problem():
    """The eager transfer must optimise the problem the graphed one does: the cost in float32 whatever the
    autocast (a bf16 cost moves the kernel's exponent by about 0.08 at eps 0.1)."""
    gen = torch.Generator().manual_seed(10)
    frames = torch.randn(2, 40, TEACHER_WIDTH, generator=gen)
    teacher = torch.randn(2, 6, TEACHER_WIDTH, generator=gen)
    frame_mask, token_mask = torch.ones(2, 40, dtype=torch.bool), torch.ones(2, 6, dtype=torch.bool)
    frame_mask[1, 30:], token_mask[1, 4:] = False, False
    settings = dict(eps=0.1, rho_frames=1.0, tol=1e-6, max_iter=2000)

    def terms():
        return transfer_terms(
            frames, frame_mask, teacher, token_mask, aligner=solve_uot, solver_settings=settings,
            kt_loss_type="cosine",
        )

    plain_loss, plain_plans, _ = terms()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_loss, auto_plans, _ = terms()
    torch.testing.assert_close(auto_plans, plain_plans, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(auto_loss, plain_loss, rtol=1e-5, atol=1e-6)

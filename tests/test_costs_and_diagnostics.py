import pytest
import torch
import torch.nn.functional as F

from modeling_uot_ctc import alignment_diagnostics, cosine_cost


def test_cosine_cost_matches_torch_cosine_similarity():
    gen = torch.Generator().manual_seed(0)
    frames, tokens = torch.randn(2, 7, 5, generator=gen), torch.randn(2, 4, 5, generator=gen)
    expected = 1 - F.cosine_similarity(frames[:, :, None, :], tokens[:, None, :, :], dim=-1)
    torch.testing.assert_close(cosine_cost(frames, tokens), expected, rtol=0, atol=1e-6)


def test_cosine_cost_gradients_are_finite_for_zero_vectors_and_padding():
    frames = torch.randn(2, 6, 4)
    frames[0, 2] = 0.0  # a valid zero vector
    frames[1, 4:] = float("nan")  # padding holding garbage
    tokens = torch.randn(2, 3, 4)
    tokens[0, 1] = 0.0
    tokens[1, 2] = float("inf")
    frame_mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    token_mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    frames.requires_grad_(True)
    tokens.requires_grad_(True)
    cost = cosine_cost(frames, tokens, frame_mask, token_mask)
    assert torch.isfinite(cost).all()
    assert cost[0, 2].eq(1.0).all() and cost[0, :, 1].eq(1.0).all()  # zero vectors: cosine 0
    assert (cost[1, 4:] == 0).all() and (cost[1, :, 2] == 0).all()
    (cost * torch.randn_like(cost)).sum().backward()
    assert torch.isfinite(frames.grad).all() and torch.isfinite(tokens.grad).all()
    assert (frames.grad[1, 4:] == 0).all() and (tokens.grad[1, 2] == 0).all()


def test_cosine_cost_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="adapter"):
        cosine_cost(torch.randn(1, 3, 4), torch.randn(1, 2, 5))


def test_diagnostics_on_a_hand_built_plan():
    # Four frames, two tokens, uniform weights a = 1/4, b = 1/2. Frame 3 carries nothing (dropped); token 1 gets
    # 0.2 < 0.5 * 1/2 (not covered).
    plan = torch.tensor([[[0.30, 0.00], [0.25, 0.05], [0.00, 0.15], [0.00, 0.00]]])
    diagnostics = alignment_diagnostics(plan, reference=torch.tensor([[0, 0, 1, -1]]))
    assert diagnostics.token_coverage.item() == pytest.approx(0.5)
    assert diagnostics.dropped_frame_fraction.item() == pytest.approx(0.25)
    assert diagnostics.total_mass.item() == pytest.approx(0.75)
    torch.testing.assert_close(diagnostics.frame_mass, torch.tensor([[1.2, 1.2, 0.6, 0.0]]))
    assert diagnostics.mean_frame_mass.item() == pytest.approx(0.75)
    # Frames 0, 1, 2 are assigned to tokens 0, 0, 1: all right (precision 1); the reference aligns 3 frames, all
    # found (recall 1).
    assert diagnostics.precision.item() == pytest.approx(1.0)
    assert diagnostics.recall.item() == pytest.approx(1.0)
    summary = diagnostics.summary()
    assert summary["token_coverage"] == pytest.approx(0.5) and "frame_mass" not in summary


def test_diagnostics_respect_masks_and_count_wrong_assignments():
    plan = torch.zeros(1, 5, 3)
    plan[0, 0, 0] = 0.25
    plan[0, 1, 1] = 0.25  # the reference says token 0
    plan[0, 2, 1] = 0.25
    plan[0, 3, 0] = 0.25  # the reference says silence
    frame_mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    token_mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    reference = torch.tensor([[0, 0, 1, -1, 2]])
    diagnostics = alignment_diagnostics(plan, frame_mask, token_mask, reference=reference)
    assert diagnostics.dropped_frame_fraction.item() == 0.0
    assert diagnostics.precision.item() == pytest.approx(2 / 4)
    assert diagnostics.recall.item() == pytest.approx(2 / 3)
    assert diagnostics.token_coverage.item() == 1.0

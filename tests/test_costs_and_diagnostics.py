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


def reference_cosine_cost(frames, tokens):
    """`1 - cos` in float64 by `torch.nn.functional.cosine_similarity`, as an outside reference."""
    frames, tokens = frames.double(), tokens.double()
    return 1 - F.cosine_similarity(frames[:, :, None, :], tokens[:, None, :, :], dim=-1)


def test_cosine_cost_under_autocast_is_computed_in_float32():
    gen = torch.Generator().manual_seed(1)
    frames, tokens = torch.randn(2, 50, 64, generator=gen), torch.randn(2, 12, 64, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = cosine_cost(frames, tokens)
    # With the product in bfloat16 it would be off by up to 5e-3 here.
    torch.testing.assert_close(cost.double(), reference_cosine_cost(frames, tokens), rtol=0, atol=1e-6)
    assert cost.dtype == torch.float32


@pytest.mark.parametrize("pad_value", [0.0, float("nan"), float("inf")])
def test_cosine_cost_of_float16_inputs_is_float32_and_zero_on_padding(pad_value):
    gen = torch.Generator().manual_seed(2)
    frames, tokens = torch.randn(2, 9, 16, generator=gen).half(), torch.randn(2, 5, 16, generator=gen).half()
    frame_mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3], dtype=torch.bool)
    token_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2], dtype=torch.bool)
    frames[1, 6:], tokens[1, 3:] = pad_value, pad_value
    frames[0, 4] = 0.0  # a valid zero vector: cosine 0, cost 1
    cost = cosine_cost(frames, tokens, frame_mask, token_mask)
    assert torch.isfinite(cost).all()
    cells = frame_mask[:, :, None] & token_mask[:, None, :]
    assert (cost[~cells] == 0).all()
    assert (cost[0, 4] == 1).all()
    # The float32 cost of the same (exactly representable) values.
    expected = reference_cosine_cost(frames.float(), tokens.float()).nan_to_num(1.0)  # the zero vector's 0 / 0
    torch.testing.assert_close(cost[cells].double(), expected[cells], rtol=0, atol=1e-6)
    assert cost.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cosine_cost_gradients_reach_half_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(3)
    frames = torch.randn(2, 7, 8, generator=gen).to(dtype)
    tokens = torch.randn(2, 4, 8, generator=gen).to(dtype)
    frame_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2], dtype=torch.bool)
    token_mask = torch.tensor([[1] * 4, [1] * 3 + [0]], dtype=torch.bool)
    frames[1, 5:], tokens[1, 3:] = 0.0, 0.0
    weights = torch.randn(2, 7, 4, generator=gen)
    frames.requires_grad_(True)
    tokens.requires_grad_(True)
    (cosine_cost(frames, tokens, frame_mask, token_mask) * weights).sum().backward()
    assert frames.grad.dtype == dtype and tokens.grad.dtype == dtype
    assert torch.isfinite(frames.grad).all() and torch.isfinite(tokens.grad).all()
    # The float64 gradient of the reference, rounded to the inputs' precision.
    wide = [x.detach().double().requires_grad_(True) for x in (frames, tokens)]
    cells = (frame_mask[:, :, None] & token_mask[:, None, :]).double()
    (reference_cosine_cost(*wide) * cells * weights).sum().backward()
    for narrow, reference in zip((frames, tokens), wide):
        torch.testing.assert_close(narrow.grad.double(), reference.grad, rtol=1e-2, atol=1e-2)


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

"""Property-based robustness of the solver: no NaN or inf, hard marginals kept, whatever the inputs."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_uot_ctc import solve_uot

RHOS = st.one_of(st.just(0.0), st.floats(1e-3, 1e3), st.just(math.inf))


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 4))
    n_frames = draw(st.integers(1, 40))
    n_tokens = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.0, 1.0, 2.0, 50.0]))
    cost = scale * torch.rand(batch, n_frames, n_tokens, generator=gen)
    frame_mask = torch.rand(batch, n_frames, generator=gen) < draw(st.floats(0.0, 1.0))
    token_mask = torch.rand(batch, n_tokens, generator=gen) < draw(st.floats(0.0, 1.0))
    cost = cost.masked_fill(~(frame_mask[:, :, None] & token_mask[:, None, :]), float("nan"))
    return dict(
        cost=cost,
        frame_mask=frame_mask,
        token_mask=token_mask,
        eps=draw(st.sampled_from([1e-3, 1e-2, 0.1, 1.0])),
        rho_frames=draw(RHOS),
        rho_tokens=draw(RHOS),
        temporal_order_weight=draw(st.sampled_from([0.0, 1.0])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        method=draw(st.sampled_from(["scaling", "log"])),
    )


def check(problem):
    cost = problem.pop("cost").to(problem.pop("dtype")).requires_grad_(True)
    result = solve_uot(cost, max_iter=300, tol=1e-5, **problem)
    result.value.sum().backward()
    for tensor in (result.plan, result.value, result.frame_potentials, result.token_potentials, cost.grad):
        assert torch.isfinite(tensor).all()
    assert (result.plan >= 0).all()
    cells = problem["frame_mask"][:, :, None] & problem["token_mask"][:, None, :]
    assert (result.plan[~cells] == 0).all()
    hard_tokens = math.isinf(problem["rho_tokens"])
    nonempty = problem["frame_mask"].any(-1) & problem["token_mask"].any(-1)
    if hard_tokens and not math.isinf(problem["rho_frames"]):
        # The token side is updated last: its marginal is exact at any iteration count.
        token_weights = problem["token_mask"].to(result.plan.dtype)
        token_weights = token_weights / token_weights.sum(-1, keepdim=True).clamp_min(1)
        expected = token_weights * nonempty[:, None]
        torch.testing.assert_close(result.plan.sum(1), expected, rtol=0, atol=2e-5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_fuzz_finite_and_hard_side_kept(problem):
    check(problem)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_fuzz_many(problem):
    check(problem)

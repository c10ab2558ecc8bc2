import math

import numpy as np
import ot
import pytest
import torch

from modeling_uot_ctc import fraction_from_rho, rho_from_fraction, solve_ot, solve_uot
from reference import order_penalty, pot_plan, uot_objective

INF = math.inf
EPSILONS = [0.5, 0.1, 0.05, 0.01]
RHO_FRAMES = [0.01, 0.1, 1.0, 10.0, INF]
RHO_TOKENS = [1.0, INF]
# The detach-mode iterations: blocking matrix scaling (the CPU default), its sync-free twin (the CUDA default) and
# the log domain.
ITERATIONS = {
    "scaling": dict(method="scaling", sync_free=False),
    "sync-free": dict(method="scaling", sync_free=True),
    "log": dict(method="log"),
}
# Those, and the unrolled mode.
MODES = {**ITERATIONS, "unrolled": dict(grad_mode="unrolled")}


def padded_batch(sizes, seed, dtype=torch.float64, pad_value=float("nan")):
    """Random costs in [0, 2] for examples of the given (T, N), padded with `pad_value` into one batch."""
    gen = torch.Generator().manual_seed(seed)
    max_t, max_n = max(t for t, _ in sizes), max(n for _, n in sizes)
    cost = torch.full((len(sizes), max_t, max_n), pad_value, dtype=torch.float64)
    frame_mask = torch.zeros(len(sizes), max_t, dtype=torch.bool)
    token_mask = torch.zeros(len(sizes), max_n, dtype=torch.bool)
    for k, (t, n) in enumerate(sizes):
        cost[k, :t, :n] = 2 * torch.rand(t, n, generator=gen, dtype=torch.float64)
        frame_mask[k, :t] = True
        token_mask[k, :n] = True
    return cost.to(dtype), frame_mask, token_mask


def random_sizes(seed, count=3):
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(1, 81)), int(rng.integers(1, 26))) for _ in range(count)]


@pytest.mark.parametrize("iteration", ITERATIONS)
@pytest.mark.parametrize("rho_tokens", RHO_TOKENS)
@pytest.mark.parametrize("rho_frames", RHO_FRAMES)
@pytest.mark.parametrize("eps", EPSILONS)
def test_matches_pot_in_float64(eps, rho_frames, rho_tokens, iteration):
    seed = hash((eps, rho_frames, rho_tokens)) % 2**31
    sizes = random_sizes(seed)
    cost, frame_mask, token_mask = padded_batch(sizes, seed)
    result = solve_uot(
        cost, frame_mask, token_mask, eps=eps, rho_frames=rho_frames, rho_tokens=rho_tokens,
        tol=1e-14, max_iter=200_000, **ITERATIONS[iteration],
    )
    assert bool(result.converged.all())
    for k, (t, n) in enumerate(sizes):
        c = cost[k, :t, :n].numpy()
        a, b = np.full(t, 1 / t), np.full(n, 1 / n)
        expected = pot_plan(c, a, b, eps, rho_frames, rho_tokens)
        plan = result.plan[k, :t, :n].numpy()
        np.testing.assert_allclose(plan, expected, rtol=0, atol=1e-9)
        expected_value = uot_objective(expected, c, a, b, eps, rho_frames, rho_tokens)
        assert result.value[k].item() == pytest.approx(expected_value, rel=1e-8, abs=1e-12)
        # The value is the objective of the returned plan, mass terms included.
        assert result.value[k].item() == pytest.approx(
            uot_objective(plan, c, a, b, eps, rho_frames, rho_tokens), rel=1e-10, abs=1e-12
        )


@pytest.mark.parametrize("rho_tokens", RHO_TOKENS)
@pytest.mark.parametrize("rho_frames", [0.1, 1.0, INF])
@pytest.mark.parametrize("eps", [0.5, 0.05])
def test_matches_pot_in_float32(eps, rho_frames, rho_tokens):
    sizes = random_sizes(7, count=4)
    cost, frame_mask, token_mask = padded_batch(sizes, 7)
    result = solve_uot(
        cost.float(), frame_mask, token_mask, eps=eps, rho_frames=rho_frames, rho_tokens=rho_tokens, tol=1e-6,
        max_iter=50_000,
    )
    assert result.plan.dtype == torch.float32
    assert bool(result.converged.all())
    for k, (t, n) in enumerate(sizes):
        c = cost[k, :t, :n].numpy()
        a, b = np.full(t, 1 / t), np.full(n, 1 / n)
        expected = pot_plan(c, a, b, eps, rho_frames, rho_tokens)
        np.testing.assert_allclose(result.plan[k, :t, :n].numpy(), expected, rtol=0, atol=1e-5)
        expected_value = uot_objective(expected, c, a, b, eps, rho_frames, rho_tokens)
        assert result.value[k].item() == pytest.approx(expected_value, rel=1e-4, abs=1e-6)


def test_weights_and_pot_conventions():
    """Non-uniform, unnormalised marginals map onto POT's `a`, `b` one to one."""
    rng = np.random.default_rng(3)
    c = rng.uniform(0, 2, (17, 6))
    a, b = rng.uniform(0.1, 1.0, 17), rng.uniform(0.1, 2.0, 6)
    for rho_frames, rho_tokens in [(0.5, INF), (0.5, 2.0), (INF, INF)]:
        result = solve_uot(
            torch.tensor(c)[None], frame_weights=torch.tensor(a)[None], token_weights=torch.tensor(b)[None],
            eps=0.1, rho_frames=rho_frames, rho_tokens=rho_tokens, tol=1e-14, max_iter=100_000,
        )
        expected = pot_plan(c, a, b, 0.1, rho_frames, rho_tokens)
        np.testing.assert_allclose(result.plan[0].numpy(), expected, atol=1e-10)
        assert result.value.item() == pytest.approx(uot_objective(expected, c, a, b, 0.1, rho_frames, rho_tokens))


def test_potentials_are_pots_log_scalings():
    rng = np.random.default_rng(4)
    c = rng.uniform(0, 2, (12, 5))
    a, b = np.full(12, 1 / 12), np.full(5, 1 / 5)
    eps, rho = 0.1, 0.3
    _, log = ot.unbalanced.sinkhorn_knopp_unbalanced(
        a, b, c, eps, (rho, INF), numItermax=100_000, stopThr=1e-15, log=True
    )
    result = solve_uot(torch.tensor(c)[None], eps=eps, rho_frames=rho, tol=1e-14, max_iter=100_000)
    np.testing.assert_allclose(result.frame_potentials[0].numpy(), eps * log["logu"], atol=1e-9)
    np.testing.assert_allclose(result.token_potentials[0].numpy(), eps * log["logv"], atol=1e-9)


@pytest.mark.parametrize("rho_frames", [0.1, INF])
def test_temporal_order_is_the_documented_cost_term(rho_frames):
    rng = np.random.default_rng(5)
    c = rng.uniform(0, 2, (30, 7))
    a, b = np.full(30, 1 / 30), np.full(7, 1 / 7)
    weight = 3.0
    augmented = c + weight * order_penalty(30, 7)
    result = solve_uot(
        torch.tensor(c)[None], eps=0.05, rho_frames=rho_frames, temporal_order_weight=weight, tol=1e-14,
        max_iter=100_000,
    )
    expected = pot_plan(augmented, a, b, 0.05, rho_frames, INF)
    np.testing.assert_allclose(result.plan[0].numpy(), expected, atol=1e-9)
    assert result.value.item() == pytest.approx(uot_objective(expected, augmented, a, b, 0.05, rho_frames, INF))


def test_fraction_parameterisation():
    eps = 0.05
    for rho in [0.0, 0.01, 1.0, 123.0, INF]:
        fraction = fraction_from_rho(rho, eps)
        assert 0.0 <= fraction <= 1.0
        assert rho_from_fraction(fraction, eps) == pytest.approx(rho)
    assert rho_from_fraction(1.0, eps) == INF
    assert fraction_from_rho(0.5, eps) == pytest.approx(0.5 / 0.55)
    with pytest.raises(ValueError):
        rho_from_fraction(1.5, eps)
    with pytest.raises(ValueError):
        fraction_from_rho(-1.0, eps)


# Padding.


@pytest.mark.parametrize("grad_mode", ["detach", "unrolled"])
@pytest.mark.parametrize("pad_value", [float("nan"), float("inf"), float("-inf"), -7.0, 1e30])
def test_padding_changes_neither_outputs_nor_gradients(grad_mode, pad_value):
    sizes = [(23, 5), (9, 8), (31, 2)]
    clean, frame_mask, token_mask = padded_batch(sizes, 11, pad_value=0.0)
    dirty, _, _ = padded_batch(sizes, 11, pad_value=pad_value)
    kwargs = dict(eps=0.1, rho_frames=0.5, tol=1e-12, max_iter=5000, grad_mode=grad_mode)
    outputs = []
    for cost in (clean, dirty):
        cost = cost.clone().requires_grad_(True)
        result = solve_uot(cost, frame_mask, token_mask, **kwargs)
        result.value.sum().backward()
        outputs.append((result, cost.grad))
    (clean_result, clean_grad), (dirty_result, dirty_grad) = outputs
    # Exact on every machine: padded cells are replaced before any arithmetic, so both runs do the same operations
    # on the same numbers in one process.
    for name in ("plan", "value", "frame_potentials", "token_potentials"):
        torch.testing.assert_close(getattr(dirty_result, name), getattr(clean_result, name), rtol=0, atol=0)
    assert torch.isfinite(dirty_grad).all()
    torch.testing.assert_close(dirty_grad, clean_grad, rtol=0, atol=0)
    cell_mask = frame_mask[:, :, None] & token_mask[:, None, :]
    assert (dirty_grad[~cell_mask] == 0).all()


@pytest.mark.parametrize("iteration", ITERATIONS)
def test_example_in_padded_batch_equals_example_alone(iteration):
    sizes = [(40, 9), (13, 3), (57, 12), (5, 1)]
    cost, frame_mask, token_mask = padded_batch(sizes, 12, dtype=torch.float32)
    kwargs = dict(eps=0.05, rho_frames=1.0, tol=1e-6, max_iter=20_000, **ITERATIONS[iteration])
    batched = solve_uot(cost, frame_mask, token_mask, **kwargs)
    for k, (t, n) in enumerate(sizes):
        alone = solve_uot(cost[k : k + 1, :t, :n], **kwargs)
        torch.testing.assert_close(batched.plan[k, :t, :n], alone.plan[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(batched.value[k], alone.value[0], rtol=1e-5, atol=1e-7)
        assert (batched.plan[k, t:, :] == 0).all() and (batched.plan[k, :, n:] == 0).all()


def test_masks_with_holes_and_zero_weights_count_as_padding():
    cost, _, _ = padded_batch([(20, 6)], 13)
    frame_mask = torch.ones(1, 20, dtype=torch.bool)
    frame_mask[0, [3, 7, 8]] = False
    frame_weights = frame_mask.double() / frame_mask.sum()
    with_mask = solve_uot(cost, frame_mask, eps=0.1, rho_frames=1.0, tol=1e-13, max_iter=10_000)
    with_weights = solve_uot(cost, frame_weights=frame_weights, eps=0.1, rho_frames=1.0, tol=1e-13, max_iter=10_000)
    torch.testing.assert_close(with_mask.plan, with_weights.plan, rtol=0, atol=1e-12)
    keep = frame_mask[0]
    alone = solve_uot(cost[:, keep], eps=0.1, rho_frames=1.0, tol=1e-13, max_iter=10_000)
    torch.testing.assert_close(with_mask.plan[:, keep], alone.plan, rtol=0, atol=1e-12)


@pytest.mark.parametrize("iteration", ITERATIONS)
@pytest.mark.parametrize("grad_mode", ["detach", "unrolled"])
def test_empty_examples_give_zero_and_no_nan(iteration, grad_mode):
    cost = torch.rand(4, 10, 5, dtype=torch.float64, requires_grad=True)
    frame_mask = torch.ones(4, 10, dtype=torch.bool)
    token_mask = torch.ones(4, 5, dtype=torch.bool)
    frame_mask[1] = False  # no frame
    token_mask[2] = False  # no token
    frame_mask[3, 4:] = False
    result = solve_uot(
        cost, frame_mask, token_mask, eps=0.1, rho_frames=1.0, grad_mode=grad_mode, tol=1e-10,
        **ITERATIONS[iteration],
    )
    result.value.sum().backward()
    for tensor in (result.plan, result.value, result.frame_potentials, result.token_potentials, cost.grad):
        assert torch.isfinite(tensor).all()
    for k in (1, 2):
        assert (result.plan[k] == 0).all() and result.value[k] == 0
        assert (cost.grad[k] == 0).all()
    assert bool(result.converged.all())
    torch.testing.assert_close(result.plan[0].sum(0), torch.full((5,), 0.2, dtype=torch.float64))


# Forbidden pairs: +inf on valid cells.


def forbid(cost, sizes, fraction, seed):
    """`cost` with +inf on about `fraction` of each example's cells, and the mask of those cells.

    Cell `(i, i * n // t)` stays open, so that every frame and every token keeps somewhere to send its mass.
    """
    gen = torch.Generator().manual_seed(seed)
    forbidden = torch.zeros(cost.shape, dtype=torch.bool)
    for k, (t, n) in enumerate(sizes):
        block = torch.rand(t, n, generator=gen) < fraction
        block[torch.arange(t), torch.arange(t) * n // t] = False
        forbidden[k, :t, :n] = block
    return cost.masked_fill(forbidden, INF), forbidden


def solve(cost, frame_mask, token_mask, rho_frames, rho_tokens, **kwargs):
    """`solve_ot` when both sides are hard, else `solve_uot`."""
    if math.isinf(rho_frames) and math.isinf(rho_tokens):
        return solve_ot(cost, frame_mask, token_mask, **kwargs)
    return solve_uot(cost, frame_mask, token_mask, rho_frames=rho_frames, rho_tokens=rho_tokens, **kwargs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rho_frames,rho_tokens", [(1.0, INF), (INF, 1.0), (INF, INF)])
def test_infinite_cost_forbids_the_pair_as_in_pot(rho_frames, rho_tokens, mode):
    sizes = [(30, 6), (17, 4), (25, 9)]
    cost, frame_mask, token_mask = padded_batch(sizes, 31)  # padded with NaN
    cost, forbidden = forbid(cost, sizes, 0.25, 31)
    cost.requires_grad_(True)
    result = solve(
        cost, frame_mask, token_mask, rho_frames, rho_tokens, eps=0.1, tol=1e-13, max_iter=20_000, **MODES[mode]
    )
    result.value.sum().backward()
    assert bool(result.converged.all())
    assert (result.plan[forbidden] == 0).all()
    assert torch.isfinite(cost.grad).all() and (cost.grad[forbidden] == 0).all()
    for k, (t, n) in enumerate(sizes):
        c = cost[k, :t, :n].detach().numpy()
        a, b = np.full(t, 1 / t), np.full(n, 1 / n)
        expected = pot_plan(c, a, b, 0.1, rho_frames, rho_tokens)  # POT's kernel is exp(-inf) = 0 there
        np.testing.assert_allclose(result.plan[k, :t, :n].detach().numpy(), expected, rtol=0, atol=1e-9)
        # The objective with 0 * inf = 0 on the forbidden cells.
        expected_value = uot_objective(expected, np.where(np.isinf(c), 0.0, c), a, b, 0.1, rho_frames, rho_tokens)
        assert result.value[k].item() == pytest.approx(expected_value, rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rho_frames,rho_tokens", [(1.0, INF), (INF, 1.0)])
def test_frame_and_token_with_every_cell_forbidden_get_nothing_and_the_rest_matches_pot(rho_frames, rho_tokens, mode):
    sizes = [(20, 5), (9, 3)]
    cost, frame_mask, token_mask = padded_batch(sizes, 33)
    cost[0, :, 2] = INF  # token 2 cannot be covered
    cost[0, 7, :] = INF  # frame 7 can go nowhere
    cost.requires_grad_(True)
    kwargs = dict(eps=0.1, rho_frames=rho_frames, rho_tokens=rho_tokens, tol=1e-13, max_iter=20_000)
    result = solve_uot(cost, frame_mask, token_mask, **kwargs, **MODES[mode])
    result.value.sum().backward()
    for tensor in (result.plan, result.value, result.frame_potentials, result.token_potentials, cost.grad):
        assert torch.isfinite(tensor).all()
    assert bool(result.converged.all())
    assert (result.plan[0, :, 2] == 0).all() and (result.plan[0, 7] == 0).all()
    # The others keep their weights (1/20 and 1/5) and are solved as POT solves the problem without the two.
    frames, tokens = [i for i in range(20) if i != 7], [0, 1, 3, 4]
    c = cost[0].detach().numpy()[np.ix_(frames, tokens)]
    a, b = np.full(19, 1 / 20), np.full(4, 1 / 5)
    expected = pot_plan(c, a, b, 0.1, rho_frames, rho_tokens)
    np.testing.assert_allclose(result.plan[0].detach().numpy()[np.ix_(frames, tokens)], expected, atol=1e-9)
    expected_value = uot_objective(expected, c, a, b, 0.1, rho_frames, rho_tokens)
    assert result.value[0].item() == pytest.approx(expected_value, rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_uncoverable_token_in_balanced_ot_gives_no_nan(mode):
    """Both sides hard and a token with every cell forbidden: no plan meets the marginals, the outputs stay finite."""
    cost, _, _ = padded_batch([(12, 4), (12, 4)], 35)
    cost[1, :, 3] = INF
    cost.requires_grad_(True)
    result = solve_ot(cost, eps=0.1, tol=1e-10, max_iter=500, **MODES[mode])
    result.value.sum().backward()
    for tensor in (result.plan, result.value, result.frame_potentials, result.token_potentials, cost.grad):
        assert torch.isfinite(tensor).all()
    assert (result.plan[1, :, 3] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_batch_with_every_cell_forbidden_is_treated_as_empty(mode):
    cost = torch.full((2, 6, 3), INF, dtype=torch.float64, requires_grad=True)
    result = solve_uot(cost, eps=0.1, rho_frames=1.0, tol=1e-12, **MODES[mode])
    result.value.sum().backward()
    for tensor in (result.plan, result.value, result.frame_potentials, result.token_potentials, cost.grad):
        assert torch.isfinite(tensor).all()
    assert bool(result.converged.all())
    assert (result.plan == 0).all() and (result.value == 0).all() and (cost.grad == 0).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rho_frames", [1.0, INF])
@pytest.mark.parametrize("bad", [float("nan"), -INF])
def test_nan_or_minus_inf_on_a_valid_cell_is_rejected(bad, rho_frames, mode):
    cost, frame_mask, token_mask = padded_batch([(12, 4), (7, 3)], 32)
    kwargs = dict(eps=0.1, rho_frames=rho_frames, **MODES[mode])
    on_padding = cost.clone()
    on_padding[1, 9, 1] = bad  # frame 9 of the second example is padding: ignored
    assert torch.isfinite(solve_uot(on_padding, frame_mask, token_mask, **kwargs).plan).all()
    cost[1, 5, 1] = bad
    with pytest.raises(ValueError, match="NaN or -inf"):
        solve_uot(cost, frame_mask, token_mask, **kwargs)
    with pytest.raises(ValueError, match="NaN or -inf"):
        solve_uot(torch.full((1, 4, 3), bad), **kwargs)  # no finite cell anywhere


# The hard side and the relaxation.


@pytest.mark.parametrize("rho_frames", [0.0, 0.01, 1.0, 1e4])
def test_hard_token_side_has_exact_column_sums(rho_frames):
    sizes = [(120, 20), (37, 4), (300, 30)]
    cost, frame_mask, token_mask = padded_batch(sizes, 14, dtype=torch.float32)
    result = solve_uot(cost, frame_mask, token_mask, eps=0.05, rho_frames=rho_frames, tol=1e-5, max_iter=5000)
    expected = token_mask.float() / token_mask.sum(-1, keepdim=True)
    torch.testing.assert_close(result.plan.sum(1), expected, rtol=0, atol=1e-6)


def test_huge_rho_frames_is_balanced_ot():
    rng = np.random.default_rng(15)
    c = rng.uniform(0, 2, (25, 8))
    a, b = np.full(25, 1 / 25), np.full(8, 1 / 8)
    balanced = ot.sinkhorn(a, b, c, 0.1, numItermax=100_000, stopThr=1e-14)
    result = solve_uot(torch.tensor(c)[None], eps=0.1, rho_frames=1e9, tol=1e-13, max_iter=100_000)
    np.testing.assert_allclose(result.plan[0].numpy(), balanced, atol=1e-8)
    exact = solve_uot(torch.tensor(c)[None], eps=0.1, rho_frames=INF, tol=1e-13, max_iter=100_000)
    np.testing.assert_allclose(exact.plan[0].numpy(), balanced, atol=1e-10)


@pytest.mark.parametrize("rho_frames", [0.0, 0.003, 0.03, 0.3, 3.0])
def test_frame_masses_follow_the_closed_form_with_hard_tokens(rho_frames):
    """With a cost that depends on the frame only, C_ij = c_i, the optimal frame masses are
    a_i exp(-c_i / (rho + eps)) normalised to the token mass (derivation in METHOD.md notation: f_i = kappa (c_i - G),
    r_i = a_i exp(-f_i / rho)). Small rho makes costly frames drop out."""
    eps = 0.05
    frame_cost = torch.linspace(0.0, 1.0, 40, dtype=torch.float64)
    cost = frame_cost[None, :, None].expand(1, 40, 6).contiguous()
    result = solve_uot(cost, eps=eps, rho_frames=rho_frames, tol=1e-14, max_iter=100_000)
    weights = torch.exp(-frame_cost / (rho_frames + eps))
    torch.testing.assert_close(result.plan[0].sum(1), weights / weights.sum(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("iteration", ITERATIONS)
def test_one_token_at_the_model_defaults_matches_the_closed_form(iteration):
    """A one-token transcript in float32 at eps 0.1, rho 1, tol 1e-4: the optimal frame scalings lie beyond the
    scaling iteration's clamp, which once let it stop early on a wrong plan (converged, but 5 times off)."""
    frame_cost = torch.tensor([0.0, 0.2, 1.0, 1.6, 1.8, 2.0])
    result = solve_uot(
        frame_cost[None, :, None], eps=0.1, rho_frames=1.0, tol=1e-4, max_iter=200, **ITERATIONS[iteration]
    )
    weights = torch.exp(-frame_cost.double() / 1.1)
    assert bool(result.converged.all())
    torch.testing.assert_close(result.plan[0, :, 0].double(), weights / weights.sum(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("iteration", ITERATIONS)
def test_both_sides_free_gives_the_gibbs_kernel(iteration):
    """With rho 0 on both sides nothing ties the plan to the marginals: P = a b^T exp(-C / eps)."""
    sizes = [(30, 6), (12, 4)]
    cost, frame_mask, token_mask = padded_batch(sizes, 24)
    result = solve_uot(
        cost, frame_mask, token_mask, eps=0.1, rho_frames=0.0, rho_tokens=0.0, tol=1e-12, **ITERATIONS[iteration]
    )
    for k, (t, n) in enumerate(sizes):
        expected = torch.exp(-cost[k, :t, :n] / 0.1) / (t * n)
        torch.testing.assert_close(result.plan[k, :t, :n], expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("rho", [0.01, 0.1, 1.0, 10.0])
def test_total_mass_shrinks_as_theory_says_when_both_sides_are_relaxed(rho):
    """Constant cost c, uniform marginals, both sides relaxed by rho: P = s a b^T with s = exp(-c / (eps + 2 rho))."""
    eps, c = 0.1, 0.7
    cost = torch.full((1, 15, 4), c, dtype=torch.float64)
    result = solve_uot(cost, eps=eps, rho_frames=rho, rho_tokens=rho, tol=1e-14, max_iter=100_000)
    assert result.plan.sum().item() == pytest.approx(math.exp(-c / (eps + 2 * rho)), rel=1e-10)


def test_translation_step_changes_speed_not_answer():
    cost, frame_mask, token_mask = padded_batch([(60, 10), (45, 7)], 16)
    kwargs = dict(eps=0.05, rho_frames=5.0, tol=1e-13, max_iter=100_000)
    fast = solve_uot(cost, frame_mask, token_mask, translation_invariant=True, **kwargs)
    slow = solve_uot(cost, frame_mask, token_mask, translation_invariant=False, **kwargs)
    torch.testing.assert_close(fast.plan, slow.plan, rtol=0, atol=1e-10)
    assert fast.n_iter.max() * 5 < slow.n_iter.max()


def test_not_converging_is_reported():
    cost, frame_mask, token_mask = padded_batch([(60, 10)], 17)
    result = solve_uot(cost, frame_mask, token_mask, eps=0.01, rho_frames=1.0, tol=1e-14, max_iter=3)
    assert not bool(result.converged.any())
    assert result.n_iter.tolist() == [3]
    assert result.marginal_error.item() > 1e-14


# Precision and the caller's state.


@pytest.mark.parametrize("sync_free", [False, True])
def test_float32_at_small_eps_stays_close_to_float64(sync_free):
    # At eps 1e-3 the float32 kernels must be rebuilt many times: by branching, or by masking when sync-free.
    sizes = [(50, 12), (33, 5), (64, 20)]
    cost, frame_mask, token_mask = padded_batch(sizes, 18)
    for rho_frames in (0.1, 1.0, INF):
        kwargs = dict(eps=1e-3, rho_frames=rho_frames, max_iter=200_000, sync_free=sync_free)
        double = solve_uot(cost, frame_mask, token_mask, tol=1e-12, **kwargs)
        single = solve_uot(cost.float(), frame_mask, token_mask, tol=1e-7, **kwargs)
        assert torch.isfinite(single.plan).all()
        torch.testing.assert_close(single.plan.double(), double.plan, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_solved_in_float32(dtype):
    cost, frame_mask, token_mask = padded_batch([(30, 6), (12, 4)], 19)
    half = cost.to(dtype)
    result = solve_uot(half, frame_mask, token_mask, eps=0.1, tol=1e-6)
    reference = solve_uot(half.double(), frame_mask, token_mask, eps=0.1, tol=1e-12)
    assert result.plan.dtype == torch.float32 and result.value.dtype == torch.float32
    # Float32 accuracy on the half-precision input: half-precision arithmetic would be off by about 1e-3.
    torch.testing.assert_close(result.plan.double(), reference.plan, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.value.double(), reference.value, rtol=1e-5, atol=0)


@pytest.mark.parametrize("iteration", ITERATIONS)
def test_autocast_does_not_lower_the_precision(iteration):
    """A model trained with bf16 autocast calls the solver inside it; its matrix products must stay float32."""
    cost, frame_mask, token_mask = padded_batch([(60, 10), (25, 4)], 23, dtype=torch.float32)
    kwargs = dict(eps=0.05, tol=1e-6, **ITERATIONS[iteration])
    reference = solve_uot(cost, frame_mask, token_mask, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = solve_uot(cost, frame_mask, token_mask, **kwargs)
    assert result.plan.dtype == torch.float32
    # Exact on every machine: with autocast switched off inside, both calls run the same float32 kernels.
    torch.testing.assert_close(result.plan, reference.plan, rtol=0, atol=0)


@pytest.mark.parametrize("grad_mode", ["detach", "unrolled"])
@pytest.mark.parametrize("enabled", [True, False])
def test_callers_grad_mode_is_left_alone(grad_mode, enabled):
    cost = torch.rand(2, 8, 3, requires_grad=True)
    with torch.set_grad_enabled(enabled):
        solve_uot(cost, grad_mode=grad_mode)
        assert torch.is_grad_enabled() == enabled
        with pytest.raises(ValueError):
            solve_uot(cost, eps=-1.0, grad_mode=grad_mode)
        assert torch.is_grad_enabled() == enabled


# Gradients.


def test_unrolled_mode_passes_gradcheck():
    gen = torch.Generator().manual_seed(20)
    cost = (2 * torch.rand(2, 5, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    frame_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)

    def plan_and_value(c):
        result = solve_uot(
            c, frame_mask, eps=0.2, rho_frames=0.7, grad_mode="unrolled", tol=1e-30, max_iter=30
        )
        return result.plan, result.value

    assert torch.autograd.gradcheck(plan_and_value, (cost,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("rho_frames,rho_tokens", [(0.5, INF), (INF, INF), (0.5, 2.0)])
def test_value_gradient_is_the_plan(rho_frames, rho_tokens):
    cost, frame_mask, token_mask = padded_batch([(20, 6), (14, 3)], 21)
    kwargs = dict(eps=0.1, rho_frames=rho_frames, rho_tokens=rho_tokens, tol=1e-13, max_iter=100_000)
    detached = cost.clone().requires_grad_(True)
    result = solve_uot(detached, frame_mask, token_mask, **kwargs)
    result.value.sum().backward()
    # Central differences of the optimal value, entry by entry (an outside check of the envelope gradient).
    gen = torch.Generator().manual_seed(22)
    for _ in range(8):
        k, i, j = 0, int(torch.randint(20, (1,), generator=gen)), int(torch.randint(6, (1,), generator=gen))
        bumped = []
        for sign in (1.0, -1.0):
            moved = cost.clone()
            moved[k, i, j] += sign * 1e-6
            bumped.append(solve_uot(moved, frame_mask, token_mask, **kwargs).value[k].item())
        assert detached.grad[k, i, j].item() == pytest.approx((bumped[0] - bumped[1]) / 2e-6, abs=1e-7)
    # Through the iterations the same gradient must come out at convergence (envelope theorem): an independent check
    # of the value formula and of the potentials.
    unrolled = cost.clone().requires_grad_(True)
    result = solve_uot(unrolled, frame_mask, token_mask, grad_mode="unrolled", **kwargs)
    result.value.sum().backward()
    torch.testing.assert_close(unrolled.grad, result.plan.detach(), rtol=0, atol=1e-8)


def test_detach_mode_memory_does_not_grow_with_iterations():
    cost = torch.rand(3, 40, 8, dtype=torch.float64, requires_grad=True)
    saved_bytes = []
    for max_iter in (5, 300):
        total = [0]

        def pack(tensor):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = solve_uot(cost, eps=1e-3, rho_frames=10.0, tol=1e-30, max_iter=max_iter)
        assert result.n_iter.tolist() == [max_iter] * 3
        saved_bytes.append(total[0])
    assert saved_bytes[0] == saved_bytes[1]
    # The unrolled mode does keep every iteration: this check can tell the difference.
    total = [0]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: total.__setitem__(0, total[0] + t.numel()) or t, lambda t: t):
        solve_uot(cost, eps=0.01, rho_frames=1.0, tol=1e-30, max_iter=50, grad_mode="unrolled")
    assert total[0] * cost.element_size() > 10 * saved_bytes[0]


# Bad input.


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(eps=0.0), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(rho_frames=-1.0), "rho_frames"),
        (dict(rho_tokens=float("nan")), "rho_tokens"),
        (dict(grad_mode="implicit"), "grad_mode"),
        (dict(method="newton"), "method"),
        (dict(max_iter=0), "max_iter"),
        (dict(tol=0.0), "tol"),
        (dict(temporal_order_weight=-1.0), "temporal_order_weight"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        solve_uot(torch.rand(1, 4, 3), **kwargs)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="cost"):
        solve_uot(torch.rand(4, 3))
    with pytest.raises(ValueError, match="cost"):
        solve_uot(torch.ones(1, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="frame_mask"):
        solve_uot(torch.rand(2, 4, 3), frame_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_weights"):
        solve_uot(torch.rand(2, 4, 3), token_weights=torch.ones(2, 4))
    with pytest.raises(ValueError, match="frame_weights"):
        solve_uot(torch.rand(1, 4, 3), frame_weights=-torch.ones(1, 4))


# The sync-free iteration (the default on CUDA).


def test_sync_free_iteration_gives_the_blocking_iterations_answers():
    """At eps 0.01 in float32 the kernels are rebuilt many times: by masking here, by branching in the other."""
    sizes = [(120, 20), (37, 4), (80, 1), (200, 25)]
    cost, frame_mask, token_mask = padded_batch(sizes, 21, dtype=torch.float32)
    frame_mask[2] = False  # an empty example among the others
    kwargs = dict(eps=0.01, rho_frames=1.0, tol=1e-6, max_iter=20_000)
    blocking = solve_uot(cost, frame_mask, token_mask, sync_free=False, **kwargs)
    sync_free = solve_uot(cost, frame_mask, token_mask, sync_free=True, **kwargs)
    assert bool(blocking.converged.all()) and bool(sync_free.converged.all())
    assert (sync_free.plan[2] == 0).all() and sync_free.n_iter[2] == 0
    torch.testing.assert_close(sync_free.plan, blocking.plan, rtol=1e-5, atol=1e-8)  # float32 rounding apart
    torch.testing.assert_close(sync_free.value, blocking.value, rtol=1e-5, atol=1e-8)
    # The same checks decide; where a rebuild fell on another check, convergence may be seen one check apart.
    assert ((sync_free.n_iter - blocking.n_iter).abs() <= 4).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sync_free_iteration_never_waits_for_the_gpu():
    sizes = [(300, 30), (120, 7), (250, 18)]
    cost, frame_mask, token_mask = padded_batch(sizes, 22, dtype=torch.float32)
    kwargs = dict(eps=0.05, rho_frames=1.0, tol=1e-6, max_iter=5000)
    on_cpu = solve_uot(cost, frame_mask, token_mask, **kwargs)
    on_gpu_args = [tensor.cuda() for tensor in (cost, frame_mask, token_mask)]
    solve_uot(*on_gpu_args, **kwargs)  # first calls may initialise things that synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any operation that makes the host wait now raises
    try:
        on_gpu = solve_uot(*on_gpu_args, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(on_gpu.converged.all())
    torch.testing.assert_close(on_gpu.plan.cpu(), on_cpu.plan, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_in_a_cuda_graph_it_runs_max_iter_and_matches_the_eager_solver():
    sizes = [(300, 30), (120, 7), (250, 18)]
    kwargs = dict(eps=0.05, rho_frames=1.0, tol=1e-5, max_iter=400)
    first, second = (
        [tensor.cuda() for tensor in padded_batch(sizes, seed, dtype=torch.float32, pad_value=0.0)] for seed in (3, 4)
    )
    static = [tensor.clone() for tensor in first]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
        solve_uot(*static, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = solve_uot(*static, **kwargs)
    for batch in (first, second):  # replayed on new data copied into the captured inputs
        for target, source in zip(static, batch):
            target.copy_(source)
        graph.replay()
        eager = solve_uot(*batch, **kwargs)
        assert bool(eager.converged.all()) and bool(captured.converged.all())
        assert int(eager.n_iter.max()) < kwargs["max_iter"]
        # Frozen at the same check as the eager iteration, however many iterations the graph ran after it.
        assert torch.equal(captured.n_iter, eager.n_iter)
        torch.testing.assert_close(captured.plan, eager.plan, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(captured.value, eager.value, rtol=1e-5, atol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("settings", [dict(grad_mode="unrolled"), dict(sync_free=False), dict(method="log")])
def test_iterations_that_read_the_host_refuse_to_be_captured(settings):
    cost, frame_mask, token_mask = (tensor.cuda() for tensor in padded_batch([(20, 5)], 5, torch.float32, 0.0))
    solve_uot(cost, frame_mask, token_mask)  # warm-up
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            solve_uot(cost, frame_mask, token_mask, **settings)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bad", [float("nan"), -INF])
def test_sync_free_iteration_on_cuda_makes_a_bad_cell_nan_for_its_example_only(bad):
    sizes = [(40, 6), (25, 4)]
    cost, frame_mask, token_mask = (tensor.cuda() for tensor in padded_batch(sizes, 34, dtype=torch.float32))
    kwargs = dict(eps=0.1, rho_frames=1.0, tol=1e-6, max_iter=500)
    clean = solve_uot(cost, frame_mask, token_mask, **kwargs)
    cost[1, 3, 2] = bad
    result = solve_uot(cost, frame_mask, token_mask, **kwargs)
    assert result.plan[1].isnan().all() and result.value[1].isnan() and not result.converged[1]
    torch.testing.assert_close(result.plan[0], clean.plan[0], rtol=1e-5, atol=1e-8)

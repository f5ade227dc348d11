"""Energy heads, the energy terms of both modes and the multiplier controller."""

from itertools import pairwise

import pytest
import torch

from physlm.config import from_flat
from physlm.physics import EnergyHeads, EnergyPenalty, LagrangeMultiplier, energy_terms


@pytest.fixture
def heads():
    torch.manual_seed(0)
    return [EnergyHeads(8) for _ in range(3)]


def _penalty(layers: int = 3, **settings) -> EnergyPenalty:
    torch.manual_seed(0)
    config = from_flat(settings).physics
    return EnergyPenalty(config, [EnergyHeads(8) for _ in range(layers)])


DRIFTS = [[0.5, 0.1, 0.9], [0.3, 0.3, 0.3], [0.0, 0.0, 0.0], [0.0, 0.2, 0.0],
          [2.0, 0.1, 5.0], [0.1, 0.1, 0.1]]


def test_reference_controller_follows_the_rule_step_by_step():
    """lambda <- clip(lambda + eta * (mean_l drift_l - target), 0.01, 10), all layers alike."""
    penalty = _penalty()
    expected = 0.05
    for drifts in DRIFTS:
        penalty.update(torch.tensor(drifts), skipped=torch.tensor(False))
        expected = min(max(expected + 0.01 * (sum(drifts) / 3 - 0.1), 0.01), 10.0)
        torch.testing.assert_close(penalty.lambdas, torch.full((3,), expected), atol=1e-7, rtol=0)


def test_pi_controller_per_layer_follows_its_rule_step_by_step():
    """Each layer's own error e_l; I_l <- clip(I_l + eta e_l); lambda_l <- clip(I_l + kp e_l)."""
    eta, kp, target = 0.05, 0.2, 0.1
    penalty = _penalty(lambda_scope="per_layer", lambda_kp=kp, lambda_lr=eta, lambda_min=0.0,
                       energy_target_drift=target)
    integral = [0.05] * 3
    for drifts in DRIFTS:
        penalty.update(torch.tensor(drifts), skipped=torch.tensor(False))
        errors = [d - target for d in drifts]
        integral = [min(max(i + eta * e, 0.0), 10.0) for i, e in zip(integral, errors, strict=True)]
        expected = [min(max(i + kp * e, 0.0), 10.0) for i, e in zip(integral, errors, strict=True)]
        torch.testing.assert_close(penalty.lambdas, torch.tensor(expected), atol=1e-6, rtol=0)
    assert len(set(penalty.lambdas.tolist())) == 3       # the layers' multipliers differ


def test_lambda_min_zero_lets_the_multiplier_switch_off():
    penalty = _penalty(lambda_min=0.0, lambda_lr=1.0)
    penalty.update(torch.zeros(3), skipped=torch.tensor(False))
    assert penalty.lambdas.tolist() == [0.0, 0.0, 0.0]


def test_a_skipped_step_moves_no_multiplier():
    penalty = _penalty(lambda_kp=0.5)
    penalty.update(torch.full((3,), 100.0), skipped=torch.tensor(True))
    torch.testing.assert_close(penalty.lambdas, torch.full((3,), 0.05))


def test_controller_clips_at_both_ends():
    penalty = _penalty()
    penalty.update(torch.full((3,), -100.0), skipped=torch.tensor(False))
    torch.testing.assert_close(penalty.lambdas, torch.full((3,), 0.01))
    penalty.update(torch.full((3,), 1e6), skipped=torch.tensor(False))
    torch.testing.assert_close(penalty.lambdas, torch.full((3,), 10.0))


def test_multiplier_is_a_parameter_the_optimizer_cannot_train():
    multiplier = LagrangeMultiplier(0.05)
    (parameter,) = multiplier.parameters()
    assert not parameter.requires_grad


def test_embedding_pairs_matches_the_reference_formula(heads):
    previous, current = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    terms = energy_terms(heads, "embedding_pairs", embeddings=current,
                         previous_embeddings=previous)
    for layer, h in enumerate(heads):
        e_cur = h.potential(current).sum((1, 2)) + h.kinetic(current - previous).sum((1, 2))
        e_prev = h.potential(previous).sum((1, 2))
        gap = e_cur - e_prev
        assert terms.mse[layer].item() == pytest.approx(gap.square().mean().item(), rel=1e-5)
        assert terms.drift[layer].item() == pytest.approx(gap.abs().mean().item(), rel=1e-5)
        assert terms.kinetic[layer].item() == pytest.approx(
            h.kinetic(current - previous).sum((1, 2)).mean().item(), rel=1e-5)


def test_energy_gradients_match_the_per_position_formula(heads):
    """The heads are evaluated for all layers at once, summed before their output layer and
    with tanh as a sigmoid: the gradients must still be those of the formula as written."""
    heads = [h.double() for h in heads]
    previous = torch.randn(4, 5, 8, dtype=torch.float64)
    current = torch.randn(4, 5, 8, dtype=torch.float64, requires_grad=True)
    inputs = [current] + [p for h in heads for p in h.parameters()]
    terms = energy_terms(heads, "embedding_pairs", embeddings=current,
                         previous_embeddings=previous)
    got = torch.autograd.grad(terms.mse.sum(), inputs)
    reference = sum((h.potential(current) + h.kinetic(current - previous)
                      - h.potential(previous)).sum((1, 2)).square().mean() for h in heads)
    expected = torch.autograd.grad(reference, inputs)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_energy_terms_stay_in_float32_under_bf16_autocast(heads):
    previous, current = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    exact = energy_terms(heads, "embedding_pairs", embeddings=current,
                         previous_embeddings=previous)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = energy_terms(heads, "embedding_pairs", embeddings=current,
                             previous_embeddings=previous)
    for name in ("mse", "drift", "kinetic", "potential"):
        got, expected = getattr(mixed, name), getattr(exact, name)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_embedding_pairs_skips_first_step_and_batch_size_changes(heads):
    current = torch.randn(4, 5, 8)
    assert energy_terms(heads, "embedding_pairs", embeddings=current,
                        previous_embeddings=None) is None
    assert energy_terms(heads, "embedding_pairs", embeddings=current,
                        previous_embeddings=torch.randn(3, 5, 8)) is None


def test_depth_mode_compares_each_layer_at_its_input_and_output(heads):
    states = [torch.randn(2, 5, 8) for _ in range(4)]       # h_0 .. h_3 for 3 layers
    terms = energy_terms(heads, "depth", hidden_states=states)
    momenta = [torch.zeros_like(states[0])] + [b - a for a, b in pairwise(states)]
    for layer, h in enumerate(heads, start=1):
        energy_in = (h.kinetic(momenta[layer - 1]) + h.potential(states[layer - 1])).sum((1, 2))
        energy_out = (h.kinetic(momenta[layer]) + h.potential(states[layer])).sum((1, 2))
        expected = (energy_out - energy_in).square().mean()
        assert terms.mse[layer - 1].item() == pytest.approx(expected.item(), rel=1e-5)


def test_depth_penalty_reaches_the_trajectory(heads):
    states = [torch.randn(2, 5, 8, requires_grad=True) for _ in range(4)]
    energy_terms(heads, "depth", hidden_states=states).mse.sum().backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in states)


def test_unknown_mode_is_rejected(heads):
    with pytest.raises(ValueError, match="energy_mode"):
        energy_terms(heads, "sideways", hidden_states=[])

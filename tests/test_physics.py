"""Energy heads, the energy terms of both modes and the multiplier controller."""

from itertools import pairwise

import pytest
import torch

from physlm.physics import EnergyHeads, LagrangeMultiplier, energy_terms


@pytest.fixture
def heads():
    torch.manual_seed(0)
    return [EnergyHeads(8) for _ in range(3)]


def test_controller_follows_the_rule_step_by_step():
    multiplier = LagrangeMultiplier(0.05)
    target, eta = 0.1, 0.01
    expected = 0.05
    for drift in [0.5, 0.3, 0.0, 0.0, 2.0, 0.1]:
        multiplier.update(torch.tensor(drift), target, eta, 0.01, 10.0)
        expected = min(max(expected + eta * (drift - target), 0.01), 10.0)
        assert multiplier.value.item() == pytest.approx(expected, abs=1e-7)


def test_controller_clips_at_both_ends():
    multiplier = LagrangeMultiplier(0.05)
    multiplier.update(torch.tensor(-100.0), 0.1, 0.01, 0.01, 10.0)
    assert multiplier.value.item() == pytest.approx(0.01)
    multiplier.update(torch.tensor(1e6), 0.1, 0.01, 0.01, 10.0)
    assert multiplier.value.item() == pytest.approx(10.0)


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

"""The corrected Koopman layer: a stable operator, a trained inverse lift, and a loss that
is zero exactly on linear lifted dynamics and cannot be met by a constant lift."""

import pytest
import torch

from physlm.config import from_flat
from physlm.koopman import Koopman, KoopmanLayer, bounded_operator, relative_error
from physlm.model import count_parameters
from physlm.trainer import train


def test_the_operator_stays_stable_while_training_pushes_it_to_grow():
    torch.manual_seed(0)
    layer = KoopmanLayer(8, 16)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    z = torch.randn(64, 16)
    for _ in range(50):     # maximise |K z|: unbounded, W grows without limit
        optimizer.zero_grad()
        (-(z @ layer.operator.T).square().sum()).backward()
        optimizer.step()
        assert torch.linalg.matrix_norm(layer.operator, ord=2) <= 1 + 1e-5
    assert torch.linalg.matrix_norm(layer.weight, ord=2) > 10    # W did grow
    radius = torch.linalg.eigvals(layer.operator.double()).abs().max()
    assert radius <= 1 + 1e-5


def test_the_operator_is_w_itself_inside_the_unit_ball():
    a = torch.diag(torch.tensor([0.5, -0.3, 0.9]))
    torch.testing.assert_close(bounded_operator(a), a)
    torch.testing.assert_close(bounded_operator(4 * a), 4 * a / 3.6)


def test_consistency_is_zero_on_a_known_linear_system_and_known_off_it():
    """Lifted states b = A a: consistency with K = A is 0; with K = I it is |A a - a|^2 over
    the spread of A a, computed by hand."""
    torch.manual_seed(0)
    a_matrix = torch.diag(torch.tensor([0.9, 0.5, -0.4]))
    a = torch.randn(200, 3)
    b = a @ a_matrix.T
    assert relative_error(a @ a_matrix.T, b).item() == pytest.approx(0.0, abs=1e-7)
    spread = (b - b.mean(0)).square().sum(-1).mean()
    expected = (a - b).square().sum(-1).mean() / (spread + 1e-6)
    assert relative_error(a, b).item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_inverse_lift_gets_a_gradient():
    torch.manual_seed(0)
    koopman = Koopman(8, 2, 16)
    states = [torch.randn(4, 5, 8) for _ in range(3)]
    koopman.terms(states).loss.backward()
    for layer in koopman.layers:
        for parameter in (*layer.unlift.parameters(), *layer.lift.parameters(), layer.weight):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_a_constant_lift_meets_consistency_but_not_reconstruction():
    """The trivial solution: phi = 0 makes K a = b exactly, and leaves psi nothing to
    reconstruct from: reconstruction is at least 1 (a constant predictor's relative error)."""
    torch.manual_seed(0)
    layer = KoopmanLayer(8, 16)
    with torch.no_grad():
        for p in layer.lift[-1].parameters():
            p.zero_()
    consistency, reconstruction, _ = layer.errors(torch.randn(4, 5, 8), torch.randn(4, 5, 8))
    assert consistency.item() == pytest.approx(0.0, abs=1e-6)
    assert reconstruction.item() >= 1.0 - 1e-4


def test_the_baseline_is_the_consistency_of_the_identity_operator_and_is_not_trained():
    torch.manual_seed(0)
    layer = KoopmanLayer(8, 16)
    before, after = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    consistency, _, identity = layer.errors(before, after)
    identity.backward()   # a baseline, not a loss: no parameter learns from it
    assert all(p.grad is None or not p.grad.any() for p in layer.parameters())
    assert identity.item() != pytest.approx(consistency.item(), rel=1e-3)   # W = I + noise
    with torch.no_grad():
        layer.weight.copy_(torch.eye(16))
    consistency, _, identity = layer.errors(before, after)
    assert identity.item() == pytest.approx(consistency.item(), rel=1e-6)


def test_a_koopman_run_follows_the_physics_schedule_and_logs_its_operator(tiny_config, tmp_path):
    config = tiny_config(energy_heads=False, energy_penalty=False, koopman=True,
                         koopman_dim=12)
    records = train(config, tmp_path / "run")
    assert [r["phase"] for r in records] == ["warmup", "physics", "physics"]
    assert records[0]["koopman_consistency_per_layer"] is None        # off in the warmup
    for record in records[1:]:
        assert len(record["koopman_consistency_per_layer"]) == 2
        assert all(v > 0 for v in record["koopman_reconstruction_per_layer"])
        assert all(v > 0 for v in record["koopman_identity_per_layer"])
        assert record["energy_grad_norm"] > 0    # the Koopman gradient, accounted as g_E
    assert all(0 < r <= 1 + 1e-5 for r in records[-1]["koopman_spectral_radius"])


def test_the_language_model_of_a_koopman_run_starts_as_the_plain_one():
    """The lifts are drawn after the LM: its initial weights equal the plain model's."""
    from physlm.build import build_model
    plain = from_flat({"energy_heads": False, "energy_penalty": False, "vocab_size": 300})
    koopman = from_flat({"energy_heads": False, "energy_penalty": False, "koopman": True,
                         "vocab_size": 300})
    a, _ = build_model(plain, 300)
    b, _ = build_model(koopman, 300)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=False):
        torch.testing.assert_close(p, q, msg=name)
    per_layer = 64 * 256 + 256 + 256 * 256 + 256 + 256 * 256 + 256 * 256 + 256 + 256 * 64 + 64
    assert count_parameters(b)["total"] - count_parameters(a)["total"] == 4 * per_layer

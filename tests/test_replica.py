"""The replica's switches (SPEC section 7): each reproduces the original's arithmetic."""

from types import SimpleNamespace

import pytest
import torch

from physlm.bk_core import _Surrogate, resolvent_diagonal, surrogate_resolvent_diagonal
from physlm.files import read_jsonl
from physlm.moe import SparseMoE
from physlm.runs import RunDirectory
from physlm.trainer import Trainer, train


def _dense_diagonal(diag: torch.Tensor, z: complex) -> torch.Tensor:
    """G_ii of tridiag(1, diag, 1) - z by a dense inverse, complex128."""
    n = diag.shape[-1]
    h = torch.diag(diag.to(torch.complex128)) + torch.diag(torch.ones(n - 1), 1) \
        + torch.diag(torch.ones(n - 1), -1)
    return torch.linalg.inv(h - z * torch.eye(n)).diagonal()


@pytest.mark.parametrize("causal", [False, True])
def test_surrogate_gradient_is_the_originals_blended_formula(causal):
    torch.manual_seed(0)
    diag = (torch.randn(1, 7, dtype=torch.float64) - 2.0).requires_grad_()
    weights = torch.randn(2, 7, dtype=torch.float64)     # L = sum a Re G + b Im G
    g = surrogate_resolvent_diagonal(diag, 1j, causal=causal)
    torch.testing.assert_close(g, resolvent_diagonal(diag.detach(), 1j, causal=causal))
    (weights[0] * g.real + weights[1] * g.imag).sum().backward()

    if causal:    # g_i: the last diagonal entry of the leading i x i block's resolvent
        G = torch.stack([_dense_diagonal(diag[0, :i + 1].detach(), 1j)[-1] for i in range(7)])
    else:
        G = _dense_diagonal(diag[0].detach(), 1j)
    upstream = torch.complex(weights[0], weights[1])     # dL/dRe + i dL/dIm, per position
    square = G ** 2
    small = square.abs() < 1e-3
    stabilised = torch.where(small, square * 1e-3 / square.abs(), square)
    expected = 0.5 * -(upstream * square).real + 0.5 * -(upstream / (stabilised + 1e-6)).real
    torch.testing.assert_close(diag.grad[0], expected.clamp(-1000, 1000))


def test_surrogate_gradient_differs_from_the_exact_one():
    """It is a different (wrong) gradient, not the exact one under another name."""
    torch.manual_seed(0)
    diag = (torch.randn(1, 7, dtype=torch.float64) - 2.0)
    grads = []
    for fn in (resolvent_diagonal, surrogate_resolvent_diagonal):
        d = diag.clone().requires_grad_()
        fn(d, 1j, causal=False).real.sum().backward()
        grads.append(d.grad)
    assert not torch.allclose(*grads, rtol=0.1, atol=0.0)


def test_surrogate_gradient_zeroes_non_finite_values_and_clamps():
    """The backward on given G values: a tiny G_ii blows the surrogate up (clamped), and
    G_ii = 0 makes the phase-keeping rescale 0/0 (set to 0)."""
    g = torch.tensor([[1e-9 + 0j, 0j, 1.0 + 1.0j]], dtype=torch.complex128)
    upstream = torch.tensor([[1e3 + 0j, 1.0 + 0j, 1.0 + 0j]], dtype=torch.complex128)
    ctx = SimpleNamespace(saved_tensors=(g,))
    grad, _, _ = _Surrogate.backward(ctx, upstream)
    assert grad[0, 0].item() == -1000.0       # 0.5 * -1e3 / (1e-3 + 1e-6), clamped
    assert grad[0, 1].item() == 0.0
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("scaled", [True, False])
def test_unscaled_router_gives_the_gate_no_gradient(scaled):
    torch.manual_seed(0)
    moe = SparseMoE(8, 4, 0.0, scale_by_router=scaled)
    out, *_ = moe(torch.randn(3, 5, 8))
    out.square().sum().backward()
    if scaled:
        assert moe.gate.weight.grad.abs().sum() > 0
    else:
        assert moe.gate.weight.grad is None
    assert moe.w1.grad.abs().sum() > 0     # the experts learn either way


def test_multiplier_in_the_optimizer_gets_adamws_step_then_the_dual_step(tiny_config, tmp_path):
    """lambda <- clip(lambda - lr (sign(mse) + wd lambda) + eta (d - d_target), 0.01, 10):
    AdamW's first step moves a parameter by lr in the direction of -sign(gradient) (m / sqrt(v)
    = g / |g|), its gradient mse_l / L >= 0, and decays it by lr * wd; the dual step follows."""
    config = tiny_config(physics_start_epoch=0, lambda_in_optimizer=True, lr=0.01,
                         lambda_energy_init=0.5, energy_target_drift=0.0)
    trainer = Trainer(config, tmp_path / "run")
    assert all(m.value.requires_grad for m in trainer.penalty.multipliers)
    torch.manual_seed(1)
    x, y = torch.randint(0, 300, (8, 16)), torch.randint(0, 300, (8, 16))
    trainer.train_step(x, y, physics_on=True)      # no previous batch: no energy, no step
    torch.testing.assert_close(trainer.penalty.lambdas, torch.full((2,), 0.5))
    record = trainer.train_step(torch.randint(0, 300, (8, 16)), y, physics_on=True)
    assert record["energy_computed"]
    physics = config.physics
    drift = record["drift_per_layer"].mean().item()
    after_adamw = 0.5 - config.train.lr * (1.0 + config.train.weight_decay * 0.5)
    expected = min(max(after_adamw + physics.lambda_lr * drift, 0.01), 10.0)
    torch.testing.assert_close(trainer.penalty.lambdas, torch.full((2,), expected),
                               rtol=1e-5, atol=1e-6)


def test_a_dual_variable_gets_only_the_dual_step(tiny_config, tmp_path):
    config = tiny_config(physics_start_epoch=0, lr=0.01, lambda_energy_init=0.5,
                         energy_target_drift=0.0)
    trainer = Trainer(config, tmp_path / "run")
    torch.manual_seed(1)
    y = torch.randint(0, 300, (8, 16))
    trainer.train_step(torch.randint(0, 300, (8, 16)), y, physics_on=True)
    record = trainer.train_step(torch.randint(0, 300, (8, 16)), y, physics_on=True)
    expected = 0.5 + config.physics.lambda_lr * record["drift_per_layer"].mean().item()
    torch.testing.assert_close(trainer.penalty.lambdas, torch.full((2,), expected))


def test_a_replica_forked_from_a_dual_variable_warmup_equals_one_trained_alone(
        tiny_config, tmp_path):
    """lambda gets no gradient before the physics epochs, so a run whose multipliers are
    AdamW parameters may start from a warmup whose were not (the study's ablation rows)."""
    config = tiny_config(epochs=3, physics_start_epoch=2)
    replica = tiny_config(epochs=3, physics_start_epoch=2, lambda_in_optimizer=True)
    train(config, tmp_path / "dual")
    assert RunDirectory(tmp_path / "forked").fork_from(RunDirectory(tmp_path / "dual"), replica)
    train(replica, tmp_path / "forked")
    train(replica, tmp_path / "alone")
    volatile = {"time_s", "tokens_per_s", "val_time_s", "train_time_s"}
    for name in ("steps", "epochs"):
        forked, alone = (read_jsonl(getattr(RunDirectory(tmp_path / run), name))
                         for run in ("forked", "alone"))
        assert [{k: v for k, v in r.items() if k not in volatile} for r in forked] == \
            [{k: v for k, v in r.items() if k not in volatile} for r in alone]

"""The MoE load balance in training (physlm.objectives.BalanceObjective) and the per-layer
load entropy that every ResNet-BK run logs."""

import math

import pytest
import torch

from physlm.config import from_flat
from physlm.files import read_jsonl
from physlm.moe import load_entropy
from physlm.objectives import BalanceObjective
from physlm.trainer import Trainer, train
from physlm.values import ConfigError

from .conftest import TINY, crash_after_step

VOLATILE = {"time_s", "tokens_per_s", "val_time_s", "train_time_s"}


def _stable(records):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def _norm(grads) -> float:
    return math.sqrt(sum((g.double() ** 2).sum().item() for g in grads if g is not None))


def test_the_balance_term_is_the_models_and_its_gradient_joins_the_lms(tiny_config, tmp_path):
    """On a physics step whose energy gradient is clipped apart (separate clipping, as in the
    recommended recipe), the balance term is the model's balance_loss and its gradient is part
    of the LM's: |g_LM| = |grad(CE + balance)|, |g_E| = |grad(energy)| alone."""
    config = tiny_config(physics_start_epoch=0, dropout=0.0, clip_mode="separate",
                         energy_mode="depth", energy_scale="relative", moe_balance_weight=0.5,
                         grad_clip=0.05)
    trainer = Trainer(config, tmp_path / "run")
    energy, balance = trainer.objectives
    assert isinstance(balance, BalanceObjective)
    torch.manual_seed(1)
    x, y = torch.randint(0, 300, (8, 16)), torch.randint(0, 300, (8, 16))
    parameters = [p for p in trainer.modules.parameters() if p.requires_grad]
    out = trainer.model(x, y)
    energy_loss = trainer.penalty.loss(trainer.penalty.terms(out, None).mse)
    lm = torch.autograd.grad(out.loss + out.balance_loss, parameters, retain_graph=True,
                             allow_unused=True)
    gate = torch.autograd.grad(out.balance_loss, trainer.model.blocks[0].moe.gate.weight,
                               retain_graph=True)[0]
    energy_grads = torch.autograd.grad(energy_loss, parameters, allow_unused=True)

    record = trainer.train_step(x, y, physics_on=True)
    assert record["balance_computed"] and record["energy_computed"]
    assert record["balance_loss"].item() == pytest.approx(out.balance_loss.item(), rel=1e-6)
    assert record["loss"].item() == pytest.approx(
        (out.loss + out.balance_loss + energy_loss).item(), rel=1e-6)
    assert record["lm_grad_norm"].item() == pytest.approx(_norm(lm), rel=1e-4)
    assert record["energy_grad_norm"].item() == pytest.approx(_norm(energy_grads), rel=1e-4)
    assert gate.abs().max() > 0          # the term reaches the router


def test_weight_zero_adds_no_term_and_draws_the_same_model(tiny_config, tmp_path):
    """At weight 0 there is no objective and no balance field, the loss is the LM's; a weight
    changes nothing but the term: the same initial weights, the same first LM loss."""
    plain = Trainer(tiny_config(energy_penalty=False, dropout=0.0), tmp_path / "a")
    balanced = Trainer(tiny_config(energy_penalty=False, dropout=0.0, moe_balance_weight=0.1),
                       tmp_path / "b")
    names = [o.name for o in plain.objectives]          # the control's energy, never computed
    assert "balance" not in names and [o.name for o in balanced.objectives] == [*names, "balance"]
    for p, q in zip(plain.model.parameters(), balanced.model.parameters(), strict=True):
        assert torch.equal(p, q)
    torch.manual_seed(1)
    x, y = torch.randint(0, 300, (8, 16)), torch.randint(0, 300, (8, 16))
    a, b = plain.train_step(x, y, False), balanced.train_step(x, y, False)
    assert "balance_loss" not in a and "balance_computed" not in a
    assert torch.equal(a["loss"], a["lm_loss"]) and torch.equal(a["lm_loss"], b["lm_loss"])
    assert b["loss"].item() == pytest.approx((b["lm_loss"] + b["balance_loss"]).item())
    assert not torch.equal(plain.model.blocks[0].moe.gate.weight,
                           balanced.model.blocks[0].moe.gate.weight)


def test_balance_keeps_a_collapsing_router_spread_in_every_epoch(tiny_config, tmp_path):
    """At a high learning rate the fixture's routers concentrate on fewer experts; the
    balance term (in every epoch: no physics here) keeps every layer's top expert lower and
    its load entropy higher. Logged: its loss per step and epoch, the entropy of every
    step's load and of the epoch's mean load."""
    runs = {}
    for weight in (0.0, 0.1):
        config = tiny_config(energy_penalty=False, epochs=2, lr=3e-2, moe_balance_weight=weight)
        train(config, tmp_path / str(weight))
        runs[weight] = (read_jsonl(tmp_path / str(weight) / "metrics" / "steps.jsonl"),
                        read_jsonl(tmp_path / str(weight) / "metrics" / "epochs.jsonl"))
    (steps, epochs), (balanced_steps, balanced_epochs) = runs[0.0], runs[0.1]
    top = [max(layer) for layer in epochs[-1]["expert_load"]]
    balanced_top = [max(layer) for layer in balanced_epochs[-1]["expert_load"]]
    assert max(top) > 0.6                                   # it does concentrate
    assert all(b < t - 0.1 for b, t in zip(balanced_top, top, strict=True))
    assert all(b > e for b, e in zip(balanced_epochs[-1]["load_entropy_per_layer"],
                                     epochs[-1]["load_entropy_per_layer"], strict=True))
    assert all(s["balance_computed"] and s["balance_loss"] > 0 for s in balanced_steps)
    for epoch in balanced_epochs:
        mine = [s["balance_loss"] for s in balanced_steps if s["epoch"] == epoch["epoch"]]
        assert epoch["train_balance_loss"] == pytest.approx(sum(mine) / len(mine))
        assert epoch["train_loss"] == pytest.approx(epoch["train_lm_loss"]
                                                    + epoch["train_balance_loss"], rel=1e-6)
    for record in steps + epochs:
        expected = load_entropy(torch.tensor(record["expert_load"], dtype=torch.float64))
        torch.testing.assert_close(torch.tensor(record["load_entropy_per_layer"],
                                                dtype=torch.float64),
                                   expected, rtol=1e-5, atol=1e-6)
    assert "train_balance_loss" not in epochs[-1]


def test_resume_with_the_balance_term_is_exact(tiny_config, tmp_path, monkeypatch):
    config = tiny_config(epochs=2, checkpoint_every=4, moe_balance_weight=0.1)
    train(config, tmp_path / "straight")
    crashing = Trainer(config, tmp_path / "cut")
    crash_after_step(crashing, monkeypatch, 9)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    Trainer(config, tmp_path / "cut").fit()
    for name in ("steps.jsonl", "epochs.jsonl"):
        straight = read_jsonl(tmp_path / "straight" / "metrics" / name)
        assert _stable(read_jsonl(tmp_path / "cut" / "metrics" / name)) == _stable(straight)
    assert "train_balance_loss" in straight[-1] and "load_entropy_per_layer" in straight[-1]


def test_models_without_experts_log_no_load_entropy(tiny_config, tmp_path):
    train(tiny_config(architecture="lstm", energy_heads=False, energy_penalty=False, epochs=1),
          tmp_path / "lstm")
    records = read_jsonl(tmp_path / "lstm" / "metrics" / "epochs.jsonl")
    assert "load_entropy_per_layer" not in records[-1]
    with pytest.raises(ConfigError, match="moe_balance_weight > 0 needs architecture: resnet_bk"):
        from_flat({**TINY, "architecture": "lstm", "energy_heads": False,
                   "energy_penalty": False, "moe_balance_weight": 0.1})

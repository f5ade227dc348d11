"""The physics recipe in training: reproduction of the reference, gradient accounting,
clipping that does not starve the LM, a constraint that collapse cannot meet."""

import json
from pathlib import Path

import pytest
import torch

from physlm.config import from_flat
from physlm.files import read_jsonl
from physlm.physics import EnergyHeads, energy_terms
from physlm.trainer import Trainer, train
from physlm.values import ConfigError

GOLDEN = json.loads((Path(__file__).parent / "data" / "reference_recipe_b479ab7.json")
                    .read_text())


@pytest.mark.parametrize("mode", ["embedding_pairs", "depth"])
def test_reference_recipe_reproduces_the_numbers_from_before_the_physics_rework(
        tiny_config, tmp_path, mode):
    """clip_mode total, the absolute (reference) energy and embeddings ~ N(0, 0.02^2): the
    same run as physlm gave before the heads left the model (the draw order is kept)."""
    config = tiny_config(energy_mode=mode, embedding_init_std=0.02, clip_mode="total",
                         energy_scale="absolute")
    records = train(config, tmp_path / "run")
    expected = GOLDEN["runs"][mode]
    assert len(records) == len(expected)
    for got, want in zip(records, expected, strict=True):
        for key in ("train_loss", "train_lm_loss", "train_energy_loss", "val_loss", "lambda"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["epoch"], key)
        if want["phase"] == "physics":
            assert got["drift"] == pytest.approx(want["drift"], rel=1e-5)
        else:
            assert got["drift"] is None      # no energy computed: null, not 0


def _independent_step(trainer, x, y, previous):
    """The same step's LM and energy gradients computed apart, by plain autograd."""
    model, penalty = trainer.model, trainer.penalty
    parameters = [p for p in trainer.modules.parameters() if p.requires_grad]
    out = model(x, y)
    terms = penalty.terms(out, previous)
    lm = torch.autograd.grad(out.loss, parameters, retain_graph=True, allow_unused=True)
    energy = torch.autograd.grad(penalty.loss(terms.mse), parameters, allow_unused=True)

    def norm(grads):
        return torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None))

    total = [(a if a is not None else 0) + (b if b is not None else 0)
             for a, b in zip(lm, energy, strict=True) if a is not None or b is not None]
    return norm(lm).item(), norm(energy).item(), norm(total).item()


@pytest.mark.parametrize("clip_mode", ["total", "separate"])
@pytest.mark.parametrize("mode", ["embedding_pairs", "depth"])
def test_gradient_norms_and_clip_factors_equal_an_independent_computation(
        tiny_config, tmp_path, clip_mode, mode):
    config = tiny_config(physics_start_epoch=0, dropout=0.0, clip_mode=clip_mode,
                         energy_mode=mode, grad_clip=0.05)
    trainer = Trainer(config, tmp_path / "run")
    torch.manual_seed(1)
    x = torch.randint(0, 300, (8, 16))
    y = torch.randint(0, 300, (8, 16))
    trainer.train_step(x, y, physics_on=True)       # the first step sets the previous batch
    x, y = torch.randint(0, 300, (8, 16)), torch.randint(0, 300, (8, 16))
    (energy,) = trainer.objectives                  # the energy penalty's
    lm_norm, energy_norm, total_norm = _independent_step(trainer, x, y, energy.previous)
    record = trainer.train_step(x, y, physics_on=True)
    assert record["energy_computed"]
    assert record["lm_grad_norm"].item() == pytest.approx(lm_norm, rel=1e-4)
    assert record["energy_grad_norm"].item() == pytest.approx(energy_norm, rel=1e-4)
    assert record["grad_norm"].item() == pytest.approx(total_norm, rel=1e-4)
    clip = config.train.grad_clip
    if clip_mode == "total":
        expected = min(1.0, clip / (total_norm + 1e-6))
        assert record["clip_factor"].item() == pytest.approx(expected, rel=1e-4)
        assert record["energy_clip_factor"].item() == pytest.approx(expected, rel=1e-4)
    else:
        assert record["clip_factor"].item() == pytest.approx(min(1.0, clip / (lm_norm + 1e-6)),
                                                             rel=1e-4)
        assert record["energy_clip_factor"].item() == pytest.approx(
            min(1.0, clip / (energy_norm + 1e-6)), rel=1e-4)


def test_separate_clipping_gives_the_lm_the_step_it_would_have_without_physics(
        tiny_config, tmp_path):
    """With clip_mode separate, the LM part of the update is the physics-off update."""
    config = tiny_config(physics_start_epoch=0, dropout=0.0, clip_mode="separate",
                         lambda_energy_init=10.0, lambda_max=10.0)
    with_physics = Trainer(config, tmp_path / "a")
    without = Trainer(tiny_config(physics_start_epoch=0, dropout=0.0, energy_penalty=False),
                      tmp_path / "b")
    torch.manual_seed(1)
    x, y = torch.randint(0, 300, (8, 16)), torch.randint(0, 300, (8, 16))
    a = with_physics.train_step(x, y, physics_on=True)
    b = without.train_step(x, y, physics_on=False)
    assert a["clip_factor"].item() == pytest.approx(b["clip_factor"].item(), rel=1e-5)
    # The energy reaches the token embedding and the heads only: every other weight moved alike.
    for (name, p), q in zip(with_physics.model.named_parameters(), without.model.parameters(),
                            strict=True):
        if name != "token_embedding.weight":
            torch.testing.assert_close(p, q, msg=name)


def _heads(zero: str) -> list[EnergyHeads]:
    torch.manual_seed(0)
    heads = [EnergyHeads(8) for _ in range(2)]
    with torch.no_grad():
        for layer_heads in heads:
            for mlp in (layer_heads.kinetic, layer_heads.potential):
                index = 0 if zero == "hidden" else -1
                mlp[index].weight.zero_()
                mlp[index].bias.zero_()
    return heads


@pytest.mark.parametrize("scale", ["absolute", "relative"])
@pytest.mark.parametrize("zero", ["hidden", "output"])
@pytest.mark.parametrize("mode", ["embedding_pairs", "depth"])
def test_collapsed_heads_meet_the_target_only_as_a_degenerate_constraint(zero, mode, scale):
    """Zeroed heads make H constant over the batch: a spread at or below the floor, so the
    criteria call the constraint degenerate instead of met, whatever the drift (0 with zeroed
    output layers; with zeroed hidden layers the reference gap is the constant N T(0))."""
    previous, current = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    states = [torch.randn(4, 5, 8) for _ in range(3)]
    terms = energy_terms(_heads(zero), mode, embeddings=current, previous_embeddings=previous,
                         hidden_states=states, scale=scale)
    if zero == "output":
        assert terms.drift.abs().max().item() < 1e-6
    floor = from_flat({"energy_scale": scale, "lambda_min": 0.0}).spread_floor
    assert (terms.spread <= floor).all()
    assert (terms.kinetic_spread == 0).all() and (terms.potential_spread == 0).all()


def test_relative_drift_does_not_shrink_with_the_heads():
    torch.manual_seed(0)
    heads = [EnergyHeads(8) for _ in range(2)]
    previous, current = torch.randn(4, 5, 8), torch.randn(4, 5, 8)

    def drifts():
        return [energy_terms(heads, "embedding_pairs", embeddings=current,
                             previous_embeddings=previous, scale=s).drift for s in
                ("absolute", "relative")]

    absolute, relative = drifts()
    with torch.no_grad():
        for layer_heads in heads:
            for mlp in (layer_heads.kinetic, layer_heads.potential):
                mlp[-1].weight.mul_(1e-3)
                mlp[-1].bias.mul_(1e-3)
    shrunk_absolute, shrunk_relative = drifts()
    torch.testing.assert_close(shrunk_absolute, absolute * 1e-3, rtol=1e-4, atol=0)
    torch.testing.assert_close(shrunk_relative, relative, rtol=1e-4, atol=0)


def test_heads_fitted_in_the_warmup_learn_without_touching_the_language_model(
        tiny_config, tmp_path):
    """fit_heads_in_warmup: the heads' energy falls during the warmup, lambda stays put, and
    the network ends the warmup as it would without it."""
    settings = {"energy_scale": "relative", "epochs": 2, "max_train_batches": 30}
    fitted = Trainer(tiny_config(**settings, fit_heads_in_warmup=True), tmp_path / "fitted")
    heads_before = [p.clone() for p in fitted.penalty.heads.parameters()]
    records = fitted.fit(until_epoch=1)
    plain = Trainer(tiny_config(**settings), tmp_path / "plain")   # seeds the RNG afresh
    plain.fit(until_epoch=1)
    assert records[0]["phase"] == "warmup" and records[0]["energy_steps"] > 0
    steps = [r for r in read_jsonl(fitted.run.steps) if r["energy_computed"]]
    third = len(steps) // 3
    first, last = ([r["energy_mse"] for r in part] for part in (steps[:third], steps[-third:]))
    assert sum(last) < 0.75 * sum(first)                            # the heads learned
    assert all(r["lambda"] == pytest.approx(0.05) for r in steps)    # lambda waits
    assert any(not torch.equal(a, b)
               for a, b in zip(heads_before, fitted.penalty.heads.parameters(), strict=True))
    for (name, a), b in zip(fitted.model.named_parameters(), plain.model.parameters(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_fitting_heads_on_the_absolute_energy_is_refused():
    with pytest.raises(ConfigError, match="collapsing to constants"):
        from_flat({"fit_heads_in_warmup": True})

"""The trainer: learning, the physics schedule, the controller, checkpoints and resume."""

import json
import math
from itertools import pairwise

import pytest
import torch

from physlm.checkpoint import load_checkpoint
from physlm.files import read_jsonl
from physlm.runs import RunConflictError, RunDirectory
from physlm.trainer import Trainer, TrainingError, train

from .conftest import crash_after_step, stable


def test_tiny_model_learns_the_fixture_corpus(tiny_config, tmp_path):
    config = tiny_config(epochs=3, max_train_batches=12, physics=False, lr=3e-3)
    epochs = train(config, tmp_path / "run")
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"] < math.log(300)
    assert epochs[-1]["val_ppl"] == pytest.approx(math.exp(epochs[-1]["val_loss"]))


def test_energy_terms_are_absent_in_warmup_and_active_after(tiny_config, tmp_path):
    """A warmup step adds no energy loss (0) and measures no drift: null, as its epoch's
    record says, not a drift of 0 that a reader could average in."""
    config = tiny_config(epochs=3, physics_start_epoch=1)
    train(config, tmp_path / "run")
    steps = read_jsonl(tmp_path / "run" / "metrics" / "steps.jsonl")
    warmup = [s for s in steps if s["epoch"] == 0]
    physics = [s for s in steps if s["epoch"] >= 1]
    assert warmup and all(s["energy_loss"] == 0 for s in warmup)
    assert all(s[key] is None for s in warmup for key in (
        "drift", "drift_per_layer", "energy_mse", "energy_mse_per_layer", "kinetic"))
    assert read_jsonl(tmp_path / "run" / "metrics" / "epochs.jsonl")[0]["drift"] is None
    assert all(not s["energy_computed"] and not s["physics"] for s in warmup)
    computed = [s for s in physics if s["energy_computed"]]
    assert len(computed) >= len(physics) - 2   # batch-size changes may skip a step
    assert all(s["energy_loss"] > 0 and s["drift"] > 0 for s in computed)
    for before, s in pairwise(steps):
        if s["energy_computed"]:   # the loss uses the multipliers as they were before the step
            weighted = sum(lam * mse for lam, mse in zip(before["lambda_per_layer"],
                                                         s["energy_mse_per_layer"], strict=True))
            assert s["energy_loss"] == pytest.approx(weighted / 2, rel=1e-5)
            assert s["loss"] == pytest.approx(s["lm_loss"] + s["energy_loss"], rel=1e-6)


def test_multipliers_move_exactly_by_the_rule(tiny_config, tmp_path):
    config = tiny_config(epochs=2, physics_start_epoch=1, lambda_lr=0.05)
    train(config, tmp_path / "run")
    steps = read_jsonl(tmp_path / "run" / "metrics" / "steps.jsonl")
    previous = config.physics.lambda_energy_init
    moved = 0
    for s in steps:
        expected = previous
        if s["energy_computed"]:
            expected = min(max(previous + 0.05 * (s["drift"] - 0.1), 0.01), 10.0)
        for value in s["lambda_per_layer"]:
            assert value == pytest.approx(expected, abs=2e-6)
        moved += expected != previous
        previous = s["lambda_per_layer"][0]
    assert moved > 0


def test_same_seed_same_metrics(tiny_config, tmp_path):
    config = tiny_config(epochs=2)
    first = train(config, tmp_path / "a")
    second = train(config, tmp_path / "b")
    assert stable(first) == stable(second)
    steps = [stable(read_jsonl(tmp_path / r / "metrics" / "steps.jsonl")) for r in "ab"]
    assert steps[0] == steps[1]


def test_checkpoint_round_trip_continues_identically(tiny_config, tmp_path):
    config = tiny_config(epochs=3, physics_start_epoch=1)
    train(config, tmp_path / "straight")
    assert len(train(config, tmp_path / "split", until_epoch=1)) == 1
    train(config, tmp_path / "split")                     # a new Trainer, from the checkpoint
    for name in ("steps.jsonl", "epochs.jsonl"):
        straight = read_jsonl(tmp_path / "straight" / "metrics" / name)
        split = read_jsonl(tmp_path / "split" / "metrics" / name)
        assert stable(split) == stable(straight)


def test_mid_epoch_checkpoint_resume_is_exact(tiny_config, tmp_path, monkeypatch):
    config = tiny_config(epochs=2, checkpoint_every=4)     # 6 batches per epoch
    train(config, tmp_path / "straight")
    crashing = Trainer(config, tmp_path / "cut")
    crash_after_step(crashing, monkeypatch, 9)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert len(read_jsonl(tmp_path / "cut" / "metrics" / "steps.jsonl")) == 9
    resumed = Trainer(config, tmp_path / "cut")
    assert (resumed.epoch, resumed.batch_in_epoch, resumed.global_step) == (1, 2, 8)
    resumed.fit()
    for name in ("steps.jsonl", "epochs.jsonl"):
        straight = read_jsonl(tmp_path / "straight" / "metrics" / name)
        cut = read_jsonl(tmp_path / "cut" / "metrics" / name)
        assert stable(cut) == stable(straight)


def test_finished_run_is_reused_not_retrained(tiny_config, tmp_path):
    config = tiny_config(epochs=1, physics_start_epoch=1)
    train(config, tmp_path / "run")
    before = (tmp_path / "run" / "metrics" / "steps.jsonl").read_text()
    assert Trainer(config, tmp_path / "run").finished
    train(config, tmp_path / "run")
    assert (tmp_path / "run" / "metrics" / "steps.jsonl").read_text() == before


def test_incompatible_resume_names_the_settings(tiny_config, tmp_path):
    train(tiny_config(epochs=1, physics_start_epoch=1), tmp_path / "run")
    with pytest.raises(RunConflictError, match=r"d_model: 16 in the run, 32 now"):
        Trainer(tiny_config(epochs=1, physics_start_epoch=1, d_model=32), tmp_path / "run")
    with pytest.raises(RunConflictError, match="resume: true"):
        Trainer(tiny_config(epochs=1, physics_start_epoch=1, resume=False), tmp_path / "run")
    fresh = Trainer(tiny_config(epochs=1, physics_start_epoch=1, d_model=32, overwrite=True),
                    tmp_path / "run")
    assert fresh.global_step == 0
    assert json.loads((tmp_path / "run" / "env.json").read_text())["parameters"]["total"] > 0


def test_more_epochs_extend_a_finished_run(tiny_config, tmp_path):
    train(tiny_config(epochs=2), tmp_path / "run")
    records = train(tiny_config(epochs=3), tmp_path / "run")
    assert [r["epoch"] for r in records] == [0, 1, 2]


def test_non_finite_steps_are_skipped_and_counted(tiny_config, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(epochs=1, physics_start_epoch=1), tmp_path / "run")
    forward = trainer.model.forward
    calls = {"n": 0}

    def sometimes_nan(x, targets=None, state=None):
        out = forward(x, targets)
        calls["n"] += 1
        if calls["n"] in (2, 3) and targets is not None and torch.is_grad_enabled():
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.model, "forward", sometimes_nan)
    records = trainer.fit()
    steps = read_jsonl(tmp_path / "run" / "metrics" / "steps.jsonl")
    assert [s["skipped"] for s in steps[:4]] == [False, True, True, False]
    assert records[0]["skipped_steps"] == 2
    assert math.isfinite(records[0]["val_loss"])


def test_too_many_bad_steps_abort_without_overwriting_the_checkpoint(tiny_config, tmp_path,
                                                                     monkeypatch):
    config = tiny_config(epochs=2, physics_start_epoch=2, max_bad_steps=3)
    trainer = Trainer(config, tmp_path / "run")
    trainer.fit(until_epoch=1)
    saved = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    forward = trainer.model.forward

    def always_nan(x, targets=None, state=None):
        out = forward(x, targets)
        if targets is not None and torch.is_grad_enabled():
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.model, "forward", always_nan)
    with pytest.raises(TrainingError, match="3 consecutive steps") as caught:
        trainer.fit()
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == saved
    assert f"the last good checkpoint ({trainer.run.checkpoint}) is kept" in str(caught.value)


def test_a_run_diverging_before_its_first_checkpoint_cites_none(tiny_config, tmp_path):
    """lr = 1e10 diverges in the first epoch: no checkpoint exists, so none is cited."""
    config = tiny_config(lr=1e10, max_bad_steps=2)
    with pytest.raises(TrainingError, match="consecutive steps") as caught:
        train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert "no checkpoint had been written yet" in str(caught.value)
    assert "last.pt" not in str(caught.value)


@pytest.mark.parametrize("fork_into", ["control", "physics"])
def test_a_run_forked_from_a_warmup_equals_one_trained_from_scratch(tiny_config, tmp_path,
                                                                    fork_into):
    """A control forked at the end of a physics run's warmup (or a physics run, with another
    physics recipe, forked from a control's) gives the same metrics, bit for bit."""
    physics = tiny_config(epochs=3, physics_start_epoch=2)
    target = (physics.control() if fork_into == "control" else
              tiny_config(epochs=3, physics_start_epoch=2, lambda_kp=0.5, clip_mode="separate"))
    source = physics if fork_into == "control" else physics.control()
    train(source, tmp_path / "source")
    forked = RunDirectory(tmp_path / "forked")
    assert forked.fork_from(RunDirectory(tmp_path / "source"), target)
    assert forked.read_env()["forked_from"] == {"run": "../source", "epoch": 2}
    train(target, forked.root)
    train(target, tmp_path / "scratch")
    for name in ("steps.jsonl", "epochs.jsonl"):
        scratch = read_jsonl(tmp_path / "scratch" / "metrics" / name)
        assert stable(read_jsonl(forked.steps.parent / name)) == stable(scratch)
    scratch = RunDirectory(tmp_path / "scratch")
    assert forked.references.read_text() == scratch.references.read_text()
    best = [load_checkpoint(run.best_checkpoint) for run in (forked, scratch)]
    assert best[0]["epoch"] == best[1]["epoch"]   # the best may be a warmup epoch: kept too
    assert all(torch.equal(best[0]["model"][k], v) for k, v in best[1]["model"].items())


def test_no_fork_where_the_warmup_would_differ(tiny_config, tmp_path):
    config = tiny_config(epochs=3, physics_start_epoch=2)
    train(config.control(), tmp_path / "source")
    source = RunDirectory(tmp_path / "source")
    for other in (tiny_config(epochs=3, physics_start_epoch=2, lr=2e-3),
                  tiny_config(epochs=3, physics_start_epoch=1),
                  tiny_config(epochs=3, physics_start_epoch=2, lambda_energy_init=0.5),
                  tiny_config(epochs=3, physics_start_epoch=2, energy_scale="relative",
                              fit_heads_in_warmup=True)):
        assert not RunDirectory(tmp_path / "target").fork_from(source, other)
    assert not (tmp_path / "target").exists()


OPTIMIZERS = {"adamw": {"optimizer": "adamw"},
              "sgd": {"optimizer": "sgd", "lr": 0.3, "momentum": 0.9, "nesterov": True},
              "symplectic": {"optimizer": "symplectic", "lr": 0.1, "momentum": 0.8}}
SCHEDULES = {"constant": {"lr_schedule": "constant"},
             "cosine": {"lr_schedule": "cosine", "lr_warmup_steps": 3},
             "plateau": {"lr_schedule": "plateau", "lr_warmup_steps": 3}}
HELDOUT_LOSSES = [3.0, 3.5, 3.6]   # per epoch: rises twice, so patience 0 cuts the lr twice


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resume_is_exact_for_every_optimizer_and_schedule(tiny_config, tmp_path, monkeypatch,
                                                          optimizer, schedule):
    """Killed mid-epoch after the warmup and after a plateau decision, then resumed: the same
    steps, epochs, learning rates and best checkpoint as a run never interrupted."""
    monkeypatch.setattr(Trainer, "evaluate_heldout", lambda self: {
        "heldout_loss": HELDOUT_LOSSES[self.epoch], "heldout_ppl": math.exp(
            HELDOUT_LOSSES[self.epoch])})
    config = tiny_config(epochs=3, max_train_batches=4, checkpoint_every=3, heldout_fraction=0.1,
                         **OPTIMIZERS[optimizer], **SCHEDULES[schedule])
    train(config, tmp_path / "straight")
    crashing = Trainer(config, tmp_path / "cut")
    crash_after_step(crashing, monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    resumed = Trainer(config, tmp_path / "cut")
    assert (resumed.epoch, resumed.batch_in_epoch) == (1, 2)   # after epoch 0's plateau step
    resumed.fit()
    for name in ("steps.jsonl", "epochs.jsonl"):
        straight = read_jsonl(tmp_path / "straight" / "metrics" / name)
        assert stable(read_jsonl(tmp_path / "cut" / "metrics" / name)) == stable(straight)
    best = [load_checkpoint(tmp_path / run / "checkpoints" / "best.pt") for run in ("straight",
                                                                                    "cut")]
    assert best[0]["epoch"] == best[1]["epoch"] == 0   # the lowest held-out loss
    assert all(torch.equal(best[0]["model"][k], v) for k, v in best[1]["model"].items())
    lrs = [r["lr"] for r in straight]
    cuts = {"constant": [1, 1, 1, 1], "cosine": None, "plateau": [1, 1, 1 / 4, 1 / 16]}[schedule]
    if cuts:   # the lr each epoch ended with (a plateau cuts after it), then the last one
        final = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
        lrs.append(final["optimizer"]["param_groups"][0]["lr"])
        assert lrs == pytest.approx([config.train.lr * c for c in cuts])
    else:
        assert lrs[-1] == pytest.approx(0, abs=1e-12)   # cosine reaches 0 at the last step


def test_the_warmup_raises_the_lr_linearly_to_its_value(tiny_config, tmp_path):
    """The per-step lr (the hand-written warmup's rule, now torch's LinearLR)."""
    train(tiny_config(epochs=1, physics=False, lr_warmup_steps=4, lr=2e-3), tmp_path / "run")
    steps = read_jsonl(tmp_path / "run" / "metrics" / "steps.jsonl")
    assert [s["lr"] for s in steps] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3])

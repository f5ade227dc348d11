"""The held-out split in training (issue 22, item 3) and what a run keeps of it: held-out and
non-<unk> figures in the epoch records, the best epoch chosen on held-out, its weights in
checkpoints/best.pt, the count references in the run's record, and the checkpoint format."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from physlm.batches import eval_batches
from physlm.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from physlm.config import from_flat
from physlm.data import UNK_ID
from physlm.errors import CheckpointError
from physlm.evaluation import evaluate
from physlm.generate import load_run_model
from physlm.model import ResNetBK
from physlm.ngram import count_references, references
from physlm.rundata import RunData, improves
from physlm.runs import RunDirectory, load_run
from physlm.trainer import Trainer, train


def test_evaluation_splits_the_loss_into_known_targets(tiny_config):
    """val_loss_known is the mean cross-entropy of the targets that are not <unk>, computed
    here from the logits; val_loss that of all targets."""
    config = tiny_config(dropout=0.0)
    torch.manual_seed(0)
    model = ResNetBK(config.model, 40)
    chunks = torch.randint(0, 40, (20, config.model.n_seq + 1))
    chunks[::3, 5::4] = UNK_ID   # a good share of <unk> targets
    figures = evaluate(model, chunks, config.data, torch.device("cpu"), split="heldout")
    losses = []
    with torch.no_grad():
        for x, y in eval_batches(chunks, config.data.batch_size, config.data.max_eval_batches):
            losses.append((F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(),
                                           reduction="none"), y.flatten()))
    every = torch.cat([loss for loss, _ in losses]).double()
    targets = torch.cat([y for _, y in losses])
    known = every[targets != UNK_ID]
    assert 0 < len(known) < len(every)
    assert figures["heldout_loss"] == pytest.approx(every.mean().item(), rel=1e-6)
    assert figures["heldout_loss_known"] == pytest.approx(known.mean().item(), rel=1e-6)
    assert figures["heldout_ppl_known"] == pytest.approx(math.exp(known.mean().item()))
    assert figures["heldout_known_tokens"] == len(known)
    assert figures["heldout_tokens"] == len(every)


def test_no_known_target_gives_nan_not_an_error(tiny_config):
    config = tiny_config()
    chunks = torch.full((4, config.model.n_seq + 1), UNK_ID)
    figures = evaluate(ResNetBK(config.model, 40), chunks, config.data, torch.device("cpu"))
    assert figures["val_known_tokens"] == 0 and math.isnan(figures["val_ppl_known"])
    assert math.isfinite(figures["val_ppl"])


@pytest.fixture(scope="module")
def heldout_run(tmp_path_factory):
    """A run with a held-out split whose held-out loss is best at epoch 1 of 3 (scripted), and
    its validation best at the last epoch."""
    root = tmp_path_factory.mktemp("heldout") / "run"
    config = from_flat({"dataset": "fixture", "d_model": 16, "n_layers": 2, "n_seq": 16,
                        "vocab_size": 300, "batch_size": 8, "epochs": 3, "physics": False,
                        "max_train_batches": 4, "max_eval_batches": 2, "progress": False,
                        "heldout_fraction": 0.1, "lr": 3e-3})
    trainer = Trainer(config, root)
    real = trainer.evaluate_heldout
    scripted = iter([3.0, 2.0, 2.5])   # epochs 0, 1, 2 (the initial evaluation was real)

    def heldout():
        figures, loss = real(), next(scripted)
        return {**figures, "heldout_loss": loss, "heldout_ppl": math.exp(loss)}

    trainer.evaluate_heldout = heldout
    trainer.fit(until_epoch=2)
    after_best = trainer.run.best_checkpoint.read_bytes()
    last_then = load_checkpoint(trainer.run.checkpoint)["model"]
    trainer.fit()
    return trainer, after_best, last_then


def test_epoch_records_carry_heldout_and_known_figures(heldout_run):
    trainer, _, _ = heldout_run
    records = trainer.run.epoch_records()
    for record in records:
        for split in ("val", "heldout"):
            assert record[f"{split}_ppl_known"] == pytest.approx(
                math.exp(record[f"{split}_loss_known"]))
            assert 0 < record[f"{split}_known_tokens"] <= record[f"{split}_tokens"]
        assert record["time_s"] == pytest.approx(record["train_time_s"] + record["val_time_s"]
                                                 + record["heldout_time_s"])
    initial = json.loads(trainer.run.initial.read_text())
    assert {"val_loss", "val_ppl_known", "heldout_loss", "heldout_ppl_known"} <= initial.keys()
    assert trainer.corpus.heldout is not None and len(trainer.corpus.heldout)


def test_best_epoch_is_chosen_on_heldout_and_its_weights_kept(heldout_run):
    trainer, after_best, last_then = heldout_run
    data = load_run(trainer.run.root)
    val = data.epochs["val_ppl"].tolist()
    assert val.index(min(val)) != 1   # validation alone would pick another epoch
    assert data.selected_on == "held-out"
    assert data.best_epoch() == (val[1], 2)   # the held-out best, with its val PPL
    best = load_checkpoint(trainer.run.best_checkpoint)
    assert (best["epoch"], best["selected_on"], best["heldout_ppl"]) == (1, "heldout_ppl",
                                                                         math.exp(2.0))
    assert set(best) == {"format", "model", "epoch", "global_step", "selected_on",
                         "heldout_ppl", "config"}   # weights only
    assert all(torch.equal(best["model"][k], v) for k, v in last_then.items())
    assert trainer.run.best_checkpoint.read_bytes() == after_best   # epoch 2 was not better
    assert load_run_model(trainer.run.root, "best").checkpoint == "best"


def test_references_are_counted_at_the_start_and_kept_with_the_record(heldout_run, tmp_path):
    trainer, _, _ = heldout_run
    stored = json.loads(trainer.run.references.read_text())
    assert stored == json.loads(json.dumps(references(trainer.corpus)))
    assert stored["valid"]["ppl"] == count_references(trainer.corpus, "valid")
    assert set(stored) == {"valid", "heldout"}
    assert stored["valid"]["targets"] == trainer.corpus.valid[:, 1:].numel()
    copy = RunDirectory(tmp_path / "copy")
    trainer.run.copy_record_to(copy)
    assert load_run(copy.root).references == stored


def test_without_heldout_the_best_epoch_is_validations(tiny_config, tmp_path):
    train(tiny_config(epochs=2, physics=False), tmp_path / "run")
    data = load_run(tmp_path / "run")
    assert "heldout_ppl" not in data.epochs and data.selected_on == "validation"
    best = load_checkpoint(RunDirectory(tmp_path / "run").best_checkpoint)
    assert best["epoch"] + 1 == data.best_epoch()[1] and best["selected_on"] == "val_ppl"
    assert set(json.loads(RunDirectory(tmp_path / "run").references.read_text())) == {"valid"}


def _data(epochs: list[dict]) -> RunData:
    return RunData(run=None, config=from_flat({}), env={}, initial={}, references={},
                   steps=pd.DataFrame(), epochs=pd.DataFrame(epochs))


def test_improves_and_best_epoch_follow_one_rule():
    """Strictly lower, finite values only; ties keep the earlier epoch, as idxmin does."""
    epochs = [{"epoch": 0, "val_ppl": 9.0, "heldout_ppl": math.nan},
              {"epoch": 1, "val_ppl": 8.0, "heldout_ppl": 5.0},
              {"epoch": 2, "val_ppl": 7.0, "heldout_ppl": 5.0},
              {"epoch": 3, "val_ppl": 6.0, "heldout_ppl": math.inf}]
    flags = [improves(epochs[:i], record) for i, record in enumerate(epochs)]
    assert flags == [False, True, False, False]
    assert _data(epochs).best_epoch() == (8.0, 2)
    plain = [{k: v for k, v in r.items() if k != "heldout_ppl"} for r in epochs]
    assert [improves(plain[:i], r) for i, r in enumerate(plain)] == [True] * 4
    assert _data(plain).best_epoch() == (6.0, 4) and _data(plain).selected_on == "validation"


def test_a_format_2_checkpoint_is_refused_for_training_but_its_weights_are_read(
        tiny_config, tmp_path):
    config = tiny_config(epochs=1, physics=False)
    train(config, tmp_path / "run")
    run = RunDirectory(tmp_path / "run")
    state = load_checkpoint(run.checkpoint)
    del state["schedule"]
    state["format"] = "physlm-checkpoint-2"
    save_checkpoint(run.checkpoint, state)
    with pytest.raises(CheckpointError, match="learning-rate schedule's state.*delete it"):
        Trainer(tiny_config(epochs=2, physics=False), run.root)
    assert load_run_model(run.root, "last").config == config   # sampling still reads it
    assert FORMAT == "physlm-checkpoint-3"


def test_a_fork_from_an_old_warmup_checkpoint_trains_its_own_warmup(tiny_config, tmp_path):
    physics = tiny_config(epochs=2, physics_start_epoch=1)
    train(physics, tmp_path / "source")
    source = RunDirectory(tmp_path / "source")
    state = load_checkpoint(source.warmup_checkpoint)
    state["format"] = "physlm-checkpoint-2"
    save_checkpoint(source.warmup_checkpoint, state)
    target = RunDirectory(tmp_path / "control")
    assert not target.fork_from(source, physics.control())
    assert not target.root.exists()
    records = train(physics.control(), target.root)   # from scratch
    assert len(records) == 2


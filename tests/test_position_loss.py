"""benchmarks/position_loss.py: the validation loss by position in a chunk averages to the
model's validation loss over the same chunks."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from physlm.config import from_flat
from physlm.data import load_corpus
from physlm.evaluation import evaluate
from physlm.generate import load_run_model
from physlm.trainer import train

from .conftest import TINY

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "position_loss.py"


def test_position_losses_average_to_the_validation_loss(tmp_path):
    spec = importlib.util.spec_from_file_location("position_loss", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run_dir = tmp_path / "run"
    train(from_flat({**TINY, "epochs": 1, "energy_penalty": False}), run_dir)
    result = module.position_loss(str(run_dir), None, "last")
    assert result["n"] == TINY["n_seq"] == len(result["loss_by_position"])
    assert result["mean_loss_by_context"]["1-1"] == result["loss_by_position"][0]
    run = load_run_model(run_dir, "last")
    data = dataclasses.replace(run.config.data, max_eval_batches=None)
    chunks = load_corpus(data, TINY["n_seq"], run.vocab).valid
    assert result["chunks"] == len(chunks)
    whole = evaluate(run.model, chunks, data, torch.device("cpu"))["val_loss"]
    losses = result["loss_by_position"]
    assert sum(losses) / len(losses) == pytest.approx(whole, rel=1e-6)
    shorter = module.position_loss(str(run_dir), 4, "last")   # --n below n_seq is taken
    assert shorter["n"] == 4 and module.position_loss(str(run_dir), 99, "last")["n"] == 16
    memory = result["efold_memory_tokens"]        # one potential per layer: 1 / -mean log|g|
    assert list(memory) == ["layer 0", "layer 1"] and all(
        len(m) == 1 and m[0] > 0 for m in memory.values())
    transformer = tmp_path / "transformer"
    train(from_flat({**TINY, "epochs": 1, "architecture": "transformer", "energy_heads": False,
                     "energy_penalty": False}), transformer)
    assert module.position_loss(str(transformer), None, "last")["efold_memory_tokens"] == {}

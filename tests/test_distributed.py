"""Data-parallel training with torchrun (2 CPU processes, gloo) equals one process."""

import os
import subprocess
import sys

import pytest
import yaml

from physlm.config import from_flat
from physlm.files import read_jsonl
from physlm.trainer import train

from .conftest import TINY


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    params = {**TINY, "dropout": 0.0, "epochs": 2, "physics_start_epoch": 1,
              "max_train_batches": 5, "lambda_lr": 0.05}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "physlm", "train",
               "--params", str(tmp_path / "params.yaml"), "--run-dir", str(tmp_path / "ddp")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    train(from_flat(params), tmp_path / "single")
    ddp = read_jsonl(tmp_path / "ddp" / "metrics" / "steps.jsonl")
    single = read_jsonl(tmp_path / "single" / "metrics" / "steps.jsonl")
    assert len(ddp) == len(single) == 10          # written once, by rank 0
    for a, b in zip(ddp, single, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["drift"] == (None if b["drift"] is None   # a warmup step measures none
                              else pytest.approx(b["drift"], rel=1e-5, abs=1e-7))
        assert a["lambda_per_layer"] == pytest.approx(b["lambda_per_layer"], rel=1e-5)
    assert ddp[-1]["lambda"] != params.get("lambda_energy_init", 0.05)
    epochs = [read_jsonl(tmp_path / r / "metrics" / "epochs.jsonl") for r in ("ddp", "single")]
    assert epochs[0][-1]["val_loss"] == pytest.approx(epochs[1][-1]["val_loss"], rel=1e-4)
    assert (tmp_path / "ddp" / "checkpoints" / "last.pt").exists()

"""Shared fixtures: a tiny configuration on the synthetic corpus the project writes itself."""

from pathlib import Path

import pytest

from physlm.config import Config, from_flat

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "dataset": "fixture", "d_model": 16, "n_layers": 2, "n_seq": 16, "vocab_size": 300,
    "batch_size": 8, "epochs": 3, "physics_start_epoch": 1, "max_train_batches": 6,
    "max_eval_batches": 3, "progress": False,
}


@pytest.fixture(autouse=True, scope="session")
def _fixture_cache(tmp_path_factory):
    """Keep the generated corpus inside pytest's temporary directory."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PHYSLM_CACHE", str(cache))
        yield


VOLATILE = {"time_s", "tokens_per_s", "val_time_s", "train_time_s"}  # timings


def stable(records: list[dict]) -> list[dict]:
    """Metrics records without their timings: what two runs of the same settings share."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def one_error_line(capsys) -> str:
    """The command's stderr, asserted to be one `physlm: ...` line without a traceback."""
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("physlm: "), f"expected one line, got {err!r}"
    return lines[0]


def crash_after_step(trainer, monkeypatch, step: int) -> None:
    """Make `trainer` stop as if killed, once `step` optimizer steps are done."""
    train_step = trainer.train_step

    def crashing(*args):
        if trainer.global_step == step:
            raise KeyboardInterrupt("simulated crash")
        return train_step(*args)

    monkeypatch.setattr(trainer, "train_step", crashing)


@pytest.fixture
def tiny_config():
    def make(**overrides) -> Config:
        return from_flat({**TINY, **overrides})
    return make

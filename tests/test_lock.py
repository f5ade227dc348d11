"""The run directory's lock (physlm.lock): one writer at a time, released when its process
dies; and the run directory's files: resumable data paths, file modes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import filelock
import pytest
import torch
import yaml

from physlm.__main__ import main
from physlm.config import from_flat
from physlm.errors import RunBusyError
from physlm.files import read_jsonl
from physlm.fixture import fixture_dir, write_fixture_corpus
from physlm.lock import HOLDER_NAME, LOCK_NAME, holder
from physlm.runs import RunDirectory
from physlm.trainer import train

from .conftest import REPO_ROOT, TINY


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                        env.get("PYTHONPATH")])))
    return env


def _params_file(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump({**TINY, "device": "cpu", **overrides}, sort_keys=False))
    return path


def _assert_metrics_intact(run: RunDirectory, epochs: int, batches: int) -> None:
    steps = [record["step"] for record in read_jsonl(run.steps)]
    assert steps == list(range(1, epochs * batches + 1)), "steps lost, repeated or out of order"
    assert [record["epoch"] for record in read_jsonl(run.epochs)] == list(range(epochs))


# --- the lock ----------------------------------------------------------------------------------

def test_lock_is_reentrant_names_its_holder_and_leaves_no_empty_folder(tmp_path):
    run = RunDirectory(tmp_path / "runs" / "x")
    with run.lock("the pipeline"):
        with run.lock():  # the same process again: only counted
            assert (run.root / HOLDER_NAME).read_text() == f"{os.getpid()} the pipeline\n"
        assert (run.root / LOCK_NAME).exists()
    assert not (tmp_path / "runs").exists()  # created by the lock, and nothing was written


def test_a_held_run_directory_fails_at_once_with_its_holder(tmp_path):
    """Another holder (another open file description: as another process would) is named."""
    run = RunDirectory(tmp_path / "run")
    run.root.mkdir()
    (run.root / "config.yaml").write_text("")
    other = filelock.FileLock(run.root / LOCK_NAME, timeout=0)
    with other:
        (run.root / HOLDER_NAME).write_text(f"{os.getpid()} python -m physlm train -x\n")
        start = time.monotonic()
        with pytest.raises(RunBusyError) as error, run.lock():
            pass
        assert time.monotonic() - start < 1.0
    assert str(error.value) == (
        f"{run.root} is in use by process {os.getpid()} (python -m physlm train -x); wait for "
        "it to finish, or stop it, then run again")
    with run.lock():  # released: free again, and the folder that holds a run stays
        pass
    assert (run.root / "config.yaml").exists()


def test_release_removes_the_lock_file_it_made_and_keeps_one_it_found(tmp_path):
    """A failed resume leaves the run directory as it was: no .lock added to it."""
    run = RunDirectory(tmp_path / "run")
    run.root.mkdir()
    (run.root / "config.yaml").write_text("")
    with run.lock():
        assert sorted(os.listdir(run.root)) == [LOCK_NAME, HOLDER_NAME, "config.yaml"]
    assert os.listdir(run.root) == ["config.yaml"]
    (run.root / LOCK_NAME).touch()  # an older physlm's, or another tool's
    with run.lock():
        pass
    assert sorted(os.listdir(run.root)) == [LOCK_NAME, "config.yaml"]


def test_a_dead_holders_record_is_not_shown(tmp_path):
    """The holder file of a killed holder stays behind; the next holder overwrites it, and
    until then a busy directory names no dead process."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / HOLDER_NAME).write_text(f"{dead.pid} python -m physlm train\n")
    assert holder(tmp_path, patience=0.05) == "another process"


@pytest.mark.slow
def test_two_trainers_started_together_on_one_run_dir(tmp_path):
    """Exactly one trains; the other fails at once with one line naming it, exit code 1."""
    fixture_dir()  # write the shared corpus before either process needs it
    epochs, batches = 3, 100
    params = _params_file(tmp_path / "params.yaml", epochs=epochs, max_train_batches=batches)
    run = RunDirectory(tmp_path / "run")
    command = [sys.executable, "-m", "physlm", "train", "--params", str(params),
               "--run-dir", str(run.root)]
    children = [subprocess.Popen(command, cwd=REPO_ROOT, env=_child_env(), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for _ in range(2)]
    ended: dict[int, float] = {}
    deadline = time.monotonic() + 300
    try:
        while len(ended) < 2 and time.monotonic() < deadline:
            for index, child in enumerate(children):
                if index not in ended and child.poll() is not None:
                    ended[index] = time.monotonic()
            time.sleep(0.01)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    outputs = [child.communicate() for child in children]
    codes = [child.returncode for child in children]
    assert sorted(codes) == [0, 1], f"exit codes {codes}: {outputs}"
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert ended[loser] < ended[winner], "the second writer waited instead of failing at once"
    lines = outputs[loser][1].strip().splitlines()
    assert len(lines) == 1, outputs[loser][1]
    assert lines[0].startswith(f"physlm: run directory busy: {run.root} is in use by process "
                               f"{children[winner].pid} (python -m physlm train --params ")
    assert lines[0].endswith("wait for it to finish, or stop it, then run again")
    _assert_metrics_intact(run, epochs, batches)
    assert not (run.root / HOLDER_NAME).exists()


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_a_sigkilled_holder_does_not_block_the_next_run(tmp_path, capsys):
    fixture_dir()
    epochs, batches = 2, 30
    params = _params_file(tmp_path / "params.yaml", epochs=epochs, max_train_batches=batches,
                          checkpoint_every=5)
    run = RunDirectory(tmp_path / "run")
    argv = ["train", "--params", str(params), "--run-dir", str(run.root)]
    child = subprocess.Popen([sys.executable, "-m", "physlm", *argv], cwd=REPO_ROOT,
                             env=_child_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while _lines(run.steps) < 1 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert child.poll() is None, "training ended before it could be killed"
        assert (run.root / HOLDER_NAME).read_text().startswith(f"{child.pid} ")
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert (run.root / HOLDER_NAME).exists()  # stale: the OS released the lock anyway
    assert main(argv) == 0, capsys.readouterr().err
    _assert_metrics_intact(run, epochs, batches)
    assert not (run.root / HOLDER_NAME).exists()


# --- the run directory's files -----------------------------------------------------------------

def test_resume_with_the_data_folder_spelled_differently(tmp_path):
    """data_dir is where the data lives, checked by its sha256: another spelling resumes."""
    corpus = write_fixture_corpus(tmp_path / "corpus", train_tokens=3000, valid_tokens=600,
                                  test_tokens=600)
    settings = {**TINY, "dataset": "wikitext-2-raw-v1", "epochs": 2, "max_train_batches": 2,
                "max_eval_batches": 1}
    run_dir = tmp_path / "run"
    train(from_flat({**settings, "data_dir": str(corpus)}), run_dir, until_epoch=1)
    records = train(from_flat({**settings, "data_dir": f"{corpus}/./"}), run_dir)
    assert [record["epoch"] for record in records] == [0, 1]
    assert RunDirectory(run_dir).read_config().data.data_dir == f"{corpus}/./"


def test_atomically_written_files_have_the_mode_of_ordinary_ones(tmp_path, tiny_config):
    """Checkpoints and env.json honour the umask as config.yaml does (not mkstemp's 0600)."""
    before = os.umask(0o027)
    try:
        train(tiny_config(epochs=1, energy_penalty=False, max_train_batches=1,
                          max_eval_batches=1), tmp_path / "run")
    finally:
        os.umask(before)
    run = RunDirectory(tmp_path / "run")
    mode = run.config.stat().st_mode & 0o777
    assert mode == 0o640
    for path in (run.checkpoint, run.env, run.initial, run.epochs):
        assert path.stat().st_mode & 0o777 == mode, path

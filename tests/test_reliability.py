"""Reliability: crash and resume, atomic checkpoints, safe loading, torn metrics, bad input.

The crash tests kill real processes (`python -m physlm train`) with SIGKILL, the way a
Colab disconnect or an out-of-memory kill ends a run, and check that running the same
command again continues it to exactly the result of an uninterrupted run.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from physlm.__main__ import main
from physlm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from physlm.config import from_flat
from physlm.files import TornRecordWarning, append_jsonl, read_jsonl
from physlm.fixture import fixture_dir
from physlm.runs import RunDirectory
from physlm.trainer import Trainer, train

from .conftest import REPO_ROOT, TINY, crash_after_step, one_error_line, stable


def _params_file(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump({**TINY, **overrides}, sort_keys=False))
    return path


def _child_env() -> dict[str, str]:
    """The test's environment (PHYSLM_CACHE: pytest's temporary cache), single-threaded."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                        env.get("PYTHONPATH")])))
    return env


@pytest.fixture(autouse=True)
def _single_thread():
    """One thread in-process, as in the child processes: results match them bitwise, and
    tiny models do not slow to a crawl when other processes load the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{what}: {key} differs"
        elif isinstance(a[key], dict):
            _assert_same_tensors(a[key], b[key], f"{what}.{key}")
        else:
            assert a[key] == b[key], f"{what}: {key} differs"


# --- crash and resume ------------------------------------------------------------------------

def _start_and_kill(command: list[str], steps: Path, kill_after: int, log: Path,
                    timeout: float = 180.0) -> int:
    """Run `command`; SIGKILL it once steps.jsonl has `kill_after` lines. Return its exit code."""
    with open(log, "wb") as output:
        child = subprocess.Popen(command, cwd=REPO_ROOT, env=_child_env(), stdout=output,
                                 stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while child.poll() is None:
                if _lines(steps) >= kill_after:
                    child.send_signal(signal.SIGKILL)
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"training did not reach step {kill_after} within {timeout:.0f} s:"
                                f"\n{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.002)
            return child.wait(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path):
    """Killing `physlm train` at a random step and running it again gives the same run, bitwise.

    The kill lands wherever the process is: in a step, appending metrics, in validation
    or writing a checkpoint. The resumed run must continue from the last checkpoint (its
    earlier step records are kept, timing included) and end with the metrics and the
    weights of a run that was never interrupted.
    """
    fixture_dir()  # write the shared corpus once, before any process needs it
    rng = random.Random()
    every = 3
    for attempt, batches in enumerate((8, 16, 32)):
        overrides = dict(epochs=2, max_train_batches=batches, checkpoint_every=every,
                         physics_start_epoch=1, device="cpu")
        total = 2 * batches
        params = _params_file(tmp_path / f"params{attempt}.yaml", **overrides)
        run_dir = tmp_path / f"killed{attempt}"
        run = RunDirectory(run_dir)
        command = [sys.executable, "-m", "physlm", "train", "--params", str(params),
                   "--run-dir", str(run_dir)]
        kill_after = rng.randrange(every + 1, total - 1)  # past the first checkpoint
        code = _start_and_kill(command, run.steps, kill_after, tmp_path / f"first{attempt}.log")
        if code == -signal.SIGKILL:
            break
        log = (tmp_path / f"first{attempt}.log").read_text(errors="replace")
        assert code == 0, f"training failed before it was killed (exit {code}):\n{log[-3000:]}"
        # It finished before the kill landed (a very fast machine): retry with a longer run.
    else:
        pytest.fail("training always finished before the kill; cannot test a crash here")

    saved = load_checkpoint(run.checkpoint)
    steps_at_kill = read_jsonl(run.steps)
    assert every <= saved["global_step"] < total, (
        f"killed after step {kill_after}: expected a mid-run checkpoint, got step "
        f"{saved['global_step']} of {total}")
    assert len(steps_at_kill) < total, "the kill came after the last step"
    timings = {r["step"]: r["time_s"] for r in steps_at_kill if r["step"] <= saved["global_step"]}

    with open(tmp_path / "resumed.log", "wb") as output:
        resumed = subprocess.Popen(command, cwd=REPO_ROOT, env=_child_env(), stdout=output,
                                   stderr=subprocess.STDOUT)
        try:
            train(from_flat({**TINY, **overrides}), tmp_path / "straight")  # meanwhile
            code = resumed.wait(timeout=300)
        finally:
            if resumed.poll() is None:
                resumed.kill()
                resumed.wait()
    log = (tmp_path / "resumed.log").read_text(errors="replace")
    assert code == 0, f"resuming after the kill at step {kill_after} failed:\n{log[-3000:]}"

    straight = RunDirectory(tmp_path / "straight")
    for name in ("steps", "epochs"):
        expected = read_jsonl(getattr(straight, name))
        got = read_jsonl(getattr(run, name))
        assert stable(got) == stable(expected), (
            f"{name}.jsonl after a kill at step {kill_after} and a resume from step "
            f"{saved['global_step']} differs from the uninterrupted run")
    resumed_timings = {r["step"]: r["time_s"] for r in read_jsonl(run.steps)
                       if r["step"] in timings}
    assert resumed_timings == timings, "the rerun retrained steps before its checkpoint"
    final, reference = load_checkpoint(run.checkpoint), load_checkpoint(straight.checkpoint)
    assert final["global_step"] == reference["global_step"] == total
    _assert_same_tensors(final["model"], reference["model"], "model weights")
    _assert_same_tensors(final["optimizer"], reference["optimizer"], "optimizer state")
    assert not list(run.checkpoint.parent.glob("*.tmp")), "stale temporary checkpoint left"


_KILL_BEFORE_RENAME = """
import os, signal, sys, torch
from pathlib import Path
from physlm.checkpoint import save_checkpoint
os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # die between write and rename
save_checkpoint(Path(sys.argv[1]), {"model": {"w": torch.full((64,), 2.0)}, "epoch": 2})
"""


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    """A process killed between writing the new checkpoint and renaming it leaves the old one."""
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(64)}, "epoch": 1})
    before = path.read_bytes()
    child = subprocess.run([sys.executable, "-c", _KILL_BEFORE_RENAME, str(path)],
                           cwd=REPO_ROOT, env=_child_env(), capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert path.read_bytes() == before
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(64))
    assert len(list(path.parent.glob(".last.pt.*.tmp"))) == 1  # the write that never landed

    save_checkpoint(path, {"model": {"w": torch.zeros(64)}, "epoch": 3})
    assert load_checkpoint(path)["epoch"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"], \
        "the next checkpoint must clean up temporaries of a killed write"


def test_failed_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """An error at the rename (disk full, I/O error) raises and leaves the old file, no litter."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})
    before = path.read_bytes()

    def broken_replace(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before and load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# --- damaged and foreign checkpoints ---------------------------------------------------------

class _RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture
def real_checkpoint(tmp_path) -> bytes:
    model = torch.nn.Linear(32, 32)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 32)).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "good.pt", {"model": model.state_dict(),
                                           "optimizer": optimizer.state_dict(), "epoch": 1,
                                           "rng_cpu": torch.get_rng_state()})
    return (tmp_path / "good.pt").read_bytes()


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.5, 0.9, -1])
def test_truncated_checkpoint_is_a_checkpoint_error(tmp_path, real_checkpoint, keep):
    """A checkpoint cut short (a crash while copying it) fails with advice, never oddly."""
    size = len(real_checkpoint)
    cut = size - 1 if keep == -1 else int(size * keep)
    path = tmp_path / "last.pt"
    path.write_bytes(real_checkpoint[:cut])
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "delete it" in message and "overwrite: true" in message
    assert "\n" not in message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["pickle", "torch.save", "nested"])
def test_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, kind):
    """A pickle whose loading runs a command fails to load, and the command never runs."""
    marker = tmp_path / "code-ran"
    payload = {
        "pickle": pickle.dumps(_RunsCode(marker)),
        "torch.save": _torch_bytes(_RunsCode(marker)),
        "nested": _torch_bytes({"format": "physlm-checkpoint-2", "model": _RunsCode(marker)}),
    }[kind]
    path = tmp_path / "last.pt"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert not marker.exists(), "loading a checkpoint executed code"
    message = str(error.value)
    assert "not a physlm checkpoint" in message and "delete it" in message
    assert "weights_only" not in message, "must not suggest loading it unsafely"
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_RunsCode(control)))   # the payload is live when unpickled
    assert control.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content", [
    pytest.param(lambda: _torch_bytes({"model": {"w": torch.ones(2)}}), id="dict-without-format"),
    pytest.param(lambda: _torch_bytes({"format": "other-1", "epoch": 0}), id="other-format"),
    pytest.param(lambda: _torch_bytes([torch.ones(2)]), id="list"),
    pytest.param(lambda: pickle.dumps({"format": "physlm-checkpoint-2"}), id="plain-pickle"),
    pytest.param(lambda: b"", id="empty"),
    pytest.param(lambda: b"not a checkpoint\n" * 10, id="text"),
])
def test_foreign_checkpoint_is_a_checkpoint_error(tmp_path, content):
    """Files that are not physlm checkpoints name the file and say how to get past it."""
    path = tmp_path / "last.pt"
    path.write_bytes(content())
    with pytest.raises(CheckpointError, match=r"delete it .*overwrite: true") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_resume_from_a_damaged_checkpoint_explains_itself(tmp_path, tiny_config, capsys):
    """The trainer surfaces a damaged checkpoint as CheckpointError; the CLI as one line."""
    run = RunDirectory(tmp_path / "run").create()
    run.checkpoint.write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        Trainer(tiny_config(), run.root)
    params = _params_file(tmp_path / "params.yaml")
    code = main(["train", "--params", str(params), "--run-dir", str(run.root)])
    err = one_error_line(capsys)
    assert code == 1 and "delete it" in err and str(run.checkpoint) in err


# --- run directory ---------------------------------------------------------------------------

def _unwritable_dir(tmp_path: Path) -> tuple[Path, str]:
    """A run directory that cannot be created: read-only if that binds us, else under a file."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (locked / "probe").touch()
    except PermissionError:
        return locked / "run", "read-only folder"
    (locked / "probe").unlink()  # root ignores modes (CI containers): use a path under a file
    locked.chmod(0o700)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return blocker / "run", "path under a regular file"


def test_unwritable_run_directory_is_a_clear_error(tmp_path, tiny_config, capsys):
    """An unusable run_dir fails before any work, naming it and what to do."""
    run_dir, how = _unwritable_dir(tmp_path)
    try:
        with pytest.raises(PermissionError, match="choose another run_dir") as error:
            Trainer(tiny_config(), run_dir)
        assert str(run_dir) in str(error.value), how
        params = _params_file(tmp_path / "params.yaml")
        code = main(["train", "--params", str(params), "--run-dir", str(run_dir)])
        err = one_error_line(capsys)
        assert code == 1 and "not writable" in err and "choose another run_dir" in err, how
    finally:
        (tmp_path / "locked").chmod(0o700)


# --- bad input through the command line ------------------------------------------------------

def _corpus(folder: Path, train: str | bytes, valid: str | bytes) -> Path:
    folder.mkdir()
    for name, text in (("wiki.train.raw", train), ("wiki.valid.raw", valid)):
        data = text.encode("utf-8") if isinstance(text, str) else text
        (folder / name).write_bytes(data)
    return folder


WORDS = " the cat sat on the mat and the dog ran to the park . \n" * 20


def _data_dir(train: str | bytes, valid: str | bytes):
    """A `--set data_dir=...` maker for a corpus with these train and valid texts."""
    return lambda tmp_path, monkeypatch: [f"data_dir={_corpus(tmp_path / 'c', train, valid)}"]


def _no_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails: no hub
    return ["dataset=wikitext-2-raw-v1"]


def _incompatible_run(tmp_path, monkeypatch):
    run = RunDirectory(tmp_path / "run").create()
    run.write_config(from_flat({**TINY, "d_model": 32}))
    return []


BAD_INPUT = [
    pytest.param(["epoch=2"], 2, "did you mean 'epochs'", id="unknown-parameter"),
    pytest.param(["epochs=ten"], 2, "epochs: expected int", id="wrong-type"),
    pytest.param(["lr=-1"], 2, "lr must be > 0", id="out-of-range"),
    pytest.param(["physics_start_epoch=5"], 2, "physics would never run; lower it",
                 id="physics-start-after-the-end"),
    pytest.param(["epochs=[1,"], 2, "not a valid YAML value", id="malformed-set"),
    pytest.param([f"seed={2 ** 50}"], 2, "seed must be", id="seed-too-large"),
    pytest.param(lambda tmp_path, monkeypatch: [f"data_dir={tmp_path / 'nowhere'}"], 2,
                 "folder not found", id="missing-data-dir"),
    pytest.param(_no_hub, 2, "dataset: fixture", id="unreachable-hub"),
    pytest.param(_data_dir(WORDS, " \n \n"), 2, "holds no tokens; point valid_file",
                 id="empty-corpus"),
    pytest.param(_data_dir(WORDS, " a b c \n"), 2, "or lower n_seq",
                 id="corpus-shorter-than-a-sequence"),
    pytest.param(_data_dir(b" caf\xe9 au lait \n" * 20, WORDS), 2, "re-encode it to UTF-8",
                 id="undecodable-bytes"),
    pytest.param(_incompatible_run, 1, "d_model: 32 in the run, 16 now", id="incompatible-resume"),
    pytest.param(["device=cuda"], 1, "use device: auto or cpu", id="cuda-missing",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
]


@pytest.mark.parametrize(("assignments", "code", "expected"), BAD_INPUT)
def test_bad_input_is_one_line_without_traceback(assignments, code, expected, tmp_path,
                                                  monkeypatch, capsys):
    """`physlm train` with bad input exits non-zero with one `physlm: ...` line saying what to do.

    Exit code 2 for configuration and data errors, 1 for errors of the run itself.
    """
    if callable(assignments):
        assignments = assignments(tmp_path, monkeypatch)
    params = _params_file(tmp_path / "params.yaml")
    argv = ["train", "--params", str(params), "--run-dir", str(tmp_path / "run")]
    for assignment in assignments:
        argv += ["--set", assignment]
    assert main(argv) == code
    err = one_error_line(capsys)
    assert expected in err


def test_missing_params_file_is_one_line(tmp_path, capsys):
    """A parameter file that does not exist is named."""
    assert main(["train", "--params", str(tmp_path / "nope.yaml")]) == 2
    assert "parameter file not found" in one_error_line(capsys)


# --- physics that never runs -----------------------------------------------------------------

def test_physics_start_equal_to_epochs_trains_without_physics_and_warns(tmp_path, tiny_config):
    """physics_start_epoch == epochs is allowed, reported by the config, and warned about."""
    config = tiny_config(epochs=1, physics_start_epoch=1, max_train_batches=2,
                         max_eval_batches=1)
    assert not config.trains_with_physics
    with pytest.warns(UserWarning, match="physics never runs"):
        trainer = Trainer(config, tmp_path / "run")
    trainer.fit()
    steps = read_jsonl(trainer.run.steps)
    assert steps and not any(s["physics"] or s["energy_computed"] for s in steps)
    assert [e["phase"] for e in read_jsonl(trainer.run.epochs)] == ["warmup"]


def test_no_warning_when_physics_is_switched_off(tmp_path, tiny_config):
    """physics: false is a deliberate control run: nothing to warn about."""
    config = tiny_config(epochs=1, physics=False, physics_start_epoch=1)
    assert not config.trains_with_physics
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(config, tmp_path / "run")


# --- metrics files ---------------------------------------------------------------------------

def test_torn_last_line_is_skipped_and_garbage_elsewhere_is_reported(tmp_path):
    """A crash mid-write tears only the last line; anything else is corruption, named by line."""
    path = tmp_path / "steps.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"steps.jsonl:2 is damaged: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n[2]\n{"step": 3}\n')   # complete, but not a record
    with pytest.raises(ValueError, match=r"steps.jsonl:2 is damaged: a record is a JSON object"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n{"loss": 2}\n')
    with pytest.raises(ValueError, match=r"steps.jsonl:2 is damaged: the record lacks step"):
        read_jsonl(path, required=("step",))


@pytest.mark.parametrize(("torn", "kept"), [
    ('{"step": 2, "loss": 1.2', []),               # torn mid-record: dropped
    ('{"step": 2, "loss": 1.25}', [{"step": 2, "loss": 1.25}]),   # only the newline lost
    ('{"step": 2, "na\xc3', []),                   # torn inside a multi-byte character
])
def test_append_after_a_torn_line_does_not_glue_records(tmp_path, torn, kept):
    """Appending after a torn line first repairs it, so the new record is intact."""
    path = tmp_path / "steps.jsonl"
    path.write_bytes(b'{"step": 1}\n' + torn.encode("latin-1"))
    append_jsonl(path, [{"step": 3}])
    append_jsonl(path, [{"step": 4}])
    assert read_jsonl(path) == [{"step": 1}, *kept, {"step": 3}, {"step": 4}]
    assert path.read_bytes().endswith(b'{"step": 4}\n')


def test_resume_after_torn_metric_lines_is_exact(tmp_path, tiny_config, monkeypatch):
    """A crash that tore the last lines of steps.jsonl and epochs.jsonl resumes cleanly."""
    config = tiny_config(epochs=2, max_train_batches=3, max_eval_batches=1, checkpoint_every=2)
    train(config, tmp_path / "straight")
    crashing = Trainer(config, tmp_path / "cut")
    crash_after_step(crashing, monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    run = crashing.run
    with open(run.steps, "a") as handle:    # the kill tore the record of step 6
        handle.write('{"loss": 5.1, "lm_loss": 5.1, "step": 6, "epo')
    with open(run.epochs, "a") as handle:
        handle.write('{"epoch": 1, "phase": "phy')
    with pytest.warns(TornRecordWarning) as torn:  # said, once per file
        resumed = Trainer(config, run.root)
    assert sorted(Path(str(w.message).split(":")[0]).name for w in torn) == [
        "epochs.jsonl", "steps.jsonl"]
    assert (resumed.epoch, resumed.global_step) == (1, 4)
    resumed.fit()
    straight = RunDirectory(tmp_path / "straight")
    for name in ("steps", "epochs"):
        text = getattr(run, name).read_text()
        assert text.endswith("}\n") and '"epo{' not in text and '"phy{' not in text
        assert stable(read_jsonl(getattr(run, name))) == \
            stable(read_jsonl(getattr(straight, name)))


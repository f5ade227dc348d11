"""The command line's errors: one `physlm: <label>: <message>` line on stderr, and an exit
code (2 for input, 1 for the run or the file system), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from physlm.__main__ import main
from physlm.config import from_flat
from physlm.errors import ConfigError, DamagedFileError, known_error, one_line
from physlm.runs import RunDirectory

from .conftest import REPO_ROOT, TINY, one_error_line


def _params(tmp_path: Path, content: str | bytes | None = None) -> Path:
    path = tmp_path / "params.yaml"
    if content is None:
        content = yaml.safe_dump(TINY, sort_keys=False)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def _train(tmp_path: Path, *extra: str, params: Path | None = None) -> int:
    params = params or _params(tmp_path)
    return main(["train", "--params", str(params), "--run-dir", str(tmp_path / "run"), *extra])


def _a_file(tmp_path: Path) -> Path:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return blocker


def _saved_run(tmp_path: Path) -> Path:
    """A run directory as the report sees one: it has a config.yaml."""
    run = RunDirectory(tmp_path / "run")
    run.write_config(from_flat(TINY))
    return run.root


# --- physlm report ---------------------------------------------------------------------------

def test_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out-dir", str(tmp_path / "out")]) == 2
    err = one_error_line(capsys)
    assert err.startswith("physlm: not a run directory: ") and "no config.yaml" in err


def test_report_into_an_unwritable_out_dir(tmp_path, capsys):
    """A path under a regular file binds root too (modes do not)."""
    out_dir = _a_file(tmp_path) / "reports"
    assert main(["report", str(_saved_run(tmp_path)), "--out-dir", str(out_dir)]) == 1
    err = one_error_line(capsys)
    assert err.startswith("physlm: cannot write: ") and "not a directory" in err
    assert "--out-dir" in err and "permission denied" not in err


@pytest.mark.parametrize("content", [b"\x00\xff\xfe garbage", "epochs: [1,\n", "- a list\n",
                                     "d_model: 16\nno_such_setting: 3\n"],
                         ids=["binary", "malformed-yaml", "a-list", "unknown-key"])
def test_report_on_a_damaged_config(tmp_path, capsys, content):
    run_dir = _saved_run(tmp_path)
    config = run_dir / "config.yaml"
    config.write_bytes(content.encode() if isinstance(content, str) else content)
    assert main(["report", str(run_dir), "--out-dir", str(tmp_path / "out")]) == 1
    err = one_error_line(capsys)
    assert err.startswith("physlm: damaged run directory: ") and str(config) in err
    assert err.count(str(config)) == 1, "the file is named once"
    assert not (tmp_path / "out").exists()


def test_a_damaged_run_directory_has_its_own_label_and_exit_code(tmp_path, capsys):
    """Not a configuration error (exit 2: fix the input): the run's own file is damaged
    (exit 1), whichever command reads it."""
    damaged = DamagedFileError("runs/x/env.json is damaged: empty; restore it")
    assert not isinstance(damaged, ConfigError)
    assert known_error(damaged) == ("damaged run directory", 1)
    config = _saved_run(tmp_path) / "config.yaml"
    config.write_text("")
    assert _train(tmp_path) == 1
    err = one_error_line(capsys)
    assert err.startswith(f"physlm: damaged run directory: {config} is damaged: it is empty")


def test_a_warning_is_one_physlm_line(tmp_path, capsys):
    """physlm's warnings (a record torn by a kill, physics that never runs) are one line each
    on stderr, `physlm: warning: ...`, not Python's two lines with a source line."""
    assert _train(tmp_path, "--set", "epochs=1", "--set", "physics_start_epoch=1") == 0
    out, err = capsys.readouterr()
    (line,) = err.splitlines()
    assert line.startswith("physlm: warning: physics_start_epoch (1) == epochs (1)"), line
    steps = tmp_path / "run" / "metrics" / "steps.jsonl"
    steps.write_bytes(steps.read_bytes() + b'{"loss": 5.1, "st')
    assert main(["report", str(tmp_path / "run"), "--out-dir", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    (line,) = err.splitlines()
    assert line.startswith(f"physlm: warning: {steps}:") and "torn" in line, line


# --- physlm train: input -----------------------------------------------------------------------

@pytest.mark.parametrize(("content", "expected"), [
    (b"epochs: 2\nname: caf\xe9\n", "is not UTF-8 text (undecodable byte at offset 19)"),
    ("- epochs\n- 2\n", "must hold a mapping"),
    ("epochs: [2,\n", "is not valid YAML"),
], ids=["not-utf8", "a-list", "malformed-yaml"])
def test_bad_params_file(tmp_path, capsys, content, expected):
    assert _train(tmp_path, params=_params(tmp_path, content)) == 2
    err = one_error_line(capsys)
    assert err.startswith("physlm: configuration error: ") and expected in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device", ["cudaX", "cuda:", "cuda:x", "gpu", "cpu0"])
def test_invalid_device_string(tmp_path, capsys, device):
    assert _train(tmp_path, "--set", f"device='{device}'") == 2  # quoted: text, as YAML reads it
    assert "device must be 'auto', 'cpu' or 'cuda[:N]'" in one_error_line(capsys)


def test_valid_device_strings_pass_validation():
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert from_flat({"device": device}).train.device == device


def test_negative_until_epoch_is_refused(tmp_path, capsys):
    assert _train(tmp_path, "--until-epoch", "-1") == 2
    err = one_error_line(capsys)
    assert err.startswith("physlm: invalid argument: --until-epoch must be >= 0")
    assert not (tmp_path / "run").exists()


# --- physlm train: the file system -------------------------------------------------------------

def test_run_dir_under_a_regular_file_is_not_called_permission_denied(tmp_path, capsys):
    run_dir = _a_file(tmp_path) / "run"
    params = _params(tmp_path)
    assert main(["train", "--params", str(params), "--run-dir", str(run_dir)]) == 1
    err = one_error_line(capsys)
    assert err.startswith("physlm: cannot write: ") and "not a directory" in err
    assert "choose another run_dir" in err and "permission denied" not in err


def test_missing_data_file_leaves_no_run_directory(tmp_path, capsys):
    """The data is loaded before anything is written: a failed start leaves nothing behind,
    not even the folders above the run directory or its lock."""
    params = _params(tmp_path)
    run_dir = tmp_path / "runs" / "nested" / "run"
    code = main(["train", "--params", str(params), "--run-dir", str(run_dir),
                 "--set", f"train_file={tmp_path / 'missing.raw'}",
                 "--set", f"valid_file={tmp_path / 'missing.raw'}"])
    assert code == 2
    assert "train_file: file not found" in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("error", "label", "message"), [
    (NotADirectoryError(20, "Not a directory", "/x/f/run"), "not a directory", "/x/f/run"),
    (OSError(28, "No space left on device", "/r/last.pt"), "no space left on device",
     "/r/last.pt"),
    (PermissionError(13, "Permission denied", "/a", None, "/b"), "permission denied",
     "/a -> /b"),
])
def test_os_errors_are_labelled_by_what_they_are(error, label, message):
    assert known_error(error) == (label, 1)
    assert one_line(error) == message


# --- OpenMP's wait policy: set by the entry points, not by importing physlm ---------------

_POLICY_AFTER = """
import os, sys
os.environ.pop("OMP_WAIT_POLICY", None)
import physlm, physlm.trainer, physlm.report  # importing sets nothing
imported = os.environ.get("OMP_WAIT_POLICY")
from physlm.__main__ import main
main(["report", sys.argv[1]])                 # the command line does, whatever the command
print(imported, os.environ.get("OMP_WAIT_POLICY"))
"""


def test_the_command_line_sets_the_openmp_wait_policy_and_an_import_does_not(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", _POLICY_AFTER, str(tmp_path)], cwd=REPO_ROOT,
                          env={**env, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.split() == ["None", "PASSIVE"], done.stderr


def test_a_study_address_where_nothing_answers_is_one_clear_error(tmp_path, capsys):
    """`study --address` to a port nobody listens on fails at once (Ray itself would retry
    for many minutes), naming the address."""
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    code = main(["study", "--params", "params/study_smoke.yaml", "--set", "seeds=[0]",
                 "--set", "variants=[control]", "--set", "ablation={}",
                 "--set", f"run_dir={tmp_path / 'runs'}", "--address", address])
    assert code == 1
    error = one_error_line(capsys)
    assert error.startswith(f"physlm: cluster error: cannot join the Ray cluster at {address}: "
                            "nothing answers there")

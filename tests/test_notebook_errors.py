"""A wrong parameter or missing data shows in phase3.ipynb as one line, not a traceback:
in the executed notebook and in the error papermill raises (what its terminal prints)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest
from papermill.exceptions import PapermillExecutionError

from physlm import pipeline
from physlm.errors import USER_ERRORS, one_line
from physlm.values import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
PHASE3 = REPO_ROOT / "notebooks" / "phase3.ipynb"


def run_phase3(tmp_path: Path, **parameters) -> tuple[PapermillExecutionError, list]:
    """Execute phase3.ipynb, expecting a failure: the error and the notebook's error outputs."""
    executed = tmp_path / "phase3.ipynb"
    with pytest.raises(PapermillExecutionError) as caught:
        papermill.execute_notebook(str(PHASE3), str(executed), parameters=parameters,
                                   kernel_name="python3", progress_bar=False, cwd=str(REPO_ROOT))
    outputs = [o for c in nbformat.read(executed, as_version=4).cells
               for o in c.get("outputs", []) if o.output_type == "error"]
    return caught.value, outputs


def assert_one_line(error: PapermillExecutionError, outputs: list, message: str) -> None:
    lines = [line for line in str(error).splitlines() if line.strip()]
    # papermill's own framing: a rule, 'Exception encountered at "In [5]":', then the traceback
    assert len(lines) == 3 and lines[1].startswith("Exception encountered at"), str(error)
    assert lines[2].startswith("physlm: ") and message in lines[2], lines[2]
    (output,) = outputs
    assert output.traceback == [lines[2]]


def test_one_line_joins_a_multi_line_message():
    assert one_line("invalid configuration:\n  a must be >= 1\n  b: c\n") == \
        "invalid configuration: a must be >= 1; b: c"
    assert one_line("stage failed.\nSee x.") == "stage failed.; See x."
    assert one_line("plain") == "plain"


def test_error_display_is_a_no_op_outside_ipython():
    assert pipeline.install_error_display() is False
    assert ConfigError in USER_ERRORS


@pytest.mark.parametrize(("parameters", "message"), [
    ({"epochs": -3}, "physlm: invalid configuration: epochs must be >= 1; "),
    ({"epcohs": 3}, "physlm: unknown parameter 'epcohs' (did you mean 'epochs'?)"),
    ({"epochs": "ten"}, "physlm: epochs: expected int, got str 'ten'"),
])
def test_a_bad_parameter_is_one_line(tmp_path, parameters, message):
    error, outputs = run_phase3(tmp_path, **parameters)
    assert error.ename == "ConfigError"
    assert_one_line(error, outputs, message)


def test_a_bad_parameter_file_is_one_line(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- epochs: 3\n- seed: 1\n")
    error, outputs = run_phase3(tmp_path, params_file=str(listed))
    assert_one_line(error, outputs, f"{listed} must hold a mapping of parameter: value")


@pytest.mark.slow
def test_missing_data_is_one_line_before_any_stage(tmp_path):
    """The pipeline looks for the data before its first stage: one line, and no run
    directory (or executed stage notebook) left behind."""
    run_dir = tmp_path / "run"
    error, outputs = run_phase3(tmp_path, data_dir="/nonexistent", run_dir=str(run_dir),
                                control_run=False)
    assert error.ename == "DataError"
    assert_one_line(error, outputs, "physlm: data_dir: folder not found: /nonexistent")
    assert not run_dir.exists()


@pytest.mark.slow
def test_the_papermill_command_ends_with_the_one_line(tmp_path):
    """What the terminal shows: papermill's own traceback (its code, not the notebook's), then
    the cell's error, one line."""
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_CURRENT_TEST"}
    result = subprocess.run(
        [sys.executable, "-m", "papermill", str(PHASE3), str(tmp_path / "out.ipynb"),
         "-p", "epcohs", "3"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=600)
    assert result.returncode != 0
    tail = result.stderr.rstrip().splitlines()
    assert tail[-2].startswith("Exception encountered at"), result.stderr[-2000:]
    assert tail[-1] == "physlm: unknown parameter 'epcohs' (did you mean 'epochs'?)"
    assert "physlm/pipeline.py" not in result.stderr and "Cell In[" not in result.stderr

"""The machinery of the bad-input matrix (tests/test_bad_inputs.py, issue 20): a case is
data (`Case`); `run_case` builds its damaged folder, runs it as a user would, in this
process as `python -m physlm` would run (the default: fast) or as a process, and sees what
changed on disk; `classify` judges the outcome clean, noisy or wrong; `tally` counts.

A papermill case that must fail, given only `-p` parameters, runs by default in one Jupyter
kernel shared by all such cases (`SharedKernel`): phase3's cells with papermill's own
parameter injection, in a cleared namespace, in the case's folder. It saves a papermill
process and a kernel start (with its imports) per case; what papermill would print of the
notebook's error, all the judge reads of it, is the same (tests/test_bad_inputs.py checks
this against papermill itself). `--subprocess` runs papermill itself for every case.
"""

from __future__ import annotations

import atexit
import contextlib
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from papermill.cli import _resolve_type  # how papermill's command line reads -p values
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

from physlm import trainer
from physlm.__main__ import main
from physlm.config import from_flat

from .conftest import REPO_ROOT, TINY
from .test_reliability import _child_env, _corpus

PHASE3 = REPO_ROOT / "notebooks" / "phase3.ipynb"
# The settings of every case: a tiny run of 2 epochs (the second with physics), 4 steps.
PARAMS = {**TINY, "epochs": 2, "physics_start_epoch": 1, "max_train_batches": 2,
          "max_eval_batches": 1}
MAX_LINES = 4  # an error in a few lines (a warning and the error); beyond that, noise
PHYSLM_LINE = re.compile(r"physlm(:| [a-z]+: error:) ")  # ours, or argparse's with our name

Setup = Callable[[Path], Callable[[], None] | None]


@dataclass(frozen=True)
class Case:
    """One bad input or fault. Strings may hold {tmp} (the case's folder), {params} (its
    parameter file, PARAMS), {run} ({tmp}/run) and {out} ({tmp}/out)."""

    name: str
    command: tuple[str, ...]          # "physlm", then its arguments; or "papermill", then -p ...
    names: tuple[str, ...]            # what the last line names (a success: what it says)
    setup: tuple[Setup, ...] = ()     # build the damaged state, in order; may return a teardown
    succeeds: bool = False            # a fault physlm handles: exit 0
    absent: tuple[str, ...] = ()      # what the output must not say (a misleading hint)
    leaves: tuple[str, ...] = ()      # globs (relative to {tmp}) the command may write
    item: str | None = None           # the item it checks
    waits: bool = False               # fails until that item's fix lands: xfail(strict)
    cuda_absent: bool = False         # only meaningful without a GPU

    @property
    def papermill(self) -> bool:
        return self.command[0] == "papermill"

    @property
    def shares_a_kernel(self) -> bool:
        """A papermill error case of `-p` parameters only: it may run in the SharedKernel."""
        return self.papermill and not self.succeeds and "-f" not in self.command


# ------------------------------------------------------------------ setups
def write(relative: str, content: str | bytes) -> Setup:
    """Write a file (parents created) in the case's folder; in text, {tmp} etc. are filled."""
    def setup(tmp: Path) -> None:
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_fill(content, tmp).encode() if isinstance(content, str) else content)
    return setup


def edit(relative: str, change: Callable[[bytes], bytes]) -> Setup:
    """Replace a file's bytes by `change(bytes)`."""
    def setup(tmp: Path) -> None:
        path = tmp / relative
        path.write_bytes(change(path.read_bytes()))
    return setup


def folder(relative: str) -> Setup:
    def setup(tmp: Path) -> None:
        path = tmp / relative
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
    return setup


def corpus(train_text: str | bytes, valid_text: str | bytes) -> Setup:
    """A data folder {tmp}/data with these train and valid texts."""
    def setup(tmp: Path) -> None:
        _corpus(tmp / "data", train_text, valid_text)
    return setup


_TRAINED: dict[tuple, Path] = {}
_CACHE = Path(tempfile.mkdtemp(prefix="physlm-bad-inputs-"))
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


def trained(until_epoch: int | None = None, **overrides) -> Setup:
    """{tmp}/run: a tiny run of PARAMS + overrides (trained once, then copied), stopped
    before `until_epoch` if given."""
    key = (until_epoch, *sorted(overrides.items()))

    def setup(tmp: Path) -> None:
        if key not in _TRAINED:
            run_dir = _CACHE / f"run{len(_TRAINED)}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "physics never runs": what some cases want
                trainer.train(from_flat({**PARAMS, **overrides}), run_dir,
                              until_epoch=until_epoch)
            (run_dir / ".lock").unlink(missing_ok=True)
            _TRAINED[key] = run_dir
        shutil.copytree(_TRAINED[key], tmp / "run")
    return setup


HOLD = """
import os, sys
from physlm.lock import run_lock
with run_lock(os.environ["PHYSLM_HOLD"]):
    print("held", flush=True)
    sys.stdin.read()
"""


def held(as_kernel: bool = False) -> Setup:
    """{run} locked by another process: a `python -c` one, or one started as a notebook
    kernel is (`python -m ipykernel_launcher -f <connection file>`), as the pipeline's is."""
    def setup(tmp: Path) -> Callable[[], None]:
        env = {**_child_env(), "PHYSLM_HOLD": str(tmp / "run"), "PYTHONDONTWRITEBYTECODE": "1"}
        command = [sys.executable, "-c", HOLD]
        if as_kernel:
            (tmp / "kernel").mkdir()
            (tmp / "kernel" / "ipykernel_launcher.py").write_text(HOLD)
            env["PYTHONPATH"] = os.pathsep.join([str(tmp / "kernel"), env["PYTHONPATH"]])
            command = [sys.executable, "-m", "ipykernel_launcher", "-f",
                       str(tmp / "kernel-4711.json")]
        holder = subprocess.Popen(command, env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"

        def release() -> None:
            holder.communicate(timeout=60)
        return release
    return setup


def empty(_: bytes) -> bytes:
    return b""


def garbage(_: bytes) -> bytes:
    return b"\x00\xff\xfe{ not json, not yaml\n"


def half_lines(data: bytes) -> bytes:
    """Cut at a line boundary near the middle (a checkpoint cut short)."""
    return data[: data.index(b"\n", len(data) // 2) + 1]


def last_lines_cut(data: bytes) -> bytes:
    """Without its last 3 lines: a file cut at a line boundary that still parses (for
    config.yaml: the report's criteria, read back as their defaults)."""
    return b"".join(data.splitlines(keepends=True)[:-3])


def last_digit_cut(data: bytes) -> bytes:
    """Cut inside the last value ("min_energy_spread: 0.001" -> "... 0.00"), which still
    parses, as another number."""
    return data[:-2]


def corrupt_line(number: int) -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        lines = data.splitlines(keepends=True)
        lines[number - 1] = b'{"step": 2, "loss": oops}\n'
        return b"".join(lines)
    return change


def torn(data: bytes) -> bytes:
    """A record cut short by a kill mid-write, after the last complete one."""
    return data + b'{"loss": 5.1, "lm_loss": 5.1, "st'


def without(key: str) -> Callable[[bytes], bytes]:
    """The first record without `key`."""
    def change(data: bytes) -> bytes:
        first, _, rest = data.partition(b"\n")
        record = json.loads(first)
        del record[key]
        return json.dumps(record).encode() + b"\n" + rest
    return change


# ------------------------------------------------------------------ running a case
@dataclass
class Outcome:
    code: int
    output: str          # stdout and stderr together, as a terminal shows them
    changed: list[str]   # paths under the case's folder added, removed or rewritten


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` -> the sha256 of its bytes ("dir" for a folder)."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        found[relative] = ("dir" if path.is_dir() and not path.is_symlink()
                           else hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{params}", str(tmp / "params.yaml")).replace(
        "{run}", str(tmp / "run")).replace("{out}", str(tmp / "out")).replace("{tmp}", str(tmp))


def _user_env() -> dict[str, str]:
    """A child's environment as a user's terminal has it: without PYTEST_CURRENT_TEST, which
    makes ipykernel leave its output alone (the pipeline's lines would not reach it)."""
    return {k: v for k, v in _child_env().items() if k != "PYTEST_CURRENT_TEST"}


def _in_process(arguments: list[str], cwd: Path) -> tuple[int, str]:
    """`python -m physlm ARGS` in this process, output as Python would print it: warnings
    as they come, an uncaught exception as a traceback (exit 1)."""
    buffer = io.StringIO()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        buffer.write(warnings.formatwarning(message, category, filename, lineno, line))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with (contextlib.chdir(cwd), contextlib.redirect_stdout(buffer),
          contextlib.redirect_stderr(buffer), warnings.catch_warnings()):
        warnings.simplefilter("default")
        warnings.showwarning = show
        try:
            code = main(arguments)
        except SystemExit as error:  # argparse
            code = error.code if isinstance(error.code, int) else 1
        except Exception:
            traceback.print_exc(file=buffer)
            code = 1
        finally:
            torch.set_num_threads(threads)
    return code, buffer.getvalue()


class SharedKernel:
    """One Jupyter kernel for the papermill cases run in this process (see the module's
    docstring). Its terminal (the stdout and stderr papermill's kernel would share with the
    user's) is a file, read per case."""

    def __init__(self) -> None:
        self.terminal = tempfile.TemporaryFile()  # noqa: SIM115 (open for the kernel's life)
        self.manager: Any = None

    def start(self) -> None:
        from jupyter_client.manager import KernelManager

        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(cwd=str(REPO_ROOT), env=_user_env(), stdout=self.terminal,
                                  stderr=subprocess.STDOUT)
        self.client = self.manager.blocking_client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=120)
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.manager is not None and self.manager.is_alive():
            self.client.stop_channels()
            self.manager.shutdown_kernel(now=True)

    def run(self, arguments: list[str], tmp: Path) -> tuple[int, str]:
        """`papermill phase3.ipynb OUT -p NAME VALUE ...` (its `arguments` after OUT) in this
        kernel, in `tmp`: (exit code, what papermill would print of it)."""
        if self.manager is None or not self.manager.is_alive():
            self.start()
        names, values = arguments[1::3], arguments[2::3]
        assert arguments[::3] == ["-p"] * len(names), arguments
        notebook = parameterize_notebook(load_notebook_node(str(PHASE3)), {
            name: _resolve_type(value) for name, value in zip(names, values, strict=True)})
        start = self.terminal.seek(0, os.SEEK_END)
        error = self._execute(f"import os\nos.chdir({str(tmp)!r})\n%reset -f")
        for cell in (c for c in notebook.cells if c.cell_type == "code"):
            if error is None:
                error = self._execute(cell.source)
        self._execute(f"import os\nos.chdir({str(REPO_ROOT)!r})\n%reset -f")  # tmp goes
        self.terminal.seek(start)
        terminal = self.terminal.read().decode(errors="replace")
        if error is None:
            return 0, terminal
        framing = f'\n{75 * "-"}\nException encountered at "In [{error["count"]}]":\n'
        return 1, terminal + framing + "\n".join(error["traceback"]) + "\n"

    def _execute(self, code: str) -> dict[str, Any] | None:
        """Run `code`; its error (with the execution count), or None."""
        errors: list[dict[str, Any]] = []

        def hook(message: dict[str, Any]) -> None:
            if message["msg_type"] == "error":
                errors.append(message["content"])
        reply = self.client.execute_interactive(code, output_hook=hook, timeout=600)
        if reply["content"]["status"] != "error":
            return None
        return {**(errors[-1] if errors else reply["content"]),
                "count": reply["content"].get("execution_count")}


SHARED_KERNEL = SharedKernel()


def _command(case: Case, tmp: Path) -> list[str]:
    words = [_fill(word, tmp) for word in case.command[1:]]
    if case.papermill:  # always in the case's folder, whatever the case forgets
        return [sys.executable, "-m", "papermill", str(PHASE3), str(tmp / "phase3.ipynb"),
                "-p", "run_dir", str(tmp / "run"), "-p", "report_dir", str(tmp / "reports"),
                *words]
    return [sys.executable, "-m", "physlm", *words]


def run_case(case: Case, tmp: Path, in_process: bool = True) -> Outcome:
    """Build the case's state in `tmp`, run it, and see what changed there."""
    (tmp / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    teardowns = [down for setup in case.setup if (down := setup(tmp))]
    try:
        before = _snapshot(tmp)
        command = _command(case, tmp)
        if in_process and not case.papermill:
            code, output = _in_process(command[3:], tmp)
        elif in_process and case.shares_a_kernel:
            code, output = SHARED_KERNEL.run(command[5:], tmp)
        else:
            result = subprocess.run(command, cwd=tmp, env=_user_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace",
                                    timeout=600)
            code, output = result.returncode, result.stdout
        after = _snapshot(tmp)
    finally:
        for teardown in teardowns:
            teardown()
    own = {"phase3.ipynb"}  # papermill's output notebook: the command's own output
    allowed = [_fill(glob, tmp) for glob in case.leaves]
    changed = [path for path in sorted(before.keys() | after.keys())
               if before.get(path) != after.get(path) and path not in own
               and not any(fnmatch.fnmatch(path, glob) for glob in allowed)]
    return Outcome(code, output, changed)


def _lines(output: str) -> list[str]:
    """Non-empty lines; of a line a progress bar redrew (\\r), what shows last."""
    return [line.split("\r")[-1].rstrip() for line in output.splitlines()
            if line.split("\r")[-1].strip()]


def classify(case: Case, outcome: Outcome, tmp: Path) -> tuple[str, str]:
    """("clean" | "noisy" | "wrong", what is wrong, or the last line when nothing is).

    Wrong: exit 0 on an error (or an error on a fault physlm should handle), a misleading or
    missing message, or files added, removed or rewritten. Noisy: a traceback, a last line
    not physlm's, or more than MAX_LINES lines. Papermill's own traceback, which frames the
    notebook's error, is not counted: the notebook's part is."""
    lines = _lines(outcome.output)
    if case.papermill:  # papermill's framing ends with 'Exception encountered at "In [n]":'
        marks = [i for i, line in enumerate(lines) if line.startswith("Exception encountered")]
        lines = lines[marks[-1] + 1:] if marks else lines
    last = lines[-1] if lines else ""
    said = "\n".join(lines) if case.succeeds else last
    crashed = any(line.startswith("Traceback (most recent call last)") for line in lines)
    problems = []
    if case.succeeds and outcome.code != 0 and not crashed:
        problems.append(("wrong", f"exit {outcome.code}"))
    if not case.succeeds and outcome.code == 0:
        problems.append(("wrong", "exit 0 on an error"))
    if outcome.changed:
        problems.append(("wrong", f"changed on disk: {', '.join(outcome.changed[:6])}"))
    if crashed:
        problems.append(("noisy", "a traceback"))
    elif not case.succeeds and not PHYSLM_LINE.match(last):
        problems.append(("noisy", "the last line is not physlm's"))
    elif outcome.code == 0 or not case.succeeds:  # what it says, when it says anything
        missing = [name for name in (_fill(n, tmp) for n in case.names) if name not in said]
        misleading = [text for text in case.absent if text in said]
        problems += [("wrong", f"does not say {missing}")] if missing else []
        problems += [("wrong", f"says {misleading}")] if misleading else []
    if len(lines) > (1 if case.papermill else MAX_LINES) and not (case.succeeds
                                                                  and case.papermill):
        problems.append(("noisy", f"{len(lines)} lines"))
    if not problems:
        return "clean", last
    kind = "wrong" if any(kind == "wrong" for kind, _ in problems) else "noisy"
    return kind, "; ".join(text for _, text in problems) + f"; last line {last!r}"


# ------------------------------------------------------------------ the tally
def tally(cases: list[Case], in_process: bool) -> dict[str, int]:
    """Run every case in a folder of its own; print its class, then the totals."""
    counts = {"clean": 0, "noisy": 0, "wrong": 0}
    framed = 0
    for case in cases:
        with tempfile.TemporaryDirectory(prefix="physlm-case-") as directory:
            tmp = Path(directory)
            outcome = run_case(case, tmp, in_process)
            kind, why = classify(case, outcome, tmp)
        counts[kind] += 1
        framed += kind == "clean" and case.papermill and not case.succeeds
        waits = f"[waits for item {case.item}] " if case.waits else ""
        print(f"{kind:5}  {case.name:38} {waits}{why}", flush=True)
    total = sum(counts.values())
    print(f"\n{total} cases: {counts['clean']} clean, {counts['noisy']} noisy, "
          f"{counts['wrong']} wrong")
    if framed:
        print(f"({framed} clean papermill cases fail a notebook, which papermill answers with "
              f"its own traceback above the notebook's one line; counted as noise, as the "
              f"issue's probe did: {counts['clean'] - framed} clean, "
              f"{counts['noisy'] + framed} noisy)")
    return counts

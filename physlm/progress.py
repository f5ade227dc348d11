"""Progress of a pipeline for the terminal that started it: one line per epoch.

A stage notebook trains in its own kernel; its progress bars land in its executed
notebook, and papermill shows a kernel's output in the terminal only with --log-output.
So while a training stage runs, `follow` tails the run's metrics/epochs.jsonl in a
background thread of the pipeline's process and `say`s one line per new epoch record:

    physics: epoch 2/3  train loss 6.5341  val PPL 655.84  drift 0.1312  lambda 0.0512  \
    elapsed 0:21  ETA 0:10          (one line)

ETA is the rest of the stage: its remaining epochs times its mean epoch time so far.

`say` prints a line (to the notebook, when the pipeline runs in one) and, when the pipeline
runs in a Jupyter kernel, also writes it to the file descriptor the kernel was started with:
ipykernel captures the kernel's stdout and stderr for the notebook, but keeps the original
stderr open (`sys.stderr.fileno()`). For `papermill notebooks/phase3.ipynb ...` that is the
terminal of the papermill command; under JupyterLab it is the server's log.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from physlm.files import read_jsonl
from physlm.metrics import epoch_figures
from physlm.runs import RunDirectory

POLL_S = 1.0
# Before a line, the terminal's current line is cleared as tqdm.write does: papermill's cell
# progress bar sits there without a newline (it redraws itself on its next update).
CLEAR = "\r" + " " * 79 + "\r"


def terminal_fd() -> int | None:
    """The descriptor of the terminal that started this Jupyter kernel; None outside one
    (there stdout is the terminal already) or where the kernel keeps none."""
    stream = sys.stderr
    if not type(stream).__module__.startswith("ipykernel"):
        return None  # a plain process (or pytest's capture): not a kernel's stream
    try:
        fd = stream.fileno()  # ipykernel: its copy of the original stderr
    except (OSError, ValueError, AttributeError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def say(line: str) -> None:
    """Print `line`; in a Jupyter kernel also write it to the terminal that started it."""
    print(line, flush=True)
    fd = terminal_fd()
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, f"{CLEAR}{line}\n".encode())


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss or m:ss."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def epoch_line(label: str, record: dict[str, Any], epochs: int, until_epoch: int,
               elapsed_s: float, mean_epoch_s: float) -> str:
    """One epoch record as a progress line; ETA for the stage, which ends at `until_epoch`."""
    left = max(0, until_epoch - (int(record["epoch"]) + 1))
    return (f"{label}: epoch {int(record['epoch']) + 1}/{epochs}  {epoch_figures(record)}"
            f"  elapsed {clock(elapsed_s)}  ETA {clock(left * mean_epoch_s)}")


class EpochTail:
    """Reports the epoch records that appear in a run's epochs.jsonl after `start()`.

    Records present at the start (earlier stages) are not reported; the file may be
    rewritten meanwhile (a resume drops records it redoes, overwrite starts it afresh).
    """

    def __init__(self, run_dir: str | Path, label: str, epochs: int, until_epoch: int,
                 poll_s: float = POLL_S) -> None:
        self.path = RunDirectory(run_dir).epochs
        self.label, self.epochs, self.until_epoch, self.poll_s = label, epochs, until_epoch, poll_s
        self.seen: set[str] = set()
        self.times: list[float] = []
        self.lines: list[str] = []  # what was reported, for tests
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0

    def _records(self) -> list[tuple[str, dict[str, Any]]]:
        try:
            records = read_jsonl(self.path)
        except (OSError, ValueError):  # mid-rewrite, or garbled: try again at the next poll
            return []
        return [(json.dumps(r, sort_keys=True), r) for r in records]

    def start(self) -> EpochTail:
        self._start = time.perf_counter()
        self.seen = {key for key, _ in self._records()}
        # A copy of the caller's context: in a kernel, the thread's prints go to its cell.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,),
                                        name="physlm-progress", daemon=True)
        self._thread.start()
        return self

    def poll(self) -> None:
        """Report every new complete record."""
        for key, record in self._records():
            if key in self.seen:
                continue
            self.seen.add(key)
            if "time_s" in record:
                self.times.append(float(record["time_s"]))
            mean = sum(self.times) / len(self.times) if self.times else 0.0
            line = epoch_line(self.label, record, self.epochs, self.until_epoch,
                              time.perf_counter() - self._start, mean)
            self.lines.append(line)
            say(line)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def stop(self) -> None:
        """Stop the thread, then report what the stage wrote last."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()


@contextlib.contextmanager
def follow(run_dir: str | Path, label: str, epochs: int, until_epoch: int,
           poll_s: float = POLL_S) -> Iterator[EpochTail]:
    """Report the run's new epoch records while the `with` block runs (a training stage)."""
    tail = EpochTail(run_dir, label, epochs, until_epoch, poll_s).start()
    try:
        yield tail
    finally:
        tail.stop()

"""One writer per run directory: an OS-level lock that a dying process cannot leave behind.

`run_lock(root)` holds `<root>/.lock` (flock, through the filelock package) and records
the holder's PID and what it is in `<root>/.lock.holder` (its command line; for a notebook
kernel, whose command line names only its connection file, the pipeline and its run), so
that a second writer fails at once with `RunBusyError` naming the holder. The operating
system releases the lock when its process dies, even by SIGKILL: a stale `.lock.holder`
is overwritten by the next one.

Who holds it: the command-line trainer (`python -m physlm train`) and the notebook
pipeline (across all its stages, for the run and its control), never the trainer itself:
the pipeline's stage kernels are other processes that train while the pipeline holds the
lock. Readers (`physlm report`) do not take it. Within one process the lock is
re-entrant: taking it again for the same directory only counts, and the last exit
releases it. What the lock created is removed at release: its `.lock` file, and its
directory when that is still empty (the run failed before writing anything).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import filelock

from physlm.errors import RunBusyError
from physlm.files import atomic_write_text

LOCK_NAME, HOLDER_NAME = ".lock", ".lock.holder"
# resolved root -> [FileLock, depth, folders it created, whether it created .lock]
_held: dict[Path, list] = {}
_guard = threading.Lock()


def this_command() -> str:
    """The command line of this process, as typed ("python -m physlm train ..."), shortened."""
    text = shlex.join(["python", *getattr(sys, "orig_argv", sys.argv)[1:]])
    return text if len(text) <= 160 else text[:157] + "..."


def this_process(root: Path) -> str:
    """What this process is, for whoever finds `root` taken: its command line, or in a
    notebook kernel (started as `python -m ipykernel_launcher -f <connection file>`) the
    pipeline and its run: the first directory this process locked (a control's run)."""
    argv = getattr(sys, "orig_argv", sys.argv)
    if not any("ipykernel" in word for word in argv[1:3]):
        return this_command()
    run = next(iter(_held), root)
    notebook = os.environ.get("JPY_SESSION_NAME")  # set by Jupyter servers for their kernels
    where = f"notebook {notebook}" if notebook else "a notebook kernel"
    return f"the physlm pipeline of run {run}, in {where}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        pass
    return True


def held_by(root: str | Path) -> str | None:
    """Who holds the lock of `root` now, as its holder file says ("process N (what it is)");
    None when no live process does (e.g. a report asking whether a run is in progress)."""
    try:
        pid, _, command = (Path(root) / HOLDER_NAME).read_text().strip().partition(" ")
    except OSError:
        return None
    return f"process {pid} ({command})" if pid.isdigit() and _alive(int(pid)) else None


def holder(root: str | Path, patience: float = 1.0) -> str:
    """Who holds the lock of `root`, as its holder file says. A holder that has just taken
    the lock may not have written it yet, over that of a dead one: wait for it a little."""
    deadline = time.monotonic() + patience
    while (found := held_by(root)) is None:
        if time.monotonic() > deadline:
            return "another process"
        time.sleep(0.02)
    return found


def _acquire(key: Path, shown: Path, description: str | None) -> list:
    created = [folder for folder in (key, *key.parents) if not folder.exists()][::-1]
    key.mkdir(parents=True, exist_ok=True)
    new_file = not (key / LOCK_NAME).exists()
    lock = filelock.FileLock(key / LOCK_NAME, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RunBusyError(f"{shown} is in use by {holder(key)}; wait for it to finish, or "
                           "stop it, then run again") from None
    try:
        text = description or this_process(key)
        atomic_write_text(key / HOLDER_NAME, f"{os.getpid()} {text}\n")
    except BaseException:
        lock.release()
        raise
    return [lock, 1, created, new_file]


def _release(key: Path, lock: filelock.FileLock, created: list[Path], new_file: bool) -> None:
    """Unlock, removing what the lock created. The .lock file goes while still held: a
    process that opened it meanwhile finds it taken and fails (nobody waits on it), one
    that opens the path later makes a new one."""
    try:
        (key / HOLDER_NAME).unlink(missing_ok=True)
        if new_file:
            (key / LOCK_NAME).unlink()
        if created and not os.listdir(key):  # nothing was written: leave nothing
            for folder in reversed(created):
                folder.rmdir()
    except OSError:
        pass  # someone else wrote there meanwhile: it stays
    finally:
        lock.release()


@contextlib.contextmanager
def run_lock(root: str | Path, description: str | None = None) -> Iterator[None]:
    """Hold `root` for writing (creating the folder); RunBusyError if another process does.

    `description` (default: this process's command line) is shown to the processes that
    find the directory busy."""
    key = Path(root).resolve()
    with _guard:
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = _acquire(key, Path(root), description)
    try:
        yield
    finally:
        with _guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                lock, _, created, new_file = entry
                _release(key, lock, created, new_file)

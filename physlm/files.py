"""Files that survive a crash: atomic replacement and append-only JSON lines.

An atomic write goes through a temporary file, fsync and rename, so a crash
leaves the old or the new file. JSON-lines files are appended record by record;
a torn last line (a crash mid-write) is repaired before the next append and
ignored on reading. Atomic writes honour the umask like ordinary files (`_umask`).
`why_not_writable` says, before anything is created, why a folder cannot be written.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def why_not_writable(folder: str | Path) -> str | None:
    """Why `folder` could not be created or written to, found without creating anything;
    None when it can. (As root, modes do not bind: os.access says so.)"""
    existing = Path(folder).absolute()
    while True:
        try:
            if existing.exists():
                break
        except OSError as error:  # a parent that may not be searched
            return f"{(error.strerror or str(error)).lower()}: {existing}"
        existing = existing.parent
    if not existing.is_dir():
        return f"not a directory: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"permission denied: cannot write in {existing}"
    return None


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file, fsync and rename: a crash leaves the old or the new file.

    The file gets the mode an ordinary new file gets (0o666 less the umask), not mkstemp's
    private 0o600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _repair_torn_tail(handle: Any) -> None:
    """Make a file opened "a+b" end with a complete line before anything is appended.

    A crash mid-write can leave a last line without its newline; appending to it would
    glue the next record onto it and garble both. A torn line that is still valid JSON
    (only the newline was lost) gets its newline; any other torn line is cut off.
    """
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        return
    handle.seek(size - 1)
    if handle.read(1) == b"\n":
        return
    start = size
    while start > 0:  # find the start of the last line, reading backwards in blocks
        block_start = max(0, start - 65536)
        handle.seek(block_start)
        newline = handle.read(start - block_start).rfind(b"\n")
        if newline >= 0:
            start = block_start + newline + 1
            break
        start = block_start
    handle.seek(start)
    try:
        complete = isinstance(json.loads(handle.read(size - start)), dict)
    except ValueError:  # json.JSONDecodeError, or bytes that are not UTF-8
        complete = False
    if complete:
        handle.write(b"\n")
    else:
        handle.truncate(start)


def append_jsonl(path: Path, records: list[dict[str, Any]], sync: bool = False) -> None:
    """Append records, one JSON object per line.

    The write is flushed to the operating system, so it survives the process being
    killed; `sync` also forces it to disk (for records that are written rarely). A
    torn last line left by an earlier crash is repaired first (`_repair_torn_tail`).
    """
    if not records:
        return
    with open(path, "a+b") as handle:
        _repair_torn_tail(handle)
        handle.write("".join(json.dumps(r, allow_nan=True) + "\n" for r in records)
                     .encode("utf-8"))
        handle.flush()
        if sync:
            os.fsync(handle.fileno())


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace a JSON-lines file atomically (used to drop records a resume will redo)."""
    atomic_write_text(path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a JSON-lines file; a torn or garbled last line is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # torn by a crash mid-write
            raise ValueError(f"{path}:{number} is not valid JSON") from None
    return records

"""Files that survive a crash: atomic replacement and append-only JSON lines.

An atomic write goes through a temporary file, fsync and rename, so a crash
leaves the old or the new file. JSON-lines files are appended record by record;
a torn last line (a crash mid-write) is repaired before the next append and
ignored on reading.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file, fsync and rename: a crash leaves the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
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

"""Files that survive a crash: atomic replacement and append-only JSON lines.

An atomic write goes through a temporary file, fsync and rename, so a crash
leaves the old or the new file. JSON-lines files are appended record by record;
a torn last line (a crash mid-write: no newline at its end) is repaired before the
next append and left out on reading, with a warning where the reader asks for one;
any other line that is not a JSON object is damage, reported by file and line
(`DamagedFileError`), never skipped. A settings file (a run's config.yaml) is headed by
its count of settings, so that one cut short is told from a whole one (`read_settings`).
Atomic writes honour the umask like ordinary files (`_umask`). `why_not_writable` says,
before anything is created, why a folder cannot be written.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import yaml

from physlm.errors import DamagedFileError


class TornRecordWarning(UserWarning):
    """The last line of a JSON-lines file was cut short by a crash and is left out."""


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


_REPAIR = "restore the file from a copy of the run, or delete that line"


def read_jsonl(path: str | Path, required: tuple[str, ...] = (),
               warn_torn: bool = False) -> list[dict[str, Any]]:
    """All records of a JSON-lines file (none when it does not exist).

    A last line without its newline that is not JSON was torn by a crash mid-write: it is
    left out, with a TornRecordWarning if `warn_torn` (a file being appended to right now
    may show one too: its reader passes False). Any other line that is not a JSON object,
    or lacks a key of `required`, raises DamagedFileError naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")  # the last item is "" after a final newline, else a torn line
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: cut short by a crash
                if warn_torn:
                    warnings.warn(f"{path}:{number}: the last record is torn (cut short by a "
                                  "crash mid-write) and is left out", TornRecordWarning,
                                  stacklevel=2)
                break
            raise DamagedFileError(f"{path}:{number} is damaged: not valid JSON "
                                   f"({error.msg}, column {error.colno}); {_REPAIR}") from None
        if not isinstance(record, dict):
            raise DamagedFileError(f"{path}:{number} is damaged: a record is a JSON object, "
                                   f"not a {type(record).__name__}; {_REPAIR}")
        missing = [key for key in required if key not in record]
        if missing:
            raise DamagedFileError(f"{path}:{number} is damaged: the record lacks "
                                   f"{', '.join(missing)}; {_REPAIR}")
        records.append(record)
    return records


def read_json(path: str | Path, default: Any = None, kind: type = dict) -> Any:
    """A JSON file holding one `kind` (an object, or a list), `default` when it does not
    exist; one that holds anything else raises DamagedFileError naming it."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        problem = f"not UTF-8 (undecodable byte at offset {error.start})"
    except json.JSONDecodeError as error:
        problem = "empty" if not error.doc.strip() else (
            f"not JSON ({error.msg}, line {error.lineno} column {error.colno})")
    else:
        if isinstance(value, kind):
            return value
        problem = f"a JSON {type(value).__name__}, not {'an object' if kind is dict else 'a list'}"
    raise DamagedFileError(f"{path} is damaged: {problem}; restore it from a copy of the run")


# The first line of a settings file: one cut short holds fewer settings than it counts.
SETTINGS_HEADER = "# physlm: {} settings\n"


def write_settings(path: Path, values: dict[str, Any]) -> None:
    """A flat YAML mapping, written atomically, headed by its count (SETTINGS_HEADER)."""
    atomic_write_text(path, SETTINGS_HEADER.format(len(values))
                      + yaml.safe_dump(values, sort_keys=False))


def read_settings(path: Path) -> dict[str, Any]:
    """The mapping `write_settings` wrote. DamagedFileError naming the file when it is
    empty, not UTF-8, not a YAML mapping, or cut short: fewer settings than its header
    counts, or a last line without its end (a file without the header, from before it,
    is checked for all but the cut)."""
    problem = None
    try:
        text = path.read_bytes().decode("utf-8")
        values = yaml.safe_load(text)
    except UnicodeDecodeError as error:
        problem = f"not UTF-8 text (undecodable byte at offset {error.start})"
    except yaml.YAMLError as error:
        problem = f"not valid YAML ({getattr(error, 'problem', None) or error})"
    else:
        header = re.match(SETTINGS_HEADER.replace("{}", r"(\d+)"), text)
        if not values:
            problem = "it is empty"
        elif not isinstance(values, dict):
            problem = f"a YAML {type(values).__name__}, not a mapping of settings"
        elif header and len(values) < int(header[1]):
            problem = f"cut short: it holds {len(values)} of its {header[1]} settings"
        elif header and not text.endswith("\n"):
            problem = "cut short: its last line is incomplete"
    if problem:
        raise DamagedFileError(f"{path} is damaged: {problem}; restore it from a copy of the "
                               "run, or train the run again in another run_dir")
    return values

"""physlm's own errors: the mistakes a user can act on, each said in one line.

Every error here carries a message that says what is wrong and what to do; the command
line prints it as `physlm: <label>: <message>` and exits with the error's code (2: the
input, 1: the run), and the notebooks show it as `physlm: <message>` without a traceback
(physlm.pipeline.install_error_display). `USER_ERRORS` is that list, in one place.
"""

from __future__ import annotations

import re
from pathlib import Path


class ConfigError(ValueError):
    """A parameter is unknown, of the wrong type, or out of range."""


class DataError(ValueError):
    """The text could not be found, read or turned into training sequences."""


class CheckpointError(RuntimeError):
    """A checkpoint file is truncated, foreign or incompatible."""


class NotWritableError(PermissionError):
    """A folder cannot be created or written to, whatever the OS's reason (a PermissionError
    for the callers that catch that)."""


class DamagedFileError(ValueError):
    """A file of a run directory cannot be read as what it should hold: empty, cut short,
    not UTF-8, not JSON or YAML, settings that are not valid, or a record without the fields
    every record has. The message names the file (and line) and what to do."""


class RunBusyError(RuntimeError):
    """Another process holds the run directory."""


class RunConflictError(RuntimeError):
    """The run directory holds a different run (other settings or data)."""


class DeviceError(RuntimeError):
    """The device asked for is not available here."""


class TrainingError(RuntimeError):
    """Training cannot go on: too many non-finite steps."""


class GenerationError(ValueError):
    """The run cannot generate text (no weights, not causal), or the request is unusable."""


class ClusterError(RuntimeError):
    """The Ray cluster cannot be joined, or cannot run physlm's tasks."""


class StageError(RuntimeError):
    """A stage notebook failed; its executed copy (with the traceback) is kept."""

    def __init__(self, stage: str, ename: str, evalue: str, notebook: Path) -> None:
        self.stage, self.ename, self.evalue, self.notebook = stage, ename, evalue, notebook
        super().__init__(f"stage {stage!r} failed with {ename}: {evalue}\n"
                         f"The executed notebook of the failed stage is kept in {notebook}; "
                         "open it for the full traceback.")


class CommandError(Exception):
    """A command's input is unusable: printed as `physlm: <label>: <message>`, exit `code`."""

    def __init__(self, label: str, message: str, code: int) -> None:
        super().__init__(message)
        self.label, self.code = label, code


# Each error with its command-line label and exit code (2: fix the input; 1: the run).
USER_ERRORS: dict[type[Exception], tuple[str, int]] = {
    ConfigError: ("configuration error", 2),
    DataError: ("data error", 2),
    GenerationError: ("cannot generate", 2),
    CheckpointError: ("checkpoint error", 1),
    TrainingError: ("cannot train", 1),
    DeviceError: ("cannot train", 1),
    ClusterError: ("cluster error", 1),
    RunBusyError: ("run directory busy", 1),
    RunConflictError: ("cannot train", 1),
    NotWritableError: ("cannot write", 1),
    DamagedFileError: ("damaged run directory", 1),
    StageError: ("pipeline stage failed", 1),
}


def known_error(error: BaseException) -> tuple[str, int] | None:
    """(label, exit code) of an error a user can act on, None for any other. An error of the
    operating system is labelled by what it is ("not a directory", "no space left on
    device", ...) and names its file."""
    if isinstance(error, CommandError):
        return error.label, error.code
    for kind, known in USER_ERRORS.items():
        if isinstance(error, kind):
            return known
    if isinstance(error, OSError):
        return (error.strerror or "file error").lower(), 1
    return None


def one_line(error: BaseException | str) -> str:
    """The message on one line: "a:\n  b\n  c" becomes "a: b; c". An error of the operating
    system ("[Errno 20] Not a directory: 'x'") is its file names (the label says the rest)."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        return " -> ".join(str(name) for name in (error.filename, error.filename2) if name)
    text = re.sub(r":\s*\n\s*", ": ", str(error).strip())
    return re.sub(r"\s*\n\s*", "; ", text)

"""Google Colab set-up of notebooks/phase3.ipynb: fetch physlm at a pinned ref and install it.

`setup(source, ref, drive)` does, on Colab only (`"google.colab" in sys.modules`):
clone the git URL `source` into /content/physlm (unless that clone exists: then fetch),
check out `ref` (a branch, tag or commit) as a detached HEAD, `pip install -e
.[notebooks,hub]`, chdir into the clone and show the GPU. With `drive=True` it also mounts
Google Drive and links the clone's `runs/` to /content/drive/MyDrive/physlm/runs, so every
run directory (checkpoints, metrics) lives on Drive and a disconnect loses nothing: run the
notebook again and training resumes from the last checkpoint. It returns that Drive folder,
or None (runs on the VM's disk, or not on Colab, where it does nothing at all). A failed
clone or checkout raises one RuntimeError that quotes git's message.

Where the code lives (one copy, no duplicates): the first cell of phase3.ipynb runs before
physlm is installed, so it cannot import this module. Instead the cell *contains* this
module's code: the part between the two "Colab cell" marker lines below uses only the
standard library and is copied verbatim into the cell, between the cell's parameters
(PHYSLM_SOURCE, PHYSLM_REF, USE_DRIVE) and its call `RUN_ROOT = setup(...)`. Edit the logic
here and regenerate the cell with `python -m physlm.colab [notebook]`, which replaces only
the code between the markers and keeps the cell's parameter values; tests/test_colab.py fails
while the cell and this module differ. The tests exercise this module's functions; the cell
is the same text.
"""

from __future__ import annotations

import json

# --- Colab cell code: begin ---
import os
import subprocess
import sys
from pathlib import Path

CLONE_DIR = "/content/physlm"
DRIVE_MOUNT = "/content/drive"


def _git(*args: str, cwd: str | None = None) -> str:
    """git's stdout; a failure raises one RuntimeError that quotes git's own message."""
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        fatal = [line for line in lines if line.startswith(("fatal:", "error:"))]
        reason = "; ".join(fatal or lines[-1:]) or f"exit status {result.returncode}"
        raise RuntimeError(f"`git {' '.join(args)}` failed: {reason}")
    return result.stdout.strip()


def checkout(source: str, ref: str, directory: str = CLONE_DIR) -> str:
    """Clone `source` into `directory` (or fetch, if cloned already); check out `ref` detached.

    `ref` is a branch (its newest commit on `source`), a tag or a commit. Returns the commit.
    """
    if os.path.isdir(os.path.join(directory, ".git")):
        _git("remote", "set-url", "origin", source, cwd=directory)
        _git("fetch", "--quiet", "--force", "--tags", "origin", cwd=directory)
    else:
        _git("clone", "--quiet", source, directory)
    for candidate in (f"origin/{ref}", ref):  # a branch as on `source`, else a tag or commit
        try:
            commit = _git("rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}",
                          cwd=directory)
            break
        except RuntimeError:
            continue
    else:
        raise RuntimeError(f"cannot check out {ref!r}: {source} has no branch, tag or commit "
                           "of that name (set PHYSLM_REF to one it has)")
    _git("checkout", "--quiet", "--detach", commit, cwd=directory)
    return commit


def pip_install(directory: str) -> None:
    """`pip install -e .[notebooks,hub]` in `directory`."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "-e", ".[notebooks,hub]"]
    if subprocess.run(command, cwd=directory).returncode != 0:
        raise RuntimeError(f"`{' '.join(command[2:])}` failed in {directory}: see pip's output")


def mount_drive(mount: str = DRIVE_MOUNT) -> Path:
    """Mount Google Drive at `mount`; returns the run-directory root on it (created)."""
    from google.colab import drive

    drive.mount(mount)
    root = Path(mount) / "MyDrive" / "physlm" / "runs"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _link_runs(directory: str, root: Path) -> None:
    """Make `directory`/runs a link to `root`: the default run_dir runs/<name> is then there."""
    link = Path(directory) / "runs"
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        if any(link.iterdir()):
            raise RuntimeError(f"{link} already holds runs on this VM's disk: move them to "
                               f"{root}, or set USE_DRIVE = False")
        link.rmdir()
    link.symlink_to(root, target_is_directory=True)


def _show_gpu() -> None:
    try:
        gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    except OSError:
        gpus = ""
    print("GPU:", gpus.strip() or "none (Runtime > Change runtime type > GPU)")


def setup(source: str, ref: str = "main", drive: bool = False, directory: str = CLONE_DIR,
          mount: str = DRIVE_MOUNT) -> Path | None:
    """On Colab: fetch, pin, install and enter physlm; the Drive run root, or None. Else None."""
    if "google.colab" not in sys.modules:
        return None
    commit = checkout(source, ref, directory)
    print(f"physlm {ref} = commit {commit[:12]} from {source}, in {directory}")
    root = mount_drive(mount) if drive else None
    pip_install(directory)
    os.chdir(directory)
    if directory not in sys.path:
        sys.path.insert(0, directory)  # importable now, without restarting the runtime
    if root is not None:
        _link_runs(directory, root)
        print(f"run directories: runs/ -> {root} (Google Drive)")
    _show_gpu()
    return root
# --- Colab cell code: end ---


UPSTREAM = "https://github.com/physlm/physlm.git"  # the cell's default PHYSLM_SOURCE
BEGIN = "# --- Colab cell code: begin ---"
END = "# --- Colab cell code: end ---"
NOTEBOOK = "notebooks/phase3.ipynb"
_CELL_HEAD = f"""\
# @title Google Colab set-up: fetch and install physlm, optionally keep runs on Google Drive
# Elsewhere this cell does nothing.
# PHYSLM_SOURCE: the git URL to clone; a fork puts its own.
# PHYSLM_REF: a branch, tag or commit; pin a tag or commit to reproduce a run exactly.
# USE_DRIVE: mount Google Drive and link runs/ to /content/drive/MyDrive/physlm/runs, so that
# a disconnect loses nothing (run the notebook again: training resumes from its checkpoint).
# The code between the markers is physlm/colab.py's, copied by `python -m physlm.colab`:
# edit it there.
PHYSLM_SOURCE = "{UPSTREAM}"  # @param {{type:"string"}}
PHYSLM_REF = "main"  # @param {{type:"string"}}
USE_DRIVE = False  # @param {{type:"boolean"}}

"""
_CELL_TAIL = "\n\nRUN_ROOT = setup(PHYSLM_SOURCE, PHYSLM_REF, USE_DRIVE)\n"


def between_markers(text: str) -> str:
    """The text between the BEGIN and END marker lines (exclusive)."""
    start, stop = text.index(BEGIN + "\n") + len(BEGIN) + 1, text.index("\n" + END)
    return text[start:stop]


def cell_code() -> str:
    """This module's code that the Colab cell holds."""
    return between_markers(Path(__file__).read_text(encoding="utf-8"))


def colab_cell(notebook: dict) -> dict:
    """The notebook's Colab cell: the code cell with the markers, else the first code cell
    that mentions google.colab."""
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    for mark in (BEGIN, "google.colab"):
        for cell in code:
            if mark in "".join(cell["source"]):
                return cell
    raise ValueError("the notebook has no code cell that mentions google.colab")


def cell_source(current: str | None = None) -> str:
    """The Colab cell's text: `current`'s lines outside the markers (or the defaults), with
    this module's code between them."""
    if current and BEGIN in current and END in current:
        head, tail = current.split(BEGIN + "\n", 1)[0], current.split("\n" + END, 1)[1]
    else:
        head, tail = _CELL_HEAD, _CELL_TAIL
    return f"{head}{BEGIN}\n{cell_code()}\n{END}{tail}"


def write_cell(path: str | Path = NOTEBOOK) -> None:
    """Copy this module's code into the Colab cell of the notebook at `path`."""
    path = Path(path)
    notebook = json.loads(path.read_text(encoding="utf-8"))
    cell = colab_cell(notebook)
    text = cell_source("".join(cell["source"]))
    cell["source"] = text.splitlines(keepends=True)
    cell["metadata"]["cellView"] = "form"  # Colab shows the parameters as a form
    path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_cell(sys.argv[1] if len(sys.argv) > 1 else NOTEBOOK)
    print(f"copied physlm/colab.py's code into the Colab cell of "
          f"{sys.argv[1] if len(sys.argv) > 1 else NOTEBOOK}")

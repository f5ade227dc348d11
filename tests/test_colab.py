"""Tests of the Colab set-up (physlm.colab) off Colab: a fake google.colab module, a local git
repository as the source, pip stubbed; and the Colab cell of phase3.ipynb against the module."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from physlm import colab

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "phase3.ipynb"
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def _commit(repo: Path, text: str) -> str:
    (repo / "VERSION").write_text(text)
    _git("add", "VERSION", cwd=repo)
    _git("commit", "--quiet", "-m", f"version {text}", cwd=repo)
    return _git("rev-parse", "HEAD", cwd=repo)


@pytest.fixture
def upstream(tmp_path: Path, monkeypatch) -> Path:
    """A local git repository on branch main: commit "1" tagged v1, then commit "2"."""
    for key in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{key}_NAME", "physlm test")
        monkeypatch.setenv(f"GIT_{key}_EMAIL", "test@example.invalid")
    repo = tmp_path / "upstream"
    repo.mkdir()
    _git("init", "--quiet", "--initial-branch", "main", cwd=repo)
    _commit(repo, "1")
    _git("tag", "v1", cwd=repo)
    _commit(repo, "2")
    return repo


@pytest.fixture
def pip_calls(monkeypatch) -> list[tuple[list[str], str]]:
    """(argv, cwd) of every pip run; pip itself never runs, every other command does."""
    calls, real_run = [], subprocess.run

    def run(command, *args, **kwargs):
        if list(command[1:3]) == ["-m", "pip"]:
            calls.append((list(command), str(kwargs.get("cwd"))))
            return subprocess.CompletedProcess(command, 0)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


@pytest.fixture
def fake_colab(monkeypatch, tmp_path: Path) -> list[str]:
    """Pretend to be on Colab; returns the mount points that drive.mount was called with."""
    mounts = []

    def mount(path: str) -> None:
        mounts.append(path)
        (Path(path) / "MyDrive").mkdir(parents=True, exist_ok=True)  # remounts are fine

    module = types.ModuleType("google.colab")
    module.drive = types.SimpleNamespace(mount=mount)
    monkeypatch.setitem(sys.modules, "google.colab", module)
    monkeypatch.chdir(tmp_path)  # setup() changes directory; undone after the test
    monkeypatch.setattr(sys, "path", list(sys.path))
    return mounts


def _head(clone: Path) -> str:
    return _git("rev-parse", "HEAD", cwd=clone)


# --- on (a simulated) Colab -------------------------------------------------------------------

@needs_git
def test_setup_clones_the_pinned_tag_and_installs(upstream, fake_colab, pip_calls, tmp_path):
    clone = tmp_path / "content" / "physlm"
    root = colab.setup(str(upstream), "v1", drive=False, directory=str(clone))
    assert root is None and fake_colab == []  # no Drive unless asked
    assert _head(clone) == _git("rev-parse", "v1^{commit}", cwd=upstream)
    assert (clone / "VERSION").read_text() == "1"
    detached = subprocess.run(["git", "symbolic-ref", "-q", "HEAD"], cwd=clone).returncode == 1
    assert detached
    assert len(pip_calls) == 1
    argv, cwd = pip_calls[0]
    assert argv[:4] == [sys.executable, "-m", "pip", "install"]
    assert argv[argv.index("-e") + 1] == ".[notebooks,hub]"
    assert cwd == str(clone)
    assert Path.cwd() == clone and sys.path[0] == str(clone)


@needs_git
def test_setup_follows_a_branch_and_pins_commits_on_rerun(upstream, fake_colab, pip_calls,
                                                          tmp_path):
    clone = tmp_path / "physlm"
    colab.setup(str(upstream), "main", directory=str(clone))
    assert _head(clone) == _git("rev-parse", "main", cwd=upstream)
    newest = _commit(upstream, "3")
    colab.setup(str(upstream), "main", directory=str(clone))  # the clone exists: fetch
    assert _head(clone) == newest and (clone / "VERSION").read_text() == "3"
    first = _git("rev-parse", "v1", cwd=upstream)
    colab.setup(str(upstream), first[:10], directory=str(clone))  # an abbreviated commit
    assert _head(clone) == first
    assert len(pip_calls) == 3


@needs_git
def test_setup_with_drive_keeps_runs_on_drive(upstream, fake_colab, pip_calls, tmp_path):
    clone, mount = tmp_path / "physlm", tmp_path / "drive"
    root = colab.setup(str(upstream), "main", drive=True, directory=str(clone), mount=str(mount))
    assert fake_colab == [str(mount)]
    assert root == mount / "MyDrive" / "physlm" / "runs" and root.is_dir()
    assert (clone / "runs").is_symlink() and (clone / "runs").resolve() == root.resolve()
    (clone / "runs" / "smoke").mkdir()  # the default run_dir runs/<name> lands on Drive
    assert (root / "smoke").is_dir()
    assert colab.setup(str(upstream), "main", True, str(clone), str(mount)) == root  # again
    assert fake_colab == [str(mount)] * 2 and (root / "smoke").is_dir()


@needs_git
def test_drive_refuses_to_hide_runs_on_the_vm_disk(upstream, fake_colab, pip_calls, tmp_path):
    clone = tmp_path / "physlm"
    colab.setup(str(upstream), "main", directory=str(clone))
    (clone / "runs" / "old").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="already holds runs"):
        colab.setup(str(upstream), "main", True, str(clone), str(tmp_path / "drive"))


@needs_git
def test_a_bad_ref_is_one_clear_error(upstream, fake_colab, pip_calls, tmp_path):
    with pytest.raises(RuntimeError) as error:
        colab.setup(str(upstream), "no-such-ref", directory=str(tmp_path / "physlm"))
    message = str(error.value)
    assert "'no-such-ref'" in message and str(upstream) in message and "\n" not in message
    assert pip_calls == []


@needs_git
def test_a_bad_source_is_one_clear_error(fake_colab, pip_calls, tmp_path):
    missing = tmp_path / "no-such-repository"
    with pytest.raises(RuntimeError) as error:
        colab.setup(str(missing), "main", directory=str(tmp_path / "physlm"))
    message = str(error.value)
    assert message.startswith("`git clone") and "fatal:" in message and "\n" not in message
    assert pip_calls == []


# --- off Colab ----------------------------------------------------------------------------------

def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"off Colab nothing may run, but {args[0] if args else kwargs} ran")


def test_off_colab_setup_does_nothing(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    here = Path.cwd()
    assert colab.setup("https://example.invalid/x.git", "main", True,
                       directory=str(tmp_path / "physlm"), mount=str(tmp_path / "drive")) is None
    assert not (tmp_path / "physlm").exists() and not (tmp_path / "drive").exists()
    assert Path.cwd() == here


def _colab_cell() -> dict:
    return colab.colab_cell(json.loads(NOTEBOOK.read_text(encoding="utf-8")))


def test_the_notebook_cell_holds_this_module_code():
    source = "".join(_colab_cell()["source"])
    assert colab.between_markers(source) == colab.cell_code(), (
        "the Colab cell of phase3.ipynb differs from physlm/colab.py: run "
        "`python -m physlm.colab` to copy the module's code into it")
    assert colab.cell_source(source) == source  # regenerating changes nothing
    assert "def setup(" in colab.cell_code() and "import physlm" not in colab.cell_code()


def test_the_notebook_cell_is_a_no_op_off_colab(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    namespace: dict = {}
    exec(compile("".join(_colab_cell()["source"]), "phase3-colab-cell", "exec"), namespace)
    assert namespace["RUN_ROOT"] is None
    assert namespace["PHYSLM_SOURCE"] == colab.UPSTREAM
    assert namespace["PHYSLM_REF"] == "main" and namespace["USE_DRIVE"] is False


def test_write_cell_keeps_the_parameters(tmp_path):
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    cell = colab.colab_cell(notebook)
    source = "".join(cell["source"]).replace('PHYSLM_REF = "main"', 'PHYSLM_REF = "v0.1.0"')
    begin = source.index(colab.BEGIN) + len(colab.BEGIN)
    cell["source"] = source[:begin] + "\nstale = 'code'\n" + source[source.index(colab.END):]
    path = tmp_path / "phase3.ipynb"
    path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    colab.write_cell(path)
    written = "".join(colab.colab_cell(json.loads(path.read_text(encoding="utf-8")))["source"])
    assert 'PHYSLM_REF = "v0.1.0"' in written and "stale" not in written
    assert colab.between_markers(written) == colab.cell_code()

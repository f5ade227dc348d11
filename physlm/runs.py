"""The run directory: the one module that knows its format, for writers and readers.

    RUN_DIR/
      config.yaml          the resolved configuration (flat keys; physlm.config)
      vocab.json           the vocabulary, id order
      env.json             provenance: versions, device, git commit, data checksums
      metrics/steps.jsonl  one JSON record per optimizer step
      metrics/epochs.jsonl one JSON record per finished epoch
      metrics/initial.json the untrained model's validation (and held-out) loss
      metrics/references.json count-model perplexities (physlm.ngram), counted at the start
      checkpoints/last.pt  the latest checkpoint (written atomically)
      checkpoints/best.pt  the weights of the best epoch so far (`improves`)
      checkpoints/warmup.pt the checkpoint at the end of the warmup, where runs fork
      checkpoints/warmup_best.pt best.pt as it was then, for the runs that fork there
      samples.json         continuations of the fixed validation prompts (physlm.generate)
      notebooks/*.ipynb    executed notebooks of each stage (pipeline runs)
      control/             the physics-off control run, a run directory itself

A run's record is what a report reads: config.yaml, env.json, metrics/ and samples.json,
without the checkpoints, vocabulary or notebooks (~0.4 MB, small enough to commit).

The trainer writes through `RunDirectory`; the report, plots, pipeline and
notebooks read a finished (or unfinished) run as one typed `RunData` (physlm.rundata: the
configuration as a `Config`, env.json as a dict, the metrics as DataFrames; its best epoch).
Metrics files are append-only JSON lines (physlm.files); every other file is replaced
atomically. A file that cannot be read as what it should hold (empty, cut short, a line that
is not a record) raises DamagedFileError naming it, never the defaults in its place; a last
metrics line torn by a crash is left out with a warning. Nothing is created before the
first file is written (`create`). One process writes at a time: `RunDirectory.lock()`
(physlm.lock) is held by the command-line trainer and the pipeline; readers need not.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from physlm.checkpoint import load_checkpoint, save_checkpoint
from physlm.config import RUNS_ROOT, Config, from_flat
from physlm.errors import (
    CheckpointError,
    DamagedFileError,
    NotWritableError,
    RunConflictError,
    one_line,
)
from physlm.files import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_text,
    read_json,
    read_jsonl,
    read_settings,
    why_not_writable,
    write_jsonl,
    write_settings,
)
from physlm.lock import run_lock
from physlm.rundata import RunData
from physlm.sections import RESUMABLE, WARMUP_INVARIANT
from physlm.values import ConfigError

# The fields every record has (the trainer's since the first published runs): a record
# without one is damaged, not a record to report with holes.
STEP_KEYS = ("step", "epoch", "loss", "physics", "skipped")
EPOCH_KEYS = ("epoch", "phase", "train_loss", "val_loss", "val_ppl", "val_ppl_batch_mean",
              "time_s")


@dataclass(frozen=True)
class RunDirectory:
    """One run directory: its paths, and reading and writing its files."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def name(self) -> str:
        return self.root.resolve().name

    config = property(lambda self: self.root / "config.yaml")
    vocab = property(lambda self: self.root / "vocab.json")
    env = property(lambda self: self.root / "env.json")
    steps = property(lambda self: self.root / "metrics" / "steps.jsonl")
    epochs = property(lambda self: self.root / "metrics" / "epochs.jsonl")
    initial = property(lambda self: self.root / "metrics" / "initial.json")
    checkpoint = property(lambda self: self.root / "checkpoints" / "last.pt")
    warmup_checkpoint = property(lambda self: self.root / "checkpoints" / "warmup.pt")
    best_checkpoint = property(lambda self: self.root / "checkpoints" / "best.pt")
    warmup_best_checkpoint = property(lambda self: self.root / "checkpoints" / "warmup_best.pt")
    references = property(lambda self: self.root / "metrics" / "references.json")
    notebooks = property(lambda self: self.root / "notebooks")
    samples = property(lambda self: self.root / "samples.json")
    control = property(lambda self: RunDirectory(self.root / "control"))

    @property
    def label(self) -> str:
        """A short name for progress lines: the run's name, with its parent for a control."""
        name = self.root.resolve().name
        return f"{self.root.resolve().parent.name}/{name}" if name == "control" else name

    @property
    def holds_run(self) -> bool:
        return self.config.exists() or self.steps.exists() or self.checkpoint.exists()

    def check_writable(self) -> None:
        """Fail early and clearly when the directory could not be made; creates nothing."""
        reason = why_not_writable(self.root)
        if reason:
            raise NotWritableError(f"run directory {self.root} is not writable ({reason}); "
                                   "choose another run_dir")

    def create(self) -> RunDirectory:
        """Make the directory tree, failing early and clearly when it is not writable."""
        self.check_writable()
        try:
            for folder in (self.root, self.steps.parent, self.checkpoint.parent):
                folder.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise NotWritableError(f"run directory {self.root} is not writable ({error}); "
                                   "choose another run_dir") from error
        return self

    def lock(self, description: str | None = None) -> AbstractContextManager[None]:
        """Hold the directory for writing (physlm.lock): RunBusyError at once if another
        process does; re-entrant within one process. Creates the folder, which is removed
        again if nothing was written to it."""
        self.check_writable()
        return run_lock(self.root, description)

    def clear(self) -> None:
        """Delete the run's files (overwrite: true); executed notebooks and control stay."""
        for path in (self.config, self.vocab, self.env, self.samples):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.steps.parent, ignore_errors=True)
        shutil.rmtree(self.checkpoint.parent, ignore_errors=True)
        self.create()

    # ------------------------------------------------------------ configuration and env
    def write_config(self, config: Config) -> None:
        """config.yaml, replaced atomically (it is rewritten on every resume)."""
        write_settings(self.config, config.to_flat())

    def read_config(self) -> Config:
        """The run's settings (old names accepted); DamagedFileError when config.yaml is
        empty, unreadable or cut short (physlm.files.read_settings), or holds settings this
        physlm does not accept, never the defaults."""
        values = read_settings(self.config)
        try:
            return from_flat(values)
        except ConfigError as error:
            raise DamagedFileError(f"{self.config} holds settings this physlm does not accept "
                                   f"({one_line(error)}): it was edited, or written by another "
                                   "version; restore it from a copy of the run") from error

    def write_env(self, env: dict[str, Any]) -> None:
        atomic_write_text(self.env, json.dumps(env, indent=2))

    def read_env(self) -> dict[str, Any]:
        return read_json(self.env, default={})

    def settings_changed(self, config: Config) -> dict[str, tuple[Any, Any]]:
        """Non-resumable settings of `config` that differ from the saved ones:
        key -> (value in the run, value now). Empty when the run has no config."""
        if not self.config.exists():
            return {}
        return self.read_config().differences(config, allowed=RESUMABLE)

    def finished_as(self, config: Config) -> bool:
        """Holds `config`'s run (same settings) with every epoch done, by its metrics: a run
        restored from its record has no checkpoint, yet it is done."""
        return (self.config.is_file() and not self.settings_changed(config)
                and len(self.epoch_records()) >= config.train.epochs)

    def copy_record_to(self, dest: RunDirectory) -> None:
        """Copy this run's record (config, provenance, metrics) to `dest`."""
        for path in (self.config, self.env, self.initial, self.references, self.steps,
                     self.epochs, self.samples):
            if path.is_file():
                atomic_write_bytes(dest.root / path.relative_to(self.root), path.read_bytes())

    def completed_epochs(self) -> int:
        """Epochs finished according to the checkpoint (0 without a readable one)."""
        try:
            return int(load_checkpoint(self.checkpoint)["epoch"])
        except (FileNotFoundError, CheckpointError):
            return 0

    # ------------------------------------------------------------ the fresh/resume decision
    def prepare(self, config: Config) -> None:
        """Make the directory ready for `config`: cleared (overwrite), or checked for resume
        (`check_accepts`). A new run's directory is only checked: it is created with its
        first file."""
        self.check_accepts(config)
        if self.holds_run and config.train.overwrite:
            self.clear()

    def check_accepts(self, config: Config) -> None:
        """Whether `config` may start or continue here, changing nothing: NotWritableError,
        RunConflictError when the directory holds a run that `config` may not continue
        (resume: false, other settings), DamagedFileError when its config.yaml is damaged."""
        self.check_writable()
        if not self.holds_run or config.train.overwrite:
            return
        if not config.train.resume:
            raise RunConflictError(f"{self.root} already holds a run. Set resume: true to "
                                   "continue it, overwrite: true to start afresh there, or "
                                   "choose another run_dir.")
        differing = [f"{key}: {before!r} in the run, {now!r} now"
                     for key, (before, now) in self.settings_changed(config).items()]
        if differing:
            raise RunConflictError(
                f"cannot resume the run in {self.root}: its settings differ from this "
                "configuration:\n  " + "\n  ".join(differing) + "\nUse the run's settings, "
                "set overwrite: true to start afresh, or choose another run_dir.")

    def check_same_data(self, checksums: dict[str, str]) -> None:
        """Refuse to continue a run whose data files changed since it started."""
        saved = self.read_env().get("data_checksums", {})
        changed = [split for split, digest in checksums.items()
                   if saved.get(split, digest) != digest]
        if changed:
            raise RunConflictError(
                f"cannot resume the run in {self.root}: its {', '.join(changed)} data changed "
                "since it started (sha256 differs). Restore the data, set overwrite: true, or "
                "choose another run_dir.")

    # ------------------------------------------------------------ forks
    def keep_warmup_checkpoint(self) -> None:
        """Keep last.pt, and best.pt as it is now, for the runs that fork here."""
        atomic_write_bytes(self.warmup_checkpoint, self.checkpoint.read_bytes())
        if self.best_checkpoint.is_file():
            atomic_write_bytes(self.warmup_best_checkpoint, self.best_checkpoint.read_bytes())

    def fork_from(self, source: RunDirectory, config: Config) -> bool:
        """Start this (empty) run at the end of `source`'s warmup, when `config` would train
        the same warmup (it differs from source's settings only in WARMUP_INVARIANT ones);
        return whether it did. Training then resumes from the copied checkpoint. A warmup
        checkpoint this code cannot continue (an older format) is no start: this run then
        trains its own warmup, which gives the same result."""
        if self.holds_run or not source.warmup_checkpoint.is_file():
            return False
        source_config = source.read_config()
        if source_config.differences(config, allowed=WARMUP_INVARIANT):
            return False
        try:
            state = load_checkpoint(source.warmup_checkpoint)
        except CheckpointError:
            return False
        self.create()
        state["config"] = config.to_flat()
        save_checkpoint(self.checkpoint, state)
        if source.warmup_best_checkpoint.is_file():
            atomic_write_bytes(self.best_checkpoint, source.warmup_best_checkpoint.read_bytes())
        self.keep_warmup_checkpoint()
        epoch = state["epoch"]
        for name in ("vocab", "initial", "references"):   # references: none in older runs
            if name != "references" or source.references.is_file():
                atomic_write_bytes(getattr(self, name), getattr(source, name).read_bytes())
        for name in ("steps", "epochs"):
            records = read_jsonl(getattr(source, name), ("epoch",))
            write_jsonl(getattr(self, name), [r for r in records if r["epoch"] < epoch])
        self.write_env({**source.read_env(), "forked_from": {
            "run": os.path.relpath(source.root.resolve(), self.root.resolve()), "epoch": epoch}})
        self.write_config(config)
        return True

    # ------------------------------------------------------------ metrics
    def start_metrics(self, initial: dict[str, Any], references: dict[str, Any]) -> None:
        """Fresh metrics, beginning with the untrained model's validation and the count
        references (the first write of a new run: the directory tree is created here)."""
        self.create()
        for path in (self.steps, self.epochs):
            path.unlink(missing_ok=True)
        atomic_write_text(self.initial, json.dumps(initial, indent=2))
        atomic_write_text(self.references, json.dumps(references, indent=2))

    def append_steps(self, records: list[dict[str, Any]]) -> None:
        append_jsonl(self.steps, records)

    def append_epoch(self, record: dict[str, Any]) -> None:
        append_jsonl(self.epochs, [record], sync=True)

    def keep_metrics_until(self, step: int, epoch: int) -> None:
        """Drop the records of work after a checkpoint (step `step`, epoch `epoch` in
        progress): a resume redoes that work."""
        steps = read_jsonl(self.steps, STEP_KEYS, warn_torn=True)
        epochs = read_jsonl(self.epochs, EPOCH_KEYS, warn_torn=True)
        write_jsonl(self.steps, [r for r in steps if r["step"] <= step])
        write_jsonl(self.epochs, [r for r in epochs if r["epoch"] < epoch])

    def epoch_records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.epochs, EPOCH_KEYS)

    # ------------------------------------------------------------ samples
    def write_samples(self, samples: list[dict[str, Any]]) -> None:
        """samples.json: the continuations of the fixed prompts (physlm.generate)."""
        atomic_write_text(self.samples, json.dumps(samples, indent=2, ensure_ascii=False))

    def read_samples(self) -> list[dict[str, Any]]:
        """The run's samples.json; empty when it has none. DamagedFileError when it is not
        a list of records with a prompt and a continuation."""
        records = read_json(self.samples, default=[], kind=list)
        if not all(isinstance(r, dict) and {"prompt", "continuation"} <= r.keys()
                   for r in records):
            raise DamagedFileError(f"{self.samples} is damaged: a record is not an object with "
                                   "a prompt and a continuation; restore it from a copy of the "
                                   f"run, or run python -m physlm generate {self.root} --write")
        return records

    def load(self) -> RunData:
        """The saved run as one typed record."""
        if not self.config.is_file():
            raise FileNotFoundError(f"{self.root} is not a run directory: it has no config.yaml")
        return RunData(
            run=self, config=self.read_config(), env=self.read_env(),
            initial=read_json(self.initial, default={}),
            references=read_json(self.references, default={}),
            steps=_frame(read_jsonl(self.steps, STEP_KEYS, warn_torn=True), STEP_KEYS),
            epochs=_frame(read_jsonl(self.epochs, EPOCH_KEYS, warn_torn=True), EPOCH_KEYS))


def _frame(records: list[dict[str, Any]], keys: tuple[str, ...]) -> pd.DataFrame:
    """Records as a DataFrame that has at least `keys` as columns, even when empty."""
    frame = pd.DataFrame(records)
    for key in keys:
        if key not in frame:
            frame[key] = pd.Series(dtype=object)
    return frame


def default_run_dir(config: Config) -> Path:
    """Where a run goes unless told otherwise: runs/<name> (the pipeline and the CLI)."""
    return Path(RUNS_ROOT) / config.run_name


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory (config.yaml, env.json, metrics/*.jsonl)."""
    return RunDirectory(run_dir).load()


def find_control(run_dir: str | Path, control_dir: str | Path | None = None) -> RunData | None:
    """The control run: `control_dir` if given, else `<run_dir>/control` when it holds a run."""
    if control_dir is not None:
        return load_run(control_dir)
    default = RunDirectory(run_dir).control
    return default.load() if default.config.is_file() else None

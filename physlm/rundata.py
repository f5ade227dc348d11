"""A saved run as one typed record (`RunData`), and the rule that picks its best epoch.

physlm.runs reads a run directory into a RunData: the configuration as a `Config`, env.json
and the count references as dicts, the metrics as DataFrames.

The best epoch is chosen on the held-out split when the run has one (its epoch records
have `heldout_ppl`), else on validation; the validation split then only gives the numbers
reported at that epoch (the early-stopped figures). The trainer keeps the weights of that
epoch (checkpoints/best.pt) by the same rule, `improves`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from physlm.config import Config


@dataclass
class RunData:
    """A saved run: its configuration, provenance and metrics."""

    run: Any                      # the physlm.runs.RunDirectory it was read from
    config: Config
    env: dict[str, Any]
    initial: dict[str, Any]       # the untrained model's validation (empty for old runs)
    references: dict[str, Any]    # count models' PPL per split (physlm.ngram; {}: old run)
    steps: pd.DataFrame
    epochs: pd.DataFrame

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def root(self) -> Path:
        return self.run.root

    @property
    def finished(self) -> bool:
        return len(self.epochs) >= self.config.train.epochs

    @property
    def selected_on(self) -> str:
        """The split the best epoch is chosen on: "held-out" or "validation"."""
        return "held-out" if selection_key(self.epochs) == HELDOUT_KEY else "validation"

    def best_record(self) -> pd.Series:
        """The record of the best finished epoch: the lowest held-out PPL when the run has a
        held-out split, else the lowest val PPL (`selection_key`)."""
        return self.epochs.loc[self.epochs[selection_key(self.epochs)].astype(float).idxmin()]

    def best_epoch(self) -> tuple[float, int]:
        """(val PPL, 1-based epoch) of `best_record`: the early-stopped validation figure."""
        best = self.best_record()
        return float(best["val_ppl"]), int(best["epoch"]) + 1

    def phase(self, name: str) -> pd.DataFrame:
        """The epoch records of one phase ("warmup" or "physics")."""
        return self.epochs[self.epochs["phase"] == name]

    @property
    def energy_steps(self) -> pd.DataFrame:
        """Steps whose energy term was computed and applied (physics on, not skipped)."""
        steps = self.steps
        if "energy_computed" not in steps:
            return steps.iloc[0:0]
        mask = (steps["physics"].astype(bool) & steps["energy_computed"].astype(bool)
                & ~steps["skipped"].astype(bool))
        return steps[mask]


HELDOUT_KEY, VALIDATION_KEY = "heldout_ppl", "val_ppl"


def selection_key(records: Any) -> str:
    """The field the best epoch is chosen on, of epoch records (a record, or a frame of
    them): the held-out PPL when they have it, else the validation PPL."""
    return HELDOUT_KEY if HELDOUT_KEY in records else VALIDATION_KEY


def improves(records: list[dict[str, Any]], record: dict[str, Any]) -> bool:
    """Whether epoch `record` is better than every one of `records` (the run's earlier
    epochs): a finite value of `selection_key` below all their finite ones. Ties keep the
    earlier epoch, as `RunData.best_epoch` does."""
    key = selection_key(record)
    finite = [r[key] for r in records if math.isfinite(r.get(key, math.nan))]
    return math.isfinite(record[key]) and record[key] < min(finite, default=math.inf)

"""Training metrics: a step's JSON record, an epoch's running totals, the console line.

A step record (metrics/steps.jsonl) holds per-layer statistics as lists
(`drift_per_layer`, ...) and, under the short name, their mean over layers. An
epoch record (metrics/epochs.jsonl) is built from running sums of its steps
(`EpochTotals`), which the checkpoint carries, so an epoch interrupted and
resumed mid-way gives the same record as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

# EnergyTerms fields logged per step -> their names in the step record.
TERM_RECORD = {"mse": "energy_mse_per_layer", "drift": "drift_per_layer", "kinetic": "kinetic",
               "potential": "potential", "spread": "energy_spread_per_layer",
               "kinetic_spread": "kinetic_spread_per_layer",
               "potential_spread": "potential_spread_per_layer"}
# Step statistic -> the per-layer list it is the mean of.
LAYER_MEAN_OF = {"lambda": "lambda_per_layer", "drift": "drift_per_layer",
                 "energy_mse": "energy_mse_per_layer",
                 "koopman_consistency": "koopman_consistency_per_layer",
                 "koopman_reconstruction": "koopman_reconstruction_per_layer",
                 "koopman_identity": "koopman_identity_per_layer"}
# Step statistics averaged over the epoch's applied (not skipped) steps.
AVERAGED = ("loss", "lm_loss", "energy_loss", "grad_norm", "lm_grad_norm", "energy_grad_norm",
            "clip_factor", "energy_clip_factor")
# Per-layer statistics averaged over the epoch's energy steps, under the same names.
LAYER_AVERAGED = ("energy_spread_per_layer", "kinetic_spread_per_layer",
                  "potential_spread_per_layer", "kinetic", "potential")
# Per-layer Koopman errors averaged over the epoch's Koopman steps.
KOOPMAN_TERMS = ("consistency", "reconstruction", "identity")
KOOPMAN_AVERAGED = tuple(f"koopman_{term}_per_layer" for term in KOOPMAN_TERMS)


def step_record(pending: dict[str, Any], step_time: float) -> dict[str, Any]:
    """A step's statistics (device tensors) as a JSON-ready record."""
    record = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in pending.items()}
    for name, per_layer in LAYER_MEAN_OF.items():
        if per_layer in record:
            record[name] = sum(record[per_layer]) / len(record[per_layer])
    record["time_s"] = step_time
    record["tokens_per_s"] = record.pop("tokens") / step_time
    return record


@dataclass
class EpochTotals:
    """Running sums over one epoch's step records (plain data, saved in checkpoints)."""

    steps: int = 0
    skipped: int = 0
    time_s: float = 0.0
    tokens: float = 0.0
    applied: dict[str, float] = field(default_factory=dict)   # sums over applied steps
    everything: dict[str, float] = field(default_factory=dict)  # over all (none applied)
    expert_load: list[list[float]] | None = None               # summed over all steps
    energy_steps: int = 0          # applied steps that computed the energy term
    energy_mse: float = 0.0
    drift: float = 0.0
    drift_max: float = 0.0
    per_layer: dict[str, list[float]] = field(default_factory=dict)  # over energy steps
    koopman_steps: int = 0
    koopman: dict[str, list[float]] = field(default_factory=dict)    # over Koopman steps

    def add(self, record: dict[str, Any]) -> None:
        self.steps += 1
        self.time_s += record["time_s"]
        self.tokens += record["tokens_per_s"] * record["time_s"]
        load = record["expert_load"]  # the router's choices count even if the update did not
        self.expert_load = load if self.expert_load is None else [
            [total + value for total, value in zip(row_total, row, strict=True)]
            for row_total, row in zip(self.expert_load, load, strict=True)]
        for key in AVERAGED:
            self.everything[key] = self.everything.get(key, 0.0) + record[key]
        if record["skipped"]:
            self.skipped += 1
            return
        for key in AVERAGED:
            self.applied[key] = self.applied.get(key, 0.0) + record[key]
        if record.get("energy_computed"):
            self.energy_steps += 1
            self.energy_mse += record["energy_mse"]
            self.drift += record["drift"]
            self.drift_max = max(self.drift_max, record["drift"])
            _accumulate(self.per_layer, LAYER_AVERAGED, record)
        if record.get("koopman_computed"):
            self.koopman_steps += 1
            _accumulate(self.koopman, KOOPMAN_AVERAGED, record)

    def summary(self, with_energy: bool, with_koopman: bool = False) -> dict[str, Any]:
        """The epoch's training figures: means over applied steps, totals, throughput."""
        applied = self.steps - self.skipped
        sums, count = (self.applied, applied) if applied else (self.everything, self.steps)

        def mean(key: str) -> float:
            return sums[key] / count if count else 0.0

        record: dict[str, Any] = {
            "steps": self.steps, "skipped_steps": self.skipped,
            "train_loss": mean("loss"), "train_lm_loss": mean("lm_loss"),
            "train_energy_loss": mean("energy_loss"),
            **{key: mean(key) for key in AVERAGED[3:]},
            "train_time_s": self.time_s,
            "tokens_per_s": self.tokens / self.time_s if self.time_s else 0.0,
            "expert_load": [[value / self.steps for value in row]
                            for row in self.expert_load or []],
        }
        if with_energy:  # null, not 0, for an epoch that never computed the energy
            n = self.energy_steps
            record.update(train_energy_mse=self.energy_mse / n if n else None,
                          drift=self.drift / n if n else None,
                          drift_max=self.drift_max if n else None, energy_steps=n,
                          **{key: [v / n for v in total] if n else None
                             for key, total in self.per_layer.items()})
        if with_koopman:
            n = self.koopman_steps
            record.update({key: [v / n for v in self.koopman[key]] if n else None
                           for key in KOOPMAN_AVERAGED})
        return record

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> EpochTotals:
        return cls(**state) if state else cls()


def _accumulate(sums: dict[str, list[float]], keys: tuple[str, ...],
                record: dict[str, Any]) -> None:
    """Add the record's per-layer lists to the running per-layer sums."""
    for key in keys:
        total = sums.get(key, [0.0] * len(record[key]))
        sums[key] = [t + v for t, v in zip(total, record[key], strict=True)]


def format_epoch(record: dict[str, Any], epochs: int, elapsed_s: float | None = None) -> str:
    """One line per epoch for the console."""
    text = (f"epoch {record['epoch'] + 1}/{epochs} [{record['phase']}] train "
            f"{record['train_loss']:.4f} val {record['val_loss']:.4f} ppl {record['val_ppl']:.1f}")
    if record.get("drift") is not None:
        text += f" drift {record['drift']:.4g} lambda {record['lambda']:.4g}"
    return text + f" {record['time_s']:.1f}s {record['tokens_per_s']:.0f} tok/s"


def exp_or_inf(x: float) -> float:
    """exp(x), inf where it would overflow (a perplexity of a diverged model)."""
    return math.exp(x) if x < 700 else math.inf

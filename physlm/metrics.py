"""Training metrics: a step's JSON record, an epoch's running totals, the console figures.

A step record (metrics/steps.jsonl) holds per-layer statistics as lists
(`drift_per_layer`, ...) and, under the short name, their mean over layers; null where the
step did not compute them (a warmup step's energy), as in the epoch records. An
epoch record (metrics/epochs.jsonl) is built from running sums of its steps
(`EpochTotals`), which the checkpoint carries, so an epoch interrupted and
resumed mid-way gives the same record as an uninterrupted one. Which fields an auxiliary
objective adds, and how its epoch is summed up, is the objective's (physlm.objectives).
A model with experts also logs the entropy of their load per layer (`load_entropy_per_layer`,
physlm.moe.load_entropy: log E balanced, 0 collapsed), of each step's load and of the epoch's
mean load.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from physlm.moe import load_entropy

# Fields every step record has, whatever objectives ran: 0 where none computed them.
STEP_DEFAULTS = {"energy_loss": 0.0}
# Step statistics averaged over the epoch's applied (not skipped) steps. The gradient figures
# of the auxiliary objectives keep the energy's names (physlm.gradients).
AVERAGED = ("loss", "lm_loss", "energy_loss", "grad_norm", "lm_grad_norm", "energy_grad_norm",
            "clip_factor", "energy_clip_factor")


def step_record(pending: dict[str, Any], step_time: float,
                layer_means: dict[str, str]) -> dict[str, Any]:
    """A step's statistics (device tensors) as a JSON-ready record; `layer_means`: the
    fields that are the mean over layers of a per-layer list (name -> list's name)."""
    record = {**STEP_DEFAULTS, **{k: (v.tolist() if isinstance(v, torch.Tensor) else v)
                                  for k, v in pending.items()}}
    for name, per_layer in layer_means.items():
        if per_layer in record:  # null where the step computed none
            values = record[per_layer]
            record[name] = None if values is None else sum(values) / len(values)
    record["time_s"] = step_time
    record["tokens_per_s"] = record.pop("tokens") / step_time
    return record


@dataclass
class Sums:
    """Running sums of some step fields (numbers, or per-layer lists) over the steps that
    count, and the maxima of the numbers: plain data, saved in checkpoints."""

    steps: int = 0
    totals: dict[str, Any] = field(default_factory=dict)
    maxima: dict[str, float] = field(default_factory=dict)

    def add(self, record: dict[str, Any], keys: tuple[str, ...]) -> None:
        self.steps += 1
        for key in keys:
            value = record[key]
            if isinstance(value, list):
                total = self.totals.get(key, [0.0] * len(value))
                self.totals[key] = [t + v for t, v in zip(total, value, strict=True)]
            else:
                self.totals[key] = self.totals.get(key, 0.0) + value
                self.maxima[key] = max(self.maxima[key], value) if key in self.maxima else value

    def mean(self, key: str) -> Any:
        """The mean over the counted steps; None when none counted."""
        if not self.steps:
            return None
        total = self.totals[key]
        return [v / self.steps for v in total] if isinstance(total, list) else total / self.steps


@dataclass
class EpochTotals:
    """Running sums over one epoch's step records (plain data, saved in checkpoints): over
    all steps, over the applied ones, and per objective over those that computed its term."""

    steps: int = 0
    skipped: int = 0
    time_s: float = 0.0
    tokens: float = 0.0
    applied: dict[str, float] = field(default_factory=dict)   # sums over applied steps
    everything: dict[str, float] = field(default_factory=dict)  # over all (none applied)
    expert_load: list[list[float]] | None = None               # summed over all steps
    computed: dict[str, Sums] = field(default_factory=dict)    # objective name -> its sums

    def add(self, record: dict[str, Any], objectives: Sequence[Any]) -> None:
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
        for objective in objectives:
            if record.get(objective.flag):
                self.computed.setdefault(objective.name, Sums()).add(record, objective.averaged)

    def summary(self, objectives: Sequence[Any]) -> dict[str, Any]:
        """The epoch's training figures: means over applied steps, totals, throughput, and
        each objective's own (`Objective.epoch_fields`)."""
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
        if record["expert_load"] and record["expert_load"][0]:   # a mixture of experts
            # Of the epoch's mean load: an expert that took tokens at some steps is not dead.
            record["load_entropy_per_layer"] = load_entropy(
                torch.tensor(record["expert_load"], dtype=torch.float64)).tolist()
        for objective in objectives:
            record.update(objective.epoch_fields(self.computed.get(objective.name, Sums())))
        return record

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> EpochTotals:
        if not state:
            return cls()
        computed = {name: Sums(**sums) for name, sums in state["computed"].items()}
        return cls(**{**state, "computed": computed})


def epoch_figures(record: dict[str, Any]) -> str:
    """An epoch record's figures for a console line (`-` where there is none)."""
    def number(key: str, spec: str) -> str:
        return "-" if record.get(key) is None else format(record[key], spec)

    heldout = f"  held-out PPL {number('heldout_ppl', ',.2f')}" if "heldout_ppl" in record else ""
    return (f"train loss {number('train_loss', '.4f')}  val PPL {number('val_ppl', ',.2f')}"
            f"{heldout}  drift {number('drift', '.4g')}  lambda {number('lambda', '.4g')}")


def exp_or_inf(x: float) -> float:
    """exp(x), inf where it would overflow (a perplexity of a diverged model)."""
    return math.exp(x) if x < 700 else math.inf

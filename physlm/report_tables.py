"""The tables of a run's report (physlm.report): its epochs by phase, the count references
beside it, the energy and lambda progression, the end of each phase against the control and
the router's load. Each is a DataFrame built from saved records (physlm.runs.RunData), with
the kinds of its numbers in `KINDS` (physlm.text formats them)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch

from physlm.criteria import Summary, best_value, count_rows, final_value, floor_sentence
from physlm.moe import load_entropy
from physlm.runs import RunData
from physlm.text import Table

# Every epoch-table column: its title -> (the epoch record's key, the kind of its numbers).
COLUMNS = {"Phase": ("phase", None), "Train loss": ("train_loss", "loss"),
           "LM loss": ("train_lm_loss", "loss"),
           "Energy loss (weighted)": ("train_energy_loss", "loss"),
           "Energy MSE (raw)": ("train_energy_mse", "loss"), "Val loss": ("val_loss", "loss"),
           "Val loss (batch mean)": ("val_loss_batch_mean", "loss"),
           "Val PPL": ("val_ppl", "ppl"), "Val PPL (batch mean)": ("val_ppl_batch_mean", "ppl"),
           "Lambda": ("lambda", None), "Lambda (mean)": ("lambda", None),
           "Per layer": ("lambda_per_layer", None), "Drift": ("drift", None),
           "Drift (mean)": ("drift", None), "Drift (max)": ("drift_max", None),
           "Energy steps": ("energy_steps", None), "Time (s)": ("time_s", "time"),
           "Tokens/s": ("tokens_per_s", "count"), "Clip factor (LM)": ("clip_factor", None),
           "LM grad norm": ("lm_grad_norm", None),
           "Energy grad norm": ("energy_grad_norm", None),
           "Val PPL (non-<unk>)": ("val_ppl_known", "ppl"),
           "Held-out loss": ("heldout_loss", "loss"), "Held-out PPL": ("heldout_ppl", "ppl")}
# Columns of runs trained since they were logged, left out of older runs' tables.
LOGGED_LATER = ("Val PPL (non-<unk>)", "Held-out loss", "Held-out PPL")
# The kinds of the report's numbers, by column title or, in a Metric table, by row title.
KINDS = {**{title: kind for title, (_, kind) in COLUMNS.items() if kind},
         "Best val PPL": "ppl", "Tokens/s (phase mean)": "count",
         "Time/epoch (s, phase mean)": "time"}


def epoch_table(rows: pd.DataFrame, *titles: str) -> pd.DataFrame:
    """Epoch records as a table: the 1-based epoch, then `titles` (COLUMNS)."""
    return pd.DataFrame({"Epoch": rows["epoch"].astype(int) + 1,
                         **{title: rows.get(COLUMNS[title][0]) for title in titles}})


def _logged(run: RunData) -> list[str]:
    """The LOGGED_LATER columns this run's records have."""
    return [title for title in LOGGED_LATER if COLUMNS[title][0] in run.epochs]


def warmup_table(run: RunData) -> pd.DataFrame:
    return epoch_table(run.phase("warmup"), "Train loss", "Val loss", "Val PPL",
                       "Val PPL (batch mean)", *_logged(run), "Time (s)", "Tokens/s")


def physics_table(run: RunData) -> pd.DataFrame:
    return epoch_table(run.phase("physics"), "Train loss", "LM loss", "Energy loss (weighted)",
                       "Energy MSE (raw)", "Val loss", "Val loss (batch mean)", "Val PPL",
                       "Val PPL (batch mean)", *_logged(run), "Lambda", "Drift", "LM grad norm",
                       "Energy grad norm", "Clip factor (LM)", "Time (s)", "Tokens/s")


def references_table(run: RunData, control: RunData | None, s: Summary,
                     title: str) -> Table | None:
    """The count models' val PPL (physlm.ngram), then the run's and the control's, final and
    at the best epoch, each over the best count model's; None without references."""
    if s.count_floor is None:
        return None
    rows = count_rows(run.references)
    for label, data in ((title, run), ("control", control)):
        if data is not None and not data.epochs.empty:
            rows += [(f"{label}, final", final_value(data, "val_ppl"),
                      final_value(data, "val_ppl_known")),
                     (f"{label}, best epoch ({data.best_epoch()[1]})",
                      best_value(data, "val_ppl"), best_value(data, "val_ppl_known"))]
    frame = pd.DataFrame(rows, columns=["Model", "Val PPL", "Val PPL (non-<unk>)"])
    frame["Ratio to the best count model"] = frame["Val PPL"] / s.count_floor.ppl
    return Table(frame, KINDS)


def count_sentences(run: RunData, control: RunData | None, s: Summary, title: str) -> list[str]:
    """For the run and the control: does its val PPL, at its best epoch and at the end,
    clear the best count model?"""
    if s.count_floor is None:
        return []
    return [floor_sentence(label, s.count_floor, data.best_epoch()[0],
                           final_value(data, "val_ppl"),
                           f"at its best epoch ({data.best_epoch()[1]})")
            for label, data in ((f"Run `{title}`", run), ("The control", control))
            if data is not None and not data.epochs.empty]


def energy_progression_table(run: RunData) -> pd.DataFrame:
    return epoch_table(run.phase("physics"), "Energy loss (weighted)", "Energy MSE (raw)",
                       "Drift (mean)", "Drift (max)", "Energy steps")


def lambda_table(run: RunData) -> pd.DataFrame:
    """Lambda at each epoch end; per layer only where the layers' multipliers differ."""
    differ = "lambda_per_layer" in run.epochs and run.epochs["lambda_per_layer"].map(
        lambda values: len(set(values)) > 1).any()
    return epoch_table(run.epochs, "Phase", "Lambda (mean)", *["Per layer"] * int(differ))


def _phase_end(rows: pd.DataFrame) -> list[Any]:
    if rows.empty:
        return [None] * 8
    end = rows.iloc[-1]
    return [int(end["epoch"]) + 1, end["val_loss"], end["val_ppl"], end["val_ppl_batch_mean"],
            end.get("drift") if end.get("energy_steps") else None,  # never computed: n/a
            end.get("lambda"), rows["tokens_per_s"].mean(), rows["time_s"].mean()]


def phase_comparison_table(run: RunData, control: RunData | None) -> pd.DataFrame:
    """Warmup end vs physics end vs control end (the control's lambda is never updated)."""
    table = pd.DataFrame({
        "Metric": ["Epoch", "Val loss", "Val PPL", "Val PPL (batch mean)", "Drift (epoch mean)",
                   "Lambda (mean)", "Tokens/s (phase mean)", "Time/epoch (s, phase mean)"],
        "Warmup end": _phase_end(run.phase("warmup")),
        "Physics end": _phase_end(run.phase("physics")),
        "Control end": _phase_end(control.epochs if control else run.epochs.iloc[0:0])},
        dtype=object)
    table.loc[5, "Control end"] = None
    return table


def router_table(load: list[list[float]]) -> pd.DataFrame:
    """Each layer's token share per expert at the last epoch and its entropy (physlm.moe:
    log E when balanced, 0 when one expert takes every token): a dead expert shows."""
    table = pd.DataFrame(load, index=pd.RangeIndex(1, len(load) + 1, name="Layer")).rename(
        columns=lambda expert: f"Expert {expert + 1}")
    if len(load) and len(load[0]):
        entropy = load_entropy(torch.tensor(load, dtype=torch.float64))
        table[f"Load entropy (of {math.log(len(load[0])):.3f})"] = entropy.tolist()
    return table.reset_index()

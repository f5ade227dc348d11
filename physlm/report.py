"""The markdown results report of a saved run (SPEC section 5).

    write_report("runs/x")   ->  reports/x.md  and its figures in reports/x/*.png

Everything comes from the run directory (physlm.run): config.yaml, env.json and
the metrics files; nothing is retrained and no number is typed in by hand. The
baseline is the control run (physics off, same model, data, seed and budget) in
`<run_dir>/control`; without one the report says there is no baseline.

`load_run` gives the same data to the analysis notebook as pandas DataFrames,
and the table builders (`warmup_table`, `physics_table`, ...) return DataFrames
that the notebook can show directly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
import yaml

import physlm
from physlm import plots
from physlm.run import RunDirectory, git_commit, read_jsonl

PPL_TOLERANCE = 0.05  # success: final val PPL <= (1 + PPL_TOLERANCE) x the control's
NA = "n/a"
MET, NOT_MET, NOT_EVALUATED = "met", "not met", "not evaluated"
# Settings a control run may differ in from the run it is the baseline of.
CONTROL_MAY_DIFFER = frozenset({
    "physics", "physics_start_epoch", "energy_mode", "lambda_energy_init", "lambda_lr",
    "energy_target_drift", "lambda_min", "lambda_max", "device", "progress", "resume",
    "overwrite", "checkpoint_every", "max_bad_steps", "data_dir", "train_file", "valid_file"})
FIGURE_CAPTIONS = {
    "energy_drift": "Energy drift per step and per epoch, with the target and the physics start",
    "lambda": "Lagrange multiplier lambda per step (mean and per layer) and per epoch",
    "losses": "Loss components per step (smoothed) and per epoch",
    "perplexity": "Validation perplexity per epoch, run and control",
    "time": "Time per epoch and training throughput",
}


# ---------------------------------------------------------------- loading

@dataclass
class RunData:
    """One run directory's saved files: config and env as dicts, metrics as DataFrames."""

    name: str
    root: Path
    config: dict[str, Any]
    env: dict[str, Any]
    steps: pd.DataFrame
    epochs: pd.DataFrame

    @property
    def epochs_planned(self) -> int:
        return int(self.config.get("epochs", 0))

    @property
    def finished(self) -> bool:
        return len(self.epochs) >= self.epochs_planned

    @property
    def physics_planned(self) -> bool:
        """Whether the configuration trains any epoch with the energy penalty."""
        return bool(self.config.get("physics")) and self.physics_start < self.epochs_planned

    @property
    def physics_start(self) -> int:
        return int(self.config.get("physics_start_epoch", 0))

    @property
    def target(self) -> float:
        return float(self.config.get("energy_target_drift", math.nan))

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


def _frame(records: list[dict[str, Any]], keys: tuple[str, ...]) -> pd.DataFrame:
    """Records as a DataFrame that has at least `keys` as columns, even when empty."""
    frame = pd.DataFrame(records)
    for key in keys:
        if key not in frame:
            frame[key] = pd.Series(dtype=object)
    return frame


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory (config.yaml, env.json, metrics/*.jsonl)."""
    paths = RunDirectory(run_dir)
    if not paths.config.is_file():
        raise FileNotFoundError(f"{paths.root} is not a run directory: it has no config.yaml")
    env = json.loads(paths.env.read_text()) if paths.env.is_file() else {}
    return RunData(name=paths.name, root=paths.root,
                   config=yaml.safe_load(paths.config.read_text()) or {}, env=env,
                   steps=_frame(read_jsonl(paths.steps), ("step", "epoch", "physics", "skipped")),
                   epochs=_frame(read_jsonl(paths.epochs), ("epoch", "phase", "val_loss")))


def find_control(run_dir: str | Path, control_dir: str | Path | None = None) -> RunData | None:
    """The control run: `control_dir` if given, else `<run_dir>/control` when it holds a run."""
    if control_dir is not None:
        return load_run(control_dir)
    default = RunDirectory(run_dir).control
    return load_run(default.root) if default.config.is_file() else None


# ---------------------------------------------------------------- analysis

@dataclass
class Summary:
    """The headline numbers, computed once and shared by every section."""

    epochs_done: int
    epochs_planned: int
    target: float
    drift_mean: float | None          # over the computed physics steps (epoch means, weighted)
    drift_max: float | None
    drift_steps: int                  # computed physics steps of the finished epochs
    within_target: float | None       # the fraction of them with drift <= target
    final_val_loss: float | None
    final_val_ppl: float | None
    control_val_loss: float | None
    control_val_ppl: float | None
    skipped: int
    max_consecutive_skipped: int

    @property
    def drift_met(self) -> bool | None:
        return None if self.drift_mean is None else self.drift_mean <= self.target

    @property
    def ppl_ratio(self) -> float | None:
        if self.final_val_ppl is None or self.control_val_ppl is None:
            return None
        return self.final_val_ppl / self.control_val_ppl


def drift_stats(run: RunData) -> tuple[float | None, float | None]:
    """Mean and maximum drift over the physics steps where the energy was computed.

    The mean weights each physics epoch's mean drift by its number of energy
    steps, which equals the mean over those steps.
    """
    physics = run.phase("physics")
    if "energy_steps" not in physics or physics["energy_steps"].sum() == 0:
        return None, None
    weights = physics["energy_steps"]
    mean = float((physics["drift"] * weights).sum() / weights.sum())
    return mean, float(physics.loc[weights > 0, "drift_max"].max())


def max_consecutive(flags: pd.Series) -> int:
    """The longest run of True values."""
    longest = current = 0
    for flag in flags.astype(bool):
        current = current + 1 if flag else 0
        longest = max(longest, current)
    return longest


def _final(run: RunData | None, key: str) -> float | None:
    if run is None or run.epochs.empty:
        return None
    return float(run.epochs[key].iloc[-1])


def summarize(run: RunData, control: RunData | None) -> Summary:
    """The headline numbers of a run against its control (None: no control run)."""
    drift_mean, drift_max = drift_stats(run)
    energy = run.energy_steps
    energy = energy[energy["epoch"].isin(run.epochs["epoch"])]  # as drift_stats: finished epochs
    within = float((energy["drift"] <= run.target).mean()) if len(energy) else None
    skipped = run.steps["skipped"].astype(bool)
    return Summary(
        epochs_done=len(run.epochs), epochs_planned=run.epochs_planned, target=run.target,
        drift_mean=drift_mean, drift_max=drift_max, drift_steps=len(energy), within_target=within,
        final_val_loss=_final(run, "val_loss"), final_val_ppl=_final(run, "val_ppl"),
        control_val_loss=_final(control, "val_loss"), control_val_ppl=_final(control, "val_ppl"),
        skipped=int(skipped.sum()), max_consecutive_skipped=max_consecutive(skipped))


def control_mismatches(run: RunData, control: RunData) -> list[str]:
    """Why the control is not a like-for-like baseline (empty: it is)."""
    problems = [f"{key}: run {run.config.get(key)!r}, control {control.config.get(key)!r}"
                for key in sorted(set(run.config) | set(control.config))
                if key not in CONTROL_MAY_DIFFER
                and run.config.get(key) != control.config.get(key)]
    if run.env.get("data_checksums") != control.env.get("data_checksums"):
        problems.append("data checksums differ")
    if control.physics_planned:
        problems.append("the control run trains with the physics penalty")
    if len(control.epochs) != len(run.epochs):
        problems.append(f"epochs finished: run {len(run.epochs)}, control {len(control.epochs)}")
    return problems


# ---------------------------------------------------------------- formatting

def fmt(value: Any) -> str:
    """One cell: counts with thousands separators, reals with 4 decimals (or scientific)."""
    if isinstance(value, str):
        return value
    if value is None:
        return NA
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    x = float(value)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e6 or abs(x) < 1e-3:
        return f"{x:.4e}"
    return f"{x:,.4f}"


def percent(fraction: float | None) -> str:
    return NA if fraction is None else f"{100 * fraction:+.2f}%"


def _numeric(column: pd.Series) -> bool:
    """Whether a column holds numbers only (n/a aside), to right-align it."""
    values = [v for v in column if not (isinstance(v, str) and v == NA)]
    return bool(values) and all(isinstance(v, int | float | np.number)
                                and not isinstance(v, bool | np.bool_) for v in values)


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a markdown table (numeric columns right-aligned, the others left)."""
    if frame.empty:
        return "_(no rows)_"

    def row(cells: list[Any]) -> str:
        return "| " + " | ".join(fmt(c).replace("|", "\\|") for c in cells) + " |"

    rule = "| " + " | ".join("---:" if _numeric(frame[c]) else ":---" for c in frame.columns)
    rule += " |"
    lines = [row(list(frame.columns)), rule]
    lines += [row(list(values)) for values in frame.itertuples(index=False)]
    return "\n".join(lines)


def key_value_table(items: dict[str, Any]) -> str:
    return markdown_table(pd.DataFrame({"Setting": list(items), "Value": list(items.values())}))


def status(ok: bool | None) -> str:
    return NOT_EVALUATED if ok is None else MET if ok else NOT_MET


def _epoch_value(epoch: pd.Series, key: str) -> Any:
    """A drift-like value of an epoch record, or n/a where the energy was never computed."""
    if key not in epoch or not epoch.get("energy_steps"):
        return NA
    return epoch[key]


# ---------------------------------------------------------------- tables

def warmup_table(run: RunData) -> pd.DataFrame:
    """Per warmup epoch: train and validation loss, both perplexities, time, throughput."""
    rows = run.phase("warmup")
    return pd.DataFrame({
        "Epoch": rows["epoch"].astype(int) + 1,
        "Train loss": rows.get("train_loss"),
        "Val loss": rows.get("val_loss"),
        "Val PPL": rows.get("val_ppl"),
        "Val PPL (batch mean)": rows.get("val_ppl_batch_mean"),
        "Time (s)": rows.get("time_s"),
        "Tokens/s": rows.get("tokens_per_s"),
    })


def physics_table(run: RunData) -> pd.DataFrame:
    """Per physics epoch: loss components, validation, lambda, drift, time, throughput."""
    rows = run.phase("physics")
    return pd.DataFrame({
        "Epoch": rows["epoch"].astype(int) + 1,
        "Train loss": rows.get("train_loss"),
        "LM loss": rows.get("train_lm_loss"),
        "Energy loss (weighted)": rows.get("train_energy_loss"),
        "Energy MSE (raw)": rows.get("train_energy_mse"),
        "Val loss": rows.get("val_loss"),
        "Val loss (batch mean)": rows.get("val_loss_batch_mean"),
        "Val PPL": rows.get("val_ppl"),
        "Val PPL (batch mean)": rows.get("val_ppl_batch_mean"),
        "Lambda": rows.get("lambda"),
        "Drift": rows.get("drift"),
        "Time (s)": rows.get("time_s"),
        "Tokens/s": rows.get("tokens_per_s"),
    })


def energy_progression_table(run: RunData) -> pd.DataFrame:
    rows = run.phase("physics")
    return pd.DataFrame({
        "Epoch": rows["epoch"].astype(int) + 1,
        "Energy loss (weighted)": rows.get("train_energy_loss"),
        "Energy MSE (raw)": rows.get("train_energy_mse"),
        "Drift (mean)": rows.get("drift"),
        "Drift (max)": rows.get("drift_max"),
        "Energy steps": rows.get("energy_steps"),
    })


def lambda_table(run: RunData) -> pd.DataFrame:
    """Lambda at each epoch end: mean over layers and per layer."""
    rows = run.epochs
    per_layer = rows["lambda_per_layer"] if "lambda_per_layer" in rows else [[]] * len(rows)
    return pd.DataFrame({
        "Epoch": rows["epoch"].astype(int) + 1,
        "Phase": rows["phase"],
        "Lambda (mean)": rows.get("lambda", NA),
        "Per layer": [", ".join(fmt(v) for v in values) or NA for values in per_layer],
    })


def _phase_column(rows: pd.DataFrame) -> pd.Series:
    if rows.empty:
        return pd.Series([NA] * 8, dtype=object)
    end = rows.iloc[-1]
    return pd.Series([int(end["epoch"]) + 1, end["val_loss"], end["val_ppl"],
                      end["val_ppl_batch_mean"], _epoch_value(end, "drift"),
                      end.get("lambda", NA), rows["tokens_per_s"].mean(), rows["time_s"].mean()],
                     dtype=object)


def phase_comparison_table(run: RunData, control: RunData | None) -> pd.DataFrame:
    """Warmup end vs physics end vs control end."""
    table = pd.DataFrame({
        "Metric": ["Epoch", "Val loss", "Val PPL", "Val PPL (batch mean)", "Drift (epoch mean)",
                   "Lambda (mean)", "Tokens/s (phase mean)", "Time/epoch (s, phase mean)"],
        "Warmup end": _phase_column(run.phase("warmup")),
        "Physics end": _phase_column(run.phase("physics")),
    })
    table["Control end"] = _phase_column(control.epochs) if control else [NA] * len(table)
    if control is not None and not control.epochs.empty:
        table.loc[table["Metric"] == "Lambda (mean)", "Control end"] = NA  # never updated
    return table


# ---------------------------------------------------------------- sections

def _warnings(run: RunData) -> list[str]:
    notes = []
    if run.config.get("bk_mode") == "bidirectional":
        notes.append("**Not a causal language model.** This run uses the bidirectional BK "
                     "core: the resolvent at position i depends on the token at i + 1, the "
                     "token it predicts (future-token leakage, SPEC section 6). Its "
                     "perplexities are not language-model perplexities; use it only as an "
                     "ablation.")
    if not run.physics_planned:
        why = ("physics: false" if not run.config.get("physics") else
               f"physics_start_epoch {run.physics_start} >= epochs {run.epochs_planned}")
        notes.append(f"**The physics penalty never ran** ({why}): every epoch trained on "
                     "the language-model loss alone.")
    elif len(run.epochs) <= run.physics_start and run.phase("physics").empty:
        notes.append(f"**The physics phase has not started yet**: it begins at epoch "
                     f"{run.physics_start + 1}.")
    if not run.finished:
        last = run.steps["step"].max() if not run.steps.empty else 0
        notes.append(f"**Unfinished run**: {len(run.epochs)} of {run.epochs_planned} epochs "
                     f"finished ({fmt(int(last))} steps logged). This report covers what exists.")
    return [f"> ⚠️ {note}" for note in notes]


def summary_section(run: RunData, control: RunData | None, s: Summary) -> str:
    params = run.env.get("parameters", {}).get("total")
    text = (f"Run `{run.name}` trained {s.epochs_done} of {s.epochs_planned} epochs "
            f"({len(run.phase('warmup'))} warmup, {len(run.phase('physics'))} physics) of a "
            f"ResNet-BK model with {fmt(params)} parameters "
            f"({run.config.get('bk_mode', NA)} BK core) on {run.env.get('data_source', NA)}.")
    if s.final_val_ppl is not None:
        text += f" Final validation perplexity: {fmt(s.final_val_ppl)}"
        text += (f" against {fmt(s.control_val_ppl)} for the control run (ratio "
                 f"{fmt(s.ppl_ratio)}, {percent(s.ppl_ratio - 1)})." if s.ppl_ratio is not None
                 else "; no control run, so no baseline.")
    if s.drift_mean is not None:
        text += (f" Energy drift after the physics start averaged {fmt(s.drift_mean)} (max "
                 f"{fmt(s.drift_max)}) against the target {fmt(s.target)}: "
                 f"{status(s.drift_met)}.")
    else:
        text += " No energy drift was measured (no physics step computed the energy)."
    return "\n\n".join([f"# physlm report: {run.name}", *_warnings(run), "## Summary", text])


def model_section(run: RunData) -> str:
    c, params = run.config, run.env.get("parameters", {})
    total, trainable = params.get("total"), params.get("trainable")
    items = {
        "Parameters (total)": total, "Parameters (trained by the optimizer)": trainable,
        "Vocabulary size": run.env.get("vocab_size", c.get("vocab_size")),
        "d_model": c.get("d_model"), "Layers": c.get("n_layers"),
        "Sequence length (n_seq)": c.get("n_seq"), "Experts (top-1)": c.get("num_experts"),
        "Dropout": c.get("dropout"), "BK core": c.get("bk_mode"),
        "Potential clamp": c.get("potential_clamp"), "Feature clamp": c.get("feature_clamp"),
        "Energy heads": c.get("energy_heads"),
    }
    text = ["## Model configuration", key_value_table(items)]
    if total is not None and trainable is not None and total != trainable:
        text.append(f"The {fmt(total - trainable)} untrained parameters are the Lagrange "
                    "multipliers (dual variables, updated by the controller, not the optimizer).")
    if not run.epochs.empty and "expert_load" in run.epochs:
        load = np.array(run.epochs["expert_load"].iloc[-1])
        table = pd.DataFrame(load, columns=[f"Expert {e + 1}" for e in range(load.shape[1])])
        table.insert(0, "Layer", range(1, len(load) + 1))
        text += ["Router load at the last epoch (fraction of tokens per expert):",
                 markdown_table(table)]
    return "\n\n".join(text)


def training_section(run: RunData) -> str:
    c = run.config
    items = {
        "Optimizer": "AdamW", "Learning rate": c.get("lr"), "Weight decay": c.get("weight_decay"),
        "Gradient-norm clip": c.get("grad_clip"), "Batch size": c.get("batch_size"),
        "Epochs": c.get("epochs"), "Physics": c.get("physics"),
        "Physics from epoch": run.physics_start + 1 if run.physics_planned else NA,
        "Energy mode": c.get("energy_mode"), "Lambda init": c.get("lambda_energy_init"),
        "Lambda learning rate (eta)": c.get("lambda_lr"),
        "Lambda bounds": f"[{fmt(c.get('lambda_min'))}, {fmt(c.get('lambda_max'))}]",
        "Target drift": c.get("energy_target_drift"), "Seed": c.get("seed"),
        "Device (asked / used)": f"{c.get('device', NA)} / {run.env.get('device', NA)}",
        "Mixed precision (bf16)": c.get("amp"),
    }
    return "\n\n".join(["## Training configuration", key_value_table(items)])


def dataset_section(run: RunData) -> str:
    env, c = run.env, run.config
    splits = sorted(set(env.get("data_tokens", {})) | set(env.get("data_checksums", {})))
    files = pd.DataFrame({
        "Split": splits,
        "File": [env.get("data_files", {}).get(s, NA) for s in splits],
        "Tokens": [env.get("data_tokens", {}).get(s, NA) for s in splits],
        "sha256": [env.get("data_checksums", {}).get(s, NA) for s in splits],
    })
    items = {
        "Source": env.get("data_source", NA), "Dataset setting": c.get("dataset"),
        "Vocabulary size": env.get("vocab_size", NA), "Batch size": c.get("batch_size"),
        "Train batches per epoch": env.get("train_batches", NA),
        "Validation batches": env.get("valid_batches", NA),
        "Batch caps (train / eval)": f"{fmt(c.get('max_train_batches'))} / "
                                     f"{fmt(c.get('max_eval_batches'))}",
    }
    text = ["## Dataset", key_value_table(items), markdown_table(files)]
    if c.get("dataset") == "fixture":
        text.append("The data is the synthetic fixture corpus, not WikiText-2.")
    return "\n\n".join(text)


def warmup_section(run: RunData) -> str:
    return "\n\n".join(["## Warmup epochs", "Language-model loss only. Val PPL is exp of the "
                        "token-weighted mean loss; the batch mean is exp of the mean batch loss.",
                        markdown_table(warmup_table(run))])


def physics_section(run: RunData) -> str:
    return "\n\n".join(["## Physics epochs",
                        "Train loss = LM loss + energy loss (lambda-weighted); energy MSE and "
                        "drift are means over the steps that computed the energy; lambda is the "
                        "mean over layers at the epoch end.",
                        markdown_table(physics_table(run))])


def energy_section(s: Summary) -> str:
    items = {
        "Average drift (physics steps)": s.drift_mean, "Maximum drift": s.drift_max,
        "Target drift": s.target, "Status (average <= target)": status(s.drift_met),
        "Physics steps within target": NA if s.within_target is None
        else f"{100 * s.within_target:.1f}% of {s.drift_steps}",
    }
    return "\n\n".join(["## Energy conservation", "Drift = mean over layers of "
                        "mean_batch |E_b - E_a|, over the physics steps of the finished epochs "
                        "that computed it.",
                        key_value_table(items)])


def _change(first: float, last: float) -> str:
    relative = percent((last - first) / first) if first else NA
    return f"{fmt(first)} -> {fmt(last)} ({fmt(last - first)}, {relative})"


def energy_progression_section(run: RunData) -> str:
    rows = run.phase("physics")
    text = ["## Energy-loss progression", markdown_table(energy_progression_table(run))]
    if len(rows) and "train_energy_mse" in rows:
        first, last = rows.iloc[0], rows.iloc[-1]
        text.append(f"First to last physics epoch: weighted energy loss "
                    f"{_change(first['train_energy_loss'], last['train_energy_loss'])}; raw MSE "
                    f"{_change(first['train_energy_mse'], last['train_energy_mse'])}.")
    return "\n\n".join(text)


def lambda_section(run: RunData) -> str:
    c = run.config
    text = ["## Lambda evolution"]
    if "lambda" not in run.steps or run.steps.empty:
        return "\n\n".join(text + ["No multiplier was logged (the model has no energy heads)."])
    values = run.steps["lambda"]
    items = {"Start (lambda init)": c.get("lambda_energy_init"),
             "Minimum over steps": values.min(), "Maximum over steps": values.max(),
             "Bounds": f"[{fmt(c.get('lambda_min'))}, {fmt(c.get('lambda_max'))}]",
             "Final (mean over layers)": values.iloc[-1]}
    text += [key_value_table(items), "At each epoch end:", markdown_table(lambda_table(run))]
    final = run.steps["lambda_per_layer"].iloc[-1]
    layers = pd.DataFrame({"Layer": range(1, len(final) + 1), "Final lambda": final})
    text += ["Per layer at the end:", markdown_table(layers)]
    return "\n\n".join(text)


def results_section(run: RunData, control: RunData | None, s: Summary) -> str:
    text = ["## Final results vs. control"]
    if control is None:
        return "\n\n".join(text + [
            "**No control run; no baseline.** Train one with the same settings and "
            f"`physics=false` into `{run.root / 'control'}` to compare against."])
    table = pd.DataFrame({
        "Run": [run.name, "control"],
        "Epochs": [len(run.epochs), len(control.epochs)],
        "Val loss": [s.final_val_loss, s.control_val_loss],
        "Val PPL": [s.final_val_ppl, s.control_val_ppl],
        "Val PPL (batch mean)": [_final(run, "val_ppl_batch_mean"),
                                 _final(control, "val_ppl_batch_mean")],
    })
    text.append(markdown_table(table))
    if s.ppl_ratio is not None:
        text.append(f"Difference (run - control): val loss "
                    f"{fmt(s.final_val_loss - s.control_val_loss)}, val PPL "
                    f"{fmt(s.final_val_ppl - s.control_val_ppl)}. Ratio (run / control): "
                    f"val PPL {fmt(s.ppl_ratio)} ({percent(s.ppl_ratio - 1)}).")
    problems = control_mismatches(run, control)
    text.append("The control matches the run in model, data, seed and budget."
                if not problems else "> ⚠️ **The control is not a like-for-like baseline**: "
                + "; ".join(problems) + ".")
    return "\n\n".join(text)


def criteria_table(run: RunData, s: Summary) -> pd.DataFrame:
    """Each success criterion with its value, threshold and status, from the data."""
    first_val = float(run.epochs["val_loss"].iloc[0]) if len(run.epochs) > 1 else None
    rows = [
        ("Training finished all epochs", f"{s.epochs_done} / {s.epochs_planned}",
         f"{s.epochs_planned} epochs", s.epochs_done >= s.epochs_planned),
        ("No non-finite (skipped) steps", s.skipped, "0", s.skipped == 0),
        ("Average drift <= target", s.drift_mean, fmt(s.target), s.drift_met),
        (f"Final val PPL within {PPL_TOLERANCE:.0%} of the control", s.ppl_ratio,
         f"ratio <= {fmt(1 + PPL_TOLERANCE)}",
         None if s.ppl_ratio is None else s.ppl_ratio <= 1 + PPL_TOLERANCE),
        ("Val loss decreased over training",
         NA if first_val is None else f"{fmt(first_val)} -> {fmt(s.final_val_loss)}",
         "last < first", None if first_val is None else s.final_val_loss < first_val),
    ]
    return pd.DataFrame([(name, value, threshold, status(ok)) for name, value, threshold, ok
                         in rows], columns=["Criterion", "Value", "Threshold", "Status"])


def criteria_section(run: RunData, s: Summary) -> str:
    return "\n\n".join(["## Success criteria", markdown_table(criteria_table(run, s))])


def phase_section(run: RunData, control: RunData | None) -> str:
    return "\n\n".join(["## Phase comparison", "Values at the last epoch of each phase; "
                        "throughput and time are means over the phase's epochs.",
                        markdown_table(phase_comparison_table(run, control))])


def robustness_section(run: RunData, s: Summary) -> str:
    steps = run.steps
    skipped = steps.loc[steps["skipped"].astype(bool), "step"].astype(int).tolist()
    listed = ", ".join(map(str, skipped[:20])) + (" ..." if len(skipped) > 20 else "")
    items = {"Optimizer steps logged": len(steps), "Skipped non-finite steps": s.skipped,
             "Longest run of consecutive skipped steps": s.max_consecutive_skipped,
             "Skipped steps": listed or "none",
             "Non-finite validation losses": int((~np.isfinite(
                 run.epochs["val_loss"].astype(float))).sum())}
    good = steps.loc[~steps["skipped"].astype(bool)]
    if "grad_norm" in good and len(good):
        items["Gradient norm of applied steps (mean / max, before clipping)"] = (
            f"{fmt(good['grad_norm'].mean())} / {fmt(good['grad_norm'].max())}")
    if "energy_computed" in steps:
        physics = steps[steps["physics"].astype(bool) & ~steps["skipped"].astype(bool)]
        items["Physics steps without an energy term (batch-size mismatch)"] = int(
            (~physics["energy_computed"].astype(bool)).sum())
    return "\n\n".join(["## Robustness", key_value_table(items)])


def plots_section(figures: dict[str, Path], out_dir: Path) -> str:
    text = ["## Plots"]
    for name, path in figures.items():
        link = quote(path.relative_to(out_dir).as_posix())
        text.append(f"### {FIGURE_CAPTIONS[name]}\n\n![{FIGURE_CAPTIONS[name]}]({link})")
    return "\n\n".join(text)


def provenance_section(run: RunData, control: RunData | None, command: str) -> str:
    env = run.env
    device = env.get("device", NA) + (f" ({env['device_name']}, CUDA {env.get('cuda')})"
                                      if env.get("device_name") else "")
    items = {"Git commit (run)": env.get("git_commit", NA),
             **{name: env.get(name.lower(), NA) for name in
                ("physlm", "Python", "torch", "numpy", "pandas", "matplotlib", "papermill")},
             "Platform": env.get("platform", NA), "Processor": env.get("processor", NA),
             "CPU cores / torch threads": f"{env.get('cpu_count', NA)} / "
                                          f"{env.get('torch_threads', NA)}",
             "Device": device, "Seed": run.config.get("seed"),
             **{f"Data sha256 ({split})": digest
                for split, digest in env.get("data_checksums", {}).items()},
             "Run directory": str(run.root),
             "Control directory": str(control.root) if control else NA,
             "Git commit (control)": control.env.get("git_commit", NA) if control else NA,
             "Report generated by": f"physlm {physlm.__version__}, commit {git_commit() or NA}",
             "Generated at (UTC)": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
             "Regenerate with": f"`{command}`"}
    return "\n\n".join(["## Provenance", key_value_table(items)])


# ---------------------------------------------------------------- the report

def render_report(run: RunData, control: RunData | None, figures: dict[str, Path],
                  out_dir: Path, command: str) -> str:
    """The whole markdown document."""
    s = summarize(run, control)
    sections = [
        summary_section(run, control, s), model_section(run), training_section(run),
        dataset_section(run), warmup_section(run), physics_section(run), energy_section(s),
        energy_progression_section(run), lambda_section(run), results_section(run, control, s),
        criteria_section(run, s), phase_section(run, control), robustness_section(run, s),
        plots_section(figures, out_dir), provenance_section(run, control, command),
    ]
    return "\n\n".join(sections) + "\n"


def save_figures(run: RunData, control: RunData | None, folder: Path) -> dict[str, Path]:
    """Draw every figure into `folder`; return name -> PNG path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, figure in plots.make_figures(run, control).items():
        paths[name] = folder / f"{name}.png"
        figure.savefig(paths[name], dpi=plots.DPI)
    return paths


def write_report(run_dir: str | Path, out_dir: str | Path = "reports",
                 control_dir: str | Path | None = None) -> Path:
    """Write `<out_dir>/<run name>.md` and its figures in `<out_dir>/<run name>/`."""
    run = load_run(run_dir)
    control = find_control(run_dir, control_dir)
    out_dir = Path(out_dir)
    figures = save_figures(run, control, out_dir / run.name)
    command = f"python -m physlm report {run_dir} --out-dir {out_dir}"
    if control_dir is not None:
        command = (f"python -c \"from physlm.report import write_report; write_report("
                   f"'{run_dir}', '{out_dir}', control_dir='{control_dir}')\"")
    path = out_dir / f"{run.name}.md"
    path.write_text(render_report(run, control, figures, out_dir, command), encoding="utf-8")
    return path

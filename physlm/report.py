"""The markdown results report of a saved run (SPEC section 5): `write_report("runs/x")`
writes reports/x.md and its figures in reports/x/, from the run directory (physlm.runs) and
its control run (the baseline). This module computes the data; templates/report.md.j2 lays it
out. No absolute path enters a report: files by name and checksum, directories relative."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
import numpy as np
import pandas as pd

import physlm
from physlm import plots
from physlm.config import REPORTS_ROOT
from physlm.criteria import STATUS, criteria_table, final_value, heads_table, summarize
from physlm.provenance import git_commit
from physlm.runs import RunData, find_control, load_run

NA = "n/a"
FIGURE_CAPTIONS = plots.CAPTIONS
# Numbers by kind: a column's (or, first column "Setting"/"Metric", a row's) is its name's first
# KINDS match; else integers are counts, reals get 4 significant digits (lambda, drift, ratio).
FORMATS = {"loss": "{:,.4f}", "ppl": "{:,.2f}", "time": "{:,.1f}", "count": "{:,.0f}",
           "fraction": "{:.3f}", "percent": "{:.1%}", "change": "{:+.2%}"}
KINDS = {r"tokens/s": "count", r"\bppl\b": "ppl", r"\btime\b": "time", r"\b(loss|mse)\b": "loss",
         r"^expert \d": "fraction", r"\bwithin target\b": "percent",
         r"\b(vs|relative to) control\b": "change"}
COLUMNS = {"Phase": "phase", "Train loss": "train_loss", "LM loss": "train_lm_loss",
           "Energy loss (weighted)": "train_energy_loss", "Energy MSE (raw)": "train_energy_mse",
           "Val loss": "val_loss", "Val loss (batch mean)": "val_loss_batch_mean",
           "Val PPL": "val_ppl", "Val PPL (batch mean)": "val_ppl_batch_mean", "Lambda": "lambda",
           "Lambda (mean)": "lambda", "Per layer": "lambda_per_layer", "Drift": "drift",
           "Drift (mean)": "drift", "Drift (max)": "drift_max", "Energy steps": "energy_steps",
           "Time (s)": "time_s", "Tokens/s": "tokens_per_s", "Clip factor (LM)": "clip_factor",
           "LM grad norm": "lm_grad_norm", "Energy grad norm": "energy_grad_norm"}


def fmt(value: Any, name: str = "") -> str:
    """One value as text, by the kind of `name`: a kind, or a column or setting name."""
    if isinstance(value, str):
        return value.replace("|", "\\|")
    if isinstance(value, list | tuple | np.ndarray):
        return ", ".join(fmt(v, name) for v in value) or NA
    if value is None or pd.isna(value):
        return NA
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    how = name if name in FORMATS else next(
        (kind for pattern, kind in KINDS.items() if re.search(pattern, name, re.I)), None)
    if how or isinstance(value, int | np.integer) or not math.isfinite(x := float(value)):
        return FORMATS[how or "count"].format(float(value))
    text = f"{x:,.{max(0, 3 - math.floor(math.log10(abs(x) or 1)))}f}"  # 4 significant digits
    return text.rstrip("0").rstrip(".") if "." in text else text


def table(frame: pd.DataFrame) -> str:
    """A DataFrame as a markdown table: values by kind, numeric columns right-aligned."""
    if frame.empty:
        return "_(no rows)_"
    rows = list(frame.iloc[:, 0]) if frame.columns[0] in ("Setting", "Metric") else None
    cells = pd.DataFrame({name: [fmt(v, str(rows[i]) if rows else name)
                                 for i, v in enumerate(column)] for name, column in frame.items()})
    align = ["right" if pd.api.types.is_numeric_dtype(numbers := column.dropna().infer_objects())
             and numbers.dtype != bool else "left" for _, column in frame.items()]
    return cells.to_markdown(index=False, colalign=align, disable_numparse=True)


def settings(*parts: Any) -> pd.DataFrame:
    """Setting | Value rows from dicts and config sections (paths made portable)."""
    items = {k: portable(v) if k.endswith(("_dir", "_file")) and v else v for part in parts
             for k, v in (part if isinstance(part, dict) else vars(part)).items()}
    return pd.DataFrame({"Setting": list(items), "Value": pd.Series(items.values(), dtype=object)})


def portable(path: str | Path) -> str:
    """`path` relative to the working directory, or its name when it lies elsewhere."""
    path, here = Path(path).resolve(), Path.cwd().resolve()
    return path.relative_to(here).as_posix() if path.is_relative_to(here) else path.name


def epoch_table(rows: pd.DataFrame, *titles: str) -> pd.DataFrame:
    """Epoch records as a table: the 1-based epoch, then `titles` (COLUMNS: title -> key)."""
    return pd.DataFrame({"Epoch": rows["epoch"].astype(int) + 1,
                         **{title: rows.get(COLUMNS[title]) for title in titles}})


def warmup_table(run: RunData) -> pd.DataFrame:
    return epoch_table(run.phase("warmup"), "Train loss", "Val loss", "Val PPL",
                       "Val PPL (batch mean)", "Time (s)", "Tokens/s")


def physics_table(run: RunData) -> pd.DataFrame:
    return epoch_table(run.phase("physics"), "Train loss", "LM loss", "Energy loss (weighted)",
                       "Energy MSE (raw)", "Val loss", "Val loss (batch mean)", "Val PPL",
                       "Val PPL (batch mean)", "Lambda", "Drift", "LM grad norm",
                       "Energy grad norm", "Clip factor (LM)", "Time (s)", "Tokens/s")


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


def render_report(run: RunData, control: RunData | None, figures: dict[str, Path],
                  out_dir: Path, command: str, title: str | None = None) -> str:
    """The whole markdown document (`figures`: name -> PNG path below `out_dir`)."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("physlm"), trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters.update(fmt=fmt, table=lambda frame: table(frame).replace("\n", "\0"),
                       status=STATUS.get, portable=portable)  # a table is one line: one block
    s = summarize(run, control)
    load = run.epochs["expert_load"].iloc[-1] if len(run.epochs.get("expert_load", [])) else []
    router = pd.DataFrame(load, index=pd.RangeIndex(1, len(load) + 1, name="Layer")).rename(
        columns=lambda expert: f"Expert {expert + 1}").reset_index()  # token share per expert
    text = env.get_template("report.md.j2").render(
        run=run, title=title or run.name, control=control, c=run.config, env=run.env, s=s,
        source=re.sub(r"(?<!\S)/\S*/", "", run.env.get("data_source", NA)),  # absolute: names
        DataFrame=pd.DataFrame, settings=settings, final=final_value,
        files={split: Path(path).name for split, path in run.env.get("data_files", {}).items()},
        heads=heads_table(run), warmup=warmup_table(run), physics=physics_table(run),
        criteria=criteria_table(run, s),
        progression=energy_progression_table(run), lambdas=lambda_table(run),
        phases=phase_comparison_table(run, control), router=router, command=command,
        generator=f"physlm {physlm.__version__}, commit {git_commit() or NA}",
        now=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        checksums={f"Data sha256 ({k})": v for k, v in run.env.get("data_checksums", {}).items()},
        figures={FIGURE_CAPTIONS[name]: quote(path.relative_to(out_dir).as_posix())
                 for name, path in figures.items()})
    blocks = [line for line in text.split("\n") if line.strip()]
    return "\n\n".join(blocks).replace("\0", "\n") + "\n"


def write_report(run_dir: str | Path, out_dir: str | Path = REPORTS_ROOT,
                 control_dir: str | Path | None = None, name: str | None = None) -> Path:
    """Write `<out_dir>/<name>.md` and its figures in `<out_dir>/<name>/` (name: the run
    directory's name); the control is `control_dir`, else `<run_dir>/control`."""
    run, control, out_dir = load_run(run_dir), find_control(run_dir, control_dir), Path(out_dir)
    name = name or run.name
    (out_dir / name).mkdir(parents=True, exist_ok=True)
    figures = {figure: out_dir / name / f"{figure}.png" for figure in FIGURE_CAPTIONS}
    for figure, drawn in plots.make_figures(run, control).items():
        drawn.savefig(figures[figure], dpi=plots.DPI)
    command = f"python -m physlm report {portable(run_dir)} --out-dir {portable(out_dir)}" + (
        f" --control-dir {portable(control_dir)}" if control_dir else "") + (
        f" --name {name}" if name != run.name else "")
    path = out_dir / f"{name}.md"
    path.write_text(render_report(run, control, figures, out_dir, command, title=name),
                    encoding="utf-8")
    return path

"""The results report of a saved run (SPEC section 5): `write_report("runs/x")` writes
reports/x.md, its figures in reports/x/ and the same report as one page, reports/x.html,
from the run directory (physlm.runs) and its control run (the baseline). This module gathers
the report's data (`ReportData`: the summary, every table with the kinds of its numbers);
templates/report.md.j2 lays it out, templates/report.html.j2 holds the page. No absolute
path enters a report: files by name and checksum, directories relative."""

from __future__ import annotations

import base64
import io
import mimetypes
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import mistune  # the markdown renderer of nbconvert too
import pandas as pd

import physlm
from physlm import plots
from physlm.config import REPORTS_ROOT, Config
from physlm.criteria import (
    STATUS,
    Summary,
    criteria_table,
    final_value,
    heads_table,
    summarize,
)
from physlm.files import atomic_write_bytes, atomic_write_text
from physlm.lock import held_by
from physlm.optim import OPTIMIZER_NAMES
from physlm.provenance import git_commit
from physlm.report_tables import (
    KINDS,
    count_sentences,
    energy_progression_table,
    lambda_table,
    phase_comparison_table,
    physics_table,
    references_table,
    router_table,
    warmup_table,
)
from physlm.runs import RunData, find_control, load_run
from physlm.samples import Samples, run_samples
from physlm.sections import ARCHITECTURE_SETTINGS
from physlm.text import NA, Table, environment, fmt, portable, rows

FIGURE_CAPTIONS = plots.CAPTIONS
# What ran, as the report's summary names it (Config.model.architecture).
ARCHITECTURES = {"resnet_bk": "a ResNet-BK model",
                 "transformer": "a Transformer (causal GPT, pre-LN)",
                 "lstm": "an LSTM (embedding tied to the output)"}

def settings(*parts: Any) -> dict[str, Any]:
    """Setting -> value from dicts and config sections (paths made portable)."""
    return {k: portable(v) if k.endswith(("_dir", "_file")) and v else v for part in parts
            for k, v in (part if isinstance(part, dict) else vars(part)).items()}


@dataclass
class ReportData:
    """Everything report.md.j2 shows, computed: the run, its summary and its tables."""

    title: str
    run: RunData
    control: RunData | None
    c: Config
    s: Summary
    architecture: str            # what ran (ARCHITECTURES)
    in_progress: str | None      # who is training the unfinished run now (None: nobody)
    source: str                  # where the data came from, absolute paths cut to names
    warmup_epochs: int           # finished epochs of each phase
    physics_epochs: int
    router: Table
    model: Table
    training: Table
    dataset: Table
    data_files: Table
    warmup: Table
    physics: Table
    energy: Table
    heads: Table
    progression: Table
    progression_change: str | None   # first to last physics epoch, when the energy is logged
    lambda_settings: Table | None    # None: no multiplier was logged
    lambdas: Table
    layers_equal: bool               # every layer's multiplier the same at the end
    final: Table | None              # None: no control
    references: Table | None         # the count models and the run against them (None: none)
    count_sentences: list[str]
    criteria: Table
    phases: Table
    robustness: Table
    figures: dict[str, str]          # caption -> link relative to the report
    provenance: Table
    samples: Samples | None          # None: the run has no samples.json

    @property
    def parameters(self) -> dict[str, int]:
        return self.run.env.get("parameters", {})


def _change(progression: pd.DataFrame, column: str) -> str:
    first, last = progression[column].iloc[0], progression[column].iloc[-1]
    relative = fmt((last - first) / first, "change") if first else NA
    return f"{fmt(first, 'loss')} -> {fmt(last, 'loss')} ({fmt(last - first, 'loss')}, {relative})"


def report_data(run: RunData, control: RunData | None, figures: dict[str, Path],
                out_dir: Path, command: str, title: str | None = None,
                commit: str | None = None) -> ReportData:
    """The report's data (`figures`: name -> PNG path below `out_dir`; `commit`: the code's,
    default the checkout's now)."""
    c, env, s = run.config, run.env, summarize(run, control)
    params = env.get("parameters", {})
    source = re.sub(r"(?<!\S)/\S*/", "", env.get("data_source", NA))   # absolute: names only
    load = run.epochs["expert_load"].iloc[-1] if len(run.epochs.get("expert_load", [])) else []
    router = router_table(load if any(load) else [])  # a baseline's layers have no experts
    physics = (vars(c.physics) if c.trains_with_physics
               else {"energy_penalty": c.physics.energy_penalty})
    progression = energy_progression_table(run)
    logged = len(progression) and progression["Energy MSE (raw)"].notna().all()
    steps = run.steps
    lambda_logged = "lambda" in steps and not steps.empty
    per_step = steps["lambda"] if lambda_logged else None
    files = {split: Path(path).name for split, path in env.get("data_files", {}).items()}
    within = f"Physics steps within target (of {s.drift_steps})"
    title = title or run.name
    return ReportData(
        title=title, run=run, control=control, c=c, s=s,
        architecture=ARCHITECTURES[c.model.architecture],
        in_progress=None if run.finished else held_by(run.root), source=source,
        warmup_epochs=len(run.phase("warmup")), physics_epochs=len(run.phase("physics")),
        router=Table(router, {title: "fraction" for title in router.columns[1:]}),
        model=rows(settings({"Parameters (total)": params.get("total"),
                             "Parameters (trained by the optimizer)": params.get("trainable"),
                             "Vocabulary size": env.get("vocab_size")},
                            {key: value for key, value in vars(c.model).items()
                             if key in ARCHITECTURE_SETTINGS[c.model.architecture]})),
        training=rows(settings({"Optimizer": OPTIMIZER_NAMES[c.train.optimizer],
                                "Device used": env.get("device"),
                                "Physics from epoch (1-based)": c.warmup_epochs + 1
                                if c.trains_with_physics else None}, c.train, physics)),
        dataset=rows(settings({"Source": source, "Vocabulary size": env.get("vocab_size"),
                               "Train batches per epoch": env.get("train_batches"),
                               "Validation batches": env.get("valid_batches")}, c.data)),
        data_files=Table(pd.DataFrame({"File": files, "Tokens": env.get("data_tokens", {}),
                                       "sha256": env.get("data_checksums", {})})
                         .rename_axis("Split").reset_index()),
        warmup=Table(warmup_table(run), KINDS), physics=Table(physics_table(run), KINDS),
        energy=rows({"Steady-state drift": s.steady_drift,
                     "Average drift (all physics steps)": s.drift_mean,
                     "Maximum drift": s.drift_max, "Target drift": s.target,
                     "Status (steady state <= target, not degenerate)": s.drift_status,
                     within: s.within_target, "Minimum spread of H (steady state)": s.spread_min,
                     "Degenerate layers": ", ".join(map(str, s.degenerate or [])) or "none"},
                    {within: "percent"}),
        heads=Table(heads_table(run)), progression=Table(progression, KINDS),
        progression_change=(f"weighted energy loss {_change(progression, 'Energy loss (weighted)')}"
                            f"; raw MSE {_change(progression, 'Energy MSE (raw)')}")
        if logged else None,
        lambda_settings=rows({"Start (lambda init)": c.physics.lambda_energy_init,
                              "Minimum over steps": per_step.min(),
                              "Maximum over steps": per_step.max(),
                              "Bounds (min, max)": [c.physics.lambda_min, c.physics.lambda_max],
                              "Final (mean over layers)": per_step.iloc[-1]})
        if lambda_logged else None,
        lambdas=Table(lambda_table(run), KINDS),
        layers_equal=lambda_logged and len(set(steps["lambda_per_layer"].iloc[-1])) == 1,
        final=None if control is None else Table(pd.DataFrame({
            "Run": [title, "control"], "Epochs": [len(run.epochs), len(control.epochs)],
            "Val loss": [s.final_val_loss, s.control_val_loss],
            "Val PPL": [s.final_val_ppl, s.control_val_ppl],
            "Val PPL (batch mean)": [final_value(run, "val_ppl_batch_mean"),
                                     final_value(control, "val_ppl_batch_mean")],
            "Best val PPL": [s.best_val_ppl, s.control_best_val_ppl],
            "Best epoch": [s.best_epoch, s.control_best_epoch]}), KINDS),
        references=references_table(run, control, s, title),
        count_sentences=count_sentences(run, control, s, title),
        criteria=Table(criteria_table(run, s)),
        phases=Table(phase_comparison_table(run, control), KINDS),
        robustness=rows({
            "Optimizer steps logged": len(steps), "Skipped non-finite steps": s.skipped,
            "Longest run of consecutive skipped steps": s.max_consecutive_skipped,
            "Skipped steps": (", ".join(map(str, s.skipped_steps[:20]))
                              + (" ..." if len(s.skipped_steps) > 20 else "")) or "none",
            "Non-finite validation losses": s.nonfinite_val,
            "Gradient norm of applied steps (mean, max; before clipping)": s.grad_norm,
            **({"Physics steps without an energy term (batch-size mismatch)": s.no_energy}
               if c.trains_with_physics else {})}),
        figures={FIGURE_CAPTIONS[name]: quote(path.relative_to(out_dir).as_posix())
                 for name, path in figures.items()},
        provenance=rows(_provenance(run, control, command, commit or git_commit())),
        samples=run_samples(run, control))


def _provenance(run: RunData, control: RunData | None, command: str,
                commit: str | None) -> dict[str, Any]:
    env = run.env
    device = env.get("device", NA) + (f" ({env['device_name']}, CUDA {env.get('cuda')})"
                                      if env.get("device_name") else "")
    return {
        "Git commit (run)": env.get("git_commit"),
        **{name: env.get(key) for name, key in (
            ("physlm", "physlm"), ("Python", "python"), ("torch", "torch"), ("numpy", "numpy"),
            ("pandas", "pandas"), ("matplotlib", "matplotlib"), ("papermill", "papermill"),
            ("Platform", "platform"), ("Processor", "processor"))},
        "CPU cores, torch threads": [env.get("cpu_count"), env.get("torch_threads")],
        "Seed": run.config.train.seed, "Device": device,
        **{f"Data sha256 ({k})": v for k, v in env.get("data_checksums", {}).items()},
        "Run directory": portable(run.root),
        "Control directory": portable(control.root) if control else None,
        "Git commit (control)": control.env.get("git_commit") if control else None,
        "Report generated by": f"physlm {physlm.__version__}, commit {commit or NA}",
        "Generated at (UTC)": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "Regenerate with": f"`{command}`"}


def render_report(data: ReportData) -> str:
    """The whole markdown document: the template's blocks, one blank line between them."""
    text = environment().get_template("report.md.j2").render(
        d=data, c=data.c, s=data.s, status=STATUS, KINDS=KINDS)
    blocks = [block.strip("\n") for block in text.split("\n\n") if block.strip()]
    return "\n\n".join(blocks) + "\n"


def inline_figures(markdown: str, base_dir: str | Path,
                   drawn: dict[Path, bytes] | None = None) -> str:
    """`markdown` with its local image links (`![caption](path)`, relative to `base_dir`)
    replaced by data URIs, so that the text alone holds its figures; `drawn`: the bytes of
    figures not written yet, by path."""
    def embed(match: re.Match[str]) -> str:
        caption, link = match.groups()
        path = Path(base_dir) / unquote(link)
        if re.match(r"[a-z][a-z0-9+.-]*:", link, re.I):
            return match.group(0)  # a URL (http:, data:) stays a link
        data = (drawn or {}).get(path) or (path.read_bytes() if path.is_file() else None)
        if data is None:
            return match.group(0)  # so does a missing file
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return f"![{caption}](data:{kind};base64,{base64.b64encode(data).decode('ascii')})"
    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", embed, markdown)


def render_html(markdown: str, title: str) -> str:
    """The report as one HTML page that works offline: no script, figures as data URIs
    (inline_figures first). Every HTML tag in the markdown is escaped, shown as the text it
    is: a run's settings and records (a data_dir named `<img onerror=...>`) never become
    markup, nor a link to javascript:."""
    body = mistune.create_markdown(renderer=TextOnlyHTML(escape=False), plugins=["table"])(
        markdown)
    return environment().get_template("report.html.j2").render(title=title, body=body)


class TextOnlyHTML(mistune.HTMLRenderer):
    """mistune's HTML with every HTML tag of the markdown shown as text. Its own escape=True
    would escape the entities too (`&lt;unk&gt;` shown as `&amp;lt;unk&amp;gt;`); links and
    images keep mistune's check of their URL (javascript: becomes #harmful-link)."""

    def inline_html(self, html: str) -> str:
        return mistune.escape(html)

    def block_html(self, html: str) -> str:
        return f"<p>{mistune.escape(html.strip())}</p>\n"


def write_report(run_dir: str | Path, out_dir: str | Path = REPORTS_ROOT,
                 control_dir: str | Path | None = None, name: str | None = None) -> Path:
    """Write `<out_dir>/<name>.md`, its figures in `<out_dir>/<name>/` and the same report as
    one page, `<out_dir>/<name>.html` (name: the run directory's); the control is
    `control_dir`, else `<run_dir>/control`. Everything is drawn and rendered before the first
    file is written, and each file is replaced atomically: a report that fails, or is killed,
    leaves the previous one."""
    run, control, out_dir = load_run(run_dir), find_control(run_dir, control_dir), Path(out_dir)
    commit = git_commit()   # before the figures are written: they may be files git tracks
    name = name or run.name
    figures, drawn = {}, {}
    for figure, plotted in plots.make_figures(run, control).items():
        figures[figure] = out_dir / name / f"{figure}.png"
        buffer = io.BytesIO()
        plotted.savefig(buffer, format="png", dpi=plots.DPI)
        drawn[figures[figure]] = buffer.getvalue()
    command = f"python -m physlm report {portable(run_dir)} --out-dir {portable(out_dir)}" + (
        f" --control-dir {portable(control_dir)}" if control_dir else "") + (
        f" --name {name}" if name != run.name else "")
    path = out_dir / f"{name}.md"
    markdown = render_report(report_data(run, control, figures, out_dir, command, title=name,
                                         commit=commit))
    page = render_html(inline_figures(markdown, out_dir, drawn), f"physlm report: {name}")
    for figure, data in drawn.items():
        atomic_write_bytes(figure, data)
    atomic_write_text(path, markdown)
    atomic_write_text(path.with_suffix(".html"), page)
    return path

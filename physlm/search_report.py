"""The report of a recipe search: its budget, every trial, the best ones, what mattered.

Made from the search's storage alone (the SQLite file the driver writes), so it regenerates
on any machine that has the file: trials (state, epochs trained, best held-out PPL, the
recipe), the count models' held-out PPL beside the best trial's, the five best, the
parameters' importances (Optuna's PED-ANOVA over the finished trials: the share of the
held-out loss's variation each setting explains) and a figure of every trial's held-out
PPL by epoch, pruned ones in grey.
"""

from __future__ import annotations

import json
import warnings
from datetime import UTC, datetime
from pathlib import Path

import optuna
import pandas as pd
import yaml
from matplotlib.figure import Figure

from physlm.criteria import COUNT_MODELS
from physlm.files import atomic_write_text
from physlm.provenance import git_commit
from physlm.search import SearchSpec, open_study, perplexity
from physlm.text import Table, environment, portable

BEST = 5           # trials in the table of the best
IMPORTANCE_TRIALS = 5   # finished trials before the settings' importances say anything
STATES = {"COMPLETE": "finished", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}


def trial_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: its number, state, epochs, best held-out PPL and recipe."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        losses = list(trial.intermediate_values.values())
        best = trial.value if trial.value is not None else min(losses, default=None)
        rows.append({"Trial": trial.number, "State": STATES.get(trial.state.name, "?"),
                     "Epochs": len(losses),
                     "Best held-out PPL": perplexity(best) if best is not None else None,
                     **json.loads(trial.user_attrs.get("settings", "{}"))})
    frame = pd.DataFrame(rows)
    return frame.sort_values("Best held-out PPL", na_position="last") if len(frame) else frame


def importances(study: optuna.Study) -> pd.DataFrame:
    """Setting -> importance, over the finished trials; empty below IMPORTANCE_TRIALS. A
    setting every finished trial shares is left out: it explains nothing (PED-ANOVA over
    two trials that differ in one setting gives the others shares too)."""
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(finished) < IMPORTANCE_TRIALS:
        return pd.DataFrame(columns=["Setting", "Importance"])
    with warnings.catch_warnings():   # "some regimes have less than 2 trials": the report
        warnings.simplefilter("ignore", UserWarning)   # says the shares are rough
        shares = optuna.importance.get_param_importances(study)
    varied = {name for name in shares
              if len({repr(t.params.get(name)) for t in finished}) > 1}
    frame = pd.DataFrame({"Setting": [n for n in shares if n in varied],
                          "Importance": [v for n, v in shares.items() if n in varied]})
    # Ties (settings with no share) in name order: Optuna's order of them changes between calls.
    return frame.sort_values(["Importance", "Setting"], ascending=[False, True],
                             ignore_index=True)


def curves_figure(study: optuna.Study) -> Figure:
    """Held-out PPL by epoch for every trial: finished in colour, pruned and failed in grey."""
    figure = Figure(figsize=(7, 4), layout="constrained")
    ax = figure.subplots()
    best = study.best_trial.number if _has_best(study) else None
    for trial in study.get_trials(deepcopy=False):
        epochs = sorted(trial.intermediate_values)
        ppl = [perplexity(trial.intermediate_values[e]) for e in epochs]
        done = trial.state == optuna.trial.TrialState.COMPLETE
        ax.plot([e + 1 for e in epochs], ppl, marker=".", lw=2.5 if trial.number == best else 1,
                color=None if done else "0.75", zorder=3 if done else 1,
                label=f"trial {trial.number} (best)" if trial.number == best else None)
    ax.set(xlabel="epoch", ylabel="held-out PPL", yscale="log",
           title=f"search {study.study_name}: held-out PPL by epoch")
    if best is not None:
        ax.legend()
    return figure


def _has_best(study: optuna.Study) -> bool:
    return any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials())


def write_recipe(spec: SearchSpec, path: str | Path) -> Path | None:
    """The best finished trial's recipe (its draw and the search's fixed settings) as a params
    file that a study applies by architecture (physlm.study `recipes`); None before any trial
    has finished."""
    study = open_study(spec)
    if not _has_best(study):
        return None
    best = study.best_trial
    finished = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    header = (f"# The tuned training recipe of {spec.params}: trial {best.number} of the search "
              f"{spec.name}\n# (best held-out PPL {perplexity(best.value):,.1f} over "
              f"{spec.epochs} epochs; {finished} finished of {len(study.trials)} trials, "
              f"{spec.trials} planned).\n# Written by `python -m physlm search --params <the "
              "search's file> --report-only`; never edited by hand.\n")
    recipe = {**spec.fixed, **json.loads(best.user_attrs["settings"])}
    atomic_write_text(Path(path), header + yaml.safe_dump(recipe, sort_keys=False))
    return Path(path)


def count_references(study: optuna.Study) -> dict[str, float]:
    """The count models' held-out PPL over all targets (physlm.ngram), as the driver stored
    them from the first trial it saw finish an epoch: model -> PPL; empty before that. (A
    chunk's first token is never a target, so the targets vary a little with n_seq.)"""
    counted = study.user_attrs.get("references", {})
    return {COUNT_MODELS[model]: ppl["all"] for model, ppl in counted.items()}


def write_search_report(spec: SearchSpec, out_dir: str | Path) -> Path:
    """reports/<name>.md and its figure, from the storage; returns the markdown's path."""
    study = open_study(spec)
    out = Path(out_dir)
    figures = out / spec.name
    figures.mkdir(parents=True, exist_ok=True)
    figure_path = figures / "heldout_ppl.png"
    curves_figure(study).savefig(figure_path, dpi=110)
    trials = trial_table(study)
    recipe = [c for c in trials.columns if c not in ("Trial", "State", "Epochs",
                                                     "Best held-out PPL")]
    counts = trials["State"].value_counts().to_dict() if len(trials) else {}
    text = environment().get_template("search.md.j2").render(
        spec=spec, counts=counts, commit=git_commit(), references=count_references(study),
        best_ppl=trials["Best held-out PPL"].min() if len(trials) else None,
        best=Table(trials.head(BEST), {"Best held-out PPL": "ppl"}),
        trials=Table(trials, {"Best held-out PPL": "ppl"}), recipe=recipe,
        importances=Table(importances(study), {"Importance": "fraction"}),
        importance_trials=IMPORTANCE_TRIALS,
        figure=figure_path.relative_to(out).as_posix(),
        storage=portable(spec.storage_path), date=datetime.now(UTC).strftime("%Y-%m-%d"))
    path = out / f"{spec.name}.md"
    atomic_write_text(path, text)
    return path

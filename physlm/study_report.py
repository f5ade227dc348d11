"""The study's report: the operating point (every variant against the count references),
then every variant against the control, with its spread.

Every sentence of the conclusion is a template filled from one paired comparison
(physlm.statistics), so none says more than the numbers.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from physlm import history, plots
from physlm.config import Config, ModelConfig
from physlm.criteria import (
    INACTIVE,
    INACTIVE_SHARE,
    NOT_MET,
    CountFloor,
    count_floor,
    count_rows,
    floor_sentence,
    ppl_status,
    steady_state,
    summarize,
)
from physlm.external import (
    USED_WITHIN,
    context_table,
    external_sentences,
    position_gaps,
    position_table,
)
from physlm.history import PPL_COLUMNS
from physlm.optim import OPTIMIZER_NAMES
from physlm.provenance import git_commit
from physlm.runs import RunData
from physlm.samples import Samples, continuation, samples_table
from physlm.statistics import numbers, paired
from physlm.study import StudyOptions, ablation_rows, load_ablation_runs, study_dir
from physlm.study_figures import curves_figure, target_figure
from physlm.text import Table, environment, fmt, literal, portable
from physlm.variants import CONTROL, REPLICA, against_of, control_of, label

# The kinds of the numbers of the study's tables (physlm.text), beyond the perplexities'.
KINDS = {**PPL_COLUMNS, "Val PPL (final, mean)": "ppl", "Val PPL (final, sd)": "ppl",
         "Parameters": "count", "Tokens/s (mean)": "count", "Relative to control": "change",
         "vs control": "change", "Val PPL": "ppl", "Val PPL (non-<unk>)": "ppl",
         "Early-stopped val PPL (mean)": "ppl", "Final val PPL (mean)": "ppl",
         "Early-stopped, non-<unk> (mean)": "ppl", "Physics from epoch": "count",
         "Steps within target": "percent", "Energy / LM gradient": "percent",
         "Held-out PPL at best (mean)": "ppl", "Held-out PPL at best (sd)": "ppl",
         "Early-stopped val PPL (sd)": "ppl", "Relative to target": "change"}


def study_references(runs: dict[str, list[RunData]]) -> dict:
    """The count references of the study's data: the control's (every variant trains on the
    same data), else the first run's that has them; {} when no record has them."""
    ordered = [*runs.get(CONTROL, []), *(r for seeds in runs.values() for r in seeds)]
    return next((run.references for run in ordered if run.references), {})


def operating_point(frame: pd.DataFrame, floor: CountFloor) -> pd.DataFrame:
    """Per variant, means over seeds: the early-stopped and final val PPL, each over the best
    count model's, and the split the best epochs were chosen on."""
    grouped = frame.groupby("variant", sort=False)
    best, final = grouped["best"].mean().to_numpy(), grouped["final"].mean().to_numpy()
    return pd.DataFrame({
        "Variant": list(grouped.groups), "Seeds": grouped.size().to_numpy(),
        "Early-stopped val PPL (mean)": best, "Final val PPL (mean)": final,
        "Early-stopped, non-<unk> (mean)": grouped["best_known"].mean().to_numpy(),
        "Early-stopped / best count model": best / floor.ppl,
        "Final / best count model": final / floor.ppl,
        "Best epoch chosen on": grouped["selected_on"].agg(
            lambda splits: ", ".join(sorted(set(splits)))).to_numpy()})


def seeds_phrase(n: int) -> str:
    return "one seed" if n == 1 else f"mean over {n} seeds"


def floor_sentences(point: pd.DataFrame, floor: CountFloor) -> list[str]:
    """A sentence for each variant that does not clear the best count model at its
    early-stopped epoch, then one naming those that do."""
    below = point["Early-stopped val PPL (mean)"] < floor.ppl
    sentences = [floor_sentence(label(row["Variant"]), floor,
                                row["Early-stopped val PPL (mean)"],
                                row["Final val PPL (mean)"],
                                f"at its early-stopped epoch ({seeds_phrase(row['Seeds'])})")
                 for _, row in point[~below].iterrows()]
    if below.any():
        seeds = set(point.loc[below, "Seeds"])
        over = seeds_phrase(seeds.pop()) if len(seeds) == 1 else "mean over seeds"
        sentences.append(f"{', '.join(point.loc[below, 'Variant'])} "
                         f"{'clears' if below.sum() == 1 else 'clear'} the {floor.name} at the "
                         f"early-stopped epoch ({over}).")
    return sentences


def study_table(frame: pd.DataFrame) -> pd.DataFrame:
    grouped = frame.groupby("variant", sort=False)
    return pd.DataFrame({
        "Variant": list(grouped.groups), "Seeds": grouped.size().to_numpy(),
        "Parameters": grouped["parameters"].first().to_numpy(),
        "Held-out PPL at best (mean)": grouped["heldout"].mean().to_numpy(),
        "Held-out PPL at best (sd)": grouped["heldout"].std().to_numpy(),
        "Best val PPL (mean)": grouped["best"].mean().to_numpy(),
        "Best val PPL (sd)": grouped["best"].std().to_numpy(),
        "Final val PPL (mean)": grouped["final"].mean().to_numpy(),
        "Final val PPL (sd)": grouped["final"].std().to_numpy(),
        "Best epoch (mean)": grouped["best_epoch"].mean().to_numpy(),
        "Tokens/s (mean)": grouped["tokens_per_s"].mean().to_numpy()})


def target_table(summary: pd.DataFrame, target: str, tolerance: float) -> pd.DataFrame:
    """From the study's summary (study_table): each variant's early-stopped val PPL (mean,
    sd over seeds) over the target variant's mean, and whether it is at most `tolerance`
    above it (physlm.criteria.ppl_status, as for an external reference): "reached"."""
    best = summary["Best val PPL (mean)"]
    ratio = best / best[summary["Variant"] == target].iloc[0]
    return summary[["Variant", "Seeds", "Parameters"]].assign(**{
        "Early-stopped val PPL (mean)": best,
        "Early-stopped val PPL (sd)": summary["Best val PPL (sd)"],
        "Relative to target": ratio - 1,
        "Reached": ["no" if ppl_status(r, tolerance, control_overfits=False) == NOT_MET
                    else "yes" for r in ratio]})


def own_controls(variants: list[str]) -> dict[str, str]:
    """The variants paired against a control of their own (Variant.control), with it."""
    return {v: control_of(v) for v in variants if control_of(v) not in (CONTROL, v)}


def also_compared(variants: list[str]) -> dict[str, list[str]]:
    """The variants also compared with others of the study (Variant.also), with those."""
    return {v: extra for v in variants if (extra := against_of(v, variants)[1:])}


def comparisons(frame: pd.DataFrame) -> pd.DataFrame:
    """Each variant minus its control (then minus each variant it is also compared with),
    paired by seed; the column "Against" names the control when some variant has another."""
    variants = list(frame["variant"].unique())
    named = bool(own_controls(variants) or also_compared(variants))
    rows = []
    for variant in (v for v in variants if v != CONTROL):
        for against in against_of(variant, variants):
            for metric in ("final", "best"):
                if (p := paired(frame, variant, metric, against)) is None:
                    continue
                rows.append({"Variant": variant, **({"Against": against} if named else {}),
                             "Val PPL at": metric, "Seeds": p["n"],
                             "Difference (mean)": p["mean"], "Difference (sd)": p["sd"],
                             "95% CI low": p["low"], "95% CI high": p["high"],
                             "Relative to control": p["mean"] / p["control"],
                             "Beyond the seed spread": "yes" if p["exceeds"] else "no"})
    return pd.DataFrame(rows)


def energy_table(runs: dict[str, list[RunData]]) -> pd.DataFrame:
    """Per variant with the energy penalty, over its finished seeds: when physics starts, the
    drift target and the steady-state drift against it (physlm.criteria), how far lambda rose,
    and the energy gradient's share of the LM's: whether the penalty acted at all."""
    rows = []
    for variant, seeds in runs.items():
        done = [run for run in seeds if run.finished and run.config.physics.energy_penalty]
        if not done:
            continue
        summaries = [summarize(run, None) for run in done]
        lambdas = [steady_lambda(run) for run in done]
        drift = pd.Series([s.steady_drift for s in summaries], dtype=float)
        statuses = pd.Series([s.drift_status for s in summaries]).value_counts()
        rows.append({
            "Variant": variant, "Seeds": len(done),
            "Physics from epoch": done[0].config.physics.physics_start_epoch + 1,
            "Target": done[0].config.physics.energy_target_drift,
            "Steady drift (mean)": drift.mean(), "Steady drift (sd)": drift.std(),
            "Steps within target": pd.Series([s.within_target for s in summaries],
                                             dtype=float).mean(),
            "Lambda, steady (mean)": pd.Series([x.mean() for x in lambdas]).mean(),
            "Lambda, steady max (mean)": pd.Series([x.max() for x in lambdas]).mean(),
            "Energy / LM gradient": pd.Series([s.energy_share for s in summaries],
                                              dtype=float).mean(),
            "Drift status (seeds)": ", ".join(f"{n} {status}" for status, n in statuses.items())})
    return pd.DataFrame(rows)


def steady_lambda(run: RunData) -> pd.Series:
    """lambda (mean over layers) at each physics step of the steady state (criteria)."""
    steps = run.energy_steps
    return steps.loc[steps["epoch"].isin(steady_state(run)["epoch"]), "lambda"].astype(float)


def phase_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The original report's "Comparison with Previous Phases", from these runs."""
    summary = study_table(frame).set_index("Variant")
    control = summary.loc[CONTROL, "Final val PPL (mean)"] if CONTROL in summary.index else None
    rows = [{"Phase": label(v), "Val PPL (final, mean)": r["Final val PPL (mean)"],
             "Val PPL (final, sd)": r["Final val PPL (sd)"], "Seeds": r["Seeds"],
             "Parameters": r["Parameters"],
             "vs control": None if control is None else r["Final val PPL (mean)"] / control - 1}
            for v, r in summary.iterrows()]
    return pd.DataFrame(rows)


def conclusion(frame: pd.DataFrame) -> list[str]:
    """Sentences, each filled from one computed comparison (final-epoch PPL) of a variant
    with its control, or with a variant it is also compared with."""
    variants = list(frame["variant"].unique())

    def against_name(variant: str, against: str) -> str:
        if against == CONTROL:
            return "the control"
        if against == control_of(variant):
            return f"its control, {label(against)}"
        return "the " + label(against)[0].lower() + label(against)[1:]

    return [sentence for variant in variants if variant != CONTROL
            for against in against_of(variant, variants)
            if (sentence := comparison_sentence(frame, variant, against,
                                                against_name(variant, against)))]


def comparison_sentence(frame: pd.DataFrame, variant: str, against: str,
                        against_name: str) -> str | None:
    """One paired comparison of final-epoch PPL, as a sentence; None without two seeds."""
    if (p := paired(frame, variant, "final", against)) is None:
        return None
    direction = "lower" if p["mean"] < 0 else "higher"
    interval = f"95% CI {fmt(p['low'], 'ppl')} to {fmt(p['high'], 'ppl')}"
    verdict = ("the difference exceeds the seed-to-seed spread" if p["exceeds"] else
               "the difference is within the seed-to-seed spread: no effect is shown")
    return (f"{label(variant)} ends with a validation perplexity "
            f"{fmt(abs(p['mean']), 'ppl')} {direction} than {against_name} on average over "
            f"{p['n']} seeds ({interval}); {verdict}.")


def variant_samples(runs: dict[str, list[RunData]]) -> Samples | None:
    """The continuation of one fixed prompt (the first) by each variant's run of its lowest
    seed (seed 0); None when none of those runs has samples.json."""
    first = {variant: min(seeds, key=lambda run: run.config.train.seed)
             for variant, seeds in runs.items() if seeds}
    models = {variant: run.run.read_samples() for variant, run in first.items()}
    prompt = next((records[0]["prompt"] for records in models.values() if records), None)
    if prompt is None:
        return None
    frame = pd.DataFrame({"Variant": list(models),
                          "Seed": [run.config.train.seed for run in first.values()],
                          "Continuation": [continuation(records, prompt)
                                           for records in models.values()]}, dtype=object)
    samples = samples_table(frame, {variant: [r for r in records if r["prompt"] == prompt]
                                    for variant, records in models.items()})
    samples.prompt = literal(prompt)
    return samples


def missing_runs(options: StudyOptions, frame: pd.DataFrame) -> list[str]:
    """The study's runs that are not finished (or not started), as "variant seed s"."""
    finished = {(r.variant, r.seed) for r in frame.itertuples() if r.finished}
    return [f"{v} seed {s}" for v in options.variants for s in options.seeds_of(v)
            if (v, s) not in finished]


def missing_ablation(options: StudyOptions, ablation: dict[str, list[RunData]]) -> list[str]:
    """The ablation rows' runs that are not finished, as "ablation row seed s"."""
    finished = {(label, r.config.train.seed) for label, runs in ablation.items()
                for r in runs if r.finished}
    return [f"ablation {row.label} seed {s}" for row in ablation_rows(options)
            for s in options.seeds if (row.label, s) not in finished]


def write_study_report(options: StudyOptions, runs: dict[str, list[RunData]]) -> Path:
    """reports/<name>.md and its figure, from the study's runs."""
    commit = git_commit()   # before the figure is written: it may be a file git tracks
    out = Path(options.report_dir)
    (out / options.name).mkdir(parents=True, exist_ok=True)
    frame = numbers(runs)
    summary = study_table(frame)
    measured = options.target in set(frame["variant"])   # the target has a finished run
    # The target's band, as an external reference's (physlm.external): its runs' tolerance.
    tolerance = runs[options.target][0].config.criteria.ppl_tolerance if measured else 0.0
    references = study_references(runs)
    floor = count_floor(references)
    point = operating_point(frame, floor) if floor else None
    figure, goal_figure = out / options.name / "val_ppl.png", out / options.name / "target.png"
    curves_figure(runs).savefig(figure, dpi=plots.DPI)
    if measured:
        target_figure(frame, options.target, tolerance).savefig(goal_figure, dpi=plots.DPI)
    configs: dict[str, Config] = {v: seeds[0].config for v, seeds in runs.items() if seeds}
    ablation = load_ablation_runs(options)
    rows, fix_sentences = history.ablation_table(ablation) if ablation else (None, [])
    shape, shape_sentences = history.replica_shape(ablation.get(REPLICA, []),
                                                   runs.get(CONTROL, []))
    text = environment().get_template("study.md.j2").render(
        o=options, configs=configs, frame=frame, summary=Table(summary, KINDS),
        floor=floor, same_targets=floor is not None and all(
            int(r.epochs["val_tokens"].iloc[-1]) == floor.targets
            for seeds in runs.values() for r in seeds if len(r.epochs)),
        counts=Table(pd.DataFrame(count_rows(references) if floor else [],
                                               columns=["Model", "Val PPL",
                                                        "Val PPL (non-<unk>)"]), KINDS),
        point=None if point is None else Table(point, KINDS),
        floor_sentences=[] if point is None else floor_sentences(point, floor),
        external=external_sentences(options, frame, runs),
        context=[(portable(path), *context_table(path)) for path in options.context],
        positions=[(portable(path), table, position_gaps(table, options.target))
                   for path in options.position_loss
                   for table in [position_table(path)[0]]],
        used_within=USED_WITHIN,
        target=None if not measured else (
            label(options.target), Table(target_table(summary, options.target, tolerance), KINDS),
            tolerance, goal_figure.relative_to(out).as_posix()),
        selection=" and ".join(sorted(set(frame["selected_on"]))) or "n/a",
        optimizer_names=OPTIMIZER_NAMES,
        comparisons=Table(comparisons(frame), KINDS), phases=Table(phase_table(frame), KINDS),
        energy=Table(energy_table(runs), KINDS), inactive=INACTIVE,
        settle=next(iter(configs.values())).criteria.settle_epochs if configs else 0,
        inactive_share=INACTIVE_SHARE,
        conclusion=conclusion(frame), labels={v: label(v) for v in options.variants},
        own_controls=own_controls(options.variants),
        also_compared=also_compared(options.variants), defaults=ModelConfig(), control=CONTROL,
        unfinished=missing_runs(options, frame) + missing_ablation(options, ablation),
        koopman=history.koopman_table(runs.get("koopman", [])), ablation=rows,
        koopman_vs_plain=comparison_sentence(frame, "koopman", "plain",
                                             "the plain model (no Koopman loss, same warmup)"),
        fix_sentences=fix_sentences, shape=shape, shape_sentences=shape_sentences,
        samples=variant_samples(runs),
        figure=figure.relative_to(out).as_posix(), run_dir=portable(study_dir(options)),
        commits=sorted({r.env.get("git_commit") or "n/a" for s in runs.values() for r in s}),
        generator=commit or "n/a", now=datetime.now(UTC).strftime("%Y-%m-%d %H:%M"))
    path = out / f"{options.name}.md"
    path.write_text(text, encoding="utf-8")
    return path

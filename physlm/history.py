"""The original's history in the study report: the Koopman phase, corrected, and the
ablation from the replica of the original to all fixes.

Ablation: row k is the replica with the first k fixes (physlm.study.ablation_rows). Each
row is compared with the row before it, paired by seed, as the study compares variants
with the control (physlm.statistics.paired): the fix "moved" validation perplexity when
the paired-t interval of the difference excludes 0. A bidirectional row is not a causal
language model (position i sees the potential of the token it predicts), so a difference
involving one is shown but never judged.

The replica against the original: the original's run plateaued near its warmup-end
perplexity and its lambda climbed past 1 within the first physics epoch. Its per-epoch
numbers are not available here, so the replica is held to that shape: each physics epoch's
PPL over the warmup-end PPL, and the step at which lambda first exceeds 1.
"""

from __future__ import annotations

import pandas as pd

from physlm.runs import RunData
from physlm.statistics import numbers, paired
from physlm.text import Table, fmt

LAMBDA_MARK = 1.0   # the original's lambda passed this within its first physics epoch


def is_causal(runs: list[RunData]) -> bool:
    return all(run.config.model.bk_mode == "causal" for run in runs)


# The kinds of the numbers of the ablation's and the replica's tables (physlm.text).
PPL_COLUMNS = {title: "ppl" for title in ("Best val PPL (mean)", "Best val PPL (sd)",
                                          "Final val PPL (mean)", "Final val PPL (sd)",
                                          "Replica val PPL (mean)")}


def ablation_table(rows: dict[str, list[RunData]]) -> tuple[Table, list[str]]:
    """One line per row (mean +- sd over seeds; the paired change from the row before) and
    one generated sentence per fix. The first row is the replica, each next one adds a fix."""
    frame = numbers(rows)
    lines, sentences, previous = [], [], None
    for label, runs in rows.items():
        mine = frame[frame["variant"] == label]
        line = {"Row": label if previous is None else f"+ {label}",
                "Causal LM": "yes" if is_causal(runs) else "no (not comparable)",
                "Seeds": len(mine), "Best val PPL (mean)": mine["best"].mean(),
                "Best val PPL (sd)": mine["best"].std(),
                "Final val PPL (mean)": mine["final"].mean(),
                "Final val PPL (sd)": mine["final"].std()}
        p = paired(frame, label, "final", against=previous) if previous else None
        if p is not None:
            comparable = is_causal(runs) and is_causal(rows[previous])
            line.update({"Change from the row above": p["mean"], "95% CI low": p["low"],
                         "95% CI high": p["high"],
                         "Beyond the seed spread": ("not judged" if not comparable else
                                                    "yes" if p["exceeds"] else "no")})
            sentences.append(_fix_sentence(label, p, comparable))
        lines.append(line)
        previous = label
    return Table(pd.DataFrame(lines), PPL_COLUMNS), sentences


def _fix_sentence(label: str, p: dict[str, float], comparable: bool) -> str:
    change = (f"moved the final validation perplexity by {p['mean']:+.1f} on average over "
              f"{p['n']} seeds (95% CI {fmt(p['low'], 'ppl')} to {fmt(p['high'], 'ppl')})")
    if not comparable:
        verdict = ("not judged: one of the two rows is bidirectional, not a causal language "
                   "model, so its perplexity is not comparable")
    elif p["exceeds"]:
        verdict = "beyond the seed-to-seed spread"
    else:
        verdict = "within the seed-to-seed spread: no effect is shown"
    return f"Fixing **{label}** {change}; {verdict}."


def lambda_crossing(run: RunData) -> tuple[int, int] | None:
    """(physics epoch, step within it), both 1-based, at which lambda first exceeds 1."""
    steps = run.steps
    if "lambda" not in steps or not len(steps):
        return None
    physics = steps[steps["physics"].astype(bool)].reset_index(drop=True)
    above = physics.index[physics["lambda"].astype(float) > LAMBDA_MARK]
    if not len(above):
        return None
    first = physics.loc[above[0]]
    within = int((physics["epoch"] == first["epoch"]).to_numpy()[: above[0] + 1].sum())
    return int(first["epoch"]) - run.config.warmup_epochs + 1, within


def replica_shape(runs: list[RunData], control: list[RunData]) -> tuple[Table, list[str]]:
    """Per epoch (mean over seeds): the replica's val PPL, its ratio to the warmup-end
    PPL, lambda; the control's ratio beside it. And sentences on the two marks of shape."""
    if not runs:
        return Table(pd.DataFrame()), []
    config = runs[0].config
    start = config.warmup_epochs
    tolerance = config.criteria.ppl_tolerance

    def ratios(group: list[RunData]) -> pd.DataFrame:
        curves = pd.DataFrame({r.config.train.seed: r.epochs.set_index("epoch")["val_ppl"]
                               for r in group if len(r.epochs) > start - 1})
        return curves / curves.loc[start - 1] if start > 0 and len(curves) else curves

    replica = pd.DataFrame({r.config.train.seed: r.epochs.set_index("epoch")["val_ppl"]
                            for r in runs})
    lambdas = pd.DataFrame({r.config.train.seed: r.epochs.set_index("epoch")["lambda"]
                            for r in runs if "lambda" in r.epochs})
    mine, theirs = ratios(runs), ratios(control)
    table = pd.DataFrame({
        "Epoch": replica.index.astype(int) + 1,
        "Phase": [config.phase(e) for e in replica.index],
        "Replica val PPL (mean)": replica.mean(axis=1).to_numpy(),
        "Replica / warmup end": mine.mean(axis=1).reindex(replica.index).to_numpy(),
        "Control / warmup end": (theirs.mean(axis=1).reindex(replica.index).to_numpy()
                                 if len(theirs) else None),
        "Replica lambda (mean)": lambdas.mean(axis=1).reindex(replica.index).to_numpy()})

    physics = mine.loc[mine.index >= start]
    sentences = []
    if len(physics):
        worst = float((physics - 1).abs().max().max())
        plateau = worst <= tolerance
        sentences.append(
            f"Plateau: over the physics epochs the replica's validation perplexity stays within "
            f"{worst:.1%} of its warmup-end value (largest deviation over {physics.shape[1]} "
            f"seeds; the original's shape is met within {tolerance:.0%}: "
            f"{'yes' if plateau else 'no'}).")
    crossings = [lambda_crossing(r) for r in runs]
    first_epoch = [c for c in crossings if c is not None and c[0] == 1]
    steps = runs[0].env.get("train_batches", "?")
    detail = ", ".join("never" if c is None else f"physics epoch {c[0]} step {c[1]}"
                       for c in crossings)
    sentences.append(
        f"Lambda: it passes {LAMBDA_MARK:g} within the first physics epoch in "
        f"{len(first_epoch)} of {len(runs)} seeds ({detail}; {steps} steps per epoch), as the "
        f"original's did: {'yes' if len(first_epoch) == len(runs) else 'no'}.")
    return Table(table, PPL_COLUMNS), sentences


def koopman_table(runs: list[RunData]) -> pd.DataFrame:
    """Per layer, at the end of training (mean over seeds): K's spectral radius and the
    last epoch's consistency (and K = I's, its baseline) and reconstruction errors."""
    last = [r.epochs.iloc[-1] for r in runs if r.finished]
    if not last or "koopman_spectral_radius" not in last[0]:
        return pd.DataFrame()
    layers = range(len(last[0]["koopman_spectral_radius"]))

    def mean(key: str, layer: int) -> float:
        values = [row[key][layer] for row in last if row.get(key) is not None]
        return sum(values) / len(values) if values else float("nan")

    return pd.DataFrame({
        "Layer": [layer + 1 for layer in layers],
        "Spectral radius of K (mean)": [mean("koopman_spectral_radius", i) for i in layers],
        "Spectral radius (max over seeds)": [max(row["koopman_spectral_radius"][i]
                                                 for row in last) for i in layers],
        "Consistency (last epoch)": [mean("koopman_consistency_per_layer", i) for i in layers],
        "Consistency of K = I": [mean("koopman_identity_per_layer", i) for i in layers],
        "Reconstruction (last epoch)": [mean("koopman_reconstruction_per_layer", i)
                                        for i in layers]})

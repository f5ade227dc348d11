"""Figures of a study (physlm.study_report): its variants' validation curves, and each
variant's early-stopped perplexity against the target's, seed by seed."""

from __future__ import annotations

import pandas as pd

from physlm import plots
from physlm.runs import RunData


def curves_figure(runs: dict[str, list[RunData]]) -> plots.Figure:
    """Validation perplexity per epoch per variant: the mean over seeds with a min-max band."""
    figure, ((ax,),) = plots.new_figure("Validation perplexity per epoch (mean, min-max band)",
                                        ncols=1)
    for variant, seeds in runs.items():
        curves = pd.DataFrame({run.config.train.seed: run.epochs.set_index("epoch")["val_ppl"]
                               for run in seeds if len(run.epochs)})
        if curves.empty:
            continue
        x = curves.index.astype(int) + 1
        line, = ax.plot(x, curves.mean(axis=1), "o-", label=variant)
        ax.fill_between(x, curves.min(axis=1), curves.max(axis=1), alpha=0.15,
                        color=line.get_color())
    ax.set_yscale("log")
    plots.set_labels(ax, "", "epoch", "validation perplexity")
    return figure


def target_figure(frame: pd.DataFrame, target: str, tolerance: float) -> plots.Figure:
    """Each variant's early-stopped val PPL (`frame`'s "best", one dot a seed, a bar at the
    mean), best first, against the target variant's mean: the band up to `tolerance` above
    it is where a variant has reached the target."""
    means = frame.groupby("variant", sort=False)["best"].mean().sort_values(ascending=False)
    figure, ((ax,),) = plots.new_figure("Early-stopped validation perplexity against the "
                                        "target (a dot a seed, a bar the mean)", ncols=1)
    figure.set_size_inches(8.0, max(4.2, 1.5 + 0.3 * len(means)))   # a row a variant
    goal = means[target]
    ax.axvspan(goal, goal * (1 + tolerance), color="tab:green", alpha=0.15,
               label=f"within {tolerance:.0%} of {target}")
    for row, (variant, mean) in enumerate(means.items()):
        seeds = frame.loc[frame["variant"] == variant, "best"]
        ax.plot(seeds, [row] * len(seeds), "o", color="tab:blue", alpha=0.6)
        ax.plot([mean, mean], [row - 0.3, row + 0.3], color="black")
    ax.set_yticks(range(len(means)), list(means.index))
    ax.legend(loc="lower right")
    plots.set_labels(ax, "", "early-stopped validation perplexity", "")
    return figure

"""Statistics over seeds: a study's runs as numbers, and paired differences.

For variant v and seed s, d_s = PPL_v,s - PPL_control,s (validation perplexity at the
final epoch, and at each run's best epoch: chosen on its held-out split when it has one,
physlm.rundata). Over n seeds the mean difference gets a
paired-t 95% interval, mean +- t_{0.975, n-1} sd / sqrt(n). A difference "exceeds the seed
spread" when its interval excludes 0.
"""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats

from physlm.runs import RunData


def run_numbers(run: RunData) -> dict[str, float]:
    epochs = run.epochs
    best, best_epoch = run.best_epoch()
    known = epochs.get("val_ppl_known", pd.Series(math.nan, index=epochs.index)).astype(float)
    chosen = run.best_record()
    return {"final": float(epochs["val_ppl"].iloc[-1]), "best": best, "best_epoch": best_epoch,
            "final_known": float(known.iloc[-1]),
            "best_known": float(known.loc[chosen.name]),
            "heldout": float(chosen.get("heldout_ppl", math.nan)),
            "selected_on": run.selected_on,
            "parameters": run.env.get("parameters", {}).get("total", math.nan),
            "tokens_per_s": float(epochs["tokens_per_s"].mean()),
            "finished": run.finished}


def numbers(runs: dict[str, list[RunData]]) -> pd.DataFrame:
    """One row per finished run: variant, seed, final and best val PPL (over all targets, and
    over the non-<unk> ones: NaN for runs trained before they were logged), best epoch, the
    split it was chosen on and the held-out PPL there (NaN without held-out lines), size,
    speed (an unfinished run is left out: its last epoch is not its final one)."""
    return pd.DataFrame([{"variant": variant, "seed": run.config.train.seed, **run_numbers(run)}
                         for variant, seeds in runs.items() for run in seeds if run.finished],
                        columns=["variant", "seed", "final", "best", "best_epoch", "final_known",
                                 "best_known", "selected_on", "heldout", "parameters",
                                 "tokens_per_s", "finished"])


def paired(frame: pd.DataFrame, variant: str, metric: str,
           against: str) -> dict[str, float] | None:
    """Variant minus `against` (the control, a row above), seed by seed, with its interval;
    None without two common seeds."""
    wide = frame.pivot(index="seed", columns="variant", values=metric)
    if variant not in wide or against not in wide:
        return None
    d = (wide[variant] - wide[against]).dropna().to_numpy()
    n = len(d)
    if n < 2:
        return None
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    result = {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half,
              "control": float(wide[against].loc[wide[variant].dropna().index].mean())}
    result["exceeds"] = result["low"] > 0 or result["high"] < 0
    return result

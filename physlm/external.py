"""Results files from benchmarks/ that a study's report cites beside its own runs:

- `external`: a reference trained by other code on the same tokens (benchmarks/external_wlm.py:
  the public word_language_model script), against a variant's early-stopped val PPL;
- `position_loss`: benchmarks/position_loss.py, the validation loss by tokens of context and
  each BK layer's e-fold memory, for trained runs: how much context each model uses;
- `context`: the context benchmark (benchmarks/context.py), one training step of each whole
  model at N from 128 to 16,384 with B * N fixed, so that O(N) reads as a flat per-token
  time: ratio = (ms per token at the longest N) / (ms per token at the shortest).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from physlm.criteria import BETTER, MET, NOT_MET, ppl_status
from physlm.runs import RunData
from physlm.study import StudyOptions
from physlm.text import fmt, portable
from physlm.variants import label

# A model "uses" the shortest band of context whose loss is within this many nats of its
# lowest: longer context gains it less.
USED_WITHIN = 0.01


def read_results(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def external_sentences(options: StudyOptions, frame: pd.DataFrame,
                       runs: dict[str, list[RunData]]) -> list[str]:
    """Each variant of `options.external` against its external reference's best validation
    PPL (a results file of benchmarks/external_wlm.py): "within" the variant's ppl_tolerance
    (physlm.criteria's band around the control), else above or below it."""
    sentences = []
    for variant, path in options.external.items():
        best = frame.loc[frame["variant"] == variant, "best"]
        if best.empty:
            continue
        reference = read_results(path)
        change = best.mean() / reference["best_val_ppl"] - 1
        tolerance = runs[variant][0].config.criteria.ppl_tolerance
        verdict = {MET: f"within {tolerance:.0%} of it", BETTER: "below it",
                   NOT_MET: f"more than {tolerance:.0%} above it"}[
            ppl_status(1 + change, tolerance, control_overfits=False)]
        tokens = runs[variant][0].env.get("data_tokens", {}).get("train")
        sentences.append(
            f"{label(variant)}, early-stopped val PPL {fmt(best.mean(), 'ppl')} +- "
            f"{fmt(best.std(), 'ppl')} over {len(best)} seeds ({fmt(tokens, 'count')} training "
            f"tokens), is {change:+.1%} against an external reference, {verdict}: "
            f"`{reference['command']}` (`{portable(path)}`), {len(reference['epochs'])} epochs "
            f"on {reference['tokens']['train']:,} training tokens, vocabulary "
            f"{reference['tokens']['vocab']:,}, best val PPL "
            f"{fmt(reference['best_val_ppl'], 'ppl')} (its epoch chosen on validation).")
    return sentences


def context_table(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """The context benchmark's per-token time (ms, median of its rounds) by N for each model
    that ran, a last row with the longest N's over the shortest's; and the file's settings
    and machine, for the sentence that says what was timed."""
    results = read_results(path)
    models = list(results["settings"]["models"])
    rows = [{"N": f"{row['n']:,}", "Batch": row["batch"],
             **{model: _round(row["models"][model].get("ms_per_token")) for model in models
                if model in row["models"]}} for row in results["rows"]]
    ratios = results["time_per_token_longest_over_shortest"]
    rows.append({"N": "longest / shortest", "Batch": "",
                 **{m: _round(ratios.get(m)) for m in models}})
    return pd.DataFrame(rows), results


def position_table(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Per run of a benchmarks/position_loss.py results file: its mean validation loss over
    each band of context lengths, and the longest and median e-fold memory of its BK layers'
    potentials (tokens; n/a for a model without them); the context it uses (the shortest
    band within USED_WITHIN nats of its lowest loss) and the loss that context gains it over
    one token; and the results, for their settings."""
    results = read_results(path)
    rows = []
    for run in results:
        memories = [m for layer in run["efold_memory_tokens"].values() for m in layer]
        bands = run["mean_loss_by_context"]
        lowest = min(bands.values())
        rows.append({"Run": run["name"], "N": run["n"],
                     **{f"Loss, {band} tokens": _round(loss) for band, loss in bands.items()},
                     "Context used, tokens": next(band for band, loss in bands.items()
                                                  if loss <= lowest + USED_WITHIN),
                     "Gain from context": _round(bands[next(iter(bands))] - lowest),
                     "Memory, longest": max(memories) if memories else None,
                     "Memory, median": float(pd.Series(memories).median()) if memories else None})
    losses = list(dict.fromkeys(key for row in rows for key in row if key.startswith("Loss")))
    columns = ["Run", "N", *losses, "Context used, tokens", "Gain from context",
               "Memory, longest", "Memory, median"]
    return pd.DataFrame(rows, columns=columns), results


def position_gaps(table: pd.DataFrame, target: str) -> pd.DataFrame | None:
    """Each run's loss over each band of position_table minus that of the `target` variant's
    run of the same seed (runs are named <variant>_s<seed>), in nats: where, by tokens of
    context, a model falls short of the target, seed by seed; None when no run has its
    target's run in the table."""
    losses = [column for column in table.columns if column.startswith("Loss")]
    runs = table.set_index("Run")[losses]
    pairs = [(run, f"{target}_s{run.rpartition('_s')[2]}") for run in runs.index
             if not run.startswith(f"{target}_s")]
    pairs = [(run, reference) for run, reference in pairs if reference in runs.index]
    if not pairs:
        return None
    return pd.DataFrame([{"Run": run, "Against": reference,
                          **(runs.loc[run] - runs.loc[reference]).round(3).to_dict()}
                         for run, reference in pairs])


def _round(value: float | None) -> float | None:
    """Three decimals: a benchmark's medians vary in the second."""
    return None if value is None else round(value, 3)

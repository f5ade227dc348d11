"""Judging a run from its saved metrics and its control's: every criterion can fail.

- Energy: the drift is judged over the steady state, the physics epochs after the first
  `settle_epochs` (the transient after the switch is shown, not judged), and only where
  the constraint is not degenerate: in every layer the spread of H over the batch, s_l,
  averaged over the steady state, must exceed `Config.spread_floor`. Constant heads meet
  any drift target; they get "degenerate", never "met".
- Perplexity against the control, two-sided: |PPL / PPL_control - 1| <= ppl_tolerance,
  at the final epoch and at each run's best epoch, and only against a finished,
  like-for-like control ("not evaluated" otherwise). A run better than the control by
  more than the tolerance is "better", or "flagged" when the control overfits (its val
  PPL rises after its best epoch): then the gain may be the control's decline.
- Activity: a met drift whose energy gradient is under 1% of the LM gradient in the steady
  state (lambda at its floor) was met by the heads alone; the report says so. In the
  embedding_pairs mode affine heads, V(e) = w.e + b and T(p) = -w.p, conserve E exactly for
  any network, so a relative drift target can be met without touching the network.
- Learning: the final val loss is below the untrained model's (metrics/initial.json).
- The count floor: the val PPL at the best epoch (chosen on the held-out split when the run
  has one, physlm.rundata) is below that of the best count model (physlm.ngram: the lowest
  of unigram, Kneser-Ney bigram and trigram, counted from the run's own train tokens and
  scored on its validation tokens, metrics/references.json); "not evaluated" for a run
  whose record predates the references.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from physlm.runs import RunData
from physlm.sections import CONTROL_MAY_DIFFER
from physlm.text import fmt

MET, NOT_MET, NOT_EVALUATED = "met", "not met", "not evaluated"
DEGENERATE, BETTER, FLAGGED = "degenerate", "better", "flagged: the control overfits"
INACTIVE = "met by the heads alone (penalty inactive)"
STATUS = {True: MET, False: NOT_MET, None: NOT_EVALUATED}
# The penalty is inactive when its gradient is under 1% of the LM's in the steady state:
# then "drift <= target" was met by the heads alone and says nothing about the network.
INACTIVE_SHARE = 0.01


def steady_state(run: RunData) -> pd.DataFrame:
    """The physics epochs after the settle window that computed the energy."""
    physics = run.phase("physics")
    physics = physics.iloc[run.config.criteria.settle_epochs:]
    return physics[physics["energy_steps"] > 0] if "energy_steps" in physics else physics


def drift_stats(rows: pd.DataFrame) -> tuple[float | None, float | None]:
    """Mean drift over the energy steps of epochs `rows` (epoch means, weighted) and the max."""
    if "energy_steps" not in rows or rows["energy_steps"].sum() == 0:
        return None, None
    rows = rows[rows["energy_steps"] > 0]
    weights = rows["energy_steps"]
    return (float((rows["drift"] * weights).sum() / weights.sum()),
            float(rows["drift_max"].max()))


def layer_means(rows: pd.DataFrame, key: str) -> list[float] | None:
    """A per-layer statistic averaged over epochs `rows`, weighted by their energy steps."""
    if key not in rows or rows.empty:
        return None
    values = np.array(rows[key].tolist(), dtype=float)
    weights = rows["energy_steps"].to_numpy(dtype=float)
    return list(weights @ values / weights.sum())


def heads_table(run: RunData) -> pd.DataFrame:
    """Per layer over the steady state: the spread of H, of each head across tokens, the
    T/V split, and the final multiplier."""
    rows = steady_state(run)
    columns = {"Spread of H (std over batch)": "energy_spread_per_layer",
               "V spread (std over tokens)": "potential_spread_per_layer",
               "T spread (std over tokens)": "kinetic_spread_per_layer",
               "T (batch mean)": "kinetic", "V (batch mean)": "potential"}
    data = {title: layer_means(rows, key) for title, key in columns.items()}
    if data["Spread of H (std over batch)"] is None:
        return pd.DataFrame()
    layers = len(data["Spread of H (std over batch)"])
    final = run.epochs["lambda_per_layer"].iloc[-1]
    return pd.DataFrame({"Layer": range(1, layers + 1), **data, "Final lambda": final})


def control_problems(run: RunData, control: RunData) -> list[str]:
    """Why the control is not a comparable baseline (empty: it is)."""
    problems = [f"{key}: run {mine!r}, control {theirs!r}" for key, (mine, theirs)
                in run.config.differences(control.config, allowed=CONTROL_MAY_DIFFER).items()]
    if run.env.get("data_checksums") != control.env.get("data_checksums"):
        problems.append("data checksums differ")
    if control.config.trains_with_physics:
        problems.append("the control run trains with the physics penalty")
    if not control.finished:
        problems.append(f"the control is unfinished ({len(control.epochs)} of "
                        f"{control.config.train.epochs} epochs)")
    if len(control.epochs) != len(run.epochs):
        problems.append(f"epochs finished: run {len(run.epochs)}, control {len(control.epochs)}")
    return problems


def ppl_status(ratio: float | None, tolerance: float, control_overfits: bool) -> str:
    if ratio is None:
        return NOT_EVALUATED
    if abs(ratio - 1) <= tolerance:
        return MET
    return NOT_MET if ratio > 1 else FLAGGED if control_overfits else BETTER


# The count models of physlm.ngram, by their key in metrics/references.json.
COUNT_MODELS = {"unigram": "add-one unigram", "kn_bigram": "Kneser-Ney bigram",
                "kn_trigram": "Kneser-Ney trigram"}


@dataclass
class CountFloor:
    """The best count model on a split: its name and perplexities (all, non-<unk> targets)."""

    name: str
    ppl: float
    ppl_known: float
    targets: int        # targets it was scored on


def count_floor(references: dict[str, Any], split: str = "valid") -> CountFloor | None:
    """The count model with the lowest all-target PPL on `split`; None without references."""
    if split not in references:
        return None
    ppl = references[split]["ppl"]
    best = min(ppl, key=lambda model: ppl[model]["all"])
    return CountFloor(COUNT_MODELS.get(best, best), ppl[best]["all"], ppl[best]["known"],
                 references[split]["targets"])


def count_rows(references: dict[str, Any], split: str = "valid"
               ) -> list[tuple[str, float, float]]:
    """(count model, PPL over all targets, over the non-<unk> ones) on `split`."""
    return [(COUNT_MODELS.get(model, model), ppl["all"], ppl["known"])
            for model, ppl in references[split]["ppl"].items()]


def floor_sentence(label: str, floor: CountFloor, best: float, final: float,
                   best_at: str) -> str:
    """Whether `label`'s val PPL at its best epoch (`best_at` says which) clears the count
    floor, with its final one, as a sentence."""
    verdict = "clears" if best < floor.ppl else "does not clear"
    return (f"{label} {verdict} the {floor.name}: its val PPL {best_at}, {fmt(best, 'ppl')}, "
            f"is {fmt(best / floor.ppl)} times the count model's {fmt(floor.ppl, 'ppl')}; at "
            f"the end {fmt(final, 'ppl')}, {fmt(final / floor.ppl)} times.")


def best_value(run: RunData | None, key: str) -> float | None:
    """Field `key` of the run's best epoch (RunData.best_record); None where it has none."""
    if run is None or run.epochs.empty or key not in run.epochs:
        return None
    value = run.best_record()[key]
    return None if pd.isna(value) else float(value)


def final_value(run: RunData | None, key: str) -> float | None:
    has = run is not None and not run.epochs.empty and key in run.epochs
    return float(run.epochs[key].iloc[-1]) if has else None


@dataclass
class Summary:
    """The headline numbers of a run against its control; None where there is nothing to
    measure (no physics step, no control, no finished epoch)."""

    epochs_done: int
    epochs_planned: int
    # Energy: the drift over all physics steps, in the steady state, against the target.
    target: float
    drift_mean: float | None
    drift_max: float | None
    drift_steps: int                  # physics steps that computed the energy
    steady_drift: float | None
    settle: int                       # physics epochs left out of the steady state
    floor: float                      # the spread of H at or below which a layer degenerates
    spread_min: float | None
    degenerate: list[int] | None      # 1-based layers whose spread is at most the floor
    drift_status: str
    within_target: float | None       # share of the physics steps at or below the target
    # Gradients of the physics steps: the LM's clip factor, the norms, the energy's share.
    clip_mode: str
    clip_mean: float | None
    clip_min: float | None
    lm_grad: float | None
    energy_grad: float | None
    energy_share: float | None        # energy / LM gradient norm in the steady state
    inactive: bool                    # that share under INACTIVE_SHARE
    # Perplexity against the control.
    problems: list[str]               # why the control is no baseline (empty: it is one)
    comparable: bool
    final_val_loss: float | None
    control_val_loss: float | None
    final_val_ppl: float | None
    control_val_ppl: float | None
    ppl_ratio: float | None
    best_val_ppl: float | None
    best_epoch: int | None
    control_best_val_ppl: float | None
    control_best_epoch: int | None
    best_ratio: float | None
    control_overfits: bool
    final_status: str
    best_status: str
    tolerance: float
    initial_val_loss: float | None    # the untrained model's
    learned: bool | None
    # The best epoch's split, and the count floor (None: the record predates references).
    selected_on: str                  # "held-out" or "validation"
    count_floor: CountFloor | None
    final_val_ppl_known: float | None  # over the targets that are not <unk>
    best_val_ppl_known: float | None
    count_ratio: float | None         # the best epoch's val PPL over the count floor's
    count_status: str
    # Robustness.
    skipped: int
    max_consecutive_skipped: int
    skipped_steps: list[int]
    grad_norm: list[float] | None     # mean, max over the applied steps
    nonfinite_val: int
    no_energy: int | None             # physics steps without an energy term


def summarize(run: RunData, control: RunData | None) -> Summary:
    """The headline numbers of a run against its control (None: no control run)."""
    c = run.config
    target, floor, tolerance = (c.physics.energy_target_drift, c.spread_floor,
                                c.criteria.ppl_tolerance)
    steady = steady_state(run)
    drift_mean, drift_max = drift_stats(run.phase("physics"))
    steady_drift, _ = drift_stats(steady)
    spreads = layer_means(steady, "energy_spread_per_layer")
    degenerate = None if spreads is None else [i + 1 for i, s in enumerate(spreads) if s <= floor]
    energy = run.energy_steps
    energy = energy[energy["epoch"].isin(run.epochs["epoch"])]
    steps, skipped = run.steps, run.steps["skipped"].astype(bool)
    physics = steps["physics"].astype(bool) & ~skipped
    problems = control_problems(run, control) if control else ["no control run"]
    comparable = not problems and not run.epochs.empty
    ppl, control_ppl = final_value(run, "val_ppl"), final_value(control, "val_ppl")
    best, best_epoch = run.best_epoch() if len(run.epochs) else (None, None)
    control_best, control_best_epoch = control.best_epoch() if control and len(control.epochs) \
        else (None, None)
    overfits = bool(control_best is not None and control_ppl > control_best
                    and control_best_epoch < len(control.epochs))
    final_ratio = ppl / control_ppl if comparable else None
    best_ratio = best / control_best if comparable else None
    clip = energy["clip_factor"] if "clip_factor" in energy else pd.Series(dtype=float)
    settled = energy[energy["epoch"].isin(steady["epoch"])]
    share = (float(settled["energy_grad_norm"].mean() / settled["lm_grad_norm"].mean())
             if len(settled) and "energy_grad_norm" in settled else None)
    initial = run.initial.get("val_loss")
    final_loss = final_value(run, "val_loss")
    counted = count_floor(run.references)
    count_ratio = best / counted.ppl if counted and best is not None else None
    return Summary(
        epochs_done=len(run.epochs), epochs_planned=c.train.epochs, target=target,
        drift_mean=drift_mean, drift_max=drift_max, drift_steps=len(energy),
        steady_drift=steady_drift, settle=c.criteria.settle_epochs, floor=floor,
        spread_min=None if spreads is None else min(spreads), degenerate=degenerate,
        drift_status=STATUS[None] if steady_drift is None else DEGENERATE if degenerate
        else NOT_MET if steady_drift > target else INACTIVE if share is not None
        and share < INACTIVE_SHARE else MET,
        within_target=float((energy["drift"] <= target).mean()) if len(energy) else None,
        clip_mean=float(clip.mean()) if len(clip) else None,
        clip_min=float(clip.min()) if len(clip) else None,
        lm_grad=float(energy["lm_grad_norm"].mean()) if len(clip) else None,
        energy_grad=float(energy["energy_grad_norm"].mean()) if len(clip) else None,
        clip_mode=c.physics.clip_mode, problems=problems, comparable=comparable,
        energy_share=share, inactive=share is not None and share < INACTIVE_SHARE,
        final_val_loss=final_loss, control_val_loss=final_value(control, "val_loss"),
        final_val_ppl=ppl, control_val_ppl=control_ppl, ppl_ratio=final_ratio,
        best_val_ppl=best, best_epoch=best_epoch, control_best_val_ppl=control_best,
        control_best_epoch=control_best_epoch, best_ratio=best_ratio, control_overfits=overfits,
        final_status=ppl_status(final_ratio, tolerance, overfits),
        best_status=ppl_status(best_ratio, tolerance, overfits), tolerance=tolerance,
        initial_val_loss=initial, learned=None if initial is None or final_loss is None
        else final_loss < initial, selected_on=run.selected_on, count_floor=counted,
        final_val_ppl_known=final_value(run, "val_ppl_known"),
        best_val_ppl_known=best_value(run, "val_ppl_known"), count_ratio=count_ratio,
        count_status=STATUS[None if count_ratio is None else count_ratio < 1],
        skipped=int(skipped.sum()), max_consecutive_skipped=max_consecutive(skipped),
        skipped_steps=steps.loc[skipped, "step"].astype(int).tolist(),
        grad_norm=[steps.loc[~skipped, "grad_norm"].agg(f) for f in ("mean", "max")]
        if "grad_norm" in steps and (~skipped).any() else None,
        nonfinite_val=int((~np.isfinite(run.epochs["val_loss"].astype(float))).sum()),
        no_energy=int((~steps.loc[physics, "energy_computed"].astype(bool)).sum())
        if "energy_computed" in steps else None)


def max_consecutive(flags: pd.Series) -> int:
    """The longest run of True values."""
    flags = flags.astype(bool).reset_index(drop=True)
    return int(flags.groupby((~flags).cumsum()).sum().max()) if len(flags) else 0


def criteria_table(run: RunData, s: Summary) -> pd.DataFrame:
    """Each success criterion with its value, threshold and status, from the data (the
    energy's only for a run that trains with physics)."""
    steady = f"after {s.settle} settle epoch{'s' * (s.settle != 1)}"
    band = f"within ±{s.tolerance:.0%}"
    energy = [
        (f"Steady-state drift <= target ({steady})", s.steady_drift, s.target, s.drift_status),
        ("Energy constraint not degenerate (min spread of H)", s.spread_min,
         f"> {s.floor:g}", STATUS[None if s.degenerate is None else not s.degenerate])]
    rows = [
        ("Training finished all epochs", f"{s.epochs_done} / {s.epochs_planned}",
         f"{s.epochs_planned} epochs", STATUS[s.epochs_done >= s.epochs_planned]),
        ("No non-finite (skipped) steps", s.skipped, "0", STATUS[s.skipped == 0]),
        *(energy if run.config.trains_with_physics else []),
        ("Final val PPL vs the control", s.ppl_ratio, f"ratio {band}", s.final_status),
        ("Best val PPL vs the control's best", s.best_ratio, f"ratio {band}", s.best_status),
        ("Val loss below the untrained model's", s.final_val_loss,
         "< " + ("n/a" if s.initial_val_loss is None else f"{s.initial_val_loss:.4f}"),
         STATUS[s.learned]),
        ("Best-epoch val PPL below the best count model's", s.count_ratio, "ratio < 1",
         s.count_status)]
    return pd.DataFrame(rows, columns=["Criterion", "Value", "Threshold", "Status"])

"""Figures of a saved run, drawn from its metrics (used by physlm.report and the notebooks).

Each function takes a `physlm.runs.RunData` (and the control run where it
compares) and returns a matplotlib Figure. Figures are built without pyplot on
the Agg canvas, so nothing needs a display and no global figure state leaks; a
notebook shows a returned Figure as it would any other.

Per-step plots use the global step on the x axis, per-epoch plots the 1-based
epoch. The physics start is a dashed vertical line, the drift target a
dashed horizontal one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from physlm.runs import RunData

DPI = 110
LOG_RANGE = 100  # a positive series spanning more than this factor gets a log axis


def new_figure(title: str, ncols: int, nrows: int = 1) -> tuple[Figure, np.ndarray]:
    """A Figure on the Agg canvas and its (nrows, ncols) axes."""
    figure = Figure(figsize=(6.4 * ncols, 4.2 * nrows), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title, fontsize=13)
    return figure, figure.subplots(nrows, ncols, squeeze=False)


def smooth(values: pd.Series) -> pd.Series:
    """A centred rolling mean over about 1/50 of the series (at least 1 point)."""
    return values.rolling(max(1, len(values) // 50), center=True, min_periods=1).mean()


def _physics_start_step(run: RunData) -> float | None:
    physics = run.steps.loc[run.steps["physics"].astype(bool), "step"]
    return float(physics.min()) - 0.5 if len(physics) else None


def _mark_physics_start(ax: Axes, x: float | None) -> None:
    if x is not None:
        ax.axvline(x, color="gray", linestyle="--", linewidth=1, label="physics start")


def _epoch_axis(ax: Axes, run: RunData) -> None:
    """Span all planned epochs and mark the physics start between two epochs."""
    config = run.config
    ax.set_xlim(0.5, max(config.train.epochs, len(run.epochs), 1) + 0.5)
    _mark_physics_start(ax, config.warmup_epochs + 0.5 if config.trains_with_physics else None)


def _mark_target(ax: Axes, run: RunData) -> None:
    target = run.config.physics.energy_target_drift
    ax.axhline(target, color="tab:red", linestyle="--", linewidth=1, label=f"target {target:g}")


def _auto_log(ax: Axes, values: pd.Series) -> None:
    """A log axis for a positive series spanning more than LOG_RANGE (nulls, as in the records
    of epochs that computed no energy, are left out)."""
    values = pd.to_numeric(values, errors="coerce").astype(float)
    values = values[np.isfinite(values)]
    if len(values) and values.min() > 0 and values.max() / values.min() > LOG_RANGE:
        ax.set_yscale("log")


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="gray")


def set_labels(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs alike
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _epochs(run: RunData) -> pd.Series:
    return run.epochs["epoch"].astype(int) + 1


def drift_figure(run: RunData) -> Figure:
    """Energy drift per computed step and per physics epoch (mean and maximum)."""
    figure, ((per_step, per_epoch),) = new_figure(f"{run.name}: energy drift", ncols=2)
    steps = run.energy_steps
    if len(steps):
        per_step.plot(steps["step"], steps["drift"], ".", markersize=3, alpha=0.4,
                      color="tab:blue", label="step")
        per_step.plot(steps["step"], smooth(steps["drift"]), color="tab:blue", label="smoothed")
        _mark_target(per_step, run)
        _auto_log(per_step, steps["drift"])
    else:
        _empty(per_step, "no step computed the energy")
    _mark_physics_start(per_step, _physics_start_step(run))
    set_labels(per_step, "per step (mean over layers)", "step", "drift |E_b - E_a|")

    epochs = run.phase("physics")
    if "energy_steps" in epochs:
        epochs = epochs[epochs["energy_steps"] > 0]
    if len(epochs) and "drift" in epochs:    # a Koopman run has physics epochs, no energy
        x = epochs["epoch"].astype(int) + 1
        per_epoch.plot(x, epochs["drift"], "o-", label="epoch mean")
        per_epoch.plot(x, epochs["drift_max"], "v:", label="epoch max")
        _mark_target(per_epoch, run)
        _auto_log(per_epoch, pd.concat([epochs["drift"], epochs["drift_max"]]))
    else:
        _empty(per_epoch, "no physics epoch")
    _epoch_axis(per_epoch, run)
    set_labels(per_epoch, "per epoch", "epoch", "drift")
    return figure


def lambda_figure(run: RunData) -> Figure:
    """The multiplier per step (mean and each layer) and at each epoch end."""
    figure, ((per_step, per_epoch),) = new_figure(f"{run.name}: Lagrange multiplier lambda",
                                                  ncols=2)
    if "lambda" in run.steps and len(run.steps):
        steps = run.steps
        layers = np.array(steps["lambda_per_layer"].tolist())
        for layer in range(layers.shape[1]):
            per_step.plot(steps["step"], layers[:, layer], linewidth=0.8, alpha=0.7,
                          label=f"layer {layer + 1}")
        per_step.plot(steps["step"], steps["lambda"], color="black", linewidth=2, label="mean")
        epochs = run.epochs
        if len(epochs):
            per_layer = np.array(epochs["lambda_per_layer"].tolist())
            for layer in range(per_layer.shape[1]):
                per_epoch.plot(_epochs(run), per_layer[:, layer], "o-", linewidth=0.8,
                               alpha=0.7, label=f"layer {layer + 1}")
            per_epoch.plot(_epochs(run), epochs["lambda"], "s-", color="black", linewidth=2,
                           label="mean")
        else:
            _empty(per_epoch, "no finished epoch")
    else:
        _empty(per_step, "no multiplier logged")
        _empty(per_epoch, "no multiplier logged")
    _mark_physics_start(per_step, _physics_start_step(run))
    _epoch_axis(per_epoch, run)
    set_labels(per_step, "per step", "step", "lambda")
    set_labels(per_epoch, "at each epoch end", "epoch", "lambda")
    return figure


def loss_figure(run: RunData) -> Figure:
    """Total, LM and energy losses per step (smoothed) and per epoch (with validation); the
    energy's row only for a run that trains with physics."""
    energy = run.config.trains_with_physics
    figure, axes = new_figure(f"{run.name}: loss components", ncols=2, nrows=1 + energy)
    if energy:
        (lm_steps, energy_steps), (lm_epochs, energy_epochs) = axes
    else:
        ((lm_steps, lm_epochs),) = axes
    steps = run.steps[~run.steps["skipped"].astype(bool)]
    start = _physics_start_step(run)
    if len(steps):
        for key, label in (("loss", "total"), ("lm_loss", "LM")):
            lm_steps.plot(steps["step"], smooth(steps[key]), label=label)
    else:
        _empty(lm_steps, "no step logged")
    _mark_physics_start(lm_steps, start)
    set_labels(lm_steps, "per step (smoothed): total and LM", "step", "loss")
    if energy:
        if len(steps):
            energy_steps.plot(steps["step"], smooth(steps["energy_loss"]), color="tab:green",
                              label="energy (lambda-weighted)")
        _mark_physics_start(energy_steps, start)
        set_labels(energy_steps, "per step (smoothed): energy", "step", "energy loss")

    epochs = run.epochs
    if len(epochs):
        for key, label, style in (("train_loss", "train total", "o-"),
                                  ("train_lm_loss", "train LM", "s-"),
                                  ("val_loss", "validation", "^--")):
            lm_epochs.plot(_epochs(run), epochs[key], style, label=label)
    else:
        _empty(lm_epochs, "no finished epoch")
    _epoch_axis(lm_epochs, run)
    set_labels(lm_epochs, "per epoch", "epoch", "loss")
    physics = run.phase("physics")
    if energy and len(physics):
        x = physics["epoch"].astype(int) + 1
        energy_epochs.plot(x, physics["train_energy_loss"], "o-", color="tab:green",
                           label="energy (lambda-weighted)")
        if "train_energy_mse" in physics:
            energy_epochs.plot(x, physics["train_energy_mse"], "s:", color="tab:olive",
                               label="energy MSE (raw)")
            _auto_log(energy_epochs, pd.concat([physics["train_energy_loss"],
                                                physics["train_energy_mse"]]))
    if energy:
        _epoch_axis(energy_epochs, run)
        set_labels(energy_epochs, "per physics epoch: energy", "epoch", "energy loss")
    return figure


def perplexity_figure(run: RunData, control: RunData | None) -> Figure:
    """Validation perplexity per epoch (token-weighted and batch mean), run and control."""
    figure, ((ax,),) = new_figure(f"{run.name}: validation perplexity", ncols=1)
    for data, label, color in ((run, run.name, "tab:blue"), (control, "control", "tab:orange")):
        if data is None or data.epochs.empty:
            continue
        x = data.epochs["epoch"].astype(int) + 1
        ax.plot(x, data.epochs["val_ppl"], "o-", color=color, label=f"{label} (token-weighted)")
        ax.plot(x, data.epochs["val_ppl_batch_mean"], "x:", color=color,
                label=f"{label} (batch mean)")
    if run.epochs.empty:
        _empty(ax, "no finished epoch")
    _epoch_axis(ax, run)
    alone = control is None and run.config.trains_with_physics   # a baseline needs none
    set_labels(ax, "per epoch" + (" (no control run)" if alone else ""), "epoch", "perplexity")
    return figure


def time_figure(run: RunData, control: RunData | None) -> Figure:
    """Wall time per epoch (training + validation) and training throughput, run and control."""
    figure, ((times, speed),) = new_figure(f"{run.name}: time per epoch", ncols=2)
    runs = [(data, label, color) for data, label, color
            in ((run, run.name, "tab:blue"), (control, "control", "tab:orange"))
            if data is not None and not data.epochs.empty]
    width = 0.8 / max(len(runs), 1)
    for index, (data, label, color) in enumerate(runs):
        epoch = data.epochs["epoch"].astype(int) + 1
        x = epoch + (index - (len(runs) - 1) / 2) * width
        times.bar(x, data.epochs["train_time_s"], width, color=color, label=f"{label} train")
        times.bar(x, data.epochs["val_time_s"], width, bottom=data.epochs["train_time_s"],
                  color=color, alpha=0.4, hatch="//", label=f"{label} validation")
        speed.plot(epoch, data.epochs["tokens_per_s"], "o-", color=color, label=label)
    if not runs:
        _empty(times, "no finished epoch")
    for ax in (times, speed):
        _epoch_axis(ax, run)
    set_labels(times, "time per epoch", "epoch", "seconds")
    set_labels(speed, "training throughput", "epoch", "tokens / s")
    return figure


def gradient_figure(run: RunData) -> Figure:
    """Per step: the LM and energy gradient norms before clipping, and the clip factors."""
    figure, ((norms, factors),) = new_figure(f"{run.name}: gradient accounting", ncols=2)
    steps = run.steps
    if "lm_grad_norm" in steps and len(steps):
        norms.plot(steps["step"], steps["lm_grad_norm"], linewidth=0.8, label="LM")
        factors.plot(steps["step"], steps["clip_factor"], linewidth=0.8, label="LM")
        energy = steps[steps["energy_grad_norm"] > 0]
        if len(energy):  # none in a run without physics
            norms.plot(energy["step"], energy["energy_grad_norm"], ".", markersize=3,
                       color="tab:red", label="energy")
            factors.plot(energy["step"], energy["energy_clip_factor"], ".", markersize=3,
                         color="tab:red", label="energy")
        norms.axhline(run.config.train.grad_clip, linestyle="--", color="gray", label="clip")
        norms.set_yscale("log")
        factors.set_yscale("log")
    else:
        _empty(norms, "no gradient accounting logged")
        _empty(factors, "no gradient accounting logged")
    for ax in (norms, factors):
        _mark_physics_start(ax, _physics_start_step(run))
    set_labels(norms, "gradient norm before clipping", "step", "norm")
    set_labels(factors, f"clip factor applied ({run.config.physics.clip_mode})", "step", "factor")
    return figure


CAPTIONS = {  # every figure of the report, by file name (without .png)
    "energy_drift": "Energy drift per step and per epoch, with the target and the physics start",
    "lambda": "Lagrange multiplier lambda per step (mean and per layer) and per epoch",
    "losses": "Loss components per step (smoothed) and per epoch",
    "perplexity": "Validation perplexity per epoch, run and control",
    "time": "Time per epoch and training throughput",
    "gradients": "LM and energy gradient norms and the clip factors per step",
}


def make_figures(run: RunData, control: RunData | None) -> dict[str, Figure]:
    """The report's figures, by file name (without .png), in the order of CAPTIONS: the
    energy's and the multiplier's only for a run that trains with physics."""
    physics = run.config.trains_with_physics
    return {
        **({"energy_drift": drift_figure(run), "lambda": lambda_figure(run)} if physics else {}),
        "losses": loss_figure(run),
        "perplexity": perplexity_figure(run, control),
        "time": time_figure(run, control),
        "gradients": gradient_figure(run),
    }

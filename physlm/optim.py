"""Optimizers and learning-rate schedules, built from TrainConfig (issue 22, item 2).

    build_optimizer(config.train, params)                  -> torch.optim.Optimizer
    build_schedule(config.train, optimizer, steps_per_epoch) -> Schedule
    load_optimizer_state(optimizer, saved)                  (a checkpoint's, on resume)

Optimizers (`optimizer`):

    adamw       torch.optim.AdamW, fused; weight_decay is its decoupled decay.
    sgd         torch.optim.SGD, fused; `momentum` (heavy ball, dampening 0) and `nesterov`;
                weight_decay is the L2 term (wd / 2) |x|^2 added to the loss.
    symplectic  ConformalSymplectic below: relativistic gradient descent; `momentum` is its
                conformal factor, weight_decay the L2 term as for sgd.

Every one of them skips a step on the device, without a host sync: the trainer sets
`optimizer.found_inf` (a 0-d float tensor, 1.0 when the loss or the gradient norm is not
finite) before `step()`, as AMP's grad scaler does for the fused kernels; a skipped step
leaves the parameters and the optimizer state as they were. The fused SGD kernel reads
`found_inf` itself; its momentum buffers are created (zero) here, because on a first step
that is skipped the kernel would leave them uninitialised (torch.empty_like). With
dampening 0, a zero buffer gives the same first step as none: buf = mu * 0 + g = g.
`complete_state` creates them again for parameters that a loaded state lacked.

Schedules (`lr_schedule`), all `torch.optim.lr_scheduler`, and a linear warmup before any
of them: lr * (step + 1) / W over the first W = `lr_warmup_steps` steps (LinearLR).

    constant    lr after the warmup.
    cosine      lr * (1 + cos(pi * s / S)) / 2 after the warmup, s = step - W, S = the
                steps left in the run (epochs * steps_per_epoch - W): it reaches 0 at the end.
    plateau     lr / 4 whenever an epoch's held-out loss is not below the best so far for
                more than `lr_plateau_patience` epochs (ReduceLROnPlateau, threshold 0: the
                rule of pytorch/examples word_language_model at patience 0).

The trainer calls `schedule.after_step()` after every `optimizer.step()` (skipped steps
included: the schedule counts batches) and `schedule.after_epoch(loss)` after every
epoch's held-out evaluation; it checkpoints `schedule.state_dict()` beside the optimizer's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    ReduceLROnPlateau,
    SequentialLR,
)

from physlm.config import TrainConfig
from physlm.values import ConfigError

PLATEAU_FACTOR = 0.25   # word_language_model: lr /= 4.0
# The optimizers as the reports name them.
OPTIMIZER_NAMES = {"adamw": "AdamW", "sgd": "SGD",
                   "symplectic": "conformal symplectic (relativistic gradient descent)"}


class ConformalSymplectic(torch.optim.Optimizer):
    r"""Relativistic gradient descent (RGD), a conformal symplectic integrator.

    França, Sulam, Robinson and Vidal, "Conformal symplectic and relativistic optimization",
    NeurIPS 2020 (arXiv:1903.04100). The parameters x of one group are a particle with
    momentum p under the damped relativistic Hamiltonian dynamics

        H(x, p) = c sqrt(|p|^2 + m^2 c^2) + f(x),   dx/dt = dH/dp,   dp/dt = -grad f - gamma p.

    The friction's exact flow is the conformal scaling p <- e^{-gamma t} p, which scales the
    symplectic form by the same factor; composed with a leapfrog step of the conservative
    part it gives a conformal symplectic map. With mu = e^{-gamma h} (`momentum`), step
    eps (`lr`) and delta = 1 / (m c)^2 in step units (`delta`), one step reads

        x_{k+1/2} = x_k + sqrt(mu) p_k / sqrt(1 + mu delta |p_k|^2)
        p_{k+1/2} = sqrt(mu) p_k - eps grad f(x_{k+1/2})
        x_{k+1}   = x_{k+1/2} + p_{k+1/2} / sqrt(1 + delta |p_{k+1/2}|^2)
        p_{k+1}   = sqrt(mu) p_{k+1/2}

    (the paper's RGD with alpha = 1, as in its authors' reference code). The gradient is
    taken at the half step, so the model holds y_k = x_{k+1/2} (as PyTorch's Nesterov SGD
    holds its look-ahead point), and with u = p_{k+1/2} the two half drifts merge:

        u       <- mu u - eps grad f(y)
        y       <- y + [1 / sqrt(1 + delta |u|^2) + mu / sqrt(1 + mu^2 delta |u|^2)] u

    |u| is the norm over the whole group. Each half drift is shorter than 1 / sqrt(delta)
    (the speed of light), so a step moves y by less than 2 / sqrt(delta) whatever the
    gradient. delta = 0 is the classical limit, H = |p|^2 / 2 + f: heavy-ball momentum,
    torch SGD with momentum mu and lr (1 + mu) eps. Weight decay adds (wd / 2) |x|^2 to f.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9,
                 delta: float = 1.0, weight_decay: float = 0.0) -> None:
        if not (lr > 0 and 0 <= momentum < 1 and delta >= 0 and weight_decay >= 0):
            raise ValueError(f"need lr > 0, 0 <= momentum < 1, delta >= 0, weight_decay >= 0; "
                             f"got {lr}, {momentum}, {delta}, {weight_decay}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "delta": delta,
                                  "weight_decay": weight_decay})
        complete_state(self)   # the buffers now, so a skipped first step changes nothing

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (torch.optim.Optimizer.step)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        skip = None if found_inf is None else found_inf > 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            mu, eps, delta = group["momentum"], group["lr"], group["delta"]
            kicked = []
            for p in params:
                grad = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] \
                    else p.grad
                kicked.append(self.state[p]["momentum"].mul(mu).add_(grad, alpha=-eps))
            norm2 = torch.stack([u.square().sum() for u in kicked]).sum()
            drift = (1 + delta * norm2).rsqrt() + mu * (1 + mu * mu * delta * norm2).rsqrt()
            for p, u in zip(params, kicked, strict=True):
                moved = p + drift * u
                momentum = self.state[p]["momentum"]
                if skip is None:
                    p.copy_(moved)
                    momentum.copy_(u)
                else:
                    p.copy_(torch.where(skip, p, moved))
                    momentum.copy_(torch.where(skip, momentum, u))
        return loss


def build_optimizer(train: TrainConfig, params: Iterable[torch.nn.Parameter]
                    ) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` over `params`, ready for `found_inf` skipping."""
    params = list(params)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay,
                                 fused=True)
    if train.optimizer == "symplectic":
        return ConformalSymplectic(params, lr=train.lr, momentum=train.momentum,
                                   delta=train.symplectic_delta, weight_decay=train.weight_decay)
    optimizer = torch.optim.SGD(params, lr=train.lr, momentum=train.momentum,
                                nesterov=train.nesterov, weight_decay=train.weight_decay,
                                fused=True)
    complete_state(optimizer)
    return optimizer


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load `saved` into `optimizer`, whose one group may end with parameters the saved one
    had not (a run forked from a warmup where lambda was no optimizer parameter, SPEC flaw
    4): they start without state (zero momentum), as they had no gradient before either."""
    group = saved["param_groups"][0]
    count = len(optimizer.param_groups[0]["params"])
    group["params"] = [*group["params"], *range(len(group["params"]), count)]
    optimizer.load_state_dict(saved)
    complete_state(optimizer)


def complete_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero momentum buffers for the parameters that have none (a new optimizer, or one
    loaded from a state saved without some of its parameters): see the module docstring.
    AdamW creates its state itself on the first applied step."""
    buffer = {ConformalSymplectic: "momentum", torch.optim.SGD: "momentum_buffer"}.get(
        type(optimizer))
    for group in optimizer.param_groups:
        if buffer is None or (buffer == "momentum_buffer" and not group["momentum"]):
            continue   # AdamW, or SGD without momentum: no buffer
        for p in group["params"]:
            if buffer not in optimizer.state[p]:
                optimizer.state[p][buffer] = torch.zeros_like(
                    p, memory_format=torch.preserve_format)


class Schedule:
    """The learning rate over a run: a per-step scheduler (warmup, cosine) and a per-epoch
    one (plateau), either possibly absent; both multiply the optimizer's current lr, so
    a plateau's cut during the warmup persists."""

    def __init__(self, per_step: LRScheduler | None, plateau: ReduceLROnPlateau | None) -> None:
        self.per_step, self.plateau = per_step, plateau

    def after_step(self) -> None:
        """Call after every optimizer step (skipped ones too)."""
        if self.per_step is not None:
            self.per_step.step()

    def after_epoch(self, heldout_loss: float) -> None:
        """Call after every epoch with its held-out (never the validation) loss."""
        if self.plateau is not None:
            self.plateau.step(heldout_loss)

    def state_dict(self) -> dict[str, Any]:
        return {name: None if part is None else part.state_dict()
                for name, part in (("per_step", self.per_step), ("plateau", self.plateau))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in (("per_step", self.per_step), ("plateau", self.plateau)):
            if (part is None) != (state[name] is None):
                raise ValueError(f"the saved schedule {'lacks' if part else 'has'} a {name} "
                                 "part: it was saved under another lr_schedule")
            if part is not None:
                part.load_state_dict(state[name])


def build_schedule(train: TrainConfig, optimizer: torch.optim.Optimizer,
                   steps_per_epoch: int) -> Schedule:
    """The schedule `train.lr_schedule` with `train.lr_warmup_steps` of linear warmup."""
    warmup = train.lr_warmup_steps
    per_step: LRScheduler | None = None
    if warmup > 1:
        per_step = LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup - 1)
    if train.lr_schedule == "cosine":
        decay = train.epochs * steps_per_epoch - warmup
        if decay < 1:
            raise ConfigError(f"lr_schedule: cosine needs more steps than lr_warmup_steps "
                              f"({warmup}); the run has {train.epochs * steps_per_epoch}")
        cosine = CosineAnnealingLR(optimizer, T_max=decay)
        per_step = cosine if per_step is None else SequentialLR(
            optimizer, [per_step, cosine], milestones=[warmup])
    plateau = None
    if train.lr_schedule == "plateau":
        plateau = ReduceLROnPlateau(optimizer, mode="min", factor=PLATEAU_FACTOR,
                                    patience=train.lr_plateau_patience, threshold=0.0)
    return Schedule(per_step, plateau)

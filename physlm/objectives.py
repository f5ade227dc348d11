"""Auxiliary objectives: what a training step adds to the language-model loss.

    loss = CE + sum_k loss_k,    loss_k = the k-th objective's term (0 on a step without it)

An objective is one object, and the trainer asks every objective the same things:

    term(out, batch_size, physics)   this step's Term: its loss (in the graph), its statistics
                                     (named as in the step record), whether its gradient is
                                     clipped apart from the LM's or joins it; None on a step
                                     without it
    after_step(stats, skipped, ...)  after the optimizer step: its hook (the multiplier
                                     controller) and its step-record fields
    epoch_fields(sums)               its epoch-record fields, from the running sums of its
                                     `averaged` fields over the epoch's steps that computed it
    state_dict(), load_state_dict()  what a checkpoint keeps of it
    module                           its trained parameters outside the model (or None)

`physics` says whether the epoch is a physics epoch (Config.is_physics_epoch); an
objective of every epoch ignores it. The gradient of all the step's terms together, g_E, is
taken apart from the LM's and clipped on its own when any of them asks (`clip_apart`), with
the LM's otherwise (physlm.gradients). A term that is part of the LM's own recipe rather than
a constraint on it (`joins_lm`: the MoE balance) is added to the LM loss before its backward
instead, so its gradient is g_LM's, whatever the other terms ask. `after_step` receives the
statistics averaged over processes (physlm.distributed), or None when it had no term this
step. A new objective is one more class here and one line in `build_objectives`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from physlm.config import Config
from physlm.koopman import Koopman
from physlm.metrics import Sums
from physlm.model import ModelOutput, ResNetBK
from physlm.physics import EnergyPenalty


@dataclass
class Term:
    """One objective's contribution to one step."""

    loss: torch.Tensor              # scalar, in the graph, weighted as it enters the loss
    stats: dict[str, torch.Tensor]  # detached, per process, named as in the step record
    clip_apart: bool                # its gradient is clipped on its own, not with the LM's
    joins_lm: bool = False          # its gradient is part of the LM's (never in g_E)


class Objective:
    """The protocol (see the module docstring); the defaults are those of a stateless
    objective that logs nothing beyond its statistics."""

    name: str = ""                  # its loss is logged as "<name>_loss"
    module: nn.Module | None = None
    averaged: tuple[str, ...] = ()  # step fields averaged over the epoch's computed steps
    layer_means: dict[str, str] = {}  # step field -> the per-layer field it is the mean of

    @property
    def loss_field(self) -> str:
        return f"{self.name}_loss"

    @property
    def flag(self) -> str:
        """The step record's field that says whether this objective computed its term."""
        return f"{self.name}_computed"

    def term(self, out: ModelOutput, batch_size: int, physics: bool) -> Term | None:
        raise NotImplementedError

    def after_step(self, stats: dict[str, torch.Tensor] | None, skipped: torch.Tensor,
                   physics: bool) -> dict[str, Any]:
        return {self.flag: stats is not None}

    def epoch_fields(self, sums: Sums) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# EnergyTerms fields -> their names in the step record.
ENERGY_RECORD = {"mse": "energy_mse_per_layer", "drift": "drift_per_layer",
                 "kinetic": "kinetic", "potential": "potential",
                 "spread": "energy_spread_per_layer",
                 "kinetic_spread": "kinetic_spread_per_layer",
                 "potential_spread": "potential_spread_per_layer"}
# Per-layer statistics averaged over the epoch's energy steps, under the same names.
ENERGY_LAYER_AVERAGED = ("energy_spread_per_layer", "kinetic_spread_per_layer",
                         "potential_spread_per_layer", "kinetic", "potential")


class EnergyObjective(Objective):
    """The energy penalty (physlm.physics): on physics steps, and on warmup steps too when
    the heads are fitted early (then detached from the network, clipped apart from the LM's
    gradient, and it never moves lambda). The reference energy compares consecutive batches
    of the same global size, so the previous batch's embeddings are kept here."""

    name = "energy"
    averaged = ("energy_mse", "drift", *ENERGY_LAYER_AVERAGED)
    layer_means = {"lambda": "lambda_per_layer", "drift": "drift_per_layer",
                   "energy_mse": "energy_mse_per_layer"}

    def __init__(self, penalty: EnergyPenalty, config: Config) -> None:
        self.module = self.penalty = penalty
        self.fit_in_warmup = config.physics.fit_heads_in_warmup
        self.clip_mode = config.physics.clip_mode
        self.previous: torch.Tensor | None = None   # the previous batch's token embeddings
        self.previous_batch_size = 0                 # its global size

    def term(self, out: ModelOutput, batch_size: int, physics: bool) -> Term | None:
        previous = self.previous if self.previous_batch_size == batch_size else None
        self.previous, self.previous_batch_size = out.token_embeddings.detach(), batch_size
        terms = (self.penalty.terms(out, previous, attached=physics)
                 if physics or self.fit_in_warmup else None)
        if terms is None:
            return None
        return Term(self.penalty.loss(terms.mse),
                    {field: getattr(terms, name).detach() for name, field in ENERGY_RECORD.items()},
                    clip_apart=not physics or self.clip_mode == "separate")

    def after_step(self, stats: dict[str, torch.Tensor] | None, skipped: torch.Tensor,
                   physics: bool) -> dict[str, Any]:
        """The multiplier controller's step (physics steps only), then the fields: null for
        the statistics of a step that computed no energy (as in the epoch records), and
        lambda after the update."""
        if stats is not None and physics:
            self.penalty.update(stats["drift_per_layer"], skipped=skipped)
        return {**{field: None for field in ENERGY_RECORD.values() if stats is None},
                self.flag: stats is not None,
                "lambda_per_layer": self.penalty.lambdas.detach().clone()}

    def epoch_fields(self, sums: Sums) -> dict[str, Any]:
        """Null, not 0, for an epoch that never computed the energy; lambda at its end."""
        n, lambdas = sums.steps, self.penalty.lambdas.tolist()
        return {"train_energy_mse": sums.mean("energy_mse"), "drift": sums.mean("drift"),
                "drift_max": sums.maxima.get("drift") if n else None, "energy_steps": n,
                **{key: sums.mean(key) for key in ENERGY_LAYER_AVERAGED if key in sums.totals},
                "lambda": sum(lambdas) / len(lambdas), "lambda_per_layer": lambdas}

    def state_dict(self) -> dict[str, Any]:
        return {"penalty": self.penalty.state_dict(),
                "previous_batch_size": self.previous_batch_size,
                "previous_embeddings": None if self.previous is None else self.previous.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """In data-parallel runs each process compared against its own slice of the previous
        batch, which the checkpoint does not hold: the first energy term after a resume is
        skipped there, as after a batch-size change."""
        self.penalty.load_state_dict(state["penalty"])
        self.previous_batch_size = state["previous_batch_size"]
        previous = state["previous_embeddings"]
        device = self.penalty.lambdas.device
        sliced = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        self.previous = None if previous is None or sliced else previous.to(device)


KOOPMAN_TERMS = ("consistency", "reconstruction", "identity")
KOOPMAN_AVERAGED = tuple(f"koopman_{term}_per_layer" for term in KOOPMAN_TERMS)


class KoopmanObjective(Objective):
    """The Koopman loss (physlm.koopman) on physics steps, weight koopman_weight; its lifts
    live in the model (drawn last, so the LM's initial weights are those without them)."""

    name = "koopman"
    averaged = KOOPMAN_AVERAGED
    layer_means = {f"koopman_{term}": f"koopman_{term}_per_layer" for term in KOOPMAN_TERMS}

    def __init__(self, koopman: Koopman, config: Config) -> None:
        self.koopman = koopman
        self.weight = config.physics.koopman_weight
        self.clip_mode = config.physics.clip_mode

    def term(self, out: ModelOutput, batch_size: int, physics: bool) -> Term | None:
        if not physics:
            return None
        terms = self.koopman.terms(out.hidden_states)
        return Term(self.weight * terms.loss,
                    {f"koopman_{name}_per_layer": getattr(terms, name).detach()
                     for name in KOOPMAN_TERMS},
                    clip_apart=self.clip_mode == "separate")

    def after_step(self, stats: dict[str, torch.Tensor] | None, skipped: torch.Tensor,
                   physics: bool) -> dict[str, Any]:
        return {self.flag: stats is not None,
                **{field: None for field in KOOPMAN_AVERAGED if stats is None}}

    def epoch_fields(self, sums: Sums) -> dict[str, Any]:
        return {**{key: sums.mean(key) for key in KOOPMAN_AVERAGED},
                "koopman_spectral_radius": self.koopman.spectral_radius()}


class BalanceObjective(Objective):
    """The Switch Transformer's load-balancing term of the MoE routers (physlm.moe,
    ModelOutput.balance_loss: moe_balance_weight * E sum_e f_e P_e, averaged over the layers),
    in every epoch. Part of the LM's recipe, as in the Switch Transformer: its gradient joins
    the LM's and is clipped with it, also on physics steps whose energy is clipped apart."""

    name = "balance"
    averaged = ("balance_loss",)

    def term(self, out: ModelOutput, batch_size: int, physics: bool) -> Term | None:
        if out.balance_loss is None:
            return None
        return Term(out.balance_loss, {}, clip_apart=False, joins_lm=True)

    def epoch_fields(self, sums: Sums) -> dict[str, Any]:
        return {"train_balance_loss": sums.mean("balance_loss")}


def build_objectives(config: Config, model: nn.Module,
                     penalty: EnergyPenalty | None) -> list[Objective]:
    """The run's auxiliary objectives, in the order their losses are added."""
    objectives: list[Objective] = []
    if penalty is not None:
        objectives.append(EnergyObjective(penalty, config))
    if getattr(model, "koopman", None) is not None:
        objectives.append(KoopmanObjective(model.koopman, config))
    if isinstance(model, ResNetBK) and config.model.moe_balance_weight > 0:
        objectives.append(BalanceObjective())
    return objectives

"""Hamiltonian energy heads, the energy-conservation penalty and its Lagrange multiplier.

Each layer l owns a learned Hamiltonian over a trajectory of states (q, p):

    H_l(q, p) = sum_pos T_l(p) + sum_pos V_l(q),   T_l, V_l: Linear(D,D) -> Tanh -> Linear(D,1)

and the penalty asks H_l to be conserved between two consecutive states a -> b:

    drift_l = mean_batch |E_b - E_a|,   mse_l = mean_batch (E_b - E_a)^2
    loss_energy = mean_l lambda_l * mse_l

Two definitions of the trajectory (`energy_mode`):

- "embedding_pairs" (the reference, SPEC section 4): the token embeddings of the
  previous batch, e_{t-1}, and of the current one, e_t:
      E_a = sum V_l(e_{t-1}),   E_b = sum V_l(e_t) + sum T_l(e_t - e_{t-1}).
  Only the embeddings and the heads feel this penalty (SPEC section 6, flaw 5).
- "depth": the residual stream across layers, q_l = h_l, p_l = h_l - h_{l-1}
  (p_0 = 0). Layer l is compared at its input and its output:
      E_a = H_l(h_{l-1}, p_{l-1}),   E_b = H_l(h_l, p_l).

The multiplier is a dual variable, updated by the controller after each physics
step and never by the optimizer (flaw 4):

    lambda_l <- clip(lambda_l + eta * (mean_l drift_l - d_target), lambda_min, lambda_max)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def _energy_mlp(d_model: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, d_model), nn.Tanh(), nn.Linear(d_model, 1))


class EnergyHeads(nn.Module):
    """H(q, p) = T(p) + V(q), each summed over positions; one pair per layer."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.kinetic = _energy_mlp(d_model)
        self.potential = _energy_mlp(d_model)

    def forward(self, q: torch.Tensor, p: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """q, p: (B, N, D). Returns T and V per sequence, (B,) each; p=None means T = 0."""
        potential = self.potential(q).sum(dim=(-2, -1))
        if p is None:
            return torch.zeros_like(potential), potential
        return self.kinetic(p).sum(dim=(-2, -1)), potential


class LagrangeMultiplier(nn.Module):
    """lambda >= 0 weighting one layer's energy penalty: a dual variable, not a weight.

    Stored as a parameter (so the model's parameter count includes it and it is
    saved with the model) with requires_grad=False, so no optimizer touches it.
    """

    def __init__(self, initial: float) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(initial)), requires_grad=False)

    @torch.no_grad()
    def update(self, drift: torch.Tensor, target: float, eta: float,
               low: float, high: float) -> None:
        """lambda <- clip(lambda + eta * (drift - target), low, high), on the device."""
        self.value.copy_((self.value + eta * (drift - target)).clamp(low, high))


@dataclass
class EnergyTerms:
    """Per-layer energy statistics of one step, each a tensor of shape (L,)."""

    mse: torch.Tensor
    drift: torch.Tensor
    kinetic: torch.Tensor
    potential: torch.Tensor


def _terms(heads: EnergyHeads, q_a: torch.Tensor, p_a: torch.Tensor | None,
           q_b: torch.Tensor, p_b: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    kinetic_a, potential_a = heads(q_a, p_a)
    kinetic_b, potential_b = heads(q_b, p_b)
    gap = (kinetic_b + potential_b) - (kinetic_a + potential_a)
    return gap.square().mean(), gap.abs().mean(), kinetic_b.mean(), potential_b.mean()


def energy_terms(heads: list[EnergyHeads], mode: str, *,
                 embeddings: torch.Tensor | None = None,
                 previous_embeddings: torch.Tensor | None = None,
                 hidden_states: list[torch.Tensor] | None = None) -> EnergyTerms | None:
    """The energy statistics of one step, or None when the step has no energy term.

    "embedding_pairs" needs `embeddings` and `previous_embeddings` of the same
    batch size; the first step and a step whose batch size differs (the last,
    partial batch) are skipped, as in the reference. "depth" needs the
    residual stream `hidden_states` = [h_0, ..., h_L].
    """
    per_layer = []
    if mode == "embedding_pairs":
        if previous_embeddings is None or previous_embeddings.shape != embeddings.shape:
            return None
        momentum = embeddings - previous_embeddings
        for layer_heads in heads:
            per_layer.append(_terms(layer_heads, previous_embeddings, None, embeddings, momentum))
    elif mode == "depth":
        momentum = [torch.zeros_like(hidden_states[0])]
        momentum += [b - a for a, b in zip(hidden_states[:-1], hidden_states[1:], strict=True)]
        for layer, layer_heads in enumerate(heads, start=1):
            per_layer.append(_terms(layer_heads, hidden_states[layer - 1], momentum[layer - 1],
                                    hidden_states[layer], momentum[layer]))
    else:
        raise ValueError(f"unknown energy_mode {mode!r}")
    mse, drift, kinetic, potential = (torch.stack(column) for column in zip(*per_layer,
                                                                              strict=True))
    return EnergyTerms(mse=mse, drift=drift, kinetic=kinetic, potential=potential)

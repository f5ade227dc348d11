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

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn


def _energy_mlp(d_model: int) -> nn.Sequential:
    """Linear(D, D) -> Tanh -> Linear(D, 1), applied per position."""
    return nn.Sequential(nn.Linear(d_model, d_model), nn.Tanh(), nn.Linear(d_model, 1))


class EnergyHeads(nn.Module):
    """One layer's Hamiltonian H(q, p) = T(p) + V(q), each head summed over positions."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.kinetic = _energy_mlp(d_model)
        self.potential = _energy_mlp(d_model)


def summed_energy(mlps: Sequence[nn.Sequential], x: torch.Tensor) -> torch.Tensor:
    """sum_pos mlp(x) for each of L energy MLPs at once: x (B, N, D) -> (B, L).

    The sum over positions commutes with an MLP's last, linear layer:

        sum_pos [w2 . tanh(W1 x_pos + b1) + b2] = w2 . sum_pos tanh(W1 x_pos + b1) + N b2

    so the L hidden layers run as one (D -> L*D) product and the output layers act on the
    (B, L, D) sums, not on every position. tanh(u) is computed as 2 sigmoid(2u) - 1, the same
    function: on the CPU torch.tanh measured 2.8x slower than torch.sigmoid (forward and
    backward of 1M floats, 4.1 against 1.5 ms), and the rescaling folds into the small weights.

    Computed in the weights' precision even under autocast: drift and MSE are differences of
    sums over positions (and 2 sigmoid - 1 cancels), which bfloat16's 8 bits would swamp.
    """
    hidden = [mlp[0] for mlp in mlps]
    output = [mlp[-1] for mlp in mlps]
    w1 = torch.cat([layer.weight for layer in hidden])                       # (L*D, D)
    b1 = torch.cat([layer.bias for layer in hidden])
    with torch.autocast(x.device.type, enabled=False):
        pre = F.linear(x.to(w1.dtype), 2 * w1, 2 * b1)
    sigmoid_sums = torch.sigmoid(pre).sum(dim=-2)                            # (B, L*D)
    sums = 2 * sigmoid_sums - x.shape[-2]                   # sum_pos tanh(W1 x_pos + b1)
    w2 = torch.cat([layer.weight for layer in output])                       # (L, D)
    b2 = torch.cat([layer.bias for layer in output])                         # (L,)
    return (sums.view(-1, *w2.shape) * w2).sum(dim=-1) + x.shape[-2] * b2


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


def _per_layer(mlps: Sequence[nn.Sequential], states: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, L): the l-th MLP summed over the l-th state."""
    return torch.cat([summed_energy([mlp], x) for mlp, x in zip(mlps, states, strict=False)],
                     dim=1)


@dataclass
class EnergyTerms:
    """Per-layer energy statistics of one step, each a tensor of shape (L,)."""

    mse: torch.Tensor
    drift: torch.Tensor
    kinetic: torch.Tensor
    potential: torch.Tensor


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
    kinetic_heads = [layer_heads.kinetic for layer_heads in heads]
    potential_heads = [layer_heads.potential for layer_heads in heads]
    if mode == "embedding_pairs":
        if previous_embeddings is None or previous_embeddings.shape != embeddings.shape:
            return None
        # Every layer's heads read the same states: one product per input for all layers.
        kinetic = summed_energy(kinetic_heads, embeddings - previous_embeddings)   # (B, L)
        potential = summed_energy(potential_heads, embeddings)
        gap = kinetic + potential - summed_energy(potential_heads, previous_embeddings)
    elif mode == "depth":
        momenta = [torch.zeros_like(hidden_states[0])]
        momenta += [b - a for a, b in pairwise(hidden_states)]
        # Layer l compares its H_l at its input (trajectory index l - 1) and output (index l).
        kinetic_in = _per_layer(kinetic_heads, momenta)
        potential_in = _per_layer(potential_heads, hidden_states)
        kinetic = _per_layer(kinetic_heads, momenta[1:])
        potential = _per_layer(potential_heads, hidden_states[1:])
        gap = (kinetic + potential) - (kinetic_in + potential_in)
    else:
        raise ValueError(f"unknown energy_mode {mode!r}")
    return EnergyTerms(mse=gap.square().mean(0), drift=gap.abs().mean(0),
                       kinetic=kinetic.mean(0), potential=potential.mean(0))

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

Both are "absolute" energies (`energy_scale`, the reference). Heads that output a
constant meet any drift target exactly, so an absolute drift says nothing by itself.
The "relative" scale divides each gap by the spread of H_l over the batch's states,

    s_l = sqrt((var_batch E_l(a) + var_batch E_l(b)) / 2),   gap_l / s_l,

which shrinking the heads cannot shrink; constant heads make it 0 / 0, and s_l is
logged with every step so that the report calls such a constraint degenerate, not met.

The multiplier is a dual variable, updated by the controller after each physics
step and never by the optimizer (flaw 4): with the error e = drift - d_target
(the layer mean of drift, `lambda_scope: shared`, or each layer's own, `per_layer`)

    I_l      <- clip(I_l + eta * e, lambda_min, lambda_max)      integral (the reference)
    lambda_l <- clip(I_l + k_p * e, lambda_min, lambda_max)      plus proportional, k_p >= 0

k_p = 0 is the reference rule (lambda_l = I_l); k_p > 0 damps the integral windup.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from physlm.config import PhysicsConfig
from physlm.model import ModelOutput

SPREAD_EPS = 1e-12


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

    Stored as a parameter (so the parameter count includes it and it is saved with
    the penalty) with requires_grad=False, so no optimizer touches it. The integral
    state of the PI rule is a buffer beside it. `in_optimizer` is the original's flaw 4
    (SPEC section 7): lambda is also an AdamW parameter, whose gradient mse_l >= 0 and
    weight decay push it down before each dual step pushes it up.
    """

    def __init__(self, initial: float, in_optimizer: bool = False) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(initial)), requires_grad=in_optimizer)
        self.register_buffer("integral", torch.tensor(float(initial)))

    @torch.no_grad()
    def update(self, error: torch.Tensor, eta: float, low: float, high: float,
               kp: float = 0.0) -> None:
        """I <- clip(I + eta * error); lambda <- clip(I + kp * error), on the device. When
        the optimizer also moves lambda, the dual step starts from where it left it."""
        if self.value.requires_grad:
            self.integral.copy_(self.value)
        self.integral.copy_((self.integral + eta * error).clamp(low, high))
        self.value.copy_((self.integral + kp * error).clamp(low, high))


def _per_layer(mlps: Sequence[nn.Sequential], states: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, L): the l-th MLP summed over the l-th state."""
    return torch.cat([summed_energy([mlp], x) for mlp, x in zip(mlps, states, strict=False)],
                     dim=1)


@torch.no_grad()
def token_spread(mlps: Sequence[nn.Sequential], states: Sequence[torch.Tensor]) -> torch.Tensor:
    """(L,): the std over all tokens of the l-th MLP's per-token output on the l-th state
    (output bias aside, it is a constant). A constant head has spread 0."""
    spreads = []
    for mlp, x in zip(mlps, states, strict=True):
        w = mlp[-1].weight
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(torch.tanh(mlp[0](x.to(w.dtype))), w)                 # (B, N, 1)
        spreads.append(out.flatten().std(correction=0))
    return torch.stack(spreads)


@dataclass
class EnergyTerms:
    """Per-layer energy statistics of one step, each a tensor of shape (L,)."""

    mse: torch.Tensor
    drift: torch.Tensor
    kinetic: torch.Tensor         # batch mean of sum_pos T_l at state b
    potential: torch.Tensor       # batch mean of sum_pos V_l at state b
    spread: torch.Tensor          # s_l: std of E_l over the batch, at states a and b
    kinetic_spread: torch.Tensor  # std over tokens of T_l's per-token output at state b
    potential_spread: torch.Tensor  # the same for V_l


def energy_terms(heads: Sequence[EnergyHeads], mode: str, *,
                 embeddings: torch.Tensor | None = None,
                 previous_embeddings: torch.Tensor | None = None,
                 hidden_states: Sequence[torch.Tensor] | None = None,
                 scale: str = "absolute") -> EnergyTerms | None:
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
        energy_a = summed_energy(potential_heads, previous_embeddings)
        momenta_b = [embeddings - previous_embeddings] * len(heads)
        states_b = [embeddings] * len(heads)
    elif mode == "depth":
        momenta = [torch.zeros_like(hidden_states[0])]
        momenta += [b - a for a, b in pairwise(hidden_states)]
        # Layer l compares its H_l at its input (trajectory index l - 1) and output (index l).
        kinetic_in = _per_layer(kinetic_heads, momenta)
        potential_in = _per_layer(potential_heads, hidden_states)
        kinetic = _per_layer(kinetic_heads, momenta[1:])
        potential = _per_layer(potential_heads, hidden_states[1:])
        energy_a = kinetic_in + potential_in
        momenta_b, states_b = momenta[1:], hidden_states[1:]
    else:
        raise ValueError(f"unknown energy_mode {mode!r}")
    energy_b = kinetic + potential
    gap = energy_b - energy_a                                                    # (B, L)
    # sqrt(var + eps) keeps the gradient finite where the heads are constant.
    variance = (energy_a.var(0, correction=0) + energy_b.var(0, correction=0)) / 2
    spread = (variance + SPREAD_EPS).sqrt()                                      # (L,)
    if scale == "relative":
        gap = gap / spread
    elif scale != "absolute":
        raise ValueError(f"unknown energy_scale {scale!r}")
    return EnergyTerms(mse=gap.square().mean(0), drift=gap.abs().mean(0),
                       kinetic=kinetic.mean(0), potential=potential.mean(0), spread=spread,
                       kinetic_spread=token_spread(kinetic_heads, momenta_b),
                       potential_spread=token_spread(potential_heads, states_b))


class EnergyPenalty(nn.Module):
    """The physics of a run: the energy heads and multipliers of every layer, the energy
    terms of a step, the lambda-weighted loss and the multiplier controller."""

    def __init__(self, config: PhysicsConfig, heads: Sequence[EnergyHeads]) -> None:
        super().__init__()
        self.config = config
        self.heads = nn.ModuleList(heads)
        self.multipliers = nn.ModuleList(
            LagrangeMultiplier(config.lambda_energy_init, config.lambda_in_optimizer)
            for _ in heads)

    @property
    def lambdas(self) -> torch.Tensor:
        return torch.stack([m.value for m in self.multipliers])

    def terms(self, out: ModelOutput, previous_embeddings: torch.Tensor | None,
              attached: bool = True) -> EnergyTerms | None:
        """This step's energy terms; `attached=False` stops them at the network's states,
        so that only the heads learn from them (fitting the heads during the warmup)."""
        def cut(x: torch.Tensor) -> torch.Tensor:
            return x if attached else x.detach()

        return energy_terms(self.heads, self.config.energy_mode,
                            embeddings=cut(out.token_embeddings),
                            previous_embeddings=previous_embeddings,
                            hidden_states=[cut(h) for h in out.hidden_states],
                            scale=self.config.energy_scale)

    def loss(self, mse: torch.Tensor) -> torch.Tensor:
        """mean_l lambda_l * mse_l."""
        return (self.lambdas * mse).mean()

    def update(self, drift: torch.Tensor, skipped: torch.Tensor) -> None:
        """One controller step from the per-layer drift (L,); a skipped step moves nothing."""
        p = self.config
        error = drift.float() if p.lambda_scope == "per_layer" else drift.float().mean()
        error = torch.where(skipped, 0.0, error - p.energy_target_drift)
        for layer, multiplier in enumerate(self.multipliers):
            multiplier.update(error[layer] if error.dim() else error, p.lambda_lr,
                              p.lambda_min, p.lambda_max, p.lambda_kp)

"""Koopman-regularised depth: the original's phase-2 idea, built so that it can work.

A lift phi_l: R^D -> R^k (Linear -> Tanh -> Linear) maps the residual stream into a space
where block l acts linearly, and an inverse lift psi_l: R^k -> R^D (Linear -> Tanh ->
Linear) maps back. Per layer l = 1..L, on its input h_{l-1} and output h_l:

    a = phi_l(h_{l-1}),  b = phi_l(h_l)
    consistency_l    = rel(K_l a, b)                                 lifted dynamics linear
    reconstruction_l = (rel(psi_l(a), h_{l-1}) + rel(psi_l(b), h_l)) / 2     psi trained
    rel(x, y) = mean |x - y|^2 / (mean |y - mean_tokens y|^2 + eps)
    loss = koopman_weight * mean_l (consistency_l + reconstruction_l)

Relative errors, so that shrinking the lift cannot make them small, and the reconstruction
term rules out the trivial lift: a constant phi (b = K a = 0) meets consistency exactly
but leaves psi nothing to reconstruct from (rel = 1). A residual block moves h little, so
K = I already has a small consistency error: rel(a, b), logged beside it, is the no-dynamics
baseline that K's consistency must beat to say the lift linearised anything.

K_l = W_l / max(1, ||W_l||_2): its spectral norm, hence its spectral radius, is at most 1,
whatever the optimizer does to W_l (init I + 0.01 N(0, 1), the original's). The original's
K had no bound and was also overwritten by a streaming DMD estimate, and its psi never got
a gradient (SPEC section 7); here K is learned by gradient only and psi by reconstruction.
The LM's forward never uses the lifts: they regularise the blocks through the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

EPS = 1e-6


def relative_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean |prediction - target|^2 over the mean squared deviation of target over tokens."""
    flat = target.reshape(-1, target.shape[-1])
    spread = (flat - flat.mean(0)).square().sum(-1).mean()
    return (prediction - target).square().sum(-1).mean() / (spread + EPS)


def bounded_operator(weight: torch.Tensor) -> torch.Tensor:
    """K = W / max(1, ||W||_2): spectral norm <= 1, the identity map where W is already inside."""
    return weight / torch.linalg.matrix_norm(weight, ord=2).clamp(min=1.0)


class KoopmanLayer(nn.Module):
    """phi: Linear(D, k) -> Tanh -> Linear(k, k); W (k, k); psi: Linear(k, k) -> Tanh ->
    Linear(k, D): the original's shapes."""

    def __init__(self, d_model: int, dim: int) -> None:
        super().__init__()
        self.lift = nn.Sequential(nn.Linear(d_model, dim), nn.Tanh(), nn.Linear(dim, dim))
        self.weight = nn.Parameter(torch.eye(dim) + 0.01 * torch.randn(dim, dim))
        self.unlift = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, d_model))

    @property
    def operator(self) -> torch.Tensor:
        return bounded_operator(self.weight)

    def errors(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """(consistency, reconstruction, consistency of K = I) of the step before -> after,
        each a scalar; the last is a baseline, outside the graph."""
        a, b = self.lift(before), self.lift(after)
        consistency = relative_error(a @ self.operator.T, b)
        reconstruction = (relative_error(self.unlift(a), before)
                          + relative_error(self.unlift(b), after)) / 2
        return torch.stack([consistency, reconstruction, relative_error(a, b).detach()])


@dataclass
class KoopmanTerms:
    consistency: torch.Tensor      # (L,)
    reconstruction: torch.Tensor   # (L,)
    identity: torch.Tensor         # (L,) the consistency K = I would have: the baseline

    @property
    def loss(self) -> torch.Tensor:
        """mean_l (consistency_l + reconstruction_l), before koopman_weight."""
        return (self.consistency + self.reconstruction).mean()


class Koopman(nn.Module):
    """One KoopmanLayer per block, applied to the residual stream [h_0, ..., h_L]."""

    def __init__(self, d_model: int, n_layers: int, dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(KoopmanLayer(d_model, dim) for _ in range(n_layers))

    def terms(self, hidden_states: list[torch.Tensor]) -> KoopmanTerms:
        errors = torch.stack([layer.errors(before.float(), after.float()) for layer, before, after
                              in zip(self.layers, hidden_states[:-1], hidden_states[1:],
                                     strict=True)])
        return KoopmanTerms(*errors.unbind(1))

    @torch.no_grad()
    def spectral_radius(self) -> list[float]:
        """max |eigenvalue| of each K_l (at most its spectral norm, at most 1)."""
        return [torch.linalg.eigvals(layer.operator.double()).abs().max().item()
                for layer in self.layers]

"""Gradient accounting and clipping of a physics step.

The step's gradient is the sum of the language-model and energy gradients,
g = g_LM + g_E (g_E: the gradient of all the step's auxiliary objectives together,
physlm.objectives: the energy penalty, the Koopman loss; the MoE balance joins g_LM), and
`clip_mode` decides how it is bounded (c = grad_clip):

    total:     g <- (g_LM + g_E) * min(1, c / |g_LM + g_E|)                 (the reference)
    separate:  g <- g_LM * min(1, c / |g_LM|) + g_E * min(1, c / |g_E|)

With `total`, a large energy gradient shrinks the LM step by the same factor (the
"clip starvation" of a run whose |g_E| is 40x |g_LM|); with `separate` the LM step
is what it would be without physics. Both norms and both factors are logged.

g_E is taken apart from g_LM by `torch.autograd.grad` before the LM backward. In
the "embedding_pairs" mode the energy reaches only the token embedding and the
heads, so this is cheap; in "depth" mode it is a second backward through the
network (about one more backward per physics step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from physlm import distributed

EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


@dataclass
class GradientStats:
    """One step's gradient figures (device scalars)."""

    grad_norm: torch.Tensor           # |g_LM + g_E| before clipping
    lm_grad_norm: torch.Tensor
    energy_grad_norm: torch.Tensor
    clip_factor: torch.Tensor         # applied to g_LM
    energy_clip_factor: torch.Tensor  # applied to g_E


def _norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float())
                                                 for t in tensors]))


def _factor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    return (max_norm / (norm + EPS)).clamp(max=1.0)


def energy_gradients(energy_loss: torch.Tensor | None, parameters: Sequence[torch.nn.Parameter],
                     world: int) -> list[torch.Tensor | None] | None:
    """g_E for each parameter (None where the energy does not reach it), averaged over
    processes; the graph is kept for the LM backward that follows. None without a loss."""
    if energy_loss is None:
        return None
    grads = list(torch.autograd.grad(energy_loss, parameters, retain_graph=True,
                                     allow_unused=True))
    if world > 1:
        present = [i for i, g in enumerate(grads) if g is not None]
        totals = distributed.sum_across([grads[i] for i in present], world)
        for i, total in zip(present, totals, strict=True):
            grads[i] = total / world
    return grads


def clip(parameters: Sequence[torch.nn.Parameter], energy: Sequence[torch.Tensor | None] | None,
         max_norm: float, apart: bool) -> GradientStats:
    """Clip the step's gradient: the LM's alone (`energy` None), or with g_E, each clipped on
    its own (`apart`: "separate") or the sum at once ("total")."""
    if energy is None:
        return clip_without_energy(parameters, max_norm)
    return combine_and_clip(parameters, energy, max_norm, "separate" if apart else "total")


def clip_without_energy(parameters: Sequence[torch.nn.Parameter],
                        max_norm: float) -> GradientStats:
    """A step with no energy term: the LM gradient clipped as usual."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    zero = torch.zeros((), device=norm.device)
    factor = _factor(norm, max_norm)
    return GradientStats(norm, norm, zero, factor, zero)


def combine_and_clip(parameters: Sequence[torch.nn.Parameter],
                     energy: Sequence[torch.Tensor | None], max_norm: float,
                     mode: str) -> GradientStats:
    """Add g_E (`energy`, aligned with `parameters`) to the LM gradients in .grad and clip
    the sum as `mode` says; return the accounting."""
    pairs = [(p, g) for p, g in zip(parameters, energy, strict=True) if g is not None]
    lm_norm = _norm([p.grad for p in parameters if p.grad is not None])
    energy_norm = _norm([g for _, g in pairs])
    if mode == "total":
        for p, g in pairs:
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        factor = _factor(norm, max_norm)
        return GradientStats(norm, lm_norm, energy_norm, factor, factor)
    if mode != "separate":
        raise ValueError(f"unknown clip_mode {mode!r}")
    # |g_LM + g_E|^2 = |g_LM|^2 + |g_E|^2 + 2 g_LM . g_E, the dot product over shared ones.
    dot = sum((p.grad.float() * g.float()).sum() for p, g in pairs if p.grad is not None)
    norm = (lm_norm.square() + energy_norm.square() + 2 * dot).clamp(min=0).sqrt()
    lm_factor, energy_factor = _factor(lm_norm, max_norm), _factor(energy_norm, max_norm)
    lm_grads = [p.grad for p in parameters if p.grad is not None]
    if lm_grads:
        torch._foreach_mul_(lm_grads, lm_factor.to(lm_grads[0].device))
    for p, g in pairs:
        scaled = g * energy_factor
        p.grad = scaled if p.grad is None else p.grad.add_(scaled)
    return GradientStats(norm, lm_norm, energy_norm, lm_factor, energy_factor)

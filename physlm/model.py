"""The ResNet-BK language model (SPEC section 2).

    h_0 = token_embedding(x) + position_embedding(0..N-1)
    h_l = h_{l-1} + layer_l(h_{l-1}),   l = 1..L
    logits = lm_head(LayerNorm(h_L))      lm_head.weight = token_embedding.weight when tied

    layer(h):  u = LayerNorm(h);  f = MoE(u)
               v = clamp(Linear(D,1)(f), -3, 3)                 one potential per position
               G = diag (H - zI)^-1,  H = tridiag(1, -2 + v, 1), z = i   (the BK core)
               out = f + s * Linear(2,D)(clamp([Re G, Im G], -10, 10))

Layer variants (ModelConfig; the defaults are the layer above, physlm.bk_features has the
math): P potentials Linear(D,P) (`bk_potentials`), each with a learned shift z_c = i gamma_c
(`bk_shift`) and an input-dependent hopping (`bk_coupling`); their diagonals read out through
Linear(2P,D), or (`bk_readout: features`) the resolvent applied to u = Linear(D,D)(f), D/P
features per potential, read out through Linear(2D,D), optionally through selective write and
read gates per feature (`bk_gates`). The MoE's Switch balancing term is
returned apart from the LM loss (`moe_balance_weight`); training adds it as an auxiliary
objective whose gradient joins the LM's (physlm.objectives).

A pure language model: the physics (energy heads H_l = T_l + V_l and the
multipliers lambda_l) is a separate module, physlm.physics.EnergyPenalty, that
reads the model's output (token embeddings, the residual stream).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from physlm.bk_core import resolvent_diagonal, surrogate_resolvent_diagonal
from physlm.bk_features import Coupling, Gates, SpectralShift, resolve_features
from physlm.config import ModelConfig
from physlm.koopman import Koopman
from physlm.losses import head_output
from physlm.moe import SparseMoE, balance_score

SPECTRAL_SHIFT = 1j  # z in (H - zI)^-1: keeps the resolvent finite for real potentials


class BKLayer(nn.Module):
    """LayerNorm -> MoE -> potentials -> resolvent features, added to the MoE output."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, potentials = config.d_model, config.bk_potentials
        self.norm = nn.LayerNorm(d)
        self.moe = SparseMoE(d, config.num_experts, config.dropout,
                             scale_by_router=config.router == "scaled")
        self.potential = nn.Linear(d, potentials)
        if config.bk_potential_init:   # a constant: no random draw, the others' stay the same
            nn.init.constant_(self.potential.bias, config.bk_potential_init)
        resolved = config.bk_readout == "features"
        self.features = nn.Linear(2 * d if resolved else 2 * potentials, d)
        self.scale = nn.Parameter(torch.ones(()))
        # Drawn after the reference layer's parameters, so its initial weights stay the same.
        self.shift = (SpectralShift(potentials, config.bk_gamma_init_min)
                      if config.bk_shift == "learned" else None)
        self.coupling = Coupling(d, potentials) if config.bk_coupling == "learned" else None
        self.signal = nn.Linear(d, d) if resolved else None
        self.gates = Gates(d) if config.bk_gates else None
        self.causal = config.bk_mode == "causal"
        self.resolvent = (surrogate_resolvent_diagonal if config.bk_gradient == "surrogate"
                          else resolvent_diagonal)
        self.potential_clamp = config.potential_clamp
        self.feature_clamp = config.feature_clamp

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: (B, N, D). Returns the layer's output, the expert load and the mean router
        probabilities (SparseMoE)."""
        f, load, importance = self.moe(self.norm(h))
        v = self.potential(f).clamp(-self.potential_clamp, self.potential_clamp)
        v = v.transpose(1, 2)                                                 # (B, P, N)
        z = SPECTRAL_SHIFT if self.shift is None else self.shift()
        hopping = None if self.coupling is None else self.coupling(f)      # (B, P, N-1)
        # The features variant needs the causal g (the LU factors) in either bk_mode.
        causal = self.causal or self.signal is not None
        if hopping is None:
            g = self.resolvent(v - 2.0, z, causal=causal)                     # (B, P, N)
        else:
            g = resolvent_diagonal(v - 2.0, z, causal=causal, offdiag_product=hopping.square())
        if self.signal is None:
            features = torch.cat((g.real, g.imag), dim=1).transpose(1, 2)     # (B, N, 2P)
        else:
            u, read = self.signal(f), 1.0
            if self.gates is not None:
                write, read = self.gates(f)
                u = write * u
            w = read * resolve_features(u, g, hopping, causal=self.causal)
            features = torch.cat((w.real, w.imag), dim=-1)                    # (B, N, 2D)
        features = features.clamp(-self.feature_clamp, self.feature_clamp)
        return f + self.scale * self.features(features), load, importance


@dataclass
class ModelOutput:
    """What one forward pass gives the trainer.

    loss is the mean next-token cross-entropy when targets were given, token_losses each
    target's (B, N), without gradient; logits are only materialised when they were not (the
    training loss never builds the full batch x vocabulary logits, see physlm.losses).
    """

    loss: torch.Tensor | None
    token_losses: torch.Tensor | None
    logits: torch.Tensor | None
    token_embeddings: torch.Tensor          # (B, N, D), e_t of the reference energy
    hidden_states: list[torch.Tensor]       # [h_0, ..., h_L], the "depth" trajectory
    expert_load: torch.Tensor               # (L, E), fraction of tokens per expert
    state: Any = None                       # carried to the next batch (recurrent models)
    # moe_balance_weight * the Switch balancing term (physlm.moe.balance_score), averaged over
    # the layers; None when the weight is 0. Not part of `loss`: an auxiliary objective.
    balance_loss: torch.Tensor | None = None


class ResNetBK(nn.Module):
    """`make_layer` builds each residual layer (BKLayer; a caller may build more there,
    in the same order of random draws as the original's blocks)."""

    def __init__(self, config: ModelConfig, vocab_size: int,
                 make_layer: Callable[[ModelConfig], nn.Module] = BKLayer) -> None:
        super().__init__()
        self.config = config
        width = config.embedding_dim or config.d_model
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(config.n_seq, config.d_model)
        self.blocks = nn.ModuleList(make_layer(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(width, vocab_size)
        # e_t = W_in E[x_t] into the layers, logits = E W_out h_L out of them (E the head's);
        # absent at width d_model, so the default model's draws are unchanged.
        self.embedding_in, self.embedding_out = (
            (nn.Linear(width, config.d_model, bias=False),
             nn.Linear(config.d_model, width, bias=False))
            if width != config.d_model else (nn.Identity(), nn.Identity()))
        for embedding in (self.token_embedding, self.position_embedding):
            nn.init.normal_(embedding.weight, std=config.embedding_init_std)
        if config.tie_embeddings:   # the head's own draw above is discarded, not skipped
            self.lm_head.weight = self.token_embedding.weight
        # Drawn last, so the language model's initial weights are those without it.
        self.koopman = (Koopman(config.d_model, config.n_layers, config.koopman_dim)
                        if config.koopman else None)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                state: Any = None) -> ModelOutput:
        """x, targets: (B, N) token ids with N <= n_seq; `state` is unused (no recurrence)."""
        n = x.shape[1]
        if n > self.config.n_seq:
            raise ValueError(f"sequence of {n} tokens is longer than n_seq={self.config.n_seq}")
        embeddings = self.embedding_in(self.token_embedding(x))
        h = embeddings + self.position_embedding.weight[:n]
        hidden_states, loads, importances = [h], [], []
        for layer in self.blocks:
            out, load, importance = layer(h)
            h = h + out
            hidden_states.append(h)
            loads.append(load)
            importances.append(importance)
        h = self.embedding_out(self.final_norm(h))
        loss, token_losses, logits = head_output(h, self.lm_head.weight, self.lm_head.bias,
                                                 targets)
        expert_load, balance = torch.stack(loads), None
        if self.config.moe_balance_weight > 0:
            score = balance_score(expert_load, torch.stack(importances))
            balance = self.config.moe_balance_weight * score.mean()
        return ModelOutput(loss=loss, token_losses=token_losses, logits=logits,
                           token_embeddings=embeddings,
                           hidden_states=hidden_states, expert_load=expert_load,
                           balance_loss=balance)


def count_parameters(*modules: nn.Module | None) -> dict[str, int]:
    """Total parameters, and those the optimizer trains (the multipliers are not)."""
    parameters = [p for module in modules if module is not None for p in module.parameters()]
    return {"total": sum(p.numel() for p in parameters),
            "trainable": sum(p.numel() for p in parameters if p.requires_grad)}


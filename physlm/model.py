"""The ResNet-BK language model (SPEC section 2).

    h_0 = token_embedding(x) + position_embedding(0..N-1)
    h_l = h_{l-1} + layer_l(h_{l-1}),   l = 1..L
    logits = lm_head(LayerNorm(h_L))

    layer(h):  u = LayerNorm(h);  f = MoE(u)
               v = clamp(Linear(D,1)(f), -3, 3)                 one potential per position
               G = diag (H - zI)^-1,  H = tridiag(1, -2 + v, 1), z = i   (the BK core)
               out = f + s * Linear(2,D)(clamp([Re G, Im G], -10, 10))

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
from physlm.config import ModelConfig
from physlm.koopman import Koopman
from physlm.losses import head_output
from physlm.moe import SparseMoE

SPECTRAL_SHIFT = 1j  # z in (H - zI)^-1: keeps the resolvent finite for real potentials


class BKLayer(nn.Module):
    """LayerNorm -> MoE -> potential -> resolvent-diagonal features, added to the MoE output."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.norm = nn.LayerNorm(d)
        self.moe = SparseMoE(d, config.num_experts, config.dropout,
                             scale_by_router=config.router == "scaled")
        self.potential = nn.Linear(d, 1)
        self.features = nn.Linear(2, d)
        self.scale = nn.Parameter(torch.ones(()))
        self.causal = config.bk_mode == "causal"
        self.resolvent = (surrogate_resolvent_diagonal if config.bk_gradient == "surrogate"
                          else resolvent_diagonal)
        self.potential_clamp = config.potential_clamp
        self.feature_clamp = config.feature_clamp

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, load = self.moe(self.norm(h))
        v = self.potential(f).squeeze(-1).clamp(-self.potential_clamp, self.potential_clamp)
        g = self.resolvent(v - 2.0, SPECTRAL_SHIFT, causal=self.causal)    # (B, N) complex
        features = torch.stack((g.real, g.imag), dim=-1).clamp(-self.feature_clamp,
                                                                self.feature_clamp)
        return f + self.scale * self.features(features), load


@dataclass
class ModelOutput:
    """What one forward pass gives the trainer.

    loss is the mean next-token cross-entropy when targets were given; logits are
    only materialised when they were not (the training loss never builds the full
    batch x vocabulary logits, see physlm.losses).
    """

    loss: torch.Tensor | None
    logits: torch.Tensor | None
    token_embeddings: torch.Tensor          # (B, N, D), e_t of the reference energy
    hidden_states: list[torch.Tensor]       # [h_0, ..., h_L], the "depth" trajectory
    expert_load: torch.Tensor               # (L, E), fraction of tokens per expert
    state: Any = None                       # carried to the next batch (recurrent models)


class ResNetBK(nn.Module):
    """`make_layer` builds each residual layer (BKLayer; a caller may build more there,
    in the same order of random draws as the original's blocks)."""

    def __init__(self, config: ModelConfig, vocab_size: int,
                 make_layer: Callable[[ModelConfig], nn.Module] = BKLayer) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.n_seq, config.d_model)
        self.blocks = nn.ModuleList(make_layer(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, vocab_size)
        for embedding in (self.token_embedding, self.position_embedding):
            nn.init.normal_(embedding.weight, std=config.embedding_init_std)
        # Drawn last, so the language model's initial weights are those without it.
        self.koopman = (Koopman(config.d_model, config.n_layers, config.koopman_dim)
                        if config.koopman else None)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                state: Any = None) -> ModelOutput:
        """x, targets: (B, N) token ids with N <= n_seq; `state` is unused (no recurrence)."""
        n = x.shape[1]
        if n > self.config.n_seq:
            raise ValueError(f"sequence of {n} tokens is longer than n_seq={self.config.n_seq}")
        embeddings = self.token_embedding(x)
        h = embeddings + self.position_embedding.weight[:n]
        hidden_states, loads = [h], []
        for layer in self.blocks:
            out, load = layer(h)
            h = h + out
            hidden_states.append(h)
            loads.append(load)
        h = self.final_norm(h)
        loss, logits = head_output(h, self.lm_head.weight, self.lm_head.bias, targets)
        return ModelOutput(loss=loss, logits=logits, token_embeddings=embeddings,
                           hidden_states=hidden_states, expert_load=torch.stack(loads))


def count_parameters(*modules: nn.Module | None) -> dict[str, int]:
    """Total parameters, and those the optimizer trains (the multipliers are not)."""
    parameters = [p for module in modules if module is not None for p in module.parameters()]
    return {"total": sum(p.numel() for p in parameters),
            "trainable": sum(p.numel() for p in parameters if p.requires_grad)}


"""Top-1 sparse mixture of experts.

    p = softmax(gate(u)),  e* = argmax_e p_e
    MoE(u) = p_e* * expert_e*(u),   expert_e(u) = W2_e dropout(relu(W1_e u + b1_e)) + b2_e

Scaling the chosen expert's output by its router probability is what lets the
gate learn: in the original the gate's logits never touched the output
(SPEC section 6, flaw 3). The expert weights are stored stacked, (E, ...).

Nothing in the LM loss balances the load (issue 23: top experts taking 93-99% of the
tokens); `balance_score` is the Switch Transformer's auxiliary term for it and
`load_entropy` the per-layer measure of what it achieves.

Two ways to run the experts, the same function of u (`dispatch`, "auto" by default):

- sparse, the default on the CPU: tokens sorted by expert, one matrix product per
  expert on its contiguous slice (a Python loop over the E experts, no per-token
  work), so 1/E of the dense FLOPs. It needs the per-expert counts on the host,
  which is free on the CPU. Measured 2.9x faster than dense for one layer's forward
  and backward at the reference shapes, 13% off the whole training step
  (benchmarks/README.md).
- dense, the default elsewhere: all E experts on all tokens as one batched product,
  then a gather of the chosen output; E times the FLOPs, but no host-device
  synchronisation, which matters more on a GPU than the FLOPs at these sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SparseMoE(nn.Module):
    """E experts Linear(D, 2D) -> ReLU -> Dropout -> Linear(2D, D); a Linear(D, E) gate, top-1."""

    def __init__(self, d_model: int, num_experts: int, dropout: float,
                 scale_by_router: bool = True) -> None:
        super().__init__()
        self.scale_by_router = scale_by_router  # False: the original's, the gate never learns
        hidden = 2 * d_model
        self.num_experts = num_experts
        self.gate = nn.Linear(d_model, num_experts)
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, 1, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.b2 = nn.Parameter(torch.empty(num_experts, 1, d_model))
        self.dropout = nn.Dropout(dropout)
        self.dispatch = "auto"  # "sparse", "dense", or "auto": sparse on the CPU, dense elsewhere
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(w.shape[1])  # nn.Linear's default init, per expert
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u: (..., D). Returns the mixture output (..., D), the expert load f (E,), the
        fraction of tokens routed to each expert, and the importance P (E,), the mean router
        probability of each expert (differentiable; `balance_score`)."""
        shape = u.shape
        tokens = u.reshape(-1, shape[-1])                                   # (T, D)
        probs = F.softmax(self.gate(tokens), dim=-1)                        # (T, E)
        top_prob, top_expert = probs.max(dim=-1)                            # (T,)
        counts = top_expert.new_zeros(self.num_experts).index_add_(  # bincount, sync-free
            0, top_expert, torch.ones_like(top_expert))
        if self.dispatch == "sparse" or (self.dispatch == "auto" and tokens.device.type == "cpu"):
            chosen = self._sparse(tokens, top_expert, counts)
        else:
            chosen = self._dense(tokens, top_expert)
        mixed = chosen * top_prob.unsqueeze(-1) if self.scale_by_router else chosen
        return mixed.reshape(shape), counts.to(u.dtype) / tokens.shape[0], probs.mean(0)

    def _sparse(self, tokens: torch.Tensor, top_expert: torch.Tensor,
                counts: torch.Tensor) -> torch.Tensor:
        """Tokens sorted by expert, one product per expert on its contiguous slice."""
        order = torch.argsort(top_expert, stable=True)
        outputs = []
        for e, x in enumerate(tokens[order].split(counts.tolist())):
            hidden = self.dropout(F.relu(torch.addmm(self.b1[e], x, self.w1[e])))
            outputs.append(torch.addmm(self.b2[e], hidden, self.w2[e]))
        return torch.empty_like(tokens).index_copy_(0, order, torch.cat(outputs))

    def _dense(self, tokens: torch.Tensor, top_expert: torch.Tensor) -> torch.Tensor:
        """All experts on all tokens, (E, T, D), then each token's chosen output."""
        experts = tokens.expand(self.num_experts, -1, -1)
        hidden = F.relu(torch.baddbmm(self.b1, experts, self.w1))
        outputs = torch.baddbmm(self.b2, self.dropout(hidden), self.w2)     # (E, T, D)
        return outputs[top_expert, torch.arange(tokens.shape[0], device=tokens.device)]


def balance_score(load: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """The Switch Transformer's load-balancing term without its weight alpha, over the last dim:

        E * sum_e f_e P_e,   f = load (the top-1 fractions, no gradient), P = importance

    Its gradient reaches the router through P only, pushing down the probabilities of the
    experts that take the most tokens. Any exactly uniform load (f_e = 1/E) scores exactly 1,
    whatever P: so does a collapsed router with flat probabilities (f one-hot, P_e = 1/E).
    It is not minimised by balance alone: with E = 2, f = (3/4, 1/4) and the first expert's
    tokens at a tie (p = (1/2, 1/2)), the others at p = (0, 1), it scores 7/8, the least
    any top-1 router of two experts can.
    """
    return load.shape[-1] * (load * importance).sum(-1)


def load_entropy(load: torch.Tensor) -> torch.Tensor:
    """Entropy of the expert load over the last dim, in nats, e.g. (L, E) -> (L,): log E when
    every expert takes the same share, 0 when one expert takes every token."""
    return 0.0 - torch.special.xlogy(load, load).sum(-1)   # +0, not -0, when collapsed

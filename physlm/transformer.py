"""The project's one Transformer: a small causal GPT (pre-LN), the attention baseline.

    h_0 = token_embedding(x) + position_embedding(0..N-1)
    h_l = h_{l-1} + Attention(LayerNorm(h_{l-1}));  h_l = h_l + MLP(LayerNorm(h_l))
    logits = lm_head(LayerNorm(h_L))                      # untied head, with bias

Attention is multi-head causal self-attention through
`torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)`, so no N x N mask
is materialised. The scores may still be: with attention dropout (training, dropout > 0)
torch takes its math path on the CPU, B x heads x N x N scores, softmax and dropout in
memory; with dropout 0 (or in eval) its fused flash kernel, O(N) memory and O(N^2) time
(benchmarks/context.py measures both). The MLP is Linear(D, 4D) -> GELU ->
Linear(4D, D). It returns the same `ModelOutput` as ResNet-BK, and its loss is the same
fused vocabulary projection + cross-entropy (physlm.losses), so the two models differ only
in their blocks (and the dropout after the embeddings, which GPT-2 has and ResNet-BK not).

Initialisation as GPT-2: Linear weights ~ N(0, 0.02^2), biases 0, the two output
projections of each block (attention and MLP) scaled by 1 / sqrt(2 n_layers); the token and
position embeddings ~ N(0, embedding_init_std^2) like ResNet-BK's. At the reference shape
(vocab 30,000, d_model 64, 4 layers, n_seq 128) it has 4,078,256 parameters against the
4,146,120 of the plain ResNet-BK (-1.6 %): the embeddings and the head, 3,878,320, are the
same, and a block holds 49,984 parameters against ResNet-BK's 66,950.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from physlm.config import ModelConfig
from physlm.losses import head_output
from physlm.model import ModelOutput

INIT_STD = 0.02


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = (t.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for t in self.qkv(h).split(d, dim=-1))          # (B, heads, N, D / heads)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(d_model)
        self.attention = CausalSelfAttention(d_model, n_heads, dropout)
        self.norm_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.norm_attention(h))
        return h + self.mlp(self.norm_mlp(h))


class Transformer(nn.Module):
    """A pre-LN causal GPT with ResNet-BK's interface (constructor and `forward`)."""

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.token_embedding = nn.Embedding(vocab_size, d)
        self.position_embedding = nn.Embedding(config.n_seq, d)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(d, config.n_heads, config.dropout)
                                    for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab_size)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=INIT_STD)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for projection in (block.attention.proj, block.mlp[2]):
                nn.init.normal_(projection.weight, std=INIT_STD / math.sqrt(2 * config.n_layers))
        for embedding in (self.token_embedding, self.position_embedding):
            nn.init.normal_(embedding.weight, std=config.embedding_init_std)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                state: Any = None) -> ModelOutput:
        """x, targets: (B, N) token ids with N <= n_seq. `state` is accepted for the
        interface's sake and ignored: attention has no recurrent state to carry."""
        n = x.shape[1]
        if n > self.config.n_seq:
            raise ValueError(f"sequence of {n} tokens is longer than n_seq={self.config.n_seq}")
        embeddings = self.token_embedding(x)
        h = self.dropout(embeddings + self.position_embedding.weight[:n])
        hidden_states = [h]
        for block in self.blocks:
            h = block(h)
            hidden_states.append(h)
        h = self.final_norm(h)
        loss, token_losses, logits = head_output(h, self.lm_head.weight, self.lm_head.bias,
                                                 targets)
        return ModelOutput(loss=loss, token_losses=token_losses, logits=logits,
                           token_embeddings=embeddings,
                           hidden_states=hidden_states,
                           expert_load=torch.zeros(self.config.n_layers, 0, device=x.device))

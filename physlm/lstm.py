"""A standard LSTM language model: the recurrent baseline of the study.

    e = dropout(embedding(x))
    h, state = LSTM(e, state)            n_layers, dropout between layers
    logits = embedding.weight @ dropout(h) + b      the head tied to the embedding

This is the recipe of pytorch/examples word_language_model (Zaremba et al. 2014
with the tied output embedding of Press & Wolf 2017, "Using the Output Embedding
to Improve Language Models"; Inan et al. 2017): embedding and LSTM both of width
d_model, the head's weight is the embedding matrix and it has its own bias.

The state (h, c) is carried from one batch to the next of a stream (the "stream"
batching of physlm.data), detached: truncated backpropagation through time over
n_seq tokens. Note that with physlm's chunks of n_seq + 1 ids (x = chunk[:-1],
y = chunk[1:]) the last target of a chunk is not an input of the next one, so the
carried state skips one token in n_seq + 1; every token is still scored.
"""

from __future__ import annotations

import torch
from torch import nn

from physlm.config import ModelConfig
from physlm.losses import head_output
from physlm.model import ModelOutput

State = tuple[torch.Tensor, torch.Tensor]

EMBEDDING_INIT_RANGE = 0.1  # uniform(-0.1, 0.1), as word_language_model's init_weights


class LSTMLanguageModel(nn.Module):
    """Embedding -> dropout -> LSTM -> dropout -> tied head (see the module docstring).

    Init as word_language_model: the embedding (and so the head's weight) uniform in
    (-0.1, 0.1), the head's bias zero, the LSTM with PyTorch's default init
    (uniform(-1/sqrt(d_model), 1/sqrt(d_model))).
    """

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.embedding = nn.Embedding(vocab_size, d)
        self.dropout = nn.Dropout(config.dropout)
        # nn.LSTM warns when dropout is set with a single layer (it would do nothing).
        self.lstm = nn.LSTM(d, d, num_layers=config.n_layers, batch_first=True,
                            dropout=config.dropout if config.n_layers > 1 else 0.0)
        self.head_bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.uniform_(self.embedding.weight, -EMBEDDING_INIT_RANGE, EMBEDDING_INIT_RANGE)

    @property
    def head_weight(self) -> nn.Parameter:
        """The output projection: the embedding matrix itself (tied, one parameter)."""
        return self.embedding.weight

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> State:
        """Zeros, shape (n_layers, batch_size, d_model) each."""
        shape = (self.config.n_layers, batch_size, self.config.d_model)
        weight = self.embedding.weight
        return (weight.new_zeros(shape, device=device), weight.new_zeros(shape, device=device))

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                state: State | None = None) -> ModelOutput:
        """x, targets: (B, N) token ids. `state`: (h, c) from the previous batch of the
        stream, or None for zeros; when it has more rows than x (the last, shorter batches
        of a stream), its first B rows are used. The returned state is detached."""
        rows = x.shape[0]
        if state is None:
            state = self.initial_state(rows, x.device)
        else:
            h0, c0 = state
            if h0.shape[1] < rows:
                raise ValueError(f"the state has {h0.shape[1]} rows, the batch {rows}: "
                                 "a stream cannot gain rows (reset the state to None)")
            state = (h0[:, :rows].contiguous(), c0[:, :rows].contiguous())
        embeddings = self.embedding(x)
        out, (h_n, c_n) = self.lstm(self.dropout(embeddings), state)
        h = self.dropout(out)
        loss, token_losses, logits = head_output(h, self.head_weight, self.head_bias, targets)
        return ModelOutput(loss=loss, token_losses=token_losses, logits=logits,
                           token_embeddings=embeddings,
                           hidden_states=[embeddings, out],
                           expert_load=torch.zeros(self.config.n_layers, 0, device=x.device),
                           state=(h_n.detach(), c_n.detach()))

"""The LSTM baseline (physlm.lstm): tied head, parameter budget, carried state, learning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from physlm.batches import train_batches
from physlm.config import ModelConfig, load_config
from physlm.data import chunk_ids
from physlm.lstm import LSTMLanguageModel
from physlm.model import count_parameters

PARAMS = Path(__file__).resolve().parents[1] / "params" / "lstm.yaml"
RESNET_BK_PARAMETERS = 4_179_924  # ResNet-BK at vocabulary 30,000 (the study's budget)


def _model(vocab: int = 50, d_model: int = 16, n_layers: int = 2, dropout: float = 0.0,
           seed: int = 0) -> LSTMLanguageModel:
    torch.manual_seed(seed)
    config = ModelConfig(d_model=d_model, n_layers=n_layers, dropout=dropout,
                         energy_heads=False)
    return LSTMLanguageModel(config, vocab)


def test_head_is_tied_to_the_embedding():
    model = _model()
    assert model.head_weight is model.embedding.weight
    assert model.head_weight.data_ptr() == model.embedding.weight.data_ptr()
    assert torch.all(model.head_bias == 0)
    assert model.embedding.weight.abs().max() <= 0.1       # uniform(-0.1, 0.1)
    names = [name for name, _ in model.named_parameters()]
    assert names.count("embedding.weight") == 1 and "head_bias" in names
    # one parameter, so the head's gradient reaches the embedding matrix too
    x = torch.randint(0, 50, (2, 6))
    model(x, torch.randint(0, 50, (2, 6))).loss.backward()
    unused = torch.ones(50, dtype=torch.bool)
    unused[x.flatten()] = False
    assert model.embedding.weight.grad[unused].abs().sum() > 0  # only the head touched these


def test_parameter_count_matches_the_resnet_bk_budget():
    config = load_config(PARAMS)
    assert config.model.architecture == "lstm" and config.data.batching == "stream"
    assert not config.model.energy_heads and not config.physics.energy_penalty
    vocab, d, layers = 30_000, config.model.d_model, config.model.n_layers
    model = LSTMLanguageModel(config.model, vocab)
    lstm = 4 * sum(d * d + d * d + 2 * d for _ in range(layers))   # W_ih, W_hh, b_ih, b_hh
    total = count_parameters(model)["total"]
    assert total == vocab * d + lstm + vocab                     # embedding = head, + bias
    assert abs(total / RESNET_BK_PARAMETERS - 1) <= 0.05, total


def test_outputs_without_and_with_targets():
    model = _model().eval()
    x, y = torch.randint(0, 50, (3, 7)), torch.randint(0, 50, (3, 7))
    out = model(x)
    assert out.loss is None and out.logits.shape == (3, 7, 50)
    with_targets = model(x, y)
    assert with_targets.logits is None
    expected = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    assert torch.allclose(with_targets.loss, expected, atol=1e-5)
    assert torch.equal(out.token_embeddings, model.embedding(x))
    assert [h.shape for h in out.hidden_states] == [(3, 7, 16), (3, 7, 16)]
    assert out.expert_load.shape == (2, 0)
    h, c = out.state
    assert h.shape == c.shape == (2, 3, 16)


def test_carried_state_matters_and_is_detached():
    model = _model().eval()
    first, second = torch.randint(0, 50, (2, 4, 8))
    targets = torch.randint(0, 50, (4, 8))
    state = model(first).state
    assert not state[0].requires_grad and not state[1].requires_grad
    assert state[0].grad_fn is None and state[1].grad_fn is None
    carried, fresh = model(second, targets, state=state).loss, model(second, targets).loss
    assert not torch.isclose(carried, fresh, rtol=0, atol=1e-6)
    zeros = model.initial_state(4)
    assert torch.equal(model(second, targets, state=zeros).loss, fresh)   # None = zeros
    # training: the loss backpropagates within the batch only (truncated BPTT)
    model.train()
    out = model(second, targets, state=state)
    out.loss.backward()
    assert not out.state[0].requires_grad


def test_fewer_rows_than_the_state_use_its_first_rows():
    model = _model().eval()
    state = model(torch.randint(0, 50, (4, 5))).state
    x, y = torch.randint(0, 50, (3, 5)), torch.randint(0, 50, (3, 5))
    out = model(x, y, state=state)
    first_rows = (state[0][:, :3], state[1][:, :3])
    assert torch.equal(out.loss, model(x, y, state=first_rows).loss)
    assert out.state[0].shape == (2, 3, 16)
    with pytest.raises(ValueError, match="cannot gain rows"):
        model(torch.randint(0, 50, (5, 5)), state=state)


def test_a_few_steps_on_a_repeated_stream_reduce_the_loss():
    vocab = 20
    pattern = torch.randperm(vocab, generator=torch.Generator().manual_seed(1))
    chunks = chunk_ids(pattern.repeat(40), n_seq=12)   # 61 chunks of one repeating text
    model = _model(vocab=vocab, d_model=32, n_layers=1, dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for epoch in range(3):
        state = None
        for x, y in train_batches(chunks, 8, seed=0, epoch=epoch, batching="stream"):
            out = model(x, y, state=state)
            state = out.state
            optimizer.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(out.loss.item())
    assert losses[0] > 0.9 * torch.log(torch.tensor(float(vocab))).item()
    assert sum(losses[-4:]) / 4 < 0.6 * losses[0], losses

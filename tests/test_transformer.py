"""The attention baseline (physlm.transformer): causal, the same loss as its logits, it
learns, and it is ResNet-BK's size at the reference shape."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from physlm.config import ModelConfig
from physlm.model import ModelOutput, ResNetBK
from physlm.transformer import Transformer

VOCAB = 50


def tiny(**overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig(d_model=16, n_layers=2, n_seq=12, dropout=0.0),
                               **overrides)


def build(config: ModelConfig, vocab: int = VOCAB, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config, vocab)


def test_changing_a_token_leaves_earlier_logits_alone():
    model = build(tiny()).eval()
    x = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    before = model(x).logits
    for j in (0, 5, 11):
        changed = x.clone()
        changed[:, j] = (changed[:, j] + 7) % VOCAB
        after = model(changed).logits
        torch.testing.assert_close(after[:, :j], before[:, :j], rtol=0, atol=1e-6)
        assert (after[:, j] - before[:, j]).abs().max() > 1e-4  # and position j does see it


def test_loss_is_the_cross_entropy_of_the_logits_and_the_output_is_resnet_bks():
    config = tiny()
    model = build(config).eval()
    generator = torch.Generator().manual_seed(2)
    x, y = (torch.randint(0, VOCAB, (2, 12), generator=generator) for _ in range(2))
    logits = model(x).logits
    out = model(x, y)
    assert isinstance(out, ModelOutput) and out.logits is None
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    assert out.token_embeddings.shape == (2, 12, config.d_model)
    assert len(out.hidden_states) == config.n_layers + 1
    assert out.expert_load.shape == (config.n_layers, 0)
    assert getattr(out, "state", None) is None


def test_a_few_steps_on_a_repeated_sequence_reduce_the_loss():
    model = build(tiny(embedding_init_std=0.02)).train()
    sequence = torch.arange(13) % 5 + 3
    x, y = sequence[:-1].repeat(4, 1), sequence[1:].repeat(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(x, y).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_parameters_match_resnet_bk_at_the_reference_shape():
    config = ModelConfig()   # vocab 30,000, d_model 64, 4 layers, n_seq 128 (4 heads)
    with torch.device("meta"):
        transformer, resnet_bk = Transformer(config, 30_000), ResNetBK(config, 30_000)
    ours = sum(p.numel() for p in transformer.parameters())
    theirs = sum(p.numel() for p in resnet_bk.parameters())
    assert theirs == 4_146_120 and ours == 4_078_256
    assert abs(ours / theirs - 1) <= 0.05


def test_works_below_n_seq_and_refuses_above():
    model = build(tiny()).eval()
    out = model(torch.randint(0, VOCAB, (2, 5)), torch.randint(0, VOCAB, (2, 5)))
    assert out.loss.isfinite()
    assert model(torch.randint(0, VOCAB, (1, 1))).logits.shape == (1, 1, VOCAB)
    with pytest.raises(ValueError, match="longer than n_seq"):
        model(torch.randint(0, VOCAB, (1, 13)))


def test_initialisation_is_gpt2s_with_resnet_bks_embeddings():
    config = ModelConfig(d_model=64, n_layers=4, n_seq=128, embedding_init_std=1.0)
    model = build(config, vocab=2000)
    assert model.token_embedding.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.blocks[0].attention.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / (2 * config.n_layers) ** 0.5
    assert model.blocks[0].mlp[2].weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.lm_head.bias.abs().max().item() == 0.0

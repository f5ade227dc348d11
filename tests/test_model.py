"""The ResNet-BK model: parameter counts, causality, routing, the fused loss."""

import pytest
import torch
import torch.nn.functional as F

import physlm.losses
from physlm.build import build_model
from physlm.config import Config, ModelConfig, from_flat
from physlm.errors import ConfigError
from physlm.losses import linear_cross_entropy
from physlm.model import ResNetBK, count_parameters
from physlm.moe import SparseMoE


def test_reference_parameter_counts():
    """SPEC section 2: the language model plus its energy penalty, 4,179,924 in all."""
    model, penalty = build_model(Config(), 30_000)
    assert count_parameters(model) == {"total": 4_146_120, "trainable": 4_146_120}
    assert count_parameters(model, penalty) == {"total": 4_179_924, "trainable": 4_179_920}
    plain, none = build_model(from_flat({"energy_heads": False, "energy_penalty": False}), 30_000)
    assert none is None and count_parameters(plain) == {"total": 4_146_120,
                                                        "trainable": 4_146_120}


def test_block_parameter_breakdown():
    model, penalty = build_model(Config(), 30_000)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    block_with_physics = count(model.blocks[0]) + count(penalty.heads[0])
    assert block_with_physics + count(penalty.multipliers[0]) == 75_401
    assert count(model.blocks[0].moe) == 66_564
    assert count(penalty.heads[0].kinetic) == count(penalty.heads[0].potential) == 4_225


def test_embedding_init_std_sets_the_scale():
    for std in (1.0, 0.02):
        model, _ = build_model(from_flat({"embedding_init_std": std}), 30_000)
        assert model.token_embedding.weight.std().item() == pytest.approx(std, rel=0.01)


def _tiny(bk_mode="causal", **overrides):
    torch.manual_seed(0)
    config = ModelConfig(d_model=16, n_layers=2, n_seq=12, bk_mode=bk_mode, dropout=0.0,
                         **overrides)
    return ResNetBK(config, 50).eval()


def test_causal_model_never_sees_the_future():
    model = _tiny("causal")
    x = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        base = model(x).logits
        for j in range(12):
            changed = x.clone()
            changed[:, j] = (changed[:, j] + 7) % 50
            logits = model(changed).logits
            torch.testing.assert_close(logits[:, :j], base[:, :j], rtol=0, atol=1e-6)
            assert not torch.allclose(logits[:, j:], base[:, j:])


def test_bidirectional_model_leaks_the_future():
    """The ablation mode is not a causal language model: this is why it is not the default."""
    model = _tiny("bidirectional")
    x = torch.randint(0, 50, (2, 12))
    changed = x.clone()
    changed[:, 8] = (changed[:, 8] + 7) % 50
    with torch.no_grad():
        assert not torch.allclose(model(changed).logits[:, :8], model(x).logits[:, :8])


def test_router_receives_gradient_and_load_is_a_distribution():
    torch.manual_seed(0)
    moe = SparseMoE(8, 4, dropout=0.0)
    out, load, _ = moe(torch.randn(2, 10, 8))
    out.square().sum().backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    assert load.shape == (4,) and load.sum().item() == pytest.approx(1.0)


def test_moe_equals_running_the_chosen_expert_alone():
    torch.manual_seed(0)
    moe = SparseMoE(8, 3, dropout=0.0)
    u = torch.randn(5, 8)
    out, *_ = moe(u)
    probs = F.softmax(moe.gate(u), -1)
    for t in range(5):
        e = probs[t].argmax()
        expert = F.relu(u[t] @ moe.w1[e] + moe.b1[e, 0]) @ moe.w2[e] + moe.b2[e, 0]
        torch.testing.assert_close(out[t], probs[t, e] * expert)


def test_model_loss_equals_cross_entropy_of_its_logits():
    model = _tiny()
    x, y = torch.randint(0, 50, (3, 12)), torch.randint(0, 50, (3, 12))
    out = model(x, y)
    assert out.logits is None
    logits = model(x).logits.reshape(-1, 50)
    reference = F.cross_entropy(logits, y.reshape(-1))
    torch.testing.assert_close(out.loss, reference)
    per_token = F.cross_entropy(logits, y.reshape(-1), reduction="none").view(3, 12)
    torch.testing.assert_close(out.token_losses, per_token.detach())
    assert len(out.hidden_states) == 3 and out.expert_load.shape == (2, 4)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_cross_entropy_matches_reference(monkeypatch, bias):
    monkeypatch.setattr(physlm.losses, "CHUNK_ELEMENTS", 3 * 40)  # several chunks, ragged end
    torch.manual_seed(0)
    h = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.randint(0, 40, (2, 7))
    inputs = (h, w, b) if bias else (h, w)
    fused, per_token = linear_cross_entropy(h, w, b, y)
    reference = F.cross_entropy(F.linear(h, w, b).reshape(-1, 40), y.reshape(-1))
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-12)
    unreduced = F.cross_entropy(F.linear(h, w, b).reshape(-1, 40), y.reshape(-1),
                                reduction="none").view(2, 7)
    torch.testing.assert_close(per_token, unreduced.detach(), rtol=0, atol=1e-12)
    assert not per_token.requires_grad
    grads = torch.autograd.grad(3.0 * fused, inputs)
    expected = torch.autograd.grad(3.0 * reference, inputs)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    with torch.no_grad():
        loss, per_token = linear_cross_entropy(h, w, b, y)
        torch.testing.assert_close(loss, reference.detach())
        torch.testing.assert_close(per_token, unreduced.detach())


def test_longer_than_n_seq_is_an_error():
    with pytest.raises(ValueError, match="longer than n_seq"):
        _tiny()(torch.zeros(1, 13, dtype=torch.long))


def test_tied_head_is_the_token_embedding():
    """tie_embeddings: one V x D matrix fewer; its gradient is the sum of the two uses', the
    gradients the untied model gives its embedding and its head at the same weights; a
    checkpoint loaded into a tied model keeps it tied."""
    torch.manual_seed(0)
    untied, _ = build_model(from_flat({"d_model": 16, "n_seq": 8, "energy_heads": False,
                                       "energy_penalty": False}), 50)
    tied, _ = build_model(from_flat({"d_model": 16, "n_seq": 8, "energy_heads": False,
                                     "energy_penalty": False, "tie_embeddings": True}), 50)
    assert tied.lm_head.weight is tied.token_embedding.weight
    assert count_parameters(untied)["total"] - count_parameters(tied)["total"] == 50 * 16
    with torch.no_grad():
        untied.lm_head.weight.copy_(untied.token_embedding.weight)
    tied.load_state_dict(untied.state_dict())
    assert tied.lm_head.weight is tied.token_embedding.weight
    x = torch.randint(0, 50, (2, 8))
    for model in (untied, tied):
        model.eval()
        model(x[:, :-1], x[:, 1:]).loss.backward()
    assert tied(x[:, :-1], x[:, 1:]).loss.item() == pytest.approx(
        untied(x[:, :-1], x[:, 1:]).loss.item())
    torch.testing.assert_close(tied.token_embedding.weight.grad,
                               untied.token_embedding.weight.grad + untied.lm_head.weight.grad)
    with pytest.raises(ConfigError, match="tie_embeddings: true needs architecture: resnet_bk"):
        from_flat({"architecture": "transformer", "tie_embeddings": True})


def test_embedding_width_apart_from_the_layers():
    """embedding_dim E != d_model D: the tied E-wide embedding is mapped into the layers and out
    of them by a D x E and an E x D matrix, the only parameters added; E = D is the default
    model, draw for draw; logits are E[x] W_out h_L + b, so a head reading a zero map outputs
    the bias alone (the trivial solution: the unigram of the bias)."""
    settings = {"d_model": 16, "n_seq": 8, "energy_heads": False, "energy_penalty": False,
                "tie_embeddings": True}
    default, _ = build_model(from_flat(settings), 50)
    same, _ = build_model(from_flat({**settings, "embedding_dim": 16}), 50)
    wide, _ = build_model(from_flat({**settings, "embedding_dim": 24}), 50)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(),
                                                 same.state_dict().values(), strict=True))
    assert wide.token_embedding.weight.shape == (50, 24) and wide.lm_head.weight is \
        wide.token_embedding.weight
    grown = count_parameters(wide)["total"] - count_parameters(default)["total"]
    assert grown == 50 * (24 - 16) + 2 * 24 * 16
    x = torch.randint(0, 50, (2, 8))
    wide.eval()
    output = wide(x)
    assert output.logits.shape == (2, 8, 50) and output.token_embeddings.shape == (2, 8, 16)
    with torch.no_grad():
        wide.embedding_out.weight.zero_()
    torch.testing.assert_close(wide(x).logits, wide.lm_head.bias.expand(2, 8, 50))
    with pytest.raises(ConfigError, match="embedding_dim must be >= 1"):
        from_flat({**settings, "embedding_dim": 0})

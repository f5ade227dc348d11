"""The CUDA path (run by benchmarks/gpu_check.sh; skipped without a CUDA device): the same
numbers as on the CPU, and a bf16 autocast epoch through the real trainer that stays finite."""

import json

import pytest
import torch

from physlm.bk_core import resolvent_diagonal
from physlm.config import ModelConfig
from physlm.model import ResNetBK
from physlm.trainer import Trainer
from physlm.transformer import Transformer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

VOCAB = 500


def forward_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: str):
    model = model.to(device).eval()      # eval: no dropout, so that both devices agree
    model.zero_grad(set_to_none=True)
    loss = model(x.to(device), y.to(device)).loss
    loss.backward()
    return loss.detach().cpu(), {name: p.grad.detach().cpu()
                                 for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 matrix products on the GPU, so that the comparison with the CPU is fair."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("causal", [True, False])
def test_bk_core_on_cuda_equals_cpu_in_float64(causal):
    generator = torch.Generator().manual_seed(0)
    diag = (torch.randn(4, 300, generator=generator, dtype=torch.float64).clamp(-3, 3) - 2.0)
    weight = torch.randn(4, 300, 2, generator=generator, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        leaf = diag.to(device, copy=True).requires_grad_()   # never diag itself: a fresh leaf
        g = resolvent_diagonal(leaf, 1j, causal=causal)
        (torch.view_as_real(g) * weight.to(device)).sum().backward()
        results.append((g.detach().cpu(), leaf.grad.cpu()))
    (g_cpu, grad_cpu), (g_cuda, grad_cuda) = results
    torch.testing.assert_close(g_cuda, g_cpu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_cuda, grad_cpu, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cls", [ResNetBK, Transformer], ids=["resnet_bk", "transformer"])
def test_model_forward_backward_on_cuda_equals_cpu(cls):
    config = ModelConfig(d_model=32, n_layers=2, n_seq=64)
    torch.manual_seed(0)
    model = cls(config, VOCAB)
    generator = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, VOCAB, (4, 64), generator=generator) for _ in range(2))
    loss_cpu, grads_cpu = forward_backward(model, x, y, "cpu")
    loss_cuda, grads_cuda = forward_backward(model, x, y, "cuda")
    torch.testing.assert_close(loss_cuda, loss_cpu, rtol=1e-5, atol=1e-5)
    assert grads_cuda.keys() == grads_cpu.keys()
    for name, grad in grads_cpu.items():
        scale = grad.abs().max().clamp_min(1e-6)
        error = (grads_cuda[name] - grad).abs().max() / scale
        assert error < 1e-3, f"{name}: relative gradient difference {error:.2e}"


def test_bf16_autocast_epoch_through_the_trainer_is_finite(tiny_config, tmp_path):
    config = tiny_config(device="cuda", amp=True, epochs=2, physics_start_epoch=1)
    trainer = Trainer(config, tmp_path / "run")
    assert trainer.amp
    records = trainer.fit()
    assert len(records) == 2
    for record in records:
        assert torch.isfinite(torch.tensor([record["train_loss"], record["val_loss"]])).all()
        assert record["skipped_steps"] == 0
    initial = json.loads(trainer.run.initial.read_text())
    assert records[-1]["val_loss"] < initial["val_loss"]   # it learned, in bf16

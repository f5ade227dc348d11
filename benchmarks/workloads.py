"""What the benchmarks run: the reference shapes (SPEC section 2), synthetic tokens, and the
plain references the library is measured against (the naive floor, the per-position BK loop)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from physlm.config import DataConfig, ModelConfig
from physlm.data import PAD, UNK, Corpus, Vocabulary

SECTIONS = ("step", "energy", "eval", "bk", "fused", "scaling", "moe")
STEP_CONFIGS = ("naive_floor", "physics_off", "physics_on")
FORMS = ("causal", "bidirectional")
EPOCH_STEPS, EVAL_STEPS = 498, 52   # train and validation batches on WikiText-2 (SPEC section 1)
VOCAB, BATCH = DataConfig.vocab_size, DataConfig.batch_size   # the reference's (physlm.config)
SCALING_POSITIONS = 65_536  # B * N for the scaling sweep
SCALING_LENGTHS = (128, 512, 2048, 8192, 16_384)
# (B, N) of the fused section: the reference shape, then longer sequences (the kernels run
# each sequence site by site, so at a small batch their time grows with N).
FUSED_SHAPES = ((BATCH, 128), (BATCH, 1024), (4, 16_384))


def synthetic_corpus(vocab_size: int, n_seq: int, chunks: int, seed: int = 0) -> Corpus:
    """Uniformly random token ids under a vocabulary of made-up words."""
    generator = torch.Generator().manual_seed(seed)
    words = [PAD, UNK] + [f"w{i}" for i in range(2, vocab_size)]
    ids = torch.randint(2, vocab_size, (chunks, n_seq + 1), generator=generator)
    return Corpus(vocab=Vocabulary(words), train=ids, valid=ids, source="synthetic")


class NaiveFloor(nn.Module):
    """Embedding -> dense head -> cross-entropy on the full logits: the cost of the vocabulary."""

    def __init__(self, vocab_size: int, d_model: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.embedding(x))                     # (B, N, V), all of it
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def step_functions(device: torch.device, train_step: Callable[..., Any] | None,
                   names: tuple[str, ...] = STEP_CONFIGS) -> dict[str, Callable[[], Any]]:
    """One training step of each named configuration, as a callable (same batch for all).
    `train_step(x, y, physics_on)` is a Trainer's (bench.reference_step); None will do when
    only the naive floor is named."""
    model = ModelConfig()
    batch = synthetic_corpus(VOCAB, model.n_seq, BATCH, seed=1).train.to(device)
    x, y = batch[:, :-1], batch[:, 1:]
    fns: dict[str, Callable[[], Any]] = {}
    if "naive_floor" in names:
        naive = NaiveFloor(VOCAB, model.d_model).to(device)
        optimizer = torch.optim.AdamW(naive.parameters(), lr=1e-3, weight_decay=0.01)

        def naive_step() -> None:
            loss = naive(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        fns["naive_floor"] = naive_step
    for name, physics_on in (("physics_off", False), ("physics_on", True)):
        if name in names:
            fns[name] = partial(train_step, x, y, physics_on)
    return fns


def loop_resolvent_diagonal(diag: torch.Tensor, z: complex, causal: bool) -> torch.Tensor:
    """Reference BK core: SPEC section 3's continued fractions, one position at a time.

    H = tridiag(1, diag, 1), so b_i c_i = 1: L_1 = 0, L_i = 1 / (a'_{i-1} - L_{i-1}),
    R_N = 0, R_i = 1 / (a'_{i+1} - R_{i+1}); causal g_i = 1 / (a'_i - L_i), full
    G_ii = 1 / (a'_i - L_i - R_i). Plain autograd differentiates the recursion.
    """
    shifted = (diag - z).unbind(-1)
    n = len(shifted)
    left = [torch.zeros_like(shifted[0])]
    for i in range(1, n):
        left.append(1 / (shifted[i - 1] - left[i - 1]))
    if causal:
        return torch.stack([1 / (a - lf) for a, lf in zip(shifted, left, strict=True)], -1)
    right = [torch.zeros_like(shifted[0])]
    for i in range(n - 2, -1, -1):
        right.append(1 / (shifted[i + 1] - right[-1]))
    right.reverse()
    return torch.stack([1 / (a - lf - rt) for a, lf, rt in zip(shifted, left, right,
                                                                   strict=True)], -1)


def bk_pass(core: Callable[..., torch.Tensor], diag: torch.Tensor, weight: torch.Tensor,
            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + backward of a BK core through a fixed read-out of [Re G, Im G]: (G, dloss/da)."""
    leaf = diag.detach().requires_grad_()
    g = core(leaf, 1j, causal=causal)
    (torch.view_as_real(g) * weight).sum().backward()
    return g.detach(), leaf.grad


def random_potential(batch: int, n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """diag = -2 + v with v in [-3, 3], as the model's potentials are clamped."""
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, n, generator=generator).clamp(-3, 3)
    return (v - 2.0).to(device)

"""Validation: the token-weighted mean cross-entropy over the validation chunks.

    val_loss = sum_batches loss_b * tokens_b / sum_batches tokens_b,  val_ppl = exp(val_loss)

and the per-batch mean (the original's figure) beside it. Under torchrun each process
takes every world-th batch and the sums are added across processes. A recurrent model
carries its state along the stream of validation batches, from zeros.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import nn

from physlm import distributed
from physlm.config import DataConfig
from physlm.data import eval_batches
from physlm.metrics import exp_or_inf


@torch.no_grad()
def evaluate(model: nn.Module, chunks: torch.Tensor, data: DataConfig, device: torch.device,
             rank: int = 0, world: int = 1,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
             ) -> dict[str, float]:
    """Validation loss: token-weighted and per-batch mean, with their perplexities."""
    model.eval()
    start = time.perf_counter()
    # Sums: token-weighted loss, tokens, per-batch losses, batches.
    sums = torch.zeros(4, device=device, dtype=torch.float64)
    streaming = data.batching == "stream"
    state = None
    batches = eval_batches(chunks, data.batch_size, data.max_eval_batches, batching=data.batching)
    for index, (x, y) in enumerate(batches):
        if index % world != rank:
            continue
        x, y = x.to(device), y.to(device)
        with autocast():
            out = model(x, y, state=state if streaming else None)
        loss, state = out.loss.double(), out.state
        sums += torch.stack([loss * y.numel(), loss.new_tensor(y.numel()), loss,
                             loss.new_tensor(1.0)])
    model.train()
    (sums,) = distributed.sum_across([sums], world)
    loss_sum, tokens, batch_loss_sum, count = sums.tolist()
    token_weighted, batch_mean = loss_sum / tokens, batch_loss_sum / count
    return {"val_loss": token_weighted, "val_ppl": exp_or_inf(token_weighted),
            "val_loss_batch_mean": batch_mean, "val_ppl_batch_mean": exp_or_inf(batch_mean),
            "val_tokens": int(tokens), "val_batches": int(count),
            "val_time_s": time.perf_counter() - start}

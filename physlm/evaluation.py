"""Evaluation on a held-out set of chunks (validation, or the held-out part of train): the
token-weighted mean cross-entropy

    loss = sum_batches loss_b * tokens_b / sum_batches tokens_b,  ppl = exp(loss)

over every target, the same over the targets that are not `<unk>` (`loss_known`: the words
the vocabulary knows; on the proxy `<unk>` never occurs in train, so its targets are
predicted from nothing), and the per-batch mean (the original's figure). Under torchrun
each process takes every world-th batch and the sums are added across processes. A
recurrent model carries its state along the stream of batches, from zeros.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from physlm import distributed
from physlm.batches import eval_batches
from physlm.config import DataConfig
from physlm.data import UNK_ID
from physlm.metrics import exp_or_inf

# The splits a record names, by their prefix: "val_loss", "heldout_loss", ...
VALIDATION, HELDOUT = "val", "heldout"


@torch.no_grad()
def evaluate(model: nn.Module, chunks: torch.Tensor, data: DataConfig, device: torch.device,
             rank: int = 0, world: int = 1,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             split: str = VALIDATION) -> dict[str, float]:
    """The loss on `chunks`, token-weighted over all targets and over the known ones, and
    per-batch mean, with their perplexities; keys named `<split>_loss`, ..."""
    model.eval()
    start = time.perf_counter()
    # Sums: token-weighted loss, tokens, per-batch losses, batches, loss and count of the
    # targets that are not <unk>.
    sums = torch.zeros(6, device=device, dtype=torch.float64)
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
        known = y != UNK_ID
        sums += torch.stack([loss * y.numel(), loss.new_tensor(y.numel()), loss,
                             loss.new_tensor(1.0), out.token_losses.double()[known].sum(),
                             known.sum().double()])
    model.train()
    (sums,) = distributed.sum_across([sums], world)
    loss_sum, tokens, batch_loss_sum, count, known_sum, known_tokens = sums.tolist()
    token_weighted, batch_mean = loss_sum / tokens, batch_loss_sum / count
    known_mean = known_sum / known_tokens if known_tokens else math.nan   # no known target
    known_ppl = exp_or_inf(known_mean) if known_tokens else math.nan
    return {f"{split}_loss": token_weighted, f"{split}_ppl": exp_or_inf(token_weighted),
            f"{split}_loss_batch_mean": batch_mean,
            f"{split}_ppl_batch_mean": exp_or_inf(batch_mean),
            f"{split}_loss_known": known_mean, f"{split}_ppl_known": known_ppl,
            f"{split}_tokens": int(tokens), f"{split}_known_tokens": int(known_tokens),
            f"{split}_batches": int(count), f"{split}_time_s": time.perf_counter() - start}

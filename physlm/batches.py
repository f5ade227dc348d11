"""Batches of a split's chunks (physlm.data cuts them): x = chunk[:-1], y = chunk[1:].

"shuffled": train batches follow a permutation that depends only on (seed, epoch), so a
resumed run can skip batches; evaluation takes the chunks in order. "stream": the chunks as
contiguous streams, so that a recurrent model carries its state from one batch to the next.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

BATCHING_MODES = ("shuffled", "stream")


def _check_batching(batching: str) -> None:
    if batching not in BATCHING_MODES:
        raise ValueError(f"batching must be one of {', '.join(BATCHING_MODES)}, got {batching!r}")


def num_batches(num_chunks: int, batch_size: int, max_batches: int | None = None,
                batching: str = "shuffled") -> int:
    """Batches per pass: the last partial batch counts; `max_batches` caps it.

    The same in both modes: ceil(num_chunks / batch_size) shuffled batches, or as many
    streams' steps (`stream_rows`)."""
    _check_batching(batching)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    count = -(-num_chunks // batch_size)
    return count if max_batches is None else min(count, max_batches)


def stream_rows(num_chunks: int, batch_size: int, index: int) -> torch.Tensor:
    """The chunks of stream batch `index`: chunk s * K + index of each stream s that has one.

    The M chunks are laid out as `batch_size` contiguous streams of K = ceil(M / B) chunks
    (stream s holds chunks s * K .. (s + 1) * K - 1 that exist, the last stream may be short
    or empty), so row i of batch t + 1 is the chunk after row i of batch t. The streams
    that have a chunk at step t are always a prefix 0..k-1: a recurrent model carries the
    first k rows of its state.
    """
    steps = -(-num_chunks // batch_size)
    rows = torch.arange(batch_size) * steps + index
    return rows[rows < num_chunks]


def _split_xy(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def epoch_permutation(num_chunks: int, seed: int, epoch: int) -> torch.Tensor:
    """The train order of one epoch; a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_chunks, generator=generator)


def train_batches(chunks: torch.Tensor, batch_size: int, seed: int, epoch: int,
                  max_batches: int | None = None, start: int = 0,
                  batching: str = "shuffled") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches of shape (B, n_seq); `start` batches are skipped (resume).

    "shuffled": chunks in the order of `epoch_permutation(seed, epoch)`. "stream": the
    chunks as contiguous streams (`stream_rows`), the same every epoch, not shuffled.
    """
    _check_batching(batching)
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    count = num_batches(len(chunks), batch_size, max_batches)
    if batching == "stream":
        for index in range(start, count):
            yield _split_xy(chunks[stream_rows(len(chunks), batch_size, index)])
        return
    order = epoch_permutation(len(chunks), seed, epoch)
    for index in range(start, count):
        yield _split_xy(chunks[order[index * batch_size:(index + 1) * batch_size]])


def eval_batches(chunks: torch.Tensor, batch_size: int, max_batches: int | None = None,
                 batching: str = "shuffled") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches in order ("shuffled", which never shuffles here: chunks 0..B-1, then
    B..2B-1, ...) or as streams ("stream", as `train_batches`)."""
    _check_batching(batching)
    for index in range(num_batches(len(chunks), batch_size, max_batches)):
        rows = (stream_rows(len(chunks), batch_size, index) if batching == "stream"
                else slice(index * batch_size, (index + 1) * batch_size))
        yield _split_xy(chunks[rows])

"""Stream batching (physlm.batches, batching="stream") and the shuffled mode left unchanged."""

from __future__ import annotations

import pytest
import torch

from physlm.batches import eval_batches, num_batches, stream_rows, train_batches
from physlm.data import chunk_ids

WIDTH = 5  # ids per chunk: n_seq = 4, so chunk i holds 5 * i .. 5 * i + 4


def _chunks(count: int) -> torch.Tensor:
    return chunk_ids(torch.arange(count * WIDTH), n_seq=WIDTH - 1)


def _rows(batches) -> list[list[int]]:
    """The chunk index of every row of every batch (checking y = x shifted by one)."""
    rows = []
    for x, y in batches:
        assert torch.equal(y, x + 1) and x.is_contiguous() and y.is_contiguous()
        rows.append([int(first) // WIDTH for first in x[:, 0]])
    return rows


def _stream(kind: str, chunks: torch.Tensor, batch_size: int, **kwargs):
    if kind == "train":
        return train_batches(chunks, batch_size, seed=3, epoch=1, batching="stream", **kwargs)
    return eval_batches(chunks, batch_size, batching="stream", **kwargs)


@pytest.mark.parametrize("kind", ["train", "eval"])
@pytest.mark.parametrize(("count", "batch_size"), [(37, 8), (40, 8), (10, 4), (9, 4), (3, 8),
                                                   (1, 1), (7, 1)])
def test_every_chunk_once_as_contiguous_streams(kind: str, count: int, batch_size: int):
    rows = _rows(_stream(kind, _chunks(count), batch_size))
    steps = -(-count // batch_size)
    assert len(rows) == steps == num_batches(count, batch_size, batching="stream")
    assert sorted(chunk for batch in rows for chunk in batch) == list(range(count))
    for t, batch in enumerate(rows):
        assert batch == [s * steps + t for s in range(len(batch))]   # stream s, step t
        assert batch == stream_rows(count, batch_size, t).tolist()
        assert 1 <= len(batch) <= batch_size
        if t:
            assert len(batch) <= len(rows[t - 1])          # the streams present: a prefix
            assert all(chunk == rows[t - 1][i] + 1 for i, chunk in enumerate(batch))


def test_stream_layout_example():
    # 10 chunks, 4 streams of K = 3: [0 1 2] [3 4 5] [6 7 8] [9]
    assert _rows(eval_batches(_chunks(10), 4, batching="stream")) == [[0, 3, 6, 9], [1, 4, 7],
                                                                      [2, 5, 8]]


def test_stream_rows_continue_the_token_stream():
    """Row i of batch t + 1 starts where row i of batch t's chunk ended: the next chunk."""
    chunks = _chunks(37)
    batches = list(train_batches(chunks, 8, seed=0, epoch=0, batching="stream"))
    for (_, y0), (x1, _) in zip(batches, batches[1:], strict=False):
        rows = len(x1)
        assert torch.equal(x1[:, 0], y0[:rows, -1] + 1)  # chunk + 1 starts one id after y's end


def test_stream_train_ignores_seed_and_epoch_and_equals_eval():
    chunks = _chunks(37)
    reference = _rows(eval_batches(chunks, 8, batching="stream"))
    for seed, epoch in ((0, 0), (3, 1), (7, 9)):
        assert _rows(train_batches(chunks, 8, seed, epoch, batching="stream")) == reference


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_stream_max_batches_truncates(kind: str):
    chunks = _chunks(37)
    full = _rows(_stream(kind, chunks, 8))
    assert _rows(_stream(kind, chunks, 8, max_batches=2)) == full[:2]
    assert num_batches(37, 8, max_batches=2, batching="stream") == 2
    assert _rows(_stream(kind, chunks, 8, max_batches=99)) == full


def test_stream_resume_with_start():
    chunks = _chunks(37)
    full = _rows(train_batches(chunks, 8, seed=3, epoch=2, batching="stream"))
    assert len(full) == 5
    for start in range(6):
        resumed = train_batches(chunks, 8, seed=3, epoch=2, start=start, batching="stream")
        assert _rows(resumed) == full[start:]
    capped = train_batches(chunks, 8, seed=3, epoch=2, max_batches=3, start=1,
                           batching="stream")
    assert _rows(capped) == full[1:3]


def test_num_batches_matches_what_is_yielded():
    for count in (1, 7, 31, 32, 33, 64, 65, 1869):
        for batch_size in (1, 5, 32):
            for cap in (None, 1, 3):
                for batching in ("shuffled", "stream"):
                    expected = num_batches(count, batch_size, cap, batching=batching)
                    chunks = _chunks(count)
                    yielded = train_batches(chunks, batch_size, 0, 0, cap, batching=batching)
                    assert sum(1 for _ in yielded) == expected
                    yielded = eval_batches(chunks, batch_size, cap, batching=batching)
                    assert sum(1 for _ in yielded) == expected


def test_unknown_batching_is_refused():
    with pytest.raises(ValueError, match="batching must be one of shuffled, stream"):
        num_batches(10, 4, batching="streams")
    with pytest.raises(ValueError, match="batching"):
        next(train_batches(_chunks(10), 4, 0, 0, batching="random"))
    with pytest.raises(ValueError, match="batching"):
        next(eval_batches(_chunks(10), 4, batching="random"))


# --- the shuffled mode, unchanged ------------------------------------------------------------

def test_shuffled_is_the_default_and_unchanged():
    """Recorded from the implementation before stream batching existed (seed 5, epoch 1)."""
    chunks = _chunks(11)
    expected = [[0, 1, 4, 10], [5, 8, 7, 2], [3, 6, 9]]
    assert _rows(train_batches(chunks, 4, seed=5, epoch=1)) == expected
    assert _rows(train_batches(chunks, 4, seed=5, epoch=1, batching="shuffled")) == expected
    assert _rows(train_batches(chunks, 4, seed=5, epoch=1, start=1)) == expected[1:]
    in_order = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert _rows(eval_batches(chunks, 4)) == in_order
    assert _rows(eval_batches(chunks, 4, batching="shuffled")) == in_order
    assert num_batches(11, 4) == num_batches(11, 4, batching="shuffled") == 3

"""Count-based reference language models: the floor a neural model has to clear.

Both models are counted from a Corpus's train chunks and scored on the targets the neural
models are scored on (`chunk[1:]` of every chunk), with the same vocabulary: a word
outside it is `<unk>` (id 1) in train and in validation alike. The event space is the
vocabulary without `<pad>` (id 0, never a word): V' = len(vocab) - 1 outcomes.

Add-one unigram:   P(w) = (c(w) + 1) / (N + V'),  N the number of train tokens.

Interpolated Kneser-Ney (Chen & Goodman 1998, "An empirical study of smoothing techniques
for language modeling", section 3.5, one discount D for every order): for the history h
of k - 1 words and its shortening h' (the first word dropped),

    P_k(w | h) = max(c_k(h w) - D, 0) / c_k(h .)  +  D N_k(h .) / c_k(h .) * P_{k-1}(w | h')

and P_k(w | h) = P_{k-1}(w | h') when c_k(h .) = 0 (a history never seen), down to the
uniform P_0(w) = 1 / V'. At the highest order c_k counts the n-grams themselves; at every
lower order c_k(g) is the continuation count N1+(. g), the number of distinct words seen
before g. c_k(h .) = sum_w c_k(h w) and N_k(h .) = |{w : c_k(h w) > 0}|. Each level sums
to one over the V' outcomes whenever D <= 1 (every count it discounts is >= 1), so the
whole model does, for every history (`<pad>` has probability 0). Histories reaching before
the start of the stream are padded with `<pad>`, which no train history holds: they back
off.

Perplexity is exp of the mean negative log-probability, over all targets and over the
targets that are not `<unk>` (the words the vocabulary knows). `references` gives them for
every split a run evaluates, as a run stores them (physlm.runs: metrics/references.json).
"""

from __future__ import annotations

import math

import torch

from physlm.data import PAD, PAD_ID, UNK, UNK_ID, Corpus

DISCOUNT = 0.75


def _keys(ids: torch.Tensor, length: int, base: int) -> torch.Tensor:
    """The n-grams of `length` words as integers: key = sum_i ids[i] * base^(length-1-i).

    `ids` is (N, length), or a stream (N,) whose windows of `length` words are taken."""
    if ids.dim() == 1:
        ids = ids.unfold(0, length, 1)
    keys = torch.zeros(ids.shape[0], dtype=torch.long)
    for column in range(length):
        keys = keys * base + ids[:, column]
    return keys


class _Table:
    """Sorted unique integer keys and a value per key; a missing key reads as 0."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor | None = None) -> None:
        if values is None:
            self.keys, values = torch.unique(keys, return_counts=True)
        else:
            self.keys = keys
        self.values = values.double()

    def __getitem__(self, queries: torch.Tensor) -> torch.Tensor:
        if not len(self.keys):
            return torch.zeros(len(queries), dtype=torch.float64)
        index = torch.searchsorted(self.keys, queries).clamp(max=len(self.keys) - 1)
        return torch.where(self.keys[index] == queries, self.values[index], 0.0)


def _per_history(grams: _Table, base: int) -> tuple[_Table, _Table]:
    """c(h .) and N(h .): each history's total count and its number of distinct next words."""
    histories = grams.keys // base   # keys are sorted, so the histories come out sorted
    unique, inverse = torch.unique_consecutive(histories, return_inverse=True)
    totals = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, grams.values)
    types = torch.bincount(inverse, minlength=len(unique))
    return _Table(unique, totals), _Table(unique, types)


class AddOneUnigram:
    """P(w) = (c(w) + 1) / (N + V'), whatever the history."""

    order = 1

    def __init__(self, train_ids: torch.Tensor, vocab_size: int) -> None:
        self.support = vocab_size - 1
        self.counts = torch.bincount(train_ids, minlength=vocab_size).double()
        self.total = float(len(train_ids))

    def log_prob(self, histories: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log P(targets | histories), float64, one per row; `histories` is (N, 0)."""
        p = (self.counts[targets] + 1) / (self.total + self.support)
        return torch.log(torch.where(targets == PAD_ID, 0.0, p))   # <pad> is no outcome


class KneserNey:
    """Interpolated Kneser-Ney of `order` (module docstring), counted from `train_ids`."""

    def __init__(self, train_ids: torch.Tensor, vocab_size: int, order: int,
                 discount: float = DISCOUNT) -> None:
        if not 0 < discount <= 1:
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        if order < 1 or vocab_size ** order >= 2**63:
            raise ValueError(f"order must be >= 1 and vocab_size^order < 2^63, got {order}")
        self.order, self.base, self.discount = order, vocab_size, discount
        self.support = vocab_size - 1
        self.levels: list[tuple[_Table, _Table, _Table]] = []  # order 1 first
        for k in range(1, order + 1):
            if k == order:   # the raw counts
                counts = _Table(_keys(train_ids, k, vocab_size))
            else:            # continuation counts: one per distinct (k+1)-gram ending in g
                seen = torch.unique(_keys(train_ids, k + 1, vocab_size))
                counts = _Table(seen % vocab_size ** k)
            self.levels.append((counts, *_per_history(counts, vocab_size)))

    def log_prob(self, histories: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log P(targets | histories), float64, one per row; `histories` is (N, order - 1)."""
        p = (targets != PAD_ID).double() / self.support   # P_0: uniform, <pad> excluded
        for k, (grams, totals, types) in enumerate(self.levels, start=1):
            history = _keys(histories[:, histories.shape[1] - (k - 1):], k - 1, self.base)
            total = totals[history]
            interpolated = ((grams[history * self.base + targets] - self.discount).clamp(min=0)
                            + self.discount * types[history] * p) / total.clamp(min=1)
            p = torch.where(total > 0, interpolated, p)
        return torch.log(p)


def scored_positions(chunks: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(histories (T, order - 1), targets (T,)) of every chunk's targets chunk[1:], the
    histories read from the stream the chunks were cut from, `<pad>` before its start."""
    stream = chunks.flatten()
    positions = torch.arange(len(stream)).view(chunks.shape)[:, 1:].flatten()
    padded = torch.cat([stream.new_full((order - 1,), PAD_ID), stream])
    offsets = torch.arange(order - 1)  # padded[i + j] = stream[i - (order - 1) + j]
    return padded[positions[:, None] + offsets], stream[positions]


def perplexities(model: AddOneUnigram | KneserNey, chunks: torch.Tensor) -> dict[str, float]:
    """{"all": perplexity over every target, "known": over the targets that are not <unk>}."""
    histories, targets = scored_positions(chunks, model.order)
    nll = -model.log_prob(histories, targets)
    known = targets != UNK_ID
    return {"all": math.exp(nll.mean().item()), "known": math.exp(nll[known].mean().item())}


def count_references(corpus: Corpus, split: str = "valid") -> dict[str, dict[str, float]]:
    """Model name -> `perplexities` on `split`'s chunks, every model counted from train."""
    assert corpus.vocab.itos[:2] == [PAD, UNK]
    train, size = corpus.train.flatten(), len(corpus.vocab)
    models = {"unigram": AddOneUnigram(train, size),
              "kn_bigram": KneserNey(train, size, order=2),
              "kn_trigram": KneserNey(train, size, order=3)}
    return {name: perplexities(model, getattr(corpus, split)) for name, model in models.items()}


def references(corpus: Corpus) -> dict[str, dict]:
    """For validation and, when the corpus has one, the held-out split: the number of targets
    scored, of those not `<unk>`, and `count_references` under "ppl"."""
    splits = ("valid",) if corpus.heldout is None else ("valid", "heldout")
    result = {}
    for split in splits:
        targets = getattr(corpus, split)[:, 1:]
        result[split] = {"targets": targets.numel(),
                         "known_targets": int((targets != UNK_ID).sum()),
                         "ppl": count_references(corpus, split)}
    return result

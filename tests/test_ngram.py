"""Tests of the count-based references (physlm.ngram): hand values, normalisation, an
independent dictionary implementation of interpolated Kneser-Ney, and the issue's proxy
figures."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from physlm.config import load_config
from physlm.data import load_corpus
from physlm.ngram import (
    AddOneUnigram,
    KneserNey,
    count_references,
    perplexities,
    scored_positions,
)

REPO = Path(__file__).resolve().parents[1]
PROXY = REPO.parent / "shared" / "data" / "wikitext-2-raw"

# <pad> 0, <unk> 1, a 2, b 3, c 4: train "a b a b c", so V' = 4 outcomes.
ABABC = torch.tensor([2, 3, 2, 3, 4])


def _prob(model, history: list[int], word: int) -> float:
    histories = torch.tensor([history], dtype=torch.long).view(1, len(history))
    return math.exp(model.log_prob(histories, torch.tensor([word])).item())


def test_hand_computed_values():
    # Unigram: (c(a) + 1) / (N + V') = 3 / 9.
    assert _prob(AddOneUnigram(ABABC, 5), [], 2) == pytest.approx(3 / 9)
    # Continuation counts: the distinct bigrams ab, ba, bc give a, b, c one each (total 3,
    # 3 types): P1(b) = (1 - 0.75 + 0.75 * 3 / 4) / 3 = 13/48.
    # Bigram: c(ab) = 2, c(a .) = 2, one type: P(b | a) = (1.25 + 0.75 * 13/48) / 2 = 93/128.
    bigram = KneserNey(ABABC, 5, order=2)
    assert _prob(bigram, [2], 3) == pytest.approx(93 / 128, rel=1e-12)
    assert _prob(bigram, [4], 3) == pytest.approx(13 / 48, rel=1e-12)  # c never a history
    # Trigram: middle order from the distinct trigrams aba, bab, abc: b is followed by a and
    # c once each: P2(c | b) = (0.25 + 0.75 * 2 * 13/48) / 2 = 21/64; c(ab .) = 2 (aba, abc):
    # P(c | a b) = (0.25 + 0.75 * 2 * 21/64) / 2 = 95/256.
    assert _prob(KneserNey(ABABC, 5, order=3), [2, 3], 4) == pytest.approx(95 / 256, rel=1e-12)


def test_unseen_histories_back_off_to_the_lower_orders():
    trigram = KneserNey(ABABC, 5, order=3)
    # c never starts a bigram, <pad> never appears: both fall through to the continuation
    # unigram of test_hand_computed_values, P1(a) = 13/48.
    assert _prob(trigram, [0, 4], 2) == pytest.approx(13 / 48)
    assert _prob(trigram, [1, 3], 4) == pytest.approx(21 / 64)
    # <unk> has no train count: only the uniform floor, D * 3 / 3 * 1/4.
    assert _prob(trigram, [0, 0], 1) == pytest.approx(0.75 / 4)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_every_history_gives_a_distribution_over_the_vocabulary(order):
    torch.manual_seed(order)
    vocab_size = 9
    train = torch.randint(1, vocab_size - 2, (300,))   # the last two words never occur
    models = [KneserNey(train, vocab_size, order)] + ([AddOneUnigram(train, vocab_size)]
                                                      if order == 1 else [])
    words = torch.arange(vocab_size)
    for model, history in itertools.product(models, itertools.product(
            range(vocab_size), repeat=order - 1)):
        histories = torch.tensor(history, dtype=torch.long).view(1, -1).expand(vocab_size, -1)
        p = model.log_prob(histories, words).exp()
        assert p[0] == 0 and (p[1:] > 0).all()   # <pad> is no outcome; every word is one
        assert p.sum().item() == pytest.approx(1.0, abs=1e-12)


def _kneser_ney_by_dictionary(train: list[int], order: int, support: list[int], d=0.75):
    """The textbook recursion over Python dictionaries, written apart from physlm.ngram."""
    grams = {k: Counter(tuple(train[i:i + k]) for i in range(len(train) - k + 1))
             for k in range(1, order + 1)}

    def count(gram: tuple) -> int:
        k = len(gram)
        if k == order:
            return grams[k][gram]
        return sum(1 for longer in grams[k + 1] if longer[1:] == gram)  # N1+(. gram)

    def prob(history: tuple, word: int) -> float:
        lower = prob(history[1:], word) if history else 1 / len(support)
        counts = {w: count(history + (w,)) for w in support}
        total = sum(counts.values())
        if total == 0:
            return lower
        types = sum(1 for c in counts.values() if c > 0)
        return (max(counts[word] - d, 0) + d * types * lower) / total

    return prob


@pytest.mark.parametrize("order", [2, 3])
def test_matches_an_independent_implementation(order):
    generator = torch.Generator().manual_seed(7)
    vocab_size = 7
    train = torch.randint(1, vocab_size, (80,), generator=generator)
    support = list(range(1, vocab_size))
    reference = _kneser_ney_by_dictionary(train.tolist(), order, support)
    model = KneserNey(train, vocab_size, order)
    for history in itertools.product(range(vocab_size), repeat=order - 1):
        for word in support:
            assert _prob(model, list(history), word) == pytest.approx(
                reference(tuple(history), word), rel=1e-12)


def test_scored_positions_are_the_chunk_targets_with_their_stream_histories():
    chunks = torch.tensor([[5, 6, 7], [8, 9, 10]])
    histories, targets = scored_positions(chunks, order=3)
    assert targets.tolist() == [6, 7, 9, 10]
    assert histories.tolist() == [[0, 5], [5, 6], [7, 8], [8, 9]]


def test_known_perplexity_leaves_out_unk_targets():
    unigram = AddOneUnigram(ABABC, 5)
    chunks = torch.tensor([[2, 1, 3, 1, 2]])   # targets <unk>, b, <unk>, a
    nll = [-math.log(1 / 9), -math.log(3 / 9), -math.log(1 / 9), -math.log(3 / 9)]
    result = perplexities(unigram, chunks)
    assert result["all"] == pytest.approx(math.exp(sum(nll) / 4))
    assert result["known"] == pytest.approx(9 / 3)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="discount"):
        KneserNey(ABABC, 5, order=2, discount=1.5)
    with pytest.raises(ValueError, match="order"):
        KneserNey(ABABC, 5, order=0)


@pytest.mark.skipif(not (PROXY / "wiki.test.raw").is_file(),
                    reason=f"the WikiText-2 proxy is not at {PROXY}")
def test_proxy_figures_match_the_issue():
    """Issue 22's table, counted from the proxy's train tokens and scored on its validation
    targets: unigram 1,701, KN bigram 843 and trigram 836; without <unk> targets 421 and
    413 (its figures use the whole streams; the chunks here drop a tail of < 129 tokens)."""
    config = load_config(REPO / "params" / "wt2_proxy.yaml")
    data = dataclasses.replace(config.data, data_dir=str(PROXY), vocab_min_count=1,
                               heldout_fraction=0.0)   # the issue's vocabulary and split
    result = count_references(load_corpus(data, config.model.n_seq))
    expected = {"unigram": (1701, None), "kn_bigram": (843, 421), "kn_trigram": (836, 413)}
    for name, (all_targets, known) in expected.items():
        assert result[name]["all"] == pytest.approx(all_targets, rel=2e-3)
        if known:
            assert result[name]["known"] == pytest.approx(known, rel=2e-3)

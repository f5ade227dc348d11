"""Property-based tests: the config loader and the text pipeline on arbitrary input."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from physlm.config import KEYS, Config, from_flat
from physlm.data import Vocabulary, chunk_ids, tokenize
from physlm.values import ConfigError, parse_assignment

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# Values of the kinds a YAML parameter file, papermill or `--set` can produce.
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["", "1e-3", "true", "False", "3", "2.5", "nan", "-inf", "causal",
                              "depth", "fixture", "cpu", "cuda:0", "auto", "none"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=5)
# Mostly real keys; some near misses, random text and the non-text keys YAML allows (`1: 2`).
KEY_NAMES = (st.sampled_from(KEYS) | st.sampled_from([k[:-1] for k in KEYS]) | st.text(max_size=12)
             | st.integers(-5, 5) | st.none() | st.booleans() | st.floats(allow_nan=False))
FLAT = st.dictionaries(KEY_NAMES, VALUES, max_size=6)
# Values that are valid for the common numeric keys, to reach the cross-field checks too.
PLAUSIBLE = st.fixed_dictionaries({}, optional={
    "epochs": st.integers(-1, 12), "physics_start_epoch": st.integers(-1, 12),
    "lambda_min": st.floats(-1, 20), "lambda_max": st.floats(-1, 20),
    "lambda_energy_init": st.floats(-1, 20), "dropout": st.floats(-1, 2),
    "physics": st.booleans(), "energy_heads": st.booleans(), "n_seq": st.integers(-1, 300),
    "max_train_batches": st.none() | st.integers(-1, 5) | st.just(""),
})


def _check_loader(values: dict) -> None:
    try:
        config = from_flat(values)
    except ConfigError as error:
        assert str(error).strip(), "a ConfigError must say what is wrong"
        return
    assert isinstance(config, Config)
    assert config.validate() is config
    flat = config.to_flat()
    assert list(flat) == list(KEYS)
    assert from_flat(flat) == config, "a loaded configuration must round-trip through to_flat"


@FAST
@given(FLAT)
def test_config_loader_returns_a_config_or_raises_config_error(values):
    """Arbitrary flat mappings: a valid, round-tripping Config, or ConfigError; nothing else."""
    _check_loader(values)


@FAST
@given(PLAUSIBLE)
def test_config_loader_cross_field_checks(values):
    """Near-valid mappings exercise ranges and cross-field constraints with the same contract."""
    _check_loader(values)


ASSIGNMENTS = st.text(max_size=30) | st.builds(
    "{}={}".format, st.sampled_from(KEYS) | st.text(max_size=6), st.text(max_size=20)
    | st.sampled_from(["[1,", "{a: 1", "- x", "'open", "a: b: c", "!!python/object:os.system",
                       "1e-3", "null", "~", ".inf", "0x10", "2e10"]))


@FAST
@given(ASSIGNMENTS)
def test_command_line_assignment_gives_a_config_or_config_error(text):
    """Any `--set` argument ends in a Config or a ConfigError (never a YAML traceback)."""
    try:
        key, value = parse_assignment(text)
    except ConfigError as error:
        assert str(error).strip()
        return
    assert key == key.strip()
    _check_loader({key: value})


TEXT = st.text(st.characters(codec="utf-8"), max_size=300) | st.lists(
    st.sampled_from(["the", "a", "cat", "<unk>", "<pad>", "café", "東京", "\n", " ", "\t", "\r\n",
                     "\u2028", "\x0b", "\x1c", "\x85", "\u3000", "\ufeff", "@-@"]),
    max_size=200).map("".join)


@FAST
@given(TEXT, st.integers(3, 40), st.integers(1, 12))
def test_text_pipeline_never_crashes_and_chunking_loses_only_the_tail(text, vocab_size, n_seq):
    """tokenize -> Vocabulary.build/encode -> chunk_ids on arbitrary text keeps its contract."""
    tokens = tokenize(text.splitlines())
    assert tokens == text.split(), "line-wise tokens must equal whitespace-split text"
    assert all(token and not any(c.isspace() for c in token) for token in tokens)

    vocab = Vocabulary.build(tokens, vocab_size)
    assert vocab.itos[:2] == ["<pad>", "<unk>"]
    assert 2 <= len(vocab) <= vocab_size and len(set(vocab.itos)) == len(vocab)
    ids = vocab.encode(tokens)
    assert ids.dtype == torch.int64 and ids.shape == (len(tokens),)
    if len(ids):
        assert int(ids.min()) >= 0 and int(ids.max()) < len(vocab)
    for token, index in zip(tokens, ids.tolist(), strict=True):
        assert index == vocab.stoi.get(token, 1)
        assert vocab.decode([index])[0] in (token, "<unk>")

    chunks = chunk_ids(ids, n_seq)
    size = n_seq + 1
    num_chunks, tail = chunks.shape[0], len(ids) - chunks.numel()
    assert chunks.shape == (num_chunks, size)
    assert num_chunks * size + tail == len(ids) and 0 <= tail < size
    assert torch.equal(chunks.flatten(), ids[: num_chunks * size])


@FAST
@given(st.lists(st.integers(0, 2**40), max_size=200), st.integers(1, 64))
def test_chunk_ids_on_arbitrary_id_streams(values, n_seq):
    """Chunks are consecutive, non-overlapping slices; only a tail shorter than a chunk is lost."""
    ids = torch.tensor(values, dtype=torch.long)
    chunks = chunk_ids(ids, n_seq)
    assert chunks.shape == (len(values) // (n_seq + 1), n_seq + 1)
    kept = chunks.numel()
    assert len(values) - kept < n_seq + 1
    assert chunks.flatten().tolist() == values[:kept]
    assert math.prod(chunks.shape) == kept

"""Tests of the word-level data pipeline (physlm.data) and the synthetic corpus (physlm.fixture)."""

from __future__ import annotations

import hashlib
import math
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

from physlm.batches import epoch_permutation, eval_batches, num_batches, train_batches
from physlm.config import DataConfig
from physlm.data import (
    Corpus,
    DataError,
    Vocabulary,
    chunk_ids,
    load_corpus,
    split_heldout,
    tokenize,
)
from physlm.fixture import cache_root, fixture_dir, write_fixture_corpus

SHARED_WT2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw"


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_fixture_corpus(tmp_path / "corpus", train_tokens=3000, valid_tokens=600,
                                test_tokens=600)


def _config(**values) -> DataConfig:
    return DataConfig(**values)


# --- tokens and vocabulary -------------------------------------------------------------------

def test_tokenize_drops_empty_lines_and_concatenates():
    lines = [" \n", " = Title = \n", " \n", " a b , c . \n", "", "d\n"]
    assert tokenize(lines) == ["=", "Title", "=", "a", "b", ",", "c", ".", "d"]


def test_vocabulary_specials_and_tie_order_match_counter():
    tokens = ["b", "a", "c", "a", "b", "d", "e", "c", "f"]
    vocab = Vocabulary.build(tokens, max_size=100)
    assert vocab.itos[:2] == ["<pad>", "<unk>"]
    assert vocab.itos[2:] == [word for word, _ in Counter(tokens).most_common()]
    assert len(vocab) == 2 + len(set(tokens))


def test_vocabulary_truncation_and_unknown_words():
    vocab = Vocabulary.build(["x", "y", "y", "z", "z", "z", "w"], max_size=4)
    assert vocab.itos == ["<pad>", "<unk>", "z", "y"]
    assert vocab.encode(["z", "y", "x", "never", "<unk>"]).tolist() == [2, 3, 1, 1, 1]
    assert vocab.encode(["z"]).dtype == torch.int64
    assert vocab.decode([2, 3, 1]) == ["z", "y", "<unk>"]


def test_literal_special_tokens_are_not_words():
    vocab = Vocabulary.build(["a", "<unk>", "<unk>", "<unk>", "b", "<pad>"], max_size=10)
    assert vocab.itos == ["<pad>", "<unk>", "a", "b"]


def test_vocabulary_min_count_makes_rare_words_unk_in_train_too():
    tokens = ["a", "b", "a", "c", "b", "a", "d"]
    vocab = Vocabulary.build(tokens, max_size=100, min_count=2)
    assert vocab.itos == ["<pad>", "<unk>", "a", "b"]
    assert vocab.encode(tokens).tolist() == [2, 3, 2, 1, 3, 2, 1]
    assert Vocabulary.build(tokens, max_size=3, min_count=2).itos == ["<pad>", "<unk>", "a"]
    assert Vocabulary.build(tokens, max_size=100).itos == ["<pad>", "<unk>", "a", "b", "c", "d"]


def test_vocabulary_save_load_round_trip(tmp_path: Path):
    vocab = Vocabulary.build(["café", ",", "naïve", "@-@", "café", "東京"], max_size=10)
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded.itos == vocab.itos
    assert loaded.stoi == vocab.stoi
    (tmp_path / "bad.json").write_text('{"words": []}')
    with pytest.raises(DataError, match="bad.json"):
        Vocabulary.load(tmp_path / "bad.json")


# --- chunks and batches ----------------------------------------------------------------------

def test_chunk_ids_drops_the_tail():
    chunks = chunk_ids(torch.arange(23), n_seq=4)
    assert chunks.shape == (4, 5)
    assert chunks.flatten().tolist() == list(range(20))


def test_num_batches_counts_the_last_partial_batch():
    assert num_batches(1658, 32) == 52
    assert num_batches(64, 32) == 2
    assert num_batches(65, 32) == 3
    assert num_batches(65, 32, max_batches=2) == 2
    assert num_batches(65, 32, max_batches=10) == 3
    assert num_batches(0, 32) == 0


def test_eval_batches_in_order_with_shifted_targets():
    chunks = chunk_ids(torch.arange(10 * 7), n_seq=6)  # 10 chunks of 7
    batches = list(eval_batches(chunks, batch_size=4))
    assert [x.shape for x, _ in batches] == [(4, 6), (4, 6), (2, 6)]
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert torch.equal(xs, chunks[:, :-1])
    assert torch.equal(ys, xs + 1)
    assert all(x.is_contiguous() and y.is_contiguous() for x, y in batches)
    assert len(list(eval_batches(chunks, batch_size=4, max_batches=2))) == 2


def test_train_batches_are_a_permutation_fixed_by_seed_and_epoch():
    chunks = chunk_ids(torch.arange(37 * 5), n_seq=4)  # row i starts at 5 * i

    def order(batch_size: int, seed: int, epoch: int) -> list[int]:
        batches = list(train_batches(chunks, batch_size, seed=seed, epoch=epoch))
        assert all(torch.equal(y, x + 1) for x, y in batches)
        return [int(row) // 5 for x, _ in batches for row in x[:, 0]]

    first = order(8, seed=0, epoch=0)
    assert sorted(first) == list(range(37))
    assert first != list(range(37))
    assert first == order(8, seed=0, epoch=0) == order(5, seed=0, epoch=0)  # not the batch size
    assert first == epoch_permutation(37, seed=0, epoch=0).tolist()
    assert first != order(8, seed=0, epoch=1)
    assert first != order(8, seed=1, epoch=0)
    sizes = [len(x) for x, _ in train_batches(chunks, 8, seed=0, epoch=0)]
    assert sizes == [8, 8, 8, 8, 5]


def test_train_batches_start_and_max_batches():
    chunks = chunk_ids(torch.arange(37 * 5), n_seq=4)
    full = list(train_batches(chunks, 8, seed=3, epoch=2))
    resumed = list(train_batches(chunks, 8, seed=3, epoch=2, start=3))
    assert len(resumed) == 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, full[3:], strict=True))
    capped = list(train_batches(chunks, 8, seed=3, epoch=2, max_batches=2, start=1))
    assert len(capped) == 1 and torch.equal(capped[0][0], full[1][0])
    assert list(train_batches(chunks, 8, seed=3, epoch=2, start=5)) == []


# --- text sources ----------------------------------------------------------------------------

def test_data_dir_with_raw_files(corpus_dir: Path):
    corpus = load_corpus(_config(data_dir=str(corpus_dir), vocab_size=50), n_seq=16)
    assert isinstance(corpus, Corpus)
    for split in ("train", "valid"):
        path = corpus_dir / f"wiki.{split}.raw"
        assert corpus.files[split] == str(path)
        assert corpus.checksums[split] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert corpus.num_tokens[split] == len(path.read_text(encoding="utf-8").split())
    assert len(corpus.vocab) == 50
    assert corpus.train.shape == (corpus.num_tokens["train"] // 17, 17)
    assert corpus.valid.shape == (corpus.num_tokens["valid"] // 17, 17)
    assert corpus.train.dtype == torch.int64
    assert str(corpus_dir) in corpus.source


def test_explicit_files_resolve_against_data_dir_and_cwd(corpus_dir: Path, monkeypatch):
    config = _config(data_dir=str(corpus_dir), train_file="wiki.test.raw")
    corpus = load_corpus(config, n_seq=16)
    assert corpus.files == {"train": str(corpus_dir / "wiki.test.raw"),
                            "valid": str(corpus_dir / "wiki.valid.raw")}
    monkeypatch.chdir(corpus_dir)
    corpus = load_corpus(_config(train_file="wiki.train.raw", valid_file="wiki.test.raw"), 16)
    assert corpus.files["valid"] == str(corpus_dir / "wiki.test.raw")


def test_vocab_min_count_in_load_corpus(corpus_dir: Path):
    everything = load_corpus(_config(data_dir=str(corpus_dir)), n_seq=16)
    assert (everything.train == 1).sum() == 0      # every train word has an id
    corpus = load_corpus(_config(data_dir=str(corpus_dir), vocab_min_count=3), n_seq=16)
    counts = Counter((corpus_dir / "wiki.train.raw").read_text().split())
    assert corpus.vocab.itos[2:] == [w for w in everything.vocab.itos[2:] if counts[w] >= 3]
    rare = torch.tensor([i for i, word in enumerate(everything.vocab.itos) if counts[word] < 3])
    assert (corpus.train == 1).sum() == torch.isin(everything.train, rare).sum() > 0


def test_split_heldout_cuts_the_last_lines():
    lines = [f"line {i}" for i in range(10)]
    assert split_heldout(lines, 0.1) == (lines[:9], lines[9:])
    assert split_heldout(lines, 0.25) == (lines[:8], lines[8:])   # round(7.5) = 8
    assert split_heldout(lines, 0.0) == (lines, [])
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_heldout(lines, 1.0)


def test_heldout_split_is_the_last_train_lines_and_out_of_the_vocabulary(tmp_path: Path):
    # 20 lines of "common" words; the last two lines hold the only "late" and "later".
    lines = [" the cat sat on the mat . \n"] * 18 + [" the late cat . \n", " later the mat \n"]
    (tmp_path / "wiki.train.raw").write_text("".join(lines), encoding="utf-8")
    (tmp_path / "wiki.valid.raw").write_text(" the cat sat . \n" * 20, encoding="utf-8")
    plain = load_corpus(_config(data_dir=str(tmp_path), batch_size=4), n_seq=4)
    assert plain.heldout is None and "late" in plain.vocab.stoi
    corpus = load_corpus(_config(data_dir=str(tmp_path), batch_size=4, heldout_fraction=0.1),
                         n_seq=4)
    assert corpus.num_tokens == {"train": 18 * 7, "valid": 80, "heldout": 7}
    assert "late" not in corpus.vocab.stoi and "later" not in corpus.vocab.stoi
    assert corpus.heldout.shape == (1, 5)
    assert corpus.vocab.decode(corpus.heldout[0]) == ["the", "<unk>", "cat", ".", "<unk>"]
    assert corpus.train.numel() == 18 * 7 // 5 * 5 and (corpus.train == 1).sum() == 0
    assert corpus.checksums == plain.checksums    # the file's identity, not the cut's
    with pytest.raises(DataError, match="heldout split .*last 10% .* raise heldout_fraction"):
        load_corpus(_config(data_dir=str(tmp_path), batch_size=4, heldout_fraction=0.1), n_seq=8)


def test_given_vocabulary_is_used(corpus_dir: Path):
    vocab = Vocabulary(["<pad>", "<unk>", "the"])
    corpus = load_corpus(_config(data_dir=str(corpus_dir)), n_seq=16, vocab=vocab)
    assert corpus.vocab is vocab
    assert set(corpus.train.unique().tolist()) == {1, 2}


@pytest.mark.parametrize("names", [("wiki.train.tokens", "wiki.valid.tokens"),
                                   ("train.txt", "valid.txt"),
                                   ("train.txt", "validation.txt")])
def test_other_file_namings(corpus_dir: Path, tmp_path: Path, names: tuple[str, str]):
    other = tmp_path / "other"
    other.mkdir()
    for split, name in zip(("train", "valid"), names, strict=True):
        (other / name).write_bytes((corpus_dir / f"wiki.{split}.raw").read_bytes())
    corpus = load_corpus(_config(data_dir=str(other)), n_seq=16)
    assert corpus.files == {"train": str(other / names[0]), "valid": str(other / names[1])}


def test_missing_paths_are_named(tmp_path: Path, corpus_dir: Path):
    with pytest.raises(DataError, match=f"data_dir: folder not found: {tmp_path / 'nowhere'}"):
        load_corpus(_config(data_dir=str(tmp_path / "nowhere")), n_seq=16)
    with pytest.raises(DataError) as error:
        load_corpus(_config(data_dir=str(corpus_dir), valid_file="missing.raw"), n_seq=16)
    assert "valid_file" in str(error.value) and str(corpus_dir / "missing.raw") in str(error.value)
    with pytest.raises(DataError, match="valid_file is not set"):
        load_corpus(_config(train_file=str(corpus_dir / "wiki.train.raw")), n_seq=16)


def test_missing_split_lists_what_was_looked_for(tmp_path: Path, corpus_dir: Path):
    (corpus_dir / "wiki.valid.raw").rename(corpus_dir / "notes.txt")
    with pytest.raises(DataError) as error:
        load_corpus(_config(data_dir=str(corpus_dir)), n_seq=16)
    message = str(error.value)
    assert "no valid split" in message
    assert "wiki.valid.raw" in message and "validation.txt" in message
    assert "notes.txt" in message and "wiki.train.raw" in message  # what the folder holds


def test_empty_and_too_short_corpora(corpus_dir: Path):
    (corpus_dir / "wiki.valid.raw").write_text(" \n \n", encoding="utf-8")
    with pytest.raises(DataError, match="valid split .* holds no tokens"):
        load_corpus(_config(data_dir=str(corpus_dir)), n_seq=16)
    (corpus_dir / "wiki.valid.raw").write_text(" a b c d e \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"has 5 tokens, fewer than .* n_seq \+ 1 = 17"):
        load_corpus(_config(data_dir=str(corpus_dir)), n_seq=16)


def test_non_utf8_bytes_name_the_file_and_offset(corpus_dir: Path):
    (corpus_dir / "wiki.train.raw").write_bytes(b" caf\xe9 au lait \n")
    with pytest.raises(DataError) as error:
        load_corpus(_config(data_dir=str(corpus_dir)), n_seq=16)
    message = str(error.value)
    assert "wiki.train.raw" in message and "offset 4" in message and "re-encode" in message


def _assert_offline_help(message: str) -> None:
    for hint in ("data_dir", "wiki.train.raw", "train_file", "wt2_proxy.yaml", "dataset: fixture"):
        assert hint in message


def test_hub_without_datasets_explains_how_to_provide_data(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(DataError) as error:
        load_corpus(_config(), n_seq=16)
    _assert_offline_help(str(error.value))


def _fake_datasets(load_dataset) -> types.ModuleType:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


def test_hub_failure_explains_how_to_provide_data(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(unreachable))
    with pytest.raises(DataError) as error:
        load_corpus(_config(), n_seq=16)
    assert "ConnectionError" in str(error.value)
    _assert_offline_help(str(error.value))


def test_hub_rows(monkeypatch):
    rows = {"train": ["", " = T = \n", "", " a b c a b c a b c \n"] * 4,
            "validation": [" a b c d \n", ""] * 4}
    calls = []

    def load_dataset(*args):
        calls.append(args)
        return {split: {"text": lines} for split, lines in rows.items()}

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load_dataset))
    corpus = load_corpus(_config(batch_size=4), n_seq=4)  # 9 train sequences
    assert calls == [("wikitext", "wikitext-2-raw-v1")]
    assert corpus.source == "hub wikitext-2-raw-v1" and corpus.files == {}
    assert corpus.num_tokens == {"train": 48, "valid": 16}
    joined = "".join(rows["validation"]).encode()
    assert corpus.checksums["valid"] == hashlib.sha256(joined).hexdigest()
    assert corpus.vocab.itos == ["<pad>", "<unk>", "a", "b", "c", "=", "T"]


# --- fixture corpus --------------------------------------------------------------------------

def test_a_batch_larger_than_the_train_split_is_refused(tmp_path: Path):
    """One batch would be the whole split, fewer sequences than the run says it trains on."""
    (tmp_path / "wiki.train.raw").write_text(" a b c d e f g h \n" * 10)  # 20 x (3 + 1)
    (tmp_path / "wiki.valid.raw").write_text(" a b c d \n" * 4)
    data = tmp_path
    with pytest.raises(DataError, match=r"batch_size 21 is more than the train split's 20 "
                                        r"sequences .*lower batch_size to at most 20"):
        load_corpus(_config(data_dir=str(data), batch_size=21), n_seq=3)
    assert len(load_corpus(_config(data_dir=str(data), batch_size=20), n_seq=3).train) == 20


def test_fixture_is_deterministic(tmp_path: Path):
    sizes = {"train_tokens": 2000, "valid_tokens": 300, "test_tokens": 300}
    first = write_fixture_corpus(tmp_path / "a", **sizes, seed=7)
    second = write_fixture_corpus(tmp_path / "b", **sizes, seed=7)
    other = write_fixture_corpus(tmp_path / "c", **sizes, seed=8)
    for split in ("train", "valid", "test"):
        name = f"wiki.{split}.raw"
        assert (first / name).read_bytes() == (second / name).read_bytes()
        assert (first / name).read_bytes() != (other / name).read_bytes()


def test_fixture_layout(tmp_path: Path):
    directory = write_fixture_corpus(tmp_path, train_tokens=2000, valid_tokens=300,
                                     test_tokens=400)
    assert directory == tmp_path
    for split, size in (("train", 2000), ("valid", 300), ("test", 400)):
        text = (tmp_path / f"wiki.{split}.raw").read_bytes().decode("utf-8")
        lines = text.splitlines(keepends=True)
        assert lines[0] == " \n" and lines[1].startswith(" = ") and lines[2] == " \n"
        assert all(line.startswith(" ") and line.endswith(" \n") for line in lines)
        assert "\r" not in text and " = = " in text and " @-@ " in text and " , " in text
        assert size <= len(text.split()) < size + 1000
    # splits differ but share a lexicon: nearly every valid word occurs in train
    train = set((tmp_path / "wiki.train.raw").read_text().split())
    valid = (tmp_path / "wiki.valid.raw").read_text().split()
    assert sum(word in train for word in valid) / len(valid) > 0.9


def test_fixture_dir_is_written_once_into_the_cache(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("PHYSLM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "physlm"
    monkeypatch.setenv("PHYSLM_CACHE", str(tmp_path / "cache"))
    directory = fixture_dir()
    assert directory.parent == tmp_path / "cache" and directory.name.startswith("fixture-")
    stamp = (directory / "wiki.train.raw").stat().st_mtime_ns
    assert fixture_dir() == directory
    assert (directory / "wiki.train.raw").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [directory.name]
    expected = write_fixture_corpus(tmp_path / "fresh")
    for name in ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"):
        assert (directory / name).read_bytes() == (expected / name).read_bytes()

    corpus = load_corpus(_config(dataset="fixture"), n_seq=32)
    assert corpus.source.startswith("fixture")
    assert corpus.files["train"] == str(directory / "wiki.train.raw")
    assert corpus.num_tokens["train"] >= 60_000 and corpus.num_tokens["valid"] >= 8_000


def test_fixture_dir_survives_a_concurrent_writer(tmp_path: Path, monkeypatch):
    """Another process finishing first: its corpus is used and the temporary folder removed."""
    import physlm.fixture

    monkeypatch.setenv("PHYSLM_CACHE", str(tmp_path))
    final = tmp_path / f"fixture-{physlm.fixture.FIXTURE_VERSION}"
    original = physlm.fixture.write_fixture_corpus

    def racing_writer(directory, **sizes):
        original(final, train_tokens=500, valid_tokens=100, test_tokens=100)  # the other one
        return original(directory, train_tokens=500, valid_tokens=100, test_tokens=100)

    monkeypatch.setattr(physlm.fixture, "write_fixture_corpus", racing_writer)
    assert fixture_dir() == final
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_fixture_is_learnable_by_a_tiny_model(tmp_path: Path):
    """A bigram model gets far below the uniform loss within 40 steps."""
    write_fixture_corpus(tmp_path, train_tokens=20_000, valid_tokens=2_000, test_tokens=100)
    corpus = load_corpus(_config(data_dir=str(tmp_path)), n_seq=32)
    torch.manual_seed(0)
    size = len(corpus.vocab)
    model = torch.nn.Sequential(torch.nn.Embedding(size, 32), torch.nn.Linear(32, size))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for x, y in train_batches(corpus.train, 16, seed=0, epoch=0, max_batches=40):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        x, y = corpus.valid[:, :-1], corpus.valid[:, 1:]
        valid_loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert valid_loss.item() < 0.65 * math.log(size)


# --- the real offline copy -------------------------------------------------------------------

@pytest.mark.skipif(not SHARED_WT2.is_dir(),
                    reason=f"offline WikiText-2 copy not found at {SHARED_WT2}")
def test_wikitext2_proxy_counts():
    config = _config(data_dir=str(SHARED_WT2), train_file="wiki.test.raw",
                     valid_file="wiki.valid.raw")
    corpus = load_corpus(config, n_seq=128)
    assert corpus.num_tokens == {"train": 241_211, "valid": 213_886}
    assert corpus.valid.shape == (1658, 129)
    valid = list(eval_batches(corpus.valid, 32))
    assert len(valid) == 52 and len(valid[-1][0]) == 26
    assert num_batches(len(corpus.train), 32) == 59
    assert len(corpus.vocab) == 21_143
    assert corpus.checksums == {
        "train": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
        "valid": "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
    }

"""The HuggingFace hub path of physlm.data without the network: a `datasets.DatasetDict` built
from the offline WikiText-2 files exactly as the hub gives wikitext-2-raw-v1 must yield the same
corpus as reading those files directly.

The offline copy has only the valid and test splits, so, as in params/wt2_proxy.yaml, the test
split stands in for "train" and the valid split is "validation".
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from physlm.batches import eval_batches
from physlm.config import DataConfig
from physlm.data import corpus_lines_from_dataset, load_corpus

SHARED_WT2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw"

datasets = pytest.importorskip(
    "datasets", reason="`datasets` is not installed (pip install -e '.[test]' or '.[hub]')")
pytestmark = pytest.mark.skipif(
    not (SHARED_WT2 / "wiki.valid.raw").is_file() or not (SHARED_WT2 / "wiki.test.raw").is_file(),
    reason=f"offline WikiText-2 copy (wiki.valid.raw, wiki.test.raw) not found at {SHARED_WT2}")


def _hub_rows(path: Path) -> list[str]:
    """A raw file as the hub's rows: one row per line with its "\\n"; a blank line is ""."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return [line if line.strip() else "" for line in lines]


@pytest.fixture(scope="module")
def rows() -> dict[str, list[str]]:
    return {"train": _hub_rows(SHARED_WT2 / "wiki.test.raw"),
            "validation": _hub_rows(SHARED_WT2 / "wiki.valid.raw")}


@pytest.fixture(scope="module")
def dataset_dict(rows) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_dict({"text": lines})
                                 for split, lines in rows.items()})


def test_rows_look_like_the_hub(rows):
    assert len(rows["validation"]) == 3760 and len(rows["train"]) == 4358
    assert rows["validation"][:2] == ["", " = Homarus gammarus = \n"]
    assert all(row == "" or row.endswith(" \n") for split in rows.values() for row in split)


def test_corpus_lines_from_dataset(dataset_dict, rows):
    lines = corpus_lines_from_dataset(dataset_dict)
    assert set(lines) == {"train", "valid"}
    assert lines["train"] == rows["train"] and lines["valid"] == rows["validation"]


def test_hub_path_gives_the_raw_files_corpus(dataset_dict, rows, monkeypatch):
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return dataset_dict

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    hub = load_corpus(DataConfig(), n_seq=128)  # no local data: the hub path
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {})]
    raw = load_corpus(DataConfig(data_dir=str(SHARED_WT2), train_file="wiki.test.raw",
                                 valid_file="wiki.valid.raw"), n_seq=128)

    assert hub.source == "hub wikitext-2-raw-v1" and hub.files == {}
    assert hub.num_tokens == raw.num_tokens == {"train": 241_211, "valid": 213_886}
    valid = list(eval_batches(hub.valid, 32))
    assert len(valid) == 52 and all(len(x) == 32 for x, _ in valid[:-1])
    assert hub.vocab.itos == raw.vocab.itos and len(hub.vocab) == 21_143
    assert torch.equal(hub.train, raw.train) and torch.equal(hub.valid, raw.valid)
    # The hub's checksum is of its rows joined; blank lines are "" there, " \n" in the files.
    for split, name in (("train", "train"), ("valid", "validation")):
        joined = "".join(rows[name]).encode("utf-8")
        assert hub.checksums[split] == hashlib.sha256(joined).hexdigest()

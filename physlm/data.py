"""WikiText-2 at word level: text sources, vocabulary and chunks (SPEC section 1).

Tokens are `line.strip().split()` of every line, empty lines dropped, lines
concatenated with no end-of-line token. The vocabulary comes from the train split
only: `<pad>` = 0, `<unk>` = 1, then the most frequent train tokens (at most vocab_size
in all, each seen at least vocab_min_count times; every other word is `<unk>`, in train
too, so that `<unk>` is a trained token when either bound bites). A held-out split
(`heldout_fraction` > 0) is the last fraction of the train split's lines, removed from
train before the vocabulary is counted: tuning and early stopping read it, never the
validation split. The id stream
of each split is cut into non-overlapping chunks of n_seq + 1 ids (the tail is
dropped); a chunk gives x = chunk[:-1] and y = chunk[1:] (physlm.batches batches them).

Text sources, in order of precedence: explicit `train_file` / `valid_file`, a local
`data_dir`, `dataset: fixture` (the synthetic corpus of `physlm.fixture`), and
finally the HuggingFace hub (`datasets`, installed with the `hub` extra).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from physlm.config import DataConfig
from physlm.errors import DataError
from physlm.files import atomic_write_text
from physlm.fixture import fixture_dir

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1   # their ids in every Vocabulary
HUB_NAME = "wikitext-2-raw-v1"
# Split -> names it may have in the data folder, in order of preference.
_SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "validation")}
_OFFLINE_HELP = (
    "To provide the data: set data_dir to a folder holding wiki.train.raw and "
    "wiki.valid.raw; or set train_file and valid_file; or offline use "
    "params/wt2_proxy.yaml (data_dir: ../shared/data/wikitext-2-raw, the real-text "
    "proxy); or set dataset: fixture for the bundled synthetic corpus."
)


def tokenize(lines: Iterable[str]) -> list[str]:
    """Whitespace tokens of every line, concatenated; empty lines add nothing."""
    return [token for line in lines for token in line.strip().split()]


class Vocabulary:
    """Word <-> id mapping: `<pad>` = 0, `<unk>` = 1, then words by falling frequency."""

    def __init__(self, itos: list[str]) -> None:
        if itos[:2] != [PAD, UNK] or len(set(itos)) != len(itos):
            raise DataError(f"a vocabulary starts with {PAD!r}, {UNK!r} and has no duplicates")
        self.itos = list(itos)
        self.stoi = {word: index for index, word in enumerate(self.itos)}

    @classmethod
    def build(cls, tokens: Iterable[str], max_size: int, min_count: int = 1) -> Vocabulary:
        """The `max_size - 2` most frequent tokens (ties: first seen first) after the specials,
        of those seen at least `min_count` times.

        The literal tokens `<pad>` and `<unk>` (`.tokens` files contain `<unk>`) are not
        counted as words; `<unk>` in the text therefore encodes to id 1.
        """
        if max_size < 3:
            raise DataError(f"vocab_size must be >= 3, got {max_size}")
        counts = Counter(tokens)
        for special in (PAD, UNK):
            counts.pop(special, None)
        frequent = counts.most_common(max_size - 2)
        return cls([PAD, UNK] + [word for word, count in frequent if count >= min_count])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Iterable[str]) -> torch.Tensor:
        """int64 ids; unknown words map to 1 (`<unk>`)."""
        stoi = self.stoi
        return torch.tensor([stoi.get(token, UNK_ID) for token in tokens], dtype=torch.long)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[int(index)] for index in ids]

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps({"itos": self.itos}, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            return cls(json.loads(Path(path).read_text(encoding="utf-8"))["itos"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DataError(f"cannot read vocabulary {Path(path).absolute()}: {error}") from error


@dataclass
class Corpus:
    """Everything the trainer needs from the data."""

    vocab: Vocabulary
    train: torch.Tensor  # (num_train_chunks, n_seq + 1) int64
    valid: torch.Tensor  # (num_valid_chunks, n_seq + 1) int64
    source: str  # human-readable: "hub wikitext-2-raw-v1" or the file paths
    files: dict[str, str] = field(default_factory=dict)  # split -> path (empty for the hub)
    checksums: dict[str, str] = field(default_factory=dict)  # split -> sha256 of the raw text
    num_tokens: dict[str, int] = field(default_factory=dict)  # split -> token count
    # (num_heldout_chunks, n_seq + 1) int64: the last heldout_fraction of the train file's
    # lines, not in `train`; None without a held-out split (heldout_fraction 0).
    heldout: torch.Tensor | None = None


def _describe_dir(directory: Path) -> str:
    names = sorted(p.name for p in directory.iterdir())
    return ", ".join(names) if names else "nothing"


def _resolve_files(data: DataConfig) -> dict[str, Path]:
    """Split -> local file, from train_file / valid_file and data_dir."""
    base = Path(data.data_dir).expanduser().resolve() if data.data_dir else None
    if base is not None and base.exists() and not base.is_dir():
        raise DataError(f"data_dir: {base} is a file, not a folder; give the folder that "
                        "holds the text files (or set train_file and valid_file)")
    if base is not None and not base.is_dir():
        raise DataError(f"data_dir: folder not found: {base}")
    explicit = {"train": data.train_file, "valid": data.valid_file}
    files = {}
    for split, names in _SPLIT_NAMES.items():
        key = f"{split}_file"
        if explicit[split]:
            path = Path(explicit[split]).expanduser()
            path = (base / path if base else path).resolve()
            if path.is_dir():
                raise DataError(f"{key}: {path} is a directory, not a file; give the text "
                                "file itself (or set data_dir to the folder)")
            if not path.is_file():
                where = f"data_dir {base}" if base else "the current directory"
                raise DataError(f"{key}: file not found: {path} "
                                f"(relative paths resolve against {where})")
        elif base is not None:
            candidates = [pattern.format(name) for name in names
                          for pattern in ("wiki.{}.raw", "wiki.{}.tokens", "{}.txt")]
            path = next((base / c for c in candidates if (base / c).is_file()), None)
            if path is None:
                raise DataError(f"data_dir {base} has no {split} split: looked for "
                                f"{', '.join(candidates)}; it holds {_describe_dir(base)}")
        else:
            raise DataError(f"{key} is not set and there is no data_dir to find the "
                            f"{split} split in. {_OFFLINE_HELP}")
        files[split] = path
    return files


def _read_text(path: Path) -> tuple[str, str]:
    """(text, sha256 of its bytes); the text must be UTF-8."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8: undecodable byte at offset {error.start} "
                        f"({error.reason}); re-encode it to UTF-8, e.g. "
                        f"`iconv -f latin1 -t utf-8`") from error
    return text, hashlib.sha256(raw).hexdigest()


def corpus_lines_from_dataset(dataset_dict) -> dict[str, list[str]]:
    """Split -> rows of a `datasets.DatasetDict` of wikitext-2-raw-v1: its "train" and
    "validation" splits' "text" column (one row per line of the raw file, ending in "\\n";
    blank lines are "")."""
    return {"train": list(dataset_dict["train"]["text"]),
            "valid": list(dataset_dict["validation"]["text"])}


def _load_hub() -> dict[str, list[str]]:
    """Split -> rows of the hub's wikitext-2-raw-v1 (`corpus_lines_from_dataset`)."""
    try:
        import datasets

        return corpus_lines_from_dataset(datasets.load_dataset("wikitext", HUB_NAME))
    except Exception as error:  # not installed, offline, or the hub failed: all alike here
        raise DataError(f"cannot load {HUB_NAME} from the HuggingFace hub "
                        f"({type(error).__name__}: {error}). {_OFFLINE_HELP}") from error


def split_heldout(lines: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out): the first round(len(lines) * (1 - fraction)) lines, and the rest."""
    if not 0 <= fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")
    cut = round(len(lines) * (1 - fraction))
    return lines[:cut], lines[cut:]


def chunk_ids(ids: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Non-overlapping chunks of n_seq + 1 ids, shape (num_chunks, n_seq + 1); tail dropped."""
    size = n_seq + 1
    num_chunks = len(ids) // size
    return ids[: num_chunks * size].view(num_chunks, size)


def _names_files(data: DataConfig) -> bool:
    """Whether the settings name local text (files, or a folder), which takes precedence."""
    return bool(data.train_file or data.valid_file or data.data_dir)


def _local_files(data: DataConfig) -> dict[str, Path] | None:
    """Split -> file when the text is read from files (local ones, or the fixture corpus);
    None when it comes from the hub."""
    if _names_files(data):
        return _resolve_files(data)
    if data.dataset == "fixture":
        return _resolve_files(dataclasses.replace(data, data_dir=str(fixture_dir())))
    return None


def check_sources(data: DataConfig) -> None:
    """Find the text files the settings name, reading none (DataError when one is missing):
    a pipeline checks this before its first stage. (The hub is reached only when loading.)"""
    _local_files(data)


def split_lines(data: DataConfig, split: str) -> list[str]:
    """The text lines of one split ("train" or "valid"), from the source `load_corpus`
    reads (the fixed prompts of physlm.generate come from the validation text)."""
    paths = _local_files(data)
    return _load_hub()[split] if paths is None else _read_text(paths[split])[0].splitlines()


def load_corpus(data: DataConfig, n_seq: int, vocab: Vocabulary | None = None) -> Corpus:
    """Read train and valid text, cut the held-out lines off train (heldout_fraction), build
    (or use the given) vocabulary from the train lines left, and chunk every split."""
    paths = _local_files(data)
    if paths is not None:
        lines, files, checksums = {}, {}, {}
        for split, path in paths.items():
            text, checksums[split] = _read_text(path)
            lines[split] = text.splitlines()
            files[split] = str(path)
        source = ", ".join(f"{split} {path}" for split, path in files.items())
        source = source if _names_files(data) else f"fixture ({source})"
    else:
        lines = _load_hub()
        checksums = {split: hashlib.sha256("".join(rows).encode("utf-8")).hexdigest()
                     for split, rows in lines.items()}
        files, source = {}, f"hub {HUB_NAME}"
    if data.heldout_fraction > 0:
        lines["train"], lines["heldout"] = split_heldout(lines["train"], data.heldout_fraction)
    tokens = {split: tokenize(rows) for split, rows in lines.items()}
    needed = n_seq + 1
    for split, words in tokens.items():
        if split == "heldout":
            where = f"the last {data.heldout_fraction:.0%} of the train split's lines"
            empty = more = "raise heldout_fraction"
        else:
            where = files.get(split, f"{source} {split}")
            empty = f"point {split}_file or data_dir at the text it should hold"
            more = "give it more text"
        if not words:
            raise DataError(f"the {split} split ({where}) holds no tokens; {empty}")
        if len(words) < needed:
            raise DataError(f"the {split} split ({where}) has {len(words)} tokens, fewer than "
                            f"one sequence needs: n_seq + 1 = {needed}; {more} or lower n_seq")
    if vocab is None:
        vocab = Vocabulary.build(tokens["train"], data.vocab_size, data.vocab_min_count)
    chunks = {split: chunk_ids(vocab.encode(words), n_seq) for split, words in tokens.items()}
    if data.batch_size > len(chunks["train"]):  # one smaller batch per epoch: not the config
        raise DataError(f"batch_size {data.batch_size} is more than the train split's "
                        f"{len(chunks['train'])} sequences of n_seq + 1 = {needed} tokens "
                        f"({files.get('train', source)}); lower batch_size to at most "
                        f"{len(chunks['train'])}, or give it more text")
    return Corpus(vocab=vocab, train=chunks["train"], valid=chunks["valid"], source=source,
                  files=files, checksums=checksums, heldout=chunks.get("heldout"),
                  num_tokens={split: len(words) for split, words in tokens.items()})

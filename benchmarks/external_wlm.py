"""The textbook LSTM next to physlm's: pytorch/examples word_language_model on physlm's tokens.

The public script is not part of physlm; get it yourself, e.g.

    git clone https://github.com/pytorch/examples && git -C examples checkout 77f55b9
    python benchmarks/external_wlm.py --script examples/word_language_model/main.py

This writes physlm's own token streams (the params file's data, vocabulary and `<unk>`
handling) in the script's format and runs the script with its own defaults (SGD lr 20 with
its /4 annealing, clip 0.25, batch 20 x 35, dropout 0.2) at physlm's LSTM size (d 128, 2
layers, tied). Like for like with physlm's data (SPEC section 1):

- each split's tokens on one line: the script appends `<eos>` to every line, which would
  otherwise add ~1 easy target per line that physlm never sees;
- validation words outside the train vocabulary already `<unk>` (the script builds its
  dictionary from all splits, so it would otherwise know them);
- the same number of epochs as physlm's study, so the same training tokens.

The script's "test" split is the validation split again (it needs a file; physlm does not
score a test split). The log and a JSON of the per-epoch validation PPL go to
benchmarks/results/external-wlm-<tag>.{log,json}.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from physlm.config import load_config
from physlm.data import load_corpus
from physlm.values import parse_assignment

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = ["--emsize", "128", "--nhid", "128", "--nlayers", "2", "--tied"]
EPOCH_LINE = re.compile(r"end of epoch\s+(\d+).*valid loss\s+([\d.]+).*valid ppl\s+([\d.]+)")


def write_splits(params: str, overrides: dict, folder: Path) -> dict[str, int]:
    """physlm's train and validation token streams, one line per split; returns their sizes."""
    config = load_config(params, overrides)
    corpus = load_corpus(config.data, n_seq=1)   # chunks of 2 ids: the stream, tail aside
    sizes = {}
    for split, name in (("train", "train"), ("valid", "valid"), ("valid", "test")):
        words = corpus.vocab.decode(getattr(corpus, split).flatten().tolist())
        (folder / f"{name}.txt").write_text(" ".join(words) + "\n", encoding="utf-8")
        sizes[name] = len(words)
    sizes["vocab"] = len(corpus.vocab)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", required=True, help="word_language_model/main.py")
    parser.add_argument("--params", default="params/wt2_proxy.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="physlm data settings (e.g. the vocabulary's <unk> choice)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--tag", default="proxy")
    parser.add_argument("--extra", default="", help="more arguments for the script, quoted")
    args = parser.parse_args()

    overrides = dict(parse_assignment(item) for item in args.set)
    with tempfile.TemporaryDirectory() as folder:
        sizes = write_splits(args.params, overrides, Path(folder))
        command = [sys.executable, args.script, "--data", folder, "--epochs", str(args.epochs),
                   *SIZE, "--save", str(Path(folder) / "model.pt"), *args.extra.split()]
        start = time.perf_counter()
        log = subprocess.run(command, capture_output=True, text=True,
                             cwd=Path(args.script).resolve().parent)
        elapsed = time.perf_counter() - start
    if log.returncode:
        sys.exit(f"external_wlm: the script failed:\n{log.stderr[-2000:]}")
    epochs = [{"epoch": int(e), "val_loss": float(loss), "val_ppl": float(ppl)}
              for e, loss, ppl in EPOCH_LINE.findall(log.stdout)]
    shown = ["python", Path(args.script).name, *command[2:]]   # no paths of this machine
    record = {"command": " ".join(shown).replace(folder, "DATA"), "params": args.params,
              "overrides": overrides, "tokens": sizes, "epochs": epochs,
              "best_val_ppl": min(e["val_ppl"] for e in epochs), "wall_s": round(elapsed, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"external-wlm-{args.tag}.log").write_text(log.stdout)
    (RESULTS / f"external-wlm-{args.tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("tokens", "best_val_ppl", "wall_s")}))


if __name__ == "__main__":
    main()

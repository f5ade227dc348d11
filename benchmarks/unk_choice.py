"""The proxy's <unk> under each vocabulary minimum count, and the count references it gives.

For each vocab_min_count: how many train tokens become <unk>, how many validation (and
held-out) targets are <unk>, and the add-one unigram and interpolated Kneser-Ney bigram
and trigram perplexities (physlm.ngram) over all targets and over the non-<unk> ones.
Targets are the models' own (chunk[1:] of every n_seq + 1 chunk). Seconds of counting.

    python benchmarks/unk_choice.py                       # min counts 1 2 3 5, n_seq 128
    python benchmarks/unk_choice.py --heldout-fraction 0.1 --min-counts 1 2 3

Writes benchmarks/results/unk-choice[-heldout<f>].json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from physlm.config import load_config
from physlm.data import load_corpus
from physlm.ngram import UNK_ID, count_references

ROOT = Path(__file__).resolve().parents[1]


def measure(min_count: int, heldout_fraction: float, n_seq: int) -> dict:
    config = load_config(ROOT / "params" / "wt2_proxy.yaml")
    data = dataclasses.replace(config.data, data_dir=str(ROOT.parent / "shared" / "data"
                                                         / "wikitext-2-raw"),
                               vocab_min_count=min_count, heldout_fraction=heldout_fraction)
    corpus = load_corpus(data, n_seq)
    splits = ["valid"] + (["heldout"] if corpus.heldout is not None else [])
    row = {"vocab_min_count": min_count, "vocab_size": len(corpus.vocab),
           "train_tokens": corpus.train.numel(),
           "train_unk": int((corpus.train == UNK_ID).sum())}
    for split in splits:
        targets = getattr(corpus, split)[:, 1:]
        row[f"{split}_targets"] = targets.numel()
        row[f"{split}_unk_targets"] = int((targets == UNK_ID).sum())
        row[f"{split}_references"] = {name: {k: round(v, 1) for k, v in ppl.items()}
                                      for name, ppl in count_references(corpus, split).items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-counts", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--heldout-fraction", type=float, default=0.0)
    parser.add_argument("--n-seq", type=int, default=128)
    args = parser.parse_args()
    rows = [measure(k, args.heldout_fraction, args.n_seq) for k in args.min_counts]
    suffix = f"-heldout{args.heldout_fraction:g}" if args.heldout_fraction else ""
    out = ROOT / "benchmarks" / "results" / f"unk-choice{suffix}.json"
    out.write_text(json.dumps({"n_seq": args.n_seq, "heldout_fraction": args.heldout_fraction,
                               "rows": rows}, indent=2) + "\n")
    splits = [s for s in ("valid", "heldout") if f"{s}_targets" in rows[0]]
    for split in splits:
        print(f"\n{split}: | min count | vocab | train <unk> | {split} <unk> targets | "
              "unigram | KN bigram | KN trigram | (all / non-<unk>)\n|" + "---|" * 7)
        for r in rows:
            ref = r[f"{split}_references"]
            cells = [f"{ref[m]['all']:,.0f} / {ref[m]['known']:,.0f}"
                     for m in ("unigram", "kn_bigram", "kn_trigram")]
            print(f"| {r['vocab_min_count']} | {r['vocab_size']:,} | {r['train_unk']:,} of "
                  f"{r['train_tokens']:,} | {r[f'{split}_unk_targets']:,} of "
                  f"{r[f'{split}_targets']:,} | " + " | ".join(cells) + " |")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()

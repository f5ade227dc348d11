"""Light, honest tuning of a study baseline (the LSTM or the Transformer) on the proxy.

The study trains on wiki.test.raw and validates on wiki.valid.raw (params/wt2_proxy.yaml).
Tuning never reads the validation split: the training file's lines are cut at 90%, the
first part becomes the tuning runs' train split (and so their vocabulary; held-out words
it lacks are <unk>, as in the study), the last 10% their validation split. Each setting
of a small grid is then an ordinary physlm run of the baseline's params file at the
study's budget (`--epochs`, 6), trained by the study's own trainer, schedule and batching,
as the study runs them (physlm.executor), and scored by its best held-out perplexity.

    python benchmarks/tune_baseline.py --params params/lstm.yaml --set lr=1e-3,3e-3,1e-2
    python benchmarks/tune_baseline.py --params params/transformer.yaml --set lr=1e-3,3e-3

Writes benchmarks/results/tune-<name>.json; the runs stay in runs/tuning/<name>/.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from physlm.config import from_flat, read_params_file
from physlm.data import split_heldout
from physlm.executor import TrainJob, run_jobs
from physlm.runs import load_run
from physlm.values import parse_assignment

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FILE = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
HOLDOUT = 0.10


def split_train_file(source: Path, folder: Path) -> dict[str, str]:
    """Write the first 90% of `source`'s lines as tune.train.raw and the rest as
    tune.heldout.raw in `folder`; returns the data settings that point at them."""
    # The same cut as `heldout_fraction` (physlm.data.split_heldout). Written as files because
    # the trainer validates on `valid` only; once it reads Corpus.heldout, setting
    # heldout_fraction: 0.1 replaces these files.
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    train, heldout = split_heldout(lines, HOLDOUT)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tune.train.raw").write_text("".join(train), encoding="utf-8")
    (folder / "tune.heldout.raw").write_text("".join(heldout), encoding="utf-8")
    return {"data_dir": str(folder), "train_file": "tune.train.raw",
            "valid_file": "tune.heldout.raw"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="the baseline's params file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                        help="a grid axis: a config key and its comma-separated values")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train-file", default=str(TRAIN_FILE))
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tabulate the runs that exist (a stopped grid)")
    args = parser.parse_args()

    recipe = read_params_file(args.params)
    name = recipe.get("name", Path(args.params).stem)
    root = ROOT / "runs" / "tuning" / name
    data = split_train_file(Path(args.train_file), root / "data")
    axes = dict(parse_assignment(item) for item in args.set)
    axes = {key: [v.strip() for v in str(values).split(",")] for key, values in axes.items()}
    grid = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]

    jobs = []
    for point in grid:
        label = "_".join(f"{key}{value}" for key, value in point.items()) or "default"
        config = from_flat({**recipe, **data, **point, "epochs": args.epochs,
                            "seed": args.seed, "name": f"tune_{name}_{label}",
                            "progress": False})
        jobs.append((point, TrainJob(config, root / label)))
    started = time.perf_counter()
    if not args.report_only:
        run_jobs([job for _, job in jobs], workers=args.workers)

    results = []
    for point, job in jobs:
        epochs = load_run(job.run_dir).epochs if (Path(job.run_dir) / "config.yaml").is_file() \
            else None
        if epochs is None or not len(epochs):
            continue
        best = epochs.loc[epochs.val_loss.idxmin()]
        results.append({**point, "epochs_trained": len(epochs),
                        "heldout_ppl_best": float(best.val_ppl), "best_epoch": int(best.epoch) + 1,
                        "heldout_ppl_final": float(epochs.val_ppl.iloc[-1]),
                        "heldout_ppl_per_epoch": [round(float(p), 1) for p in epochs.val_ppl]})
    # Chosen among the settings that trained the whole budget; a setting stopped early
    # (diverging) stays in the record with the epochs it trained.
    chosen = min((r for r in results if r["epochs_trained"] == args.epochs),
                 key=lambda r: r["heldout_ppl_best"])
    record = {"what": f"tuning of {args.params} on a held-out slice of the proxy's TRAIN "
                      "split (the validation split is never read)",
              "train_file": str(Path(args.train_file).name),
              "split": f"first {1 - HOLDOUT:.0%} of its lines train, last {HOLDOUT:.0%} held out",
              "epochs": args.epochs, "seed": args.seed, "grid": axes,
              "wall_s": round(time.perf_counter() - started), "results": results,
              "chosen": chosen}
    out = ROOT / "benchmarks" / "results" / f"tune-{name}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print("\n| setting | epochs | best held-out PPL (epoch) | last |\n|---|---:|---:|---:|")
    for r in sorted(results, key=lambda r: r["heldout_ppl_best"]):
        label = ", ".join(f"{key} {r[key]}" for key in axes)
        print(f"| {label} | {r['epochs_trained']} | {r['heldout_ppl_best']:.1f} "
              f"({r['best_epoch']}) | {r['heldout_ppl_final']:.1f} |")
    print(f"\nchosen: {chosen}; written to {out}")


if __name__ == "__main__":
    main()

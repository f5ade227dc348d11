"""One proxy-sized training epoch through the real Trainer, in float32 and bf16 autocast.

    python benchmarks/gpu_epoch.py [--out FILE] [--device auto] [--modes fp32,bf16]
                                   [--batches 59] [--batch-size 32] [--n-seq 128]
                                   [--vocab 30000] [--eval-batches 4] [--warmup-steps 2]

The offline WikiText-2 proxy's epoch (59 batches of 32 x 128 tokens, vocabulary 30,000, the
reference model with the physics term on) on synthetic tokens: `physlm.trainer.Trainer`
built as benchmarks/bench.py's `reference_step` builds it (a temporary run directory, a
synthetic corpus), then `fit()` for one epoch, timed with the device synchronised. A few
`train_step` calls before the epoch warm the kernels up (`--warmup-steps`); the epoch's
wall time, the trainer's own step times, the losses and the skipped steps are reported,
and the estimate of a full WikiText-2 epoch (498 steps) from the median step. bf16 autocast
needs CUDA (the trainer ignores `amp` on the CPU): on the CPU that mode is skipped.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [path for path in (str(HERE), str(HERE.parent)) if path not in sys.path]

import physlm

physlm.passive_openmp()  # before torch: idle OpenMP threads sleep

# isort: split
import argparse
import json
import statistics
import tempfile
import time
from typing import Any

import torch

from physlm.config import from_flat
from physlm.distributed import resolve_device
from physlm.trainer import Trainer

# isort: split
from timing import sync
from workloads import BATCH, EPOCH_STEPS, VOCAB, synthetic_corpus

MODES = {"fp32": False, "bf16": True}   # mode -> amp


def epoch(device: torch.device, amp: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One epoch of `args.batches` batches, physics on, through Trainer.fit()."""
    config = from_flat({"device": str(device), "progress": False, "vocab_size": args.vocab,
                        "batch_size": args.batch_size, "n_seq": args.n_seq, "epochs": 1,
                        "physics_start_epoch": 0, "amp": amp,
                        "max_eval_batches": args.eval_batches})
    corpus = synthetic_corpus(args.vocab, args.n_seq, args.batches * args.batch_size)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, Path(run_dir) / "run", corpus)
        batch = corpus.train[:args.batch_size].to(device)
        for _ in range(args.warmup_steps):
            trainer.train_step(batch[:, :-1], batch[:, 1:], physics_on=True)
        sync(device)
        start = time.perf_counter()
        record = trainer.fit()[-1]
        sync(device)
        wall = time.perf_counter() - start
        steps = [json.loads(line) for line in trainer.run.steps.read_text().splitlines()]
    step_s = statistics.median(s["time_s"] for s in steps)
    tokens = args.batches * args.batch_size * args.n_seq
    return {"amp": amp, "epoch_wall_s": wall, "train_time_s": record["train_time_s"],
            "val_time_s": record["val_time_s"], "tokens_per_s": tokens / record["train_time_s"],
            "median_step_s": step_s, "full_epoch_estimate_s": EPOCH_STEPS * step_s,
            "steps": record["steps"], "skipped_steps": record["skipped_steps"],
            "train_loss": record["train_loss"], "val_loss": record["val_loss"],
            "finite": all(map(_finite, (record["train_loss"], record["val_loss"])))}


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_epoch.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON file (default: print only)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--modes", default=",".join(MODES), help="among fp32,bf16")
    parser.add_argument("--batches", type=int, default=59, help="the proxy's 59")
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--n-seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--warmup-steps", type=int, default=2)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose among {', '.join(MODES)}")
    result: dict[str, Any] = {"device": str(device), "batches": args.batches,
                              "batch_size": args.batch_size, "n_seq": args.n_seq,
                              "vocab": args.vocab, "modes": {}, "skipped": {}}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    for mode in modes:
        if MODES[mode] and device.type != "cuda":
            result["skipped"][mode] = "bf16 autocast needs CUDA (the trainer ignores amp here)"
            print(f"skipped {mode}: {result['skipped'][mode]}", flush=True)
            continue
        result["modes"][mode] = row = epoch(device, MODES[mode], args)
        print(f"{mode}: epoch {row['epoch_wall_s']:.2f} s ({row['steps']} steps, median step "
              f"{row['median_step_s'] * 1e3:.1f} ms, {row['tokens_per_s']:.0f} tokens/s), "
              f"loss {row['train_loss']:.3f}, skipped {row['skipped_steps']}", flush=True)
    if {"fp32", "bf16"} <= result["modes"].keys():
        result["bf16_over_fp32_step"] = (result["modes"]["bf16"]["median_step_s"]
                                         / result["modes"]["fp32"]["median_step_s"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if all(row["finite"] for row in result["modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

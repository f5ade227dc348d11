"""Trainer.train_step of two checkouts, before and after a change, interleaved in one process.

    git worktree add /tmp/before main     # or: git archive main | tar -x -C /tmp/before
    OMP_NUM_THREADS=1 python benchmarks/before_after.py /tmp/before . --out results/x.json

Physics on and off at the reference configuration (vocabulary 30,000, B=32, N=128), on
synthetic tokens, round after round in alternating order. Both packages are named physlm:
the "before" one is imported first, its modules are taken out of sys.modules (they keep
their own references) and the "after" one is imported. `--clock thread` times each call by
the CPU time of this thread (with one thread, all of a step's work): on a shared machine it
is far less noisy than the wall clock. Give the same checkout twice for the noise floor.
"""

# ruff: noqa: E402
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (physlm.passive_openmp)

import torch
from timing import Timing, paired_ratio, time_interleaved
from workloads import BATCH, VOCAB, synthetic_corpus


def train_step(checkout: Path, run_dir: str):
    """Trainer.train_step of `checkout`'s physlm, at the reference configuration."""
    for name in [name for name in sys.modules if name.split(".")[0] == "physlm"]:
        del sys.modules[name]
    sys.path.insert(0, str(checkout))
    try:
        from physlm.config import from_flat
        from physlm.trainer import Trainer

        config = from_flat({"device": "cpu", "progress": False, "vocab_size": VOCAB,
                            "batch_size": BATCH})
        trainer = Trainer(config, Path(run_dir),
                          synthetic_corpus(VOCAB, config.model.n_seq, 2 * BATCH))
    finally:
        sys.path.remove(str(checkout))
    trainer.model.train()
    return trainer.train_step


def cpu_time_rounds(fns: dict, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """CPU seconds of this thread per call, round after round, the order reversed each round."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for index in range(warmup + rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            start = time.thread_time()
            fns[name]()
            if index >= warmup:
                samples[name].append(time.thread_time() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--clock", choices=("wall", "thread"), default="thread")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        steps = {"before": train_step(args.before.resolve(), a),
                 "after": train_step(args.after.resolve(), b)}
        batch = synthetic_corpus(VOCAB, 128, BATCH, seed=1).train
        x, y = batch[:, :-1], batch[:, 1:]
        fns = {f"{who}_{phase}": (lambda step=step, on=on: step(x, y, on))
               for who, step in steps.items() for phase, on in (("on", True), ("off", False))}
        samples = (cpu_time_rounds(fns, args.rounds) if args.clock == "thread" else
                   time_interleaved(fns, torch.device("cpu"), Timing(args.rounds, 2, 1)))
    result = {"clock": args.clock, "threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rounds": args.rounds,
              "load_average": os.getloadavg(),
              "median_s": {name: statistics.median(s) for name, s in samples.items()}}
    for phase in ("on", "off"):
        ratios = [a / b for a, b in zip(samples[f"after_{phase}"], samples[f"before_{phase}"],
                                        strict=True)]
        quartiles = statistics.quantiles(ratios, n=4)
        result[f"after_over_before_{phase}"] = paired_ratio(samples[f"after_{phase}"],
                                                            samples[f"before_{phase}"])
        result[f"quartiles_{phase}"] = [quartiles[0], quartiles[2]]
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps({**result, "samples": samples}, indent=1))


if __name__ == "__main__":
    main()

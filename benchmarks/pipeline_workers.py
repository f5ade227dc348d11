"""Wall time of the phase3 pipeline with workers 1 (stages one after the other) and 2 (the
run's and the control's physics stages side by side), alternated round after round.

    python benchmarks/pipeline_workers.py [--rounds 3] [--out FILE.json]

A shortened proxy pipeline (the WikiText-2 proxy of params/wt2_proxy.yaml, 2 epochs,
physics from epoch index 1, a few batches per epoch) in fresh run directories; both
variants fork the control from the run's warmup, so they differ only in running the two
post-warmup stages in parallel. The ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from physlm.config import load_config
from physlm.pipeline import PipelineOptions, run_pipeline

SHORT = {"epochs": 2, "physics_start_epoch": 1, "max_train_batches": 12, "max_eval_batches": 8,
         "progress": False}


def one_run(workers: int, root: Path) -> float:
    config = load_config("params/wt2_proxy.yaml", SHORT)
    start = time.perf_counter()
    run_pipeline(config, root / f"w{workers}", PipelineOptions(workers=workers,
                                                               report_dir=str(root / "r")))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/pipeline-workers.json"))
    args = parser.parse_args()
    rounds = []
    for index in range(args.rounds):
        order = (1, 2) if index % 2 == 0 else (2, 1)   # alternate who goes first
        with tempfile.TemporaryDirectory() as folder:
            times = {w: one_run(w, Path(folder) / str(w)) for w in order}
        rounds.append({"order": list(order), "seconds": times, "ratio": times[2] / times[1]})
        print(f"round {index + 1}: workers 1 {times[1]:.1f}s, workers 2 {times[2]:.1f}s, "
              f"ratio {times[2] / times[1]:.3f}", flush=True)
    result = {"settings": SHORT, "rounds": rounds,
              "median_ratio": statistics.median(r["ratio"] for r in rounds)}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"median wall-time ratio (workers 2 / workers 1): {result['median_ratio']:.3f}")


if __name__ == "__main__":
    main()

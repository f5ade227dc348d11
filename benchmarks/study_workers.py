"""Wall time of the smoke study with workers 1 and 2, for one or more checkouts of physlm
(engines), alternated round after round.

    python benchmarks/study_workers.py --engine ray=. --engine pool=/tmp/physlm-pool \
        [--rounds 3] [--note TEXT] [--out benchmarks/results/ray-vs-pool.json]

Each measurement is the whole command a user types, `python -m physlm study --params
params/study_smoke.yaml --set workers=W` (8 variants and 2 ablation rows x 3 seeds, 30
runs of a tiny model on the fixture corpus, then the report), in the engine's checkout,
in fresh run and report directories: start-up (Ray's cluster, the pool's processes)
included. `pool` is physlm before Ray (main at 179c376, `git archive 179c376`), `ray` this
checkout. The order of the (engine, workers) pairs rotates every round, so load from other
processes hits all alike; each ratio is the median of the per-round ratios. Each
invocation is one session, appended to the sessions already in `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STUDY = "params/study_smoke.yaml"


def one_study(checkout: Path, workers: int, root: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(checkout)
    command = [sys.executable, "-m", "physlm", "study", "--params", STUDY,
               "--set", f"workers={workers}", "--set", f"run_dir={root / 'runs'}",
               "--set", f"report_dir={root / 'reports'}"]
    start = time.perf_counter()
    child = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed in {checkout}:\n{child.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", action="append", required=True, metavar="NAME=CHECKOUT")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--note", default="", help="what is special about this session")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ray-vs-pool.json"))
    args = parser.parse_args()
    engines = {name: Path(path).resolve() for name, path in
               (text.split("=", 1) for text in args.engine)}
    pairs = [(engine, workers) for engine in engines for workers in (1, 2)]
    rounds = []
    for index in range(args.rounds):
        order = pairs[index % len(pairs):] + pairs[:index % len(pairs)]
        seconds: dict[str, float] = {}
        for engine, workers in order:
            with tempfile.TemporaryDirectory() as folder:
                seconds[f"{engine} w{workers}"] = one_study(engines[engine], workers,
                                                            Path(folder))
            print(f"round {index + 1}: {engine} workers {workers}: "
                  f"{seconds[f'{engine} w{workers}']:.1f}s", flush=True)
        rounds.append({"order": [f"{e} w{w}" for e, w in order], "seconds": seconds,
                       "load_after": os.getloadavg()})
    medians = {name: statistics.median(r["seconds"][name] for r in rounds)
               for name in rounds[0]["seconds"]}
    ratios = {f"{engine}: w2 / w1": statistics.median(
        r["seconds"][f"{engine} w2"] / r["seconds"][f"{engine} w1"] for r in rounds)
        for engine in engines}
    names = list(engines)
    for workers in (1, 2):
        for other in names[1:]:
            ratios[f"w{workers}: {names[0]} / {other}"] = statistics.median(
                r["seconds"][f"{names[0]} w{workers}"] / r["seconds"][f"{other} w{workers}"]
                for r in rounds)
    session = {"note": args.note, "python": sys.executable, "study": STUDY,
               "cpus": os.cpu_count(), "engines": {k: str(v) for k, v in engines.items()},
               "rounds": rounds, "median_seconds": medians, "median_ratios": ratios}
    sessions = json.loads(args.out.read_text())["sessions"] if args.out.exists() else []
    args.out.write_text(json.dumps({"sessions": [*sessions, session]}, indent=2) + "\n")
    for name, value in {**medians, **ratios}.items():
        print(f"{name}: {value:.3f}")


if __name__ == "__main__":
    main()

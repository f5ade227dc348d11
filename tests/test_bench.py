"""The benchmark harness (benchmarks/bench.py, outside the package): its timing protocol and
a quick run's record (no timing asserted)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    """benchmarks/bench.py as a module (it puts its own folder on sys.path for its siblings)."""
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_samples_are_runs_of_calls_in_alternating_order(bench):
    Timing, time_interleaved = bench.Timing, bench.time_interleaved
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = time_interleaved(fns, torch.device("cpu"), Timing(repeats=3, warmup=1, calls=2))
    assert {name: len(s) for name, s in samples.items()} == {"a": 3, "b": 3, "c": 3}
    warmup, timed = calls[:3], calls[3:]
    assert warmup == ["a", "b", "c"]
    assert timed == ["a", "a", "b", "b", "c", "c",      # the order reverses every round, so
                     "c", "c", "b", "b", "a", "a",      # no function always follows the same one
                     "a", "a", "b", "b", "c", "c"]


def test_quick_run_writes_its_record(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--only", "energy,bk,moe", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["timing"]) == {"energy", "bk", "moe"}
    for form in bench.FORMS:
        row = record["bk"][form]
        # The fast core and the per-position loop agree, values and gradients (float32).
        assert row["max_abs_diff"] < 1e-5 and row["max_abs_diff_grad"] < 1e-4
        assert len(row["fast"]["samples_s"]) == bench.QUICK["bk"].repeats
    assert record["moe"]["max_abs_diff"] < 1e-5  # sparse and dense dispatch, same function
    assert set(record["targets"]) == {"BK speed-up vs loop (causal)",
                                      "BK speed-up vs loop (bidirectional)"}
    assert record["energy"]["median_s"] > 0
    printed = capsys.readouterr().out
    assert "energy term alone" in printed and f"wrote {out}" in printed

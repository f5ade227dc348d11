"""How the benchmarks measure: the timing protocol, its summaries, and peak memory.

Two ways to time, both on time.perf_counter with the device synchronised around each
timed run of calls (CUDA):

- `time_interleaved`, for comparisons of several functions in one run (the steps against
  the naive floor, the BK core against the loop, N against N, sparse against dense MoE):
  rounds of one sample per function, the order reversed every round, and ratios as medians
  of the per-round ratios (`paired_ratio`). torch.utils.benchmark times one function at a
  time; timed one after the other, two functions would see different load on a shared
  machine and each its own predecessor (see `Timing`).
- `time_single`, for one function alone (the energy term, validation):
  torch.utils.benchmark.Timer, with the same samples (runs of consecutive calls).
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils import benchmark


@dataclass(frozen=True)
class Timing:
    """How a section is timed: `repeats` samples per function, after `warmup` untimed rounds,
    each sample the mean over `calls` consecutive calls. A single millisecond-long call timed
    right after a different workload ran up to 1.6x slower than in a steady state on this
    shared CPU (caches, predictors, a vCPU that idled): that measures the neighbour, not the
    code, so short calls are timed in runs."""

    repeats: int
    warmup: int
    calls: int


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def time_interleaved(fns: dict[Any, Callable[[], Any]], device: torch.device,
                     timing: Timing) -> dict[Any, list[float]]:
    """Seconds per call of each function, sampled round-robin (see Timing), the order
    reversed every round: what runs just before a call (the naive floor's 1.8 GB of logits,
    say) changes its time, and a fixed order would charge that to one function only."""
    for _ in range(timing.warmup):
        for fn in fns.values():
            fn()
    samples: dict[Any, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for _ in range(timing.repeats):
        for name, fn in order:
            start = _clock(device)
            for _ in range(timing.calls):
                fn()
            samples[name].append((_clock(device) - start) / timing.calls)
        order.reverse()  # so that no function always runs right after the same neighbour
    return samples


def time_single(fn: Callable[[], Any], device: torch.device, timing: Timing,
                label: str) -> list[float]:
    """Seconds per call of one function alone: `timing.repeats` samples of
    torch.utils.benchmark.Timer.timeit(`timing.calls`) after `timing.warmup` untimed calls.
    Timer.timeit also makes 2 untimed calls before each sample (harmless: the function is its
    own neighbour). The Timer runs at torch's current thread count (its default is 1) and
    on this module's clock, which synchronises `device`, not only the current one."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, timer=partial(_clock, device),
                            num_threads=torch.get_num_threads(), label=label,
                            description=str(device))
    for _ in range(timing.warmup):
        fn()
    return [timer.timeit(number=timing.calls).times[0] for _ in range(timing.repeats)]


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator / denominator (robust to load that drifts)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def summary(samples: list[float], tokens: int | None = None) -> dict[str, Any]:
    median = statistics.median(samples)
    result: dict[str, Any] = {"median_s": median, "min_s": min(samples), "samples_s": samples}
    if tokens is not None:
        result["tokens_per_s"] = tokens / median
    return result


def peak_rss_mib() -> float:
    """Peak resident set size of this process's address space, in MiB.

    On Linux this is VmHWM: ru_maxrss survives execve, so a child started by a large
    parent would report at least the parent's size. Elsewhere, ru_maxrss.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10      # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10

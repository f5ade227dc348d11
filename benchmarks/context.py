"""Long context at the model level: ResNet-BK against the Transformer of matched size.

    python benchmarks/context.py [--quick] [--out benchmarks/results/context-cpu.json]
                                 [--lengths 128,512,2048,8192,16384] [--tokens 16384]
                                 [--time-cap-s 60] [--memory-budget-gib 12] [--device auto]

One training step (forward, backward, fused AdamW step) of each whole language model at
sequence lengths N with B * N = `--tokens` fixed, vocabulary 30,000, the reference
d_model 64, 4 layers (physlm.model.ResNetBK, physlm.transformer.Transformer; 4,146,120
and 4,078,256 parameters at N = 128). The models:

- resnet_bk: the reference configuration (dropout 0.1);
- resnet_bk_improved: the layer of params/improved.yaml (4 potentials with learned shifts,
  the resolvent applied to the features, MoE balancing; issue 23), dropout 0.1;
- resnet_bk_improved_tied: the same at d_model 88 with the head tied to the embedding
  (params/improved_tied.yaml), dropout 0.1;
- resnet_bk_improved_tied_gated: tied at d_model 84 with the selective write and read gates
  (params/improved_tied_gated.yaml), dropout 0.1;
- resnet_bk_improved_tied_dense: tied at d_model 112 with one expert per layer
  (params/improved_tied_dense.yaml), dropout 0.1;
- resnet_bk_improved_tied_deep8: tied, 8 layers at d_model 68 (params/improved_tied_deep8.yaml),
  dropout 0.1;
- resnet_bk_improved_tied_deep16: tied, 16 layers at d_model 52
  (params/improved_tied_deep16.yaml), dropout 0.1; likewise deep24 (24 layers at d_model 44)
  and deep32 (32 layers at d_model 36);
- transformer: dropout 0.1 as it trains with the reference configuration. Attention dropout
  makes torch's scaled_dot_product_attention take its math path on the CPU: B x heads x N x N
  scores, softmax and dropout mask in memory;
- transformer_p0: dropout 0, so that the fused (flash) attention kernel runs: O(N) memory,
  still O(N^2) time. The strongest attention baseline torch offers here.

At each N, every model still in the race first runs one step alone (the warmup round of
the timing): a step that needs more new memory than the budget (`--memory-budget-gib`,
enforced as an address-space limit on the CPU and a memory fraction on CUDA) or takes longer
than `--time-cap-s` stops that model there, and the reason is recorded. The survivors are
then timed interleaved, all (model, N) pairs in the same rounds (timing.time_interleaved),
so that load drifting over the run hits every length and model alike; each time is the
median of the rounds, each ratio the median of the per-round ratios.

Peak memory is that of each step above what was resident before it: the high-water mark
VmHWM (timing.peak_rss_mib), reset before every step through /proc/self/clear_refs, after
freed heap memory went back to the system (malloc_trim). It counts activations, gradients
and temporaries, not the parameters, the optimizer state or the ~0.4 GiB of Python and
torch (on CUDA: torch.cuda.max_memory_allocated above the memory allocated before the
step). All in one process, so that the models see the same load.
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
import contextlib
import ctypes
import dataclasses
import gc
import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from physlm.config import ModelConfig, load_config
from physlm.model import ResNetBK
from physlm.transformer import Transformer

# isort: split
from bench import environment, resolve
from report import machine_info, save_results
from timing import Timing, paired_ratio, peak_rss_mib, summary, sync, time_interleaved
from workloads import VOCAB


def params_model(variant: str) -> dict[str, Any]:
    """The model settings of params/<variant>.yaml that differ from ModelConfig's defaults:
    the layer and the embedding init a study variant trains with, read, not restated (a
    restatement once missed the embedding init, and a head tied to the default N(0, 1)
    embedding gives logits of std ~sqrt(d_model), whose softmax underflows into float32
    denormals: the tied d_model-88 step ran 2x slower, 1.0 s against 0.48 s at std 0.02)."""
    model = load_config(HERE.parent / "params" / f"{variant}.yaml").model
    defaults = ModelConfig()
    return {field.name: getattr(model, field.name) for field in dataclasses.fields(model)
            if getattr(model, field.name) != getattr(defaults, field.name)}


# name -> (class, model settings); resnet_bk_<variant> is the layer of params/<variant>.yaml.
IMPROVED = ("improved", "improved_tied", "improved_tied_gated", "improved_tied_dense",
            "improved_tied_deep8", "improved_tied_deep16", "improved_tied_deep24",
            "improved_tied_deep32")
MODELS = {"resnet_bk": (ResNetBK, {}),
          **{f"resnet_bk_{variant}": (ResNetBK, params_model(variant)) for variant in IMPROVED},
          "transformer": (Transformer, {}), "transformer_p0": (Transformer, {"dropout": 0.0})}
LENGTHS = (128, 512, 2048, 8192, 16_384)
QUICK_LENGTHS = (128, 1024)
GOAL = 1.5  # a ResNet-BK's time per token at the longest N over the shortest


def build_step(name: str, n: int, batch: int, device: torch.device,
               vocab: int) -> Callable[[], None]:
    """One optimizer step of model `name` at (batch, n) on fixed random tokens."""
    cls, settings = MODELS[name]
    torch.manual_seed(0)
    model = cls(ModelConfig(n_seq=n, **settings), vocab).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    tokens = torch.randint(2, vocab, (batch, n + 1), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    def step() -> None:
        loss = model(x, y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _status_mib(field: str) -> float | None:
    """A /proc/self/status field in MiB (VmRSS, VmHWM, VmSize), None where there is none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**10
    return None


def _release_free_memory() -> None:
    """Return freed heap memory to the system, so that RSS before a step is what is live."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MeteredStep:
    """A step whose calls each get `budget` bytes of new memory at most (an address-space
    limit on the CPU, a memory fraction on CUDA) and whose peak above the memory resident
    before the call is recorded (the high-water mark VmHWM, reset through
    /proc/self/clear_refs before each call; torch.cuda's peak statistics on CUDA)."""

    def __init__(self, step: Callable[[], None], device: torch.device, budget: int) -> None:
        self.step, self.device, self.budget = step, device, budget
        self.peak_step_mib: float | None = None   # max over calls of (peak - resident before)
        self.peak_process_mib: float | None = None

    def _record(self, before: float | None, peak: float | None) -> None:
        if before is not None and peak is not None:
            self.peak_step_mib = max(self.peak_step_mib or 0.0, peak - before)
            self.peak_process_mib = max(self.peak_process_mib or 0.0, peak)

    def __call__(self) -> None:
        if self.device.type == "cuda":
            return self._call_cuda()
        _release_free_memory()
        before, size = _status_mib("VmRSS"), _status_mib("VmSize")
        reset = Path("/proc/self/clear_refs")
        if before is None or size is None or not reset.exists():
            self.step()
            return None
        reset.write_text("5")                      # VmHWM := VmRSS
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (int(size * 2**20) + self.budget, hard))
        try:
            self.step()
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
            self._record(before, peak_rss_mib())
        return None

    def _call_cuda(self) -> None:
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(min(1.0, (before + self.budget) / total), index)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.step()
        torch.cuda.synchronize(self.device)
        self._record(before / 2**20, torch.cuda.max_memory_allocated(self.device) / 2**20)


def probe(name: str, step: MeteredStep, time_cap_s: float) -> dict[str, Any]:
    """The model's first step (the warmup round of the timing): status ok, memory or time."""
    start = time.perf_counter()
    try:
        step()
        sync(step.device)
    except (MemoryError, RuntimeError) as error:  # torch.cuda.OutOfMemoryError is one
        if not isinstance(error, MemoryError) and "alloc" not in str(error).lower() \
                and "out of memory" not in str(error).lower():
            raise
        _release_free_memory()
        return {"status": "memory", "detail": f"{type(error).__name__} beyond the "
                f"budget: {str(error).strip().splitlines()[0][:160]}"}
    seconds = time.perf_counter() - start
    if seconds > time_cap_s:
        return {"status": "time", "first_step_s": seconds,
                "detail": f"its first step took {seconds:.1f} s > the {time_cap_s:g} s cap"}
    return {"status": "ok", "first_step_s": seconds}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Probe every (model, N) in order of N, then time all survivors in the same rounds: load
    that drifts over the run hits every length and every model alike."""
    device = resolve(args.device)
    budget = int(args.memory_budget_gib * 2**30)
    rows: list[dict[str, Any]] = []
    stopped: dict[str, dict[str, Any]] = {}
    steps: dict[tuple[str, int], MeteredStep] = {}
    for n in args.lengths:
        batch = max(1, args.tokens // n)
        row: dict[str, Any] = {"n": n, "batch": batch, "tokens": batch * n, "models": {}}
        rows.append(row)
        for name in args.models:
            if name in stopped:
                row["models"][name] = {"status": "not run",
                                       "detail": f"stopped at N={stopped[name]['n']}"}
                continue
            print(f"[context] N={n} B={batch} {name}: first step", flush=True)
            step = MeteredStep(build_step(name, n, batch, device, args.vocab), device, budget)
            cell = row["models"][name] = probe(name, step, args.time_cap_s)
            if cell["status"] == "ok":
                steps[name, n] = step
            else:
                stopped[name] = {"n": n, "reason": cell["status"], "detail": cell["detail"]}
                del step
                _release_free_memory()
    print(f"[context] {args.repeats} rounds of {len(steps)} (model, N) steps", flush=True)
    samples = time_interleaved(steps, device, Timing(args.repeats, warmup=0, calls=1))
    per_token = {}
    for row in rows:
        n, tokens = row["n"], row["tokens"]
        for name in args.models:
            if (name, n) not in samples:
                continue
            s = samples[name, n]
            per_token[name, n] = [t / tokens for t in s]
            row["models"][name].update(
                **summary(s, tokens), ms_per_token=statistics.median(s) / tokens * 1e3,
                peak_step_mib=steps[name, n].peak_step_mib,
                peak_process_mib=steps[name, n].peak_process_mib)
            if name != "resnet_bk" and ("resnet_bk", n) in samples:
                row["models"][name]["time_over_resnet_bk"] = paired_ratio(
                    s, samples["resnet_bk", n])
    return {"rows": rows, "stopped": stopped, **scaling(per_token, args.lengths)}


def scaling(per_token: dict[tuple[str, int], list[float]], lengths: list[int]) -> dict[str, Any]:
    """Time per token at the longest N over the shortest (median of the per-round ratios),
    per model that ran at both."""
    ratios = {name: paired_ratio(per_token[name, lengths[-1]], per_token[name, lengths[0]])
              for name in MODELS
              if (name, lengths[0]) in per_token and (name, lengths[-1]) in per_token}
    fastest = {name: min(per_token[name, lengths[-1]]) / min(per_token[name, lengths[0]])
               for name in ratios}
    result: dict[str, Any] = {"time_per_token_longest_over_shortest": ratios,
                              "fastest_time_per_token_longest_over_shortest": fastest}
    result["goal"] = {name: {"value": ratio, "target": f"<= {GOAL}", "met": ratio <= GOAL}
                      for name, ratio in ratios.items() if name.startswith("resnet_bk")}
    return result


def format_table(results: dict[str, Any]) -> list[str]:
    lines = ["   N     B  model                 tokens/s   ms/token  step peak MiB  status"]
    for row in results["rows"]:
        for name, cell in row["models"].items():
            speed = (f"{cell['tokens_per_s']:9.0f}  {cell['ms_per_token']:9.4f}"
                     if "tokens_per_s" in cell else f"{'-':>9s}  {'-':>9s}")
            peak = cell.get("peak_step_mib")
            peak_text = f"{peak:9.0f}" if peak is not None else f"{'-':>9s}"
            lines.append(f"{row['n']:6d} {row['batch']:4d}  {name:20s} {speed}      {peak_text}"
                         f"  {cell['status']}")
    fastest = results["fastest_time_per_token_longest_over_shortest"]
    for name, ratio in results["time_per_token_longest_over_shortest"].items():
        lines.append(f"{name}: time per token at the longest N / shortest = {ratio:.2f} "
                     f"(median of the rounds' ratios; fastest over fastest {fastest[name]:.2f})")
    for name, stop in results["stopped"].items():
        lines.append(f"{name} stopped at N={stop['n']} ({stop['reason']}): {stop['detail']}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/context.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"N = {QUICK_LENGTHS}, 2,048 tokens per step, 2 rounds: a smoke run")
    parser.add_argument("--out", type=Path,
                        help="JSON file (default benchmarks/results/context-<device>[-quick].json)")
    parser.add_argument("--lengths", help="comma-separated N (default 128,512,2048,8192,16384)")
    parser.add_argument("--tokens", type=int, help="B * N per step (default 16,384)")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="default 30,000 (reference)")
    parser.add_argument("--models", default=",".join(MODELS), help="among " + ",".join(MODELS))
    parser.add_argument("--repeats", type=int, help="timed rounds (default 3, quick 2)")
    parser.add_argument("--time-cap-s", type=float, default=60.0, help="per step")
    parser.add_argument("--memory-budget-gib", type=float, default=12.0,
                        help="new memory one step may take (default 12 GiB)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    args.lengths = ([int(n) for n in args.lengths.split(",")] if args.lengths
                    else list(QUICK_LENGTHS if args.quick else LENGTHS))
    args.tokens = args.tokens or (2048 if args.quick else 16_384)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose among {', '.join(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve(args.device)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine_info(environment(device)), "quick": args.quick,
        "settings": {"lengths": args.lengths, "tokens_per_step": args.tokens, "vocab": args.vocab,
                     "models": {name: {"class": MODELS[name][0].__name__,
                                       "settings": MODELS[name][1]} for name in args.models},
                     "repeats": args.repeats, "warmup": "the first step (the probe)",
                     "time_cap_s": args.time_cap_s, "memory_budget_gib": args.memory_budget_gib,
                     "threads": args.threads, "device": str(device)},
        "load_average_start": os.getloadavg()}
    results.update(run(args))
    results["load_average_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - start
    print("\n".join(format_table(results)))
    name = f"context-{device.type}{'-quick' if args.quick else ''}.json"
    out = save_results(results, args.out or HERE / "results" / name)
    print(f"wrote {out} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

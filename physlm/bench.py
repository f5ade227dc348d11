"""Benchmarks: training step, validation, BK core and its scaling, MoE dispatch.

    python -m physlm bench [--quick] [--out benchmarks/results/cpu.json]
                           [--only step,energy,eval,bk,scaling,moe] [--device auto]
                           [--threads N]

Sections (all on synthetic tokens, at the reference configuration of SPEC section 2):

- step: one optimizer step through the real `Trainer.train_step` (forward, energy term,
  backward, clip, fused AdamW, multiplier update), physics on and off, against the naive
  floor written plainly below (embedding -> dense head -> cross-entropy on the full logits
  -> AdamW). The three are timed interleaved, round after round, and the ratios are
  medians of the per-round ratios, so load from other processes hits all of them alike.
  Peak resident memory is per process: each configuration runs again alone in a fresh
  subprocess that reports its own peak RSS.
- energy: the energy term alone (what physics adds to a step), forward and backward.
- eval: validation throughput (model.eval(), no_grad).
- bk: BK core forward + backward at B=32, N=128, both forms, against a per-position
  Python loop through the continued fractions (plain autograd, complex tensors).
- scaling: BK core at N = 128 ... 16,384 with B * N fixed, time per position.
- moe: one MoE layer forward + backward, sparse dispatch against dense (all experts).

Times are medians of samples after warmup rounds, a sample being the mean of a run of
consecutive calls (see Timing; time.perf_counter, with torch.cuda.synchronize around each
timed run on CUDA). Only ratios measured in the same run are comparable: the machine may
be shared. On a shared CPU, set OMP_WAIT_POLICY=PASSIVE: spinning OpenMP workers otherwise
lose their core to other processes at every parallel region, and small operations take
milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import physlm
from physlm.bk_core import resolvent_diagonal
from physlm.config import ModelConfig, from_flat
from physlm.data import PAD, UNK, Corpus, Vocabulary
from physlm.model import ResNetBK
from physlm.moe import SparseMoE
from physlm.physics import EnergyHeads, energy_terms
from physlm.run import environment_info
from physlm.trainer import Trainer, resolve_device

SECTIONS = ("step", "energy", "eval", "bk", "scaling", "moe")
STEP_CONFIGS = ("naive_floor", "physics_off", "physics_on")
FORMS = ("causal", "bidirectional")


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


FULL = {"step": Timing(31, 3, 1), "energy": Timing(30, 3, 5), "eval": Timing(20, 3, 1),
        "bk": Timing(30, 5, 20), "scaling": Timing(10, 2, 3), "moe": Timing(30, 5, 5)}
QUICK = {"step": Timing(3, 1, 1), "energy": Timing(5, 1, 2), "eval": Timing(3, 1, 1),
         "bk": Timing(5, 2, 5), "scaling": Timing(3, 1, 1), "moe": Timing(5, 2, 2)}
EPOCH_STEPS, EVAL_STEPS = 498, 52   # train and validation batches on WikiText-2 (SPEC section 1)
VOCAB, BATCH = 30_000, 32
SCALING_POSITIONS = 65_536  # B * N for the scaling sweep
SCALING_LENGTHS = (128, 512, 2048, 8192, 16_384)
TARGETS = {  # name: (value key, bound, "max" or "min")
    "step / naive floor": ("step_over_naive", 0.6, "max"),
    "peak RSS / naive floor": ("rss_over_naive", 0.5, "max"),
    "physics overhead": ("physics_overhead", 0.03, "max"),
    "BK speed-up vs loop (causal)": ("bk_speedup_causal", 10.0, "min"),
    "BK speed-up vs loop (bidirectional)": ("bk_speedup_bidirectional", 10.0, "min"),
    "BK time/position max/min over N (causal)": ("bk_scaling_causal", 1.5, "max"),
    "BK time/position max/min over N (bidirectional)": ("bk_scaling_bidirectional", 1.5, "max"),
}


# ---------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device,
                     timing: Timing) -> dict[str, list[float]]:
    """Seconds per call of each function, sampled round-robin (see Timing), the order
    reversed every round: what runs just before a call (the naive floor's 1.8 GB of logits,
    say) changes its time, and a fixed order would charge that to one function only."""
    for _ in range(timing.warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for _ in range(timing.repeats):
        for name, fn in order:
            _sync(device)
            start = time.perf_counter()
            for _ in range(timing.calls):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / timing.calls)
        order.reverse()  # so that no function always runs right after the same neighbour
    return samples


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator / denominator (robust to load that drifts)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def _summary(samples: list[float], tokens: int | None = None) -> dict[str, Any]:
    median = statistics.median(samples)
    summary: dict[str, Any] = {"median_s": median, "min_s": min(samples), "samples_s": samples}
    if tokens is not None:
        summary["tokens_per_s"] = tokens / median
    return summary


# ---------------------------------------------------------------- workloads
def synthetic_corpus(vocab_size: int, n_seq: int, chunks: int, seed: int = 0) -> Corpus:
    """Uniformly random token ids under a vocabulary of made-up words."""
    generator = torch.Generator().manual_seed(seed)
    words = [PAD, UNK] + [f"w{i}" for i in range(2, vocab_size)]
    ids = torch.randint(2, vocab_size, (chunks, n_seq + 1), generator=generator)
    return Corpus(vocab=Vocabulary(words), train=ids, valid=ids, source="synthetic")


def reference_trainer(run_dir: Path, device: torch.device) -> Trainer:
    """A Trainer at the reference configuration (ModelConfig defaults, vocab 30,000)."""
    config = from_flat({"device": str(device), "progress": False, "vocab_size": VOCAB,
                        "batch_size": BATCH})
    corpus = synthetic_corpus(VOCAB, config.model.n_seq, 2 * BATCH)
    trainer = Trainer(config, run_dir, corpus)
    trainer.model.train()
    return trainer


class NaiveFloor(nn.Module):
    """Embedding -> dense head -> cross-entropy on the full logits: the cost of the vocabulary."""

    def __init__(self, vocab_size: int, d_model: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.embedding(x))                     # (B, N, V), all of it
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def step_functions(device: torch.device, trainer: Trainer | None,
                   names: tuple[str, ...] = STEP_CONFIGS) -> dict[str, Callable[[], Any]]:
    """One training step of each named configuration, as a callable (same batch for all)."""
    model = ModelConfig()
    batch = synthetic_corpus(VOCAB, model.n_seq, BATCH, seed=1).train.to(device)
    x, y = batch[:, :-1], batch[:, 1:]
    fns: dict[str, Callable[[], Any]] = {}
    if "naive_floor" in names:
        naive = NaiveFloor(VOCAB, model.d_model).to(device)
        optimizer = torch.optim.AdamW(naive.parameters(), lr=1e-3, weight_decay=0.01)

        def naive_step() -> None:
            loss = naive(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        fns["naive_floor"] = naive_step
    if "physics_off" in names:
        fns["physics_off"] = lambda: trainer.train_step(x, y, physics_on=False)
    if "physics_on" in names:
        fns["physics_on"] = lambda: trainer.train_step(x, y, physics_on=True)
    return fns


def loop_resolvent_diagonal(diag: torch.Tensor, z: complex, causal: bool) -> torch.Tensor:
    """Reference BK core: SPEC section 3's continued fractions, one position at a time.

    H = tridiag(1, diag, 1), so b_i c_i = 1: L_1 = 0, L_i = 1 / (a'_{i-1} - L_{i-1}),
    R_N = 0, R_i = 1 / (a'_{i+1} - R_{i+1}); causal g_i = 1 / (a'_i - L_i), full
    G_ii = 1 / (a'_i - L_i - R_i). Plain autograd differentiates the recursion.
    """
    shifted = (diag - z).unbind(-1)
    n = len(shifted)
    left = [torch.zeros_like(shifted[0])]
    for i in range(1, n):
        left.append(1 / (shifted[i - 1] - left[i - 1]))
    if causal:
        return torch.stack([1 / (a - lf) for a, lf in zip(shifted, left, strict=True)], -1)
    right = [torch.zeros_like(shifted[0])]
    for i in range(n - 2, -1, -1):
        right.append(1 / (shifted[i + 1] - right[-1]))
    right.reverse()
    return torch.stack([1 / (a - lf - rt) for a, lf, rt in zip(shifted, left, right,
                                                                   strict=True)], -1)


def bk_pass(core: Callable[..., torch.Tensor], diag: torch.Tensor, weight: torch.Tensor,
            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + backward of a BK core through a fixed read-out of [Re G, Im G]: (G, dloss/da)."""
    leaf = diag.detach().requires_grad_()
    g = core(leaf, 1j, causal=causal)
    (torch.view_as_real(g) * weight).sum().backward()
    return g.detach(), leaf.grad


def random_potential(batch: int, n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """diag = -2 + v with v in [-3, 3], as the model's potentials are clamped."""
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, n, generator=generator).clamp(-3, 3)
    return (v - 2.0).to(device)


# ---------------------------------------------------------------- sections
def bench_step(device: torch.device, timing: Timing, threads: int) -> dict[str, Any]:
    """Step time of the three configurations (interleaved) and their peak RSS (subprocesses)."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = reference_trainer(Path(run_dir), device)
        samples = time_interleaved(step_functions(device, trainer), device, timing)
    tokens = BATCH * ModelConfig().n_seq
    result: dict[str, Any] = {name: _summary(s, tokens) for name, s in samples.items()}
    for name in ("physics_off", "physics_on"):
        result[name]["epoch_s_estimate"] = EPOCH_STEPS * result[name]["median_s"]
    result["step_over_naive"] = paired_ratio(samples["physics_on"], samples["naive_floor"])
    result["physics_off_over_naive"] = paired_ratio(samples["physics_off"],
                                                    samples["naive_floor"])
    result["physics_overhead"] = paired_ratio(samples["physics_on"], samples["physics_off"]) - 1
    # The spread of the per-round ratios: on a shared CPU it is several times the target.
    quartiles = statistics.quantiles([a / b - 1 for a, b in zip(samples["physics_on"],
                                                               samples["physics_off"],
                                                               strict=True)], n=4)
    result["physics_overhead_quartiles"] = [quartiles[0], quartiles[2]]
    memory = {name: measure_memory(name, device, threads) for name in STEP_CONFIGS}
    result["memory"] = memory
    result["rss_over_naive"] = (memory["physics_on"]["peak_rss_mib"]
                                / memory["naive_floor"]["peak_rss_mib"])
    return result


def measure_memory(name: str, device: torch.device, threads: int) -> dict[str, float]:
    """Peak memory of a fresh process that only runs configuration `name`."""
    env = dict(os.environ)
    package_root = str(Path(physlm.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "physlm.bench", "--memory-child", name,
               "--device", str(device), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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


def memory_child(name: str, device: torch.device, steps: int = 4) -> dict[str, float]:
    """Run `steps` steps of one configuration in this (fresh) process; report peak memory."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = None if name == "naive_floor" else reference_trainer(Path(run_dir), device)
        step = step_functions(device, trainer, (name,))[name]
        for _ in range(steps):
            step()
        _sync(device)
    memory = {"peak_rss_mib": peak_rss_mib()}
    if device.type == "cuda":
        memory["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return memory


def bench_energy(device: torch.device, timing: Timing) -> dict[str, Any]:
    """The energy term alone, the part of a step that physics adds: the reference definition
    on two batches' token embeddings, forward and backward through the heads of all layers.
    A component time, far less noisy than the difference of two whole-step medians."""
    config = ModelConfig()
    heads = [EnergyHeads(config.d_model).to(device) for _ in range(config.n_layers)]
    generator = torch.Generator().manual_seed(5)
    current, previous = (torch.randn(BATCH, config.n_seq, config.d_model, generator=generator)
                         .to(device) for _ in range(2))
    current.requires_grad_()
    lambdas = torch.full((config.n_layers,), 0.05, device=device)
    parameters = [current] + [p for h in heads for p in h.parameters()]

    def energy_step() -> None:
        terms = energy_terms(heads, "embedding_pairs", embeddings=current,
                             previous_embeddings=previous)
        torch.autograd.grad((lambdas * terms.mse).mean(), parameters)

    samples = time_interleaved({"energy": energy_step}, device, timing)["energy"]
    return _summary(samples)


def bench_eval(device: torch.device, timing: Timing) -> dict[str, Any]:
    """Validation throughput: model.eval(), no_grad, the loss of one batch."""
    config = ModelConfig()
    model = ResNetBK(config, VOCAB).to(device).eval()
    batch = synthetic_corpus(VOCAB, config.n_seq, BATCH, seed=2).valid.to(device)
    x, y = batch[:, :-1], batch[:, 1:]

    @torch.no_grad()
    def evaluate() -> torch.Tensor:
        return model(x, y).loss

    samples = time_interleaved({"eval": evaluate}, device, timing)["eval"]
    result = _summary(samples, BATCH * config.n_seq)
    result["epoch_s_estimate"] = EVAL_STEPS * result["median_s"]
    return result


def bench_bk(device: torch.device, timing: Timing) -> dict[str, Any]:
    """BK core forward + backward at B=32, N=128 against the per-position loop."""
    n = ModelConfig().n_seq
    diag = random_potential(BATCH, n, device)
    weight = torch.randn(BATCH, n, 2, generator=torch.Generator().manual_seed(3)).to(device)
    result: dict[str, Any] = {"batch": BATCH, "n": n}
    for form in FORMS:
        causal = form == "causal"
        fast = partial(bk_pass, resolvent_diagonal, diag, weight, causal)
        loop = partial(bk_pass, loop_resolvent_diagonal, diag, weight, causal)
        (g_fast, grad_fast), (g_loop, grad_loop) = fast(), loop()
        samples = time_interleaved({"fast": fast, "loop": loop}, device, timing)
        result[form] = {
            "fast": _summary(samples["fast"]), "loop": _summary(samples["loop"]),
            "speedup": paired_ratio(samples["loop"], samples["fast"]),
            "max_abs_diff": (g_fast - g_loop).abs().max().item(),
            "max_abs_diff_grad": (grad_fast - grad_loop).abs().max().item(),
        }
    return result


def bench_scaling(device: torch.device, timing: Timing) -> dict[str, Any]:
    """BK core forward + backward time per position for growing N at fixed B * N."""
    result: dict[str, Any] = {"positions": SCALING_POSITIONS}
    for form in FORMS:
        fns = {}
        for n in SCALING_LENGTHS:
            batch = SCALING_POSITIONS // n
            weight = torch.randn(batch, n, 2, generator=torch.Generator().manual_seed(3))
            fns[n] = partial(bk_pass, resolvent_diagonal, random_potential(batch, n, device),
                             weight.to(device), form == "causal")
        samples = time_interleaved(fns, device, timing)
        rows = [{"n": n, "batch": SCALING_POSITIONS // n, **_summary(s),
                 "ns_per_position": statistics.median(s) / SCALING_POSITIONS * 1e9}
                for n, s in samples.items()]
        per_position = [row["ns_per_position"] for row in rows]
        result[form] = {"rows": rows, "spread": max(per_position) / min(per_position)}
    return result


def bench_moe(device: torch.device, timing: Timing) -> dict[str, Any]:
    """One MoE layer forward + backward at the reference shapes: sparse dispatch vs dense."""
    config = ModelConfig()
    moe = SparseMoE(config.d_model, config.num_experts, config.dropout).to(device)
    u = torch.randn(BATCH * config.n_seq, config.d_model,
                    generator=torch.Generator().manual_seed(4)).to(device)

    def run(dispatch: str) -> torch.Tensor:
        moe.dispatch = dispatch
        out, _ = moe(u.detach().requires_grad_())
        out.square().sum().backward()
        return out.detach()

    moe.eval()   # no dropout: both dispatches must agree
    difference = (run("sparse") - run("dense")).abs().max().item()
    moe.train()
    samples = time_interleaved({d: partial(run, d) for d in ("dense", "sparse")}, device,
                               timing)
    moe.dispatch = "auto"
    return {"dense": _summary(samples["dense"]), "sparse": _summary(samples["sparse"]),
            "speedup": paired_ratio(samples["dense"], samples["sparse"]),
            "max_abs_diff": difference}


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {
    "energy": bench_energy, "eval": bench_eval, "bk": bench_bk, "scaling": bench_scaling,
    "moe": bench_moe,
}


# ---------------------------------------------------------------- report
def machine_info(device: torch.device) -> dict[str, Any]:
    """environment_info plus the CPU model and the OpenMP settings that matter on a shared CPU."""
    info = environment_info(device)
    info.update({name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")})
    info["cpu_model"] = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return info


def target_values(results: dict[str, Any]) -> dict[str, float]:
    """The quantities the targets bound, from whichever sections ran."""
    values: dict[str, float] = {}
    if "step" in results:
        values.update({key: results["step"][key] for key in
                       ("step_over_naive", "rss_over_naive", "physics_overhead")})
    for form in FORMS:
        if "bk" in results:
            values[f"bk_speedup_{form}"] = results["bk"][form]["speedup"]
        if "scaling" in results:
            values[f"bk_scaling_{form}"] = results["scaling"][form]["spread"]
    return values


def check_targets(values: dict[str, float]) -> dict[str, dict[str, Any]]:
    checks = {}
    for label, (key, bound, kind) in TARGETS.items():
        if key in values:
            met = values[key] <= bound if kind == "max" else values[key] >= bound
            checks[label] = {"value": values[key], "target": f"{'<=' if kind == 'max' else '>='}"
                             f" {bound}", "met": met}
    return checks


def _ms(summary: dict[str, Any]) -> str:
    return f"{summary['median_s'] * 1e3:10.2f} ms"


def format_results(results: dict[str, Any]) -> list[str]:
    """The human-readable table of a run."""
    lines = []
    if "step" in results:
        step = results["step"]
        lines.append("training step (B=32, N=128, vocab 30,000)   median      tokens/s   peak RSS")
        for name in STEP_CONFIGS:
            lines.append(f"  {name:42s}{_ms(step[name])} {step[name]['tokens_per_s']:10.0f}"
                         f" {step['memory'][name]['peak_rss_mib']:7.0f} MiB")
        lines.append(f"  epoch estimate ({EPOCH_STEPS} steps, physics on): "
                     f"{step['physics_on']['epoch_s_estimate']:.1f} s")
        low, high = step["physics_overhead_quartiles"]
        lines.append(f"  physics overhead {step['physics_overhead']:+.2%} (median of per-round "
                     f"ratios; quartiles {low:+.2%}, {high:+.2%})")
    if "energy" in results:
        line = f"energy term alone, fwd+bwd (B=32, N=128)      {_ms(results['energy'])}"
        if "step" in results:
            share = results["energy"]["median_s"] / results["step"]["physics_off"]["median_s"]
            line += f"  = {share:.2%} of the physics-off step"
        lines.append(line)
    if "eval" in results:
        lines.append(f"validation (no_grad)                          {_ms(results['eval'])}"
                     f" {results['eval']['tokens_per_s']:10.0f}")
    if "bk" in results:
        lines.append("BK core fwd+bwd, B=32, N=128                  fast        loop   speed-up")
        for form in FORMS:
            row = results["bk"][form]
            lines.append(f"  {form:42s}{_ms(row['fast'])} {_ms(row['loop'])} "
                         f"{row['speedup']:6.1f}x  (max |diff| {row['max_abs_diff']:.1e})")
    if "scaling" in results:
        lines.append(f"BK core scaling, B*N = {SCALING_POSITIONS:,}: ns per position")
        for form in FORMS:
            rows = results["scaling"][form]["rows"]
            cells = "  ".join(f"N={row['n']}: {row['ns_per_position']:.1f}" for row in rows)
            lines.append(f"  {form:14s}{cells}  (max/min {results['scaling'][form]['spread']:.2f})")
    if "moe" in results:
        moe = results["moe"]
        lines.append(f"MoE layer fwd+bwd, T=4096: dense {_ms(moe['dense'])}, sparse "
                     f"{_ms(moe['sparse'])}, speed-up {moe['speedup']:.2f}x")
    for label, check in results.get("targets", {}).items():
        lines.append(f"target {label}: {check['value']:.4g} ({check['target']}) "
                     f"{'met' if check['met'] else 'MISSED'}")
    return lines


# ---------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="physlm bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    parser.add_argument("--out", type=Path,
                        help="JSON file (default benchmarks/results/<device>[-quick].json)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections among {','.join(SECTIONS)}")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--memory-child", choices=STEP_CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, device)))
        return 0
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose among {SECTIONS}")

    torch.manual_seed(0)
    plan = QUICK if args.quick else FULL
    results: dict[str, Any] = {"machine": machine_info(device), "quick": args.quick,
                               "timing": {s: asdict(plan[s]) for s in sections},
                               "load_average_start": os.getloadavg()}
    for section in SECTIONS:
        if section not in sections:
            continue
        timing = plan[section]
        print(f"[bench] {section}: {timing.repeats} samples of {timing.calls} call(s) after "
              f"{timing.warmup} warmup rounds", flush=True)
        if section == "step":
            results[section] = bench_step(device, timing, torch.get_num_threads())
        else:
            results[section] = BENCHMARKS[section](device, timing)
    results["load_average_end"] = os.getloadavg()
    results["targets"] = check_targets(target_values(results))

    print("\n".join(format_results(results)))
    default_name = f"{device.type}{'-quick' if args.quick else ''}.json"
    out = args.out or Path("benchmarks/results") / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

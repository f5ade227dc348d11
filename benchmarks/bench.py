"""Benchmarks: training step, validation, BK core and its scaling, MoE dispatch.

    python benchmarks/bench.py [--quick] [--out benchmarks/results/cpu.json]
                               [--only step,energy,eval,bk,fused,scaling,moe]
                               [--device auto]
                               [--threads N]

Sections (all on synthetic tokens, at the reference configuration of SPEC section 2):

- step: one optimizer step through the real `Trainer.train_step` (forward, energy term,
  backward, clip, fused AdamW, multiplier update), physics on and off, against the naive
  floor written plainly in workloads.py (embedding -> dense head -> cross-entropy on the full
  logits -> AdamW). The three are timed interleaved, round after round, and the ratios are
  medians of the per-round ratios, so load from other processes hits all of them alike.
  Peak resident memory is per process: each configuration runs again alone in a fresh
  subprocess that reports its own peak RSS.
- energy: the energy term alone (what physics adds to a step), forward and backward.
- eval: validation throughput (model.eval(), no_grad).
- bk: BK core forward + backward at B=32, N=128, both forms, against a per-position
  Python loop through the continued fractions (plain autograd, complex tensors).
- fused (CUDA only): the BK core's Triton kernels (what resolvent_diagonal runs on CUDA)
  against its PyTorch scan on the same device, at B=32, N=128 and longer N.
- scaling: BK core at N = 128 ... 16,384 with B * N fixed, time per position.
- moe: one MoE layer forward + backward, sparse dispatch against dense (all experts).

Times are medians of samples after warmup rounds, a sample being the mean of a run of
consecutive calls (see timing.py: comparisons are timed interleaved, the energy term and
validation alone through torch.utils.benchmark.Timer; time.perf_counter, with
torch.cuda.synchronize around each timed run on CUDA). Only ratios measured in the same run
are comparable: the machine may be shared. On a shared CPU, set OMP_WAIT_POLICY=PASSIVE:
spinning OpenMP workers otherwise lose their core to other processes at every parallel
region, and small operations take milliseconds.
"""

# ruff: noqa: E402
# (This folder and the checkout go on sys.path before the imports, and OMP_WAIT_POLICY is set
# before torch is imported: OpenMP reads it once, physlm.passive_openmp.)
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
import importlib.util
import json
import os
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict
from functools import partial
from typing import Any

import torch

from physlm.bk_core import resolvent_diagonal
from physlm.config import ModelConfig, PhysicsConfig
from physlm.model import ResNetBK
from physlm.moe import SparseMoE
from physlm.physics import EnergyHeads, energy_terms

# isort: split
from report import check_targets, format_results, machine_info, save_results, target_values
from timing import (
    Timing,
    paired_ratio,
    peak_rss_mib,
    summary,
    sync,
    time_interleaved,
    time_single,
)
from workloads import (
    BATCH,
    EPOCH_STEPS,
    EVAL_STEPS,
    FORMS,
    FUSED_SHAPES,
    SCALING_LENGTHS,
    SCALING_POSITIONS,
    SECTIONS,
    STEP_CONFIGS,
    VOCAB,
    bk_pass,
    loop_resolvent_diagonal,
    random_potential,
    step_functions,
    synthetic_corpus,
)

FULL = {"step": Timing(31, 3, 1), "energy": Timing(30, 3, 5), "eval": Timing(20, 3, 1),
        "bk": Timing(30, 5, 20), "fused": Timing(30, 5, 20), "scaling": Timing(10, 2, 3),
        "moe": Timing(30, 5, 5)}
QUICK = {"step": Timing(3, 1, 1), "energy": Timing(5, 1, 2), "eval": Timing(3, 1, 1),
         "bk": Timing(5, 2, 5), "fused": Timing(5, 2, 5), "scaling": Timing(3, 1, 1),
         "moe": Timing(5, 2, 2)}


# ---------------------------------------------------------------- physlm's training API
# The ONLY code here that touches physlm's trainer and run modules (Trainer, train_step,
# resolve_device, environment_info, the flat configuration). They are imported when called,
# so that the other sections do not depend on them; adapt these three functions when they
# move or change.
def resolve(name: str) -> torch.device:
    """The device that `--device` names ("auto", "cpu", "cuda[:N]")."""
    from physlm.distributed import resolve_device

    return resolve_device(name)


def environment(device: torch.device) -> dict[str, Any]:
    """A run's provenance: code version, library versions, hardware."""
    from physlm.provenance import environment_info

    return environment_info(device)


@contextlib.contextmanager
def reference_step(device: torch.device) -> Iterator[Callable[[torch.Tensor, torch.Tensor, bool],
                                                               Any]]:
    """`step(x, y, physics_on)`: Trainer.train_step of a Trainer at the reference configuration
    (ModelConfig defaults, vocab 30,000, batch 32) on synthetic tokens, in a temporary run
    directory that lasts as long as the context."""
    from physlm.config import from_flat
    from physlm.trainer import Trainer

    config = from_flat({"device": str(device), "progress": False, "vocab_size": VOCAB,
                        "batch_size": BATCH})
    corpus = synthetic_corpus(VOCAB, config.model.n_seq, 2 * BATCH)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, Path(run_dir), corpus)
        trainer.model.train()
        yield lambda x, y, physics_on: trainer.train_step(x, y, physics_on=physics_on)


# ---------------------------------------------------------------- sections
def bench_step(device: torch.device, timing: Timing, threads: int) -> dict[str, Any]:
    """Step time of the three configurations (interleaved) and their peak RSS (subprocesses)."""
    with reference_step(device) as train_step:
        samples = time_interleaved(step_functions(device, train_step), device, timing)
    tokens = BATCH * ModelConfig().n_seq
    result: dict[str, Any] = {name: summary(s, tokens) for name, s in samples.items()}
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
    """Peak memory of a fresh process (this script) that only runs configuration `name`."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", name,
               "--device", str(device), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_child(name: str, device: torch.device, steps: int = 4) -> dict[str, float]:
    """Run `steps` steps of one configuration in this (fresh) process; report peak memory."""
    trainer = contextlib.nullcontext() if name == "naive_floor" else reference_step(device)
    with trainer as train_step:
        step = step_functions(device, train_step, (name,))[name]
        for _ in range(steps):
            step()
        sync(device)
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
    lambdas = torch.full((config.n_layers,), PhysicsConfig().lambda_energy_init, device=device)
    parameters = [current] + [p for h in heads for p in h.parameters()]

    def energy_step() -> None:
        terms = energy_terms(heads, "embedding_pairs", embeddings=current,
                             previous_embeddings=previous)
        torch.autograd.grad((lambdas * terms.mse).mean(), parameters)

    return summary(time_single(energy_step, device, timing, "energy term fwd+bwd"))


def bench_eval(device: torch.device, timing: Timing) -> dict[str, Any]:
    """Validation throughput: model.eval(), no_grad, the loss of one batch."""
    config = ModelConfig()
    model = ResNetBK(config, VOCAB).to(device).eval()
    batch = synthetic_corpus(VOCAB, config.n_seq, BATCH, seed=2).valid.to(device)
    x, y = batch[:, :-1], batch[:, 1:]

    @torch.no_grad()
    def evaluate() -> torch.Tensor:
        return model(x, y).loss

    result = summary(time_single(evaluate, device, timing, "validation batch"),
                     BATCH * config.n_seq)
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
            "fast": summary(samples["fast"]), "loop": summary(samples["loop"]),
            "speedup": paired_ratio(samples["loop"], samples["fast"]),
            "max_abs_diff": (g_fast - g_loop).abs().max().item(),
            "max_abs_diff_grad": (grad_fast - grad_loop).abs().max().item(),
        }
    return result


def bench_fused(device: torch.device, timing: Timing) -> dict[str, Any]:
    """BK core forward + backward: the Triton kernels against the PyTorch scan, same device."""
    if device.type != "cuda":
        return {"skipped": "needs CUDA: the Triton kernels run compiled only on a GPU (on the "
                           "CPU, tests/test_bk_triton.py runs them in Triton's interpreter)"}
    if importlib.util.find_spec("triton") is None:
        return {"skipped": "Triton is not installed: resolvent_diagonal runs the scan on CUDA"}
    result: dict[str, Any] = {"shapes": [list(shape) for shape in FUSED_SHAPES]}
    for form in FORMS:
        rows = []
        for batch, n in FUSED_SHAPES:
            diag = random_potential(batch, n, device)
            weight = torch.randn(batch, n, 2, generator=torch.Generator().manual_seed(3))
            fns = {name: partial(bk_pass, partial(resolvent_diagonal, fused=name == "fused"),
                                 diag, weight.to(device), form == "causal")
                   for name in ("fused", "scan")}
            (g_fused, grad_fused), (g_scan, grad_scan) = fns["fused"](), fns["scan"]()
            samples = time_interleaved(fns, device, timing)
            rows.append({"batch": batch, "n": n, "fused": summary(samples["fused"]),
                         "scan": summary(samples["scan"]),
                         "speedup": paired_ratio(samples["scan"], samples["fused"]),
                         "max_abs_diff": (g_fused - g_scan).abs().max().item(),
                         "max_abs_diff_grad": (grad_fused - grad_scan).abs().max().item()})
        result[form] = rows
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
        rows = [{"n": n, "batch": SCALING_POSITIONS // n, **summary(s),
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
        out, *_ = moe(u.detach().requires_grad_())
        out.square().sum().backward()
        return out.detach()

    moe.eval()   # no dropout: both dispatches must agree
    difference = (run("sparse") - run("dense")).abs().max().item()
    moe.train()
    samples = time_interleaved({d: partial(run, d) for d in ("dense", "sparse")}, device,
                               timing)
    moe.dispatch = "auto"
    return {"dense": summary(samples["dense"]), "sparse": summary(samples["sparse"]),
            "speedup": paired_ratio(samples["dense"], samples["sparse"]),
            "max_abs_diff": difference}


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {
    "energy": bench_energy, "eval": bench_eval, "bk": bench_bk, "fused": bench_fused,
    "scaling": bench_scaling, "moe": bench_moe,
}


# ---------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/bench.py", description=__doc__,
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
    device = resolve(args.device)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, device)))
        return 0
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose among {SECTIONS}")

    torch.manual_seed(0)
    plan = QUICK if args.quick else FULL
    results: dict[str, Any] = {"machine": machine_info(environment(device)), "quick": args.quick,
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
    results["targets"] = check_targets(target_values(results), device.type)

    print("\n".join(format_results(results)))
    default_name = f"{device.type}{'-quick' if args.quick else ''}.json"
    print(f"wrote {save_results(results, args.out or HERE / 'results' / default_name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

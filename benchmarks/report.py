"""What a benchmark run reports: the machine, the targets met or missed, the table."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from workloads import EPOCH_STEPS, FORMS, SCALING_POSITIONS, STEP_CONFIGS

TARGETS = {  # device type: {name: (value key, bound, "max" or "min")}
    "cpu": {
        "step / naive floor": ("step_over_naive", 0.6, "max"),
        "peak RSS / naive floor": ("rss_over_naive", 0.5, "max"),
        "physics overhead": ("physics_overhead", 0.03, "max"),
        "BK speed-up vs loop (causal)": ("bk_speedup_causal", 10.0, "min"),
        "BK speed-up vs loop (bidirectional)": ("bk_speedup_bidirectional", 10.0, "min"),
        "BK time/position max/min over N (causal)": ("bk_scaling_causal", 1.5, "max"),
        "BK time/position max/min over N (bidirectional)": ("bk_scaling_bidirectional", 1.5,
                                                             "max"),
    },
    # Issue 24's goals for one modern GPU (an H100/H200): a step within twice the naive floor,
    # physics nearly free, a WikiText-2 epoch under 5 s, the fused core 10x the scan.
    "cuda": {
        "step / naive floor": ("step_over_naive", 2.0, "max"),
        "physics overhead": ("physics_overhead", 0.05, "max"),
        "epoch estimate, physics on (s)": ("epoch_s_estimate", 5.0, "max"),
        "BK fused vs scan, B=32 N=128 (causal)": ("bk_fused_causal", 10.0, "min"),
        "BK fused vs scan, B=32 N=128 (bidirectional)": ("bk_fused_bidirectional", 10.0, "min"),
        "BK speed-up vs loop (causal)": ("bk_speedup_causal", 10.0, "min"),
        "BK speed-up vs loop (bidirectional)": ("bk_speedup_bidirectional", 10.0, "min"),
        "BK time/position max/min over N (causal)": ("bk_scaling_causal", 1.5, "max"),
        "BK time/position max/min over N (bidirectional)": ("bk_scaling_bidirectional", 1.5,
                                                             "max"),
    },
}


def save_results(results: dict[str, Any], out: Path) -> Path:
    """Write a benchmark's record as JSON (making its folder) and return the path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return out


def machine_info(environment: dict[str, Any]) -> dict[str, Any]:
    """A run's environment plus the CPU model and the OpenMP settings that matter on a shared
    CPU."""
    info = dict(environment)
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
        values["epoch_s_estimate"] = results["step"]["physics_on"]["epoch_s_estimate"]
    for form in FORMS:
        if "bk" in results:
            values[f"bk_speedup_{form}"] = results["bk"][form]["speedup"]
        if form in results.get("fused", {}):   # the first shape is the reference one
            values[f"bk_fused_{form}"] = results["fused"][form][0]["speedup"]
        if "scaling" in results:
            values[f"bk_scaling_{form}"] = results["scaling"][form]["spread"]
    return values


def check_targets(values: dict[str, float], device_type: str) -> dict[str, dict[str, Any]]:
    """The targets of `device_type` ("cpu" for a device without its own) met or missed."""
    checks = {}
    for label, (key, bound, kind) in TARGETS.get(device_type, TARGETS["cpu"]).items():
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
    if "fused" in results:
        fused = results["fused"]
        if "skipped" in fused:
            lines.append(f"BK core, Triton vs scan: skipped ({fused['skipped']})")
        else:
            lines.append("BK core fwd+bwd, Triton kernels vs PyTorch scan   fused        scan"
                         "   speed-up")
            for form in FORMS:
                for row in fused[form]:
                    shape = f"{form}, B={row['batch']} N={row['n']}"
                    lines.append(f"  {shape:42s}{_ms(row['fused'])} {_ms(row['scan'])} "
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

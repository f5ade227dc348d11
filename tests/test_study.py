"""The study: plans, a tiny end-to-end run in the worker pool, statistics and the report."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from physlm import statistics, study, study_report
from physlm.files import read_jsonl
from physlm.pool import run_job
from physlm.values import ConfigError

from .conftest import TINY

ALL = ["plain", "koopman", "physics_reference", "physics_recommended", "physics_depth",
       "control", "lstm", "transformer"]
FIXES = {"causal": {"bk_mode": "causal"}, "exact_gradient": {"bk_gradient": "exact"},
         "router_gradient": {"router": "scaled"}, "dual_lambda": {"lambda_in_optimizer": False},
         "separate_clip": {"clip_mode": "separate"}}


def tiny_study(tmp_path: Path, **changes) -> study.StudyOptions:
    overrides = {k: v for k, v in TINY.items() if k not in ("epochs", "physics_start_epoch")}
    values = dict(name="tiny", seeds=[0, 1, 2], variants=ALL, epochs=2, physics_start_epoch=1,
                  data_params=None, overrides={**overrides, "max_train_batches": 3,
                                               "max_eval_batches": 2},
                  run_dir=str(tmp_path / "runs"), report_dir=str(tmp_path / "reports"),
                  workers=2)
    return study.study_options({**values, **changes})


def test_plan_forks_the_runs_that_share_the_controls_warmup(tmp_path):
    options = tiny_study(tmp_path)
    jobs = study.plan(options)
    assert [Path(job.run_dir).parent.name for job in jobs[:3]] == ["control"] * 3
    forked = {(Path(job.run_dir).parent.name, Path(job.run_dir).name): job.fork
              for job in jobs if job.fork}
    assert forked == {(v, f"s{s}"): study.run_path(options, "control", s)
                      for v in ("physics_reference", "physics_depth") for s in (0, 1, 2)}
    assert len(jobs) == 8 * 3


def test_ablation_rows_add_one_fix_each_and_reuse_a_variant_they_equal(tmp_path):
    options = tiny_study(tmp_path, ablation=FIXES)
    rows = study.ablation_rows(options)
    assert [r.label for r in rows] == ["replica", *FIXES]
    assert rows[2].fixes == {"bk_mode": "causal", "bk_gradient": "exact"}
    # replica + the first four fixes is the reference recipe: its runs are reused.
    assert [r.same_as for r in rows] == [None] * 4 + ["physics_reference", None]
    jobs = {Path(j.run_dir).relative_to(tmp_path / "runs").as_posix(): j
            for j in study.plan(options)}
    assert "ablation/4_dual_lambda/s0" not in jobs
    replica = jobs["ablation/0_replica/s0"].config
    assert (replica.model.bk_mode, replica.model.bk_gradient, replica.model.router,
            replica.physics.lambda_in_optimizer, replica.physics.clip_mode) == (
        "bidirectional", "surrogate", "unscaled", True, "total")
    # Rows whose warmup is the control's (the fixes of the physics epochs) fork from it.
    forks = {name: j.fork is not None for name, j in jobs.items() if name.startswith("ablation")}
    assert forks == {f"ablation/{i}_{label}/s{s}": i in (3, 5)
                     for i, label in enumerate(["replica", *FIXES]) if i != 4 for s in (0, 1, 2)}

@pytest.mark.parametrize("change, message", [
    ({"variants": ["plain"]}, "must include 'control'"),
    ({"variants": ["control", "nonexistent"]}, "has no params/nonexistent.yaml"),
    ({"seeds": [1, 1]}, "seeds must differ"),
    ({"physics_start_epoch": 3}, "physics would never run"),
    ({"epocs": 3}, "did you mean 'epochs'"),
    ({"ablation": {"a fix": {"bk_mode": "causal"}}}, "ablation fixes are named"),
    ({"ablation": "x"}, "ablation: parameter file not found: x; give a mapping of fix: "),
])
def test_bad_study_settings_are_one_clear_error(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        tiny_study(tmp_path, **change)


def test_a_study_checks_the_physics_schedule_by_the_configs_rule(tmp_path):
    """No study-only rule: variants without a physics objective may start it past the end."""
    options = tiny_study(tmp_path, variants=["control", "lstm"], physics_start_epoch=3)
    assert [job.config.warmup_epochs for job in study.plan(options)] == [2] * 6
    with pytest.raises(ConfigError, match="variant koopman: .*physics would never run"):
        tiny_study(tmp_path, variants=["control", "koopman"], physics_start_epoch=3)


def test_paired_interval_is_the_t_interval_of_the_seed_differences():
    frame = pd.DataFrame({"variant": ["control"] * 3 + ["x"] * 3, "seed": [0, 1, 2] * 2,
                          "final": [100.0, 110.0, 120.0, 90.0, 104.0, 111.0]})
    p = statistics.paired(frame, "x", "final", "control")
    d = [-10.0, -6.0, -9.0]
    mean, sd = sum(d) / 3, pd.Series(d).std()
    half = 4.302652729911275 * sd / math.sqrt(3)      # t_{0.975, 2}
    assert p["mean"] == pytest.approx(mean) and p["sd"] == pytest.approx(sd)
    assert (p["low"], p["high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert p["exceeds"] == (mean + half < 0)


@pytest.mark.slow
def test_a_tiny_study_runs_every_variant_and_reports_them(tmp_path):
    options = tiny_study(tmp_path, ablation={k: FIXES[k] for k in ("causal", "dual_lambda")})
    runs = study.run_study(options)
    assert set(runs) == set(ALL) and all(len(seeds) == 3 for seeds in runs.values())
    assert all(run.finished for seeds in runs.values() for run in seeds)
    forked = runs["physics_reference"][0].env.get("forked_from")
    assert forked == {"run": "../../control/s0", "epoch": 1}
    control_steps = read_jsonl(runs["control"][0].run.steps)
    reference_steps = read_jsonl(runs["physics_reference"][0].run.steps)
    assert reference_steps[:3] == control_steps[:3]            # the shared warmup
    path = study_report.write_study_report(options, runs)
    text = path.read_text()
    for heading in ("## Conclusion", "## Results by variant", "## Paired differences",
                    "## Comparison with previous phases", "## Phase 2: the Koopman layer",
                    "## Ablation", "## The replica against the original", "## Variants",
                    "## Provenance"):
        assert heading in text
    assert "Phase 2: Koopman ResNet-BK" in text                 # its row of the phase table
    assert text.count("Fixing **") == 2 and "| + dual_lambda |" in text
    assert "each fix alone on the replica (2 more rows) is not run" in text
    assert "Unfinished" not in text
    assert (path.parent / "tiny" / "val_ppl.png").is_file()
    assert text.count("than the control on average over 3 seeds") == len(ALL) - 1
    # A second run of the study reuses every finished run.
    before = {str(r.run.steps): r.run.steps.read_text() for s in runs.values() for r in s}
    study.run_study(options)
    assert all(Path(p).read_text() == text for p, text in before.items())


def test_records_let_a_fresh_machine_reuse_finished_runs(tmp_path, monkeypatch):
    """A study's finished runs are saved as records (no checkpoints) and restored on a machine
    whose runs/ is gone, so nothing is trained twice; a record of other settings is not."""
    records = tmp_path / "records"
    options = tiny_study(tmp_path, variants=["control", "physics_reference"], seeds=[0],
                         workers=1, records=str(records))
    trained = study.run_study(options)
    saved = {p.relative_to(records).as_posix() for p in records.rglob("*") if p.is_file()}
    assert saved == {f"{v}/s0/{f}" for v in ("control", "physics_reference") for f in (
        "config.yaml", "env.json", "metrics/initial.json", "metrics/steps.jsonl",
        "metrics/epochs.jsonl")}

    shutil.rmtree(tmp_path / "runs")                               # a fresh machine
    submitted: list = []
    monkeypatch.setattr(study, "run_jobs", lambda jobs, workers: submitted.extend(jobs))
    restored = study.run_study(options)
    assert submitted == []
    for variant in trained:
        assert restored[variant][0].epochs.equals(trained[variant][0].epochs)
        assert restored[variant][0].finished

    for change in ({"epochs": 3}, {"overrides": {**options.overrides, "lr": 1e-2}}):
        submitted.clear()
        other = dataclasses.replace(options, run_dir=str(tmp_path / "other"), **change)
        study.run_study(other)                  # a longer budget, another setting: train
        assert len(submitted) == 2
        assert not (tmp_path / "other" / "control" / "s0" / "config.yaml").exists()


def test_records_keep_the_runs_that_finished_before_a_crash(tmp_path, monkeypatch):
    options = tiny_study(tmp_path, variants=["control"], seeds=[0, 1], workers=1,
                         records=str(tmp_path / "records"))

    def crash_after_the_first(jobs, workers):
        run_job(jobs[0])
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(study, "run_jobs", crash_after_the_first)
    with pytest.raises(RuntimeError, match="went away"):
        study.run_study(options)
    assert (tmp_path / "records" / "control" / "s0" / "metrics" / "epochs.jsonl").is_file()
    assert not (tmp_path / "records" / "control" / "s1").exists()


def test_the_ablation_params_are_the_studys_runs():
    """params/ablation.yaml runs part of params/study.yaml: the same runs, budget and fixes."""
    full, part = study.load_study("params/study.yaml"), study.load_study("params/ablation.yaml")
    assert set(part.variants) <= set(full.variants)
    assert study.study_dir(part) == study.study_dir(full) and part.records == full.records
    for key in ("seeds", "epochs", "physics_start_epoch", "data_params", "ablation"):
        assert getattr(part, key) == getattr(full, key), key
    jobs = {str(job.run_dir): job.config for job in study.plan(full)}
    assert all(jobs[str(job.run_dir)] == job.config for job in study.plan(part))

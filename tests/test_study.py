"""The study: plans, a tiny end-to-end run on Ray (physlm.executor), statistics, the report."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from physlm import external, statistics, study, study_figures, study_report, text, variants
from physlm.config import from_flat, read_params_file
from physlm.executor import run_job
from physlm.files import read_jsonl
from physlm.runs import load_run
from physlm.sections import CONTROL_MAY_DIFFER
from physlm.trainer import train
from physlm.values import ConfigError

from .conftest import TINY

ALL = ["plain", "koopman", "physics_reference", "physics_recommended", "physics_depth",
       "control", "lstm", "transformer"]
IMPROVED = {"bk_potentials": 4, "bk_shift": "learned", "bk_readout": "features",
            "embedding_init_std": 0.02, "moe_balance_weight": 0.01}
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

def test_recipes_apply_by_architecture_and_the_replica_keeps_the_originals(tmp_path):
    (tmp_path / "bk.yaml").write_text("optimizer: sgd\nlr: 5.0\ndropout: 0.25\n")
    (tmp_path / "lstm.yaml").write_text("lr: 2.0\noptimizer: sgd\n")
    (tmp_path / "plain.yaml").write_text("lr: 0.5\noptimizer: sgd\n")
    options = tiny_study(tmp_path, ablation=FIXES, recipes={
        "resnet_bk": str(tmp_path / "bk.yaml"), "lstm": str(tmp_path / "lstm.yaml"),
        "plain": str(tmp_path / "plain.yaml")})
    train = {v: study.run_config(options, v, 0).train for v in ("control", "physics_recommended",
                                                              "lstm", "plain", "transformer")}
    assert (train["control"].lr, train["control"].optimizer) == (5.0, "sgd")
    assert study.run_config(options, "control", 0).model.dropout == 0.25
    same = ("optimizer", "lr", "momentum", "lr_schedule", "weight_decay", "grad_clip")
    assert all(getattr(train["physics_recommended"], key) == getattr(train["control"], key)
               for key in same)                                   # physics on the same recipe
    assert (train["lstm"].lr, train["plain"].lr) == (2.0, 0.5)    # its own entry wins
    assert train["transformer"].optimizer == "adamw"              # no recipe: its own file
    replica = study.run_config(options, "replica", 0, study.ablation_rows(options)[-1].fixes)
    assert (replica.train.optimizer, replica.train.lr) == ("adamw", 1e-3)
    # The recipe changes the control, so no ablation row is a variant's runs any more, and
    # the physics variants still fork from the control's warmup.
    assert all(row.same_as is None for row in study.ablation_rows(options))
    forks = {Path(j.run_dir).parent.name for j in study.plan(options) if j.fork}
    assert {"physics_reference", "physics_depth"} <= forks


def test_a_variant_may_set_its_own_physics_start(tmp_path, monkeypatch):
    params = tmp_path / "params"
    shutil.copytree(study.PARAMS, params)
    (params / "physics_late.yaml").write_text("energy_penalty: true\nphysics_start_epoch: 2\n")
    monkeypatch.setattr(study, "PARAMS", params)
    options = tiny_study(tmp_path, epochs=3, variants=["control", "physics_late"])
    assert study.run_config(options, "physics_late", 0).physics.physics_start_epoch == 2
    assert study.run_config(options, "control", 0).physics.physics_start_epoch == 1


def test_a_variant_with_its_own_control_is_paired_and_forks_against_it(tmp_path, monkeypatch):
    """physics_improved is compared with improved, not with the study's control, in the plan
    (where its warmup would fork from) and in the report; the others with the control."""
    options = tiny_study(tmp_path, variants=["control", "improved", "physics_improved"])
    assert variants.control_of("physics_improved") == "improved"
    assert variants.control_of("improved") == variants.control_of("plain") == "control"
    # The recommended recipe fits its heads in the warmup: no fork. The reference recipe on
    # the improved layer shares improved's warmup: it forks from improved's run.
    assert all(job.fork is None for job in study.plan(options))
    params = tmp_path / "params"
    shutil.copytree(study.PARAMS, params)
    (params / "reference_improved.yaml").write_text(yaml.safe_dump(IMPROVED))
    monkeypatch.setattr(study, "PARAMS", params)
    monkeypatch.setitem(variants.VARIANTS, "reference_improved",
                        variants.Variant("the reference recipe on improved", control="improved"))
    forks = {Path(job.run_dir).parent.name: job.fork for job in study.plan(tiny_study(
        tmp_path, variants=["control", "improved", "reference_improved"], seeds=[0]))}
    assert forks == {"control": None, "improved": None,
                     "reference_improved": study.run_path(options, "improved", 0)}
    frame = pd.DataFrame({"variant": ["control"] * 3 + ["improved"] * 3
                          + ["physics_improved"] * 3, "seed": [0, 1, 2] * 3,
                          "final": [100.0, 110.0, 120.0, 90.0, 100.0, 111.0, 91.0, 99.0, 112.0]})
    frame["best"] = frame["final"]
    table = study_report.comparisons(frame)
    finals = table[table["Val PPL at"] == "final"].set_index("Variant")
    assert finals.loc["improved", "Against"] == "control"
    assert finals.loc["improved", "Difference (mean)"] == pytest.approx(-29 / 3)
    assert finals.loc["physics_improved", "Against"] == "improved"
    assert finals.loc["physics_improved", "Difference (mean)"] == pytest.approx(1 / 3)
    sentences = study_report.conclusion(frame)
    assert "than its control, ResNet-BK, resolvent on the features" in sentences[1]
    assert "Against" not in study_report.comparisons(frame[frame["variant"] != "physics_improved"])
    with pytest.raises(ConfigError, match="paired against improved: add improved to variants"):
        tiny_study(tmp_path, variants=["control", "physics_improved"])


def test_physics_is_also_compared_with_the_regularised_control_when_the_study_has_it():
    """A physics recipe on the reference layer is paired against the control and, when the
    study has it, against the control with tuned regularisation: two rows, two sentences."""
    frame = pd.DataFrame({"variant": ["control"] * 3 + ["control_regularised"] * 3
                          + ["physics_recommended"] * 3, "seed": [0, 1, 2] * 3,
                          "final": [100.0, 110.0, 120.0, 95.0, 104.0, 116.0, 99.0, 109.0, 118.0]})
    frame["best"] = frame["final"]
    finals = study_report.comparisons(frame).query("`Val PPL at` == 'final'")
    physics = finals[finals["Variant"] == "physics_recommended"].set_index("Against")
    assert list(physics.index) == ["control", "control_regularised"]
    assert physics.loc["control", "Difference (mean)"] == pytest.approx(-4 / 3)
    assert physics.loc["control_regularised", "Difference (mean)"] == pytest.approx(11 / 3)
    sentences = study_report.conclusion(frame)
    assert len(sentences) == 3 and sentences[2].endswith("no effect is shown.")
    assert "higher than the control with tuned dropout and weight decay on average" in \
        sentences[2]
    alone = study_report.comparisons(frame[frame["variant"] != "control_regularised"])
    assert "Against" not in alone and len(alone) == 2


def test_the_report_names_a_variants_own_control_and_its_layer(tmp_path):
    options = tiny_study(tmp_path, variants=["control", "improved", "physics_improved"],
                         seeds=[0, 1])
    for job in study.plan(options):                         # in this process: no pool
        run_job(job)
    text = study_report.write_study_report(options, study.load_study_runs(options)).read_text()
    assert "Paired against a control of their own instead of the study's (column " \
           '"Against"): physics_improved against improved.' in text
    assert "| physics_improved | improved  | final" in text
    assert ("Physics on the improved ResNet-BK, recommended recipe ends with a validation "
            "perplexity") in text
    assert "than its control, ResNet-BK, resolvent on the features (physics off) on" in text
    assert ("BK layer of 4 potentials (learned shifts from gamma 0.1, fixed hopping, features "
            "readout), MoE balance weight 0.01, embeddings initialised with std 0.02") in text
    variants = section(text, "## Variants")
    assert variants.count("BK layer of") == 2 and variants.count("embeddings initialised") == 2


def section(text: str, heading: str) -> str:
    start = text.index(heading + "\n")
    return text[start:text.index("\n## ", start + 1)]


def test_the_improved_variants_are_their_recipes():
    """improved is the control with the layer variant; physics_improved is improved with
    params/physics_recommended.yaml's recipe, and differs from it only there."""
    read = {name: {k: v for k, v in read_params_file(study.PARAMS / f"{name}.yaml").items()
                   if k != "name"}
            for name in ("control", "improved", "physics_improved", "physics_recommended")}
    assert read["improved"] == {**read["control"], **IMPROVED}
    tied = {k: v for k, v in read_params_file(study.PARAMS / "improved_tied.yaml").items()
            if k != "name"}
    assert tied == {**read["improved"], "d_model": 88, "tie_embeddings": True}
    physics_tied = {k: v for k, v in read_params_file(
        study.PARAMS / "physics_improved_tied.yaml").items() if k != "name"}
    assert physics_tied == {**{k: v for k, v in tied.items() if k != "energy_penalty"},
                            **read["physics_recommended"]}
    deep, physics_deep = ({k: v for k, v in read_params_file(study.PARAMS / f"{name}.yaml")
                           .items() if k not in ("name", "energy_penalty")}
                          for name in ("improved_tied_deep16", "physics_improved_tied_deep16"))
    assert physics_deep == {**deep, **read["physics_recommended"]}
    layer = {k: v for k, v in read["improved"].items() if k != "energy_penalty"}
    assert read["physics_improved"] == {**layer, **read["physics_recommended"]}
    options = study.load_study("params/study.yaml")
    for variant in ("improved", "physics_improved"):
        assert variant not in options.variants          # the committed study stays as it is
    improved, physics = (study.run_config(options, v, 0) for v in ("improved",
                                                                    "physics_improved"))
    recommended, control = (study.run_config(options, v, 0) for v in ("physics_recommended",
                                                                        "control"))
    assert physics.differences(improved, allowed=CONTROL_MAY_DIFFER) == {}
    assert set(physics.differences(improved, allowed="")) == set(
        recommended.differences(control, allowed=""))
    tuned = study.load_study("params/study_tuned.yaml")     # at the layer's own recipe
    recipe = read_params_file(study.PARAMS / "recipe_improved.yaml")
    for variant in ("improved", "physics_improved"):
        flat = study.run_config(tuned, variant, 0).to_flat()
        assert {key: flat[key] for key in recipe} == recipe


@pytest.mark.parametrize("variant, knob", [
    ("physics_warmup6", {"physics_start_epoch": 6}),
    ("physics_target_half", {"energy_target_drift": 0.15}),
    ("physics_rate", {"energy_target_drift": 0.15, "lambda_lr": 1.0}),
])
def test_the_drift_knobs_are_the_recommended_recipe_and_one_change(variant, knob):
    """Each drift-reduction variant is params/physics_recommended.yaml with its knob (the rate
    on the halved target: at 0.3 lambda has nothing to act on), and
    the study trains it with that knob (a variant's physics_start_epoch wins the budget's)."""
    read = {name: {k: v for k, v in read_params_file(study.PARAMS / f"{name}.yaml").items()
                   if k != "name"} for name in (variant, "physics_recommended")}
    assert read[variant] == {**read["physics_recommended"], **knob}
    options = study.load_study("params/study_tuned.yaml")
    config = study.run_config(options, variant, 0)
    recommended = study.run_config(options, "physics_recommended", 0)
    assert set(config.differences(recommended, allowed="")) == {*knob, "name"}
    assert config.physics.physics_start_epoch == knob.get("physics_start_epoch",
                                                          options.physics_start_epoch)


@pytest.mark.parametrize("variant, change", [
    ("layer_shifts", {"bk_potentials": 4, "bk_shift": "learned"}),
    ("layer_coupling", {"bk_coupling": "learned"}),
    ("layer_balance", {"moe_balance_weight": 0.01}),
])
def test_each_screened_layer_variant_is_the_control_and_one_change(variant, change):
    """The layer screen (issue 23) changes one thing of the control, at its tuned recipe, and
    reuses the tuned study's control and improved runs (same settings, same run directory)."""
    layers, tuned = (study.load_study(f"params/study_{name}.yaml") for name in ("layers", "tuned"))
    config, control = (study.run_config(layers, v, 0) for v in (variant, "control"))
    assert config.differences(control, allowed="") == {
        **{key: (value, getattr(control.model, key)) for key, value in change.items()},
        "name": (f"{variant}_s0", "control_s0")}
    assert study.study_dir(layers) == study.study_dir(tuned)
    for shared in ("control", "improved"):
        assert study.run_config(layers, shared, 0) == study.run_config(tuned, shared, 0)


@pytest.mark.parametrize("change, message", [
    ({"variants": ["plain"]}, "must include 'control'"),
    ({"variants": ["control", "nonexistent"]}, "has no params/nonexistent.yaml"),
    ({"seeds": [1, 1]}, "seeds must differ"),
    ({"physics_start_epoch": 3}, "physics would never run"),
    ({"epocs": 3}, "did you mean 'epochs'"),
    ({"ablation": {"a fix": {"bk_mode": "causal"}}}, "ablation fixes are named"),
    ({"ablation": "x"}, "ablation: parameter file not found: x; give a mapping of fix: "),
    ({"external": {"lstm": "nope.json"}}, "external: lstm -> nope.json needs the variant"),
    ({"context": ["nope.json"]}, "context: nope.json is not a file"),
    ({"position_loss": ["nope.json"]}, "position_loss: nope.json is not a file"),
    ({"target": "lstm", "variants": ["control"]}, "target: lstm must be among variants"),
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


def test_the_operating_point_names_who_clears_the_count_floor():
    """A sentence per variant above the best count model, one naming those below it."""
    floor = study_report.CountFloor("Kneser-Ney bigram", 170.0, 280.0, 1000)
    point = pd.DataFrame({"Variant": ["control", "lstm", "improved"], "Seeds": [3, 3, 3],
                          "Early-stopped val PPL (mean)": [175.0, 130.0, 150.0],
                          "Final val PPL (mean)": [180.0, 131.0, 151.0]})
    sentences = study_report.floor_sentences(point, floor)
    assert len(sentences) == 2 and sentences[0].startswith(
        "Control (physics off) does not clear the Kneser-Ney bigram")
    assert sentences[1] == ("lstm, improved clear the Kneser-Ney bigram at the early-stopped "
                            "epoch (mean over 3 seeds).")
    one = study_report.floor_sentences(point.iloc[:2], floor)[1]
    assert one.startswith("lstm clears the Kneser-Ney bigram")
    assert "epoch (mean over 3 seeds), 175.00" in sentences[0]
    single = study_report.floor_sentences(point.assign(Seeds=1), floor)[0]
    assert "at its early-stopped epoch (one seed), 175.00" in single
    assert study_report.floor_sentences(point.assign(Seeds=1), floor)[1].endswith(
        "at the early-stopped epoch (one seed).")
    mixed = study_report.floor_sentences(point.assign(Seeds=[3, 3, 1]), floor)[1]
    assert mixed.endswith("at the early-stopped epoch (mean over seeds).")


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
    for heading in ("## Operating point", "## Conclusion", "## Results by variant",
                    "## Paired differences",
                    "## Comparison with previous phases", "## Phase 2: the Koopman layer",
                    "## Ablation", "## The replica against the original", "## Variants",
                    "## Provenance"):
        assert heading in text
    assert "Phase 2: Koopman ResNet-BK" in text                 # its row of the phase table
    energy = study_report.energy_table(runs).set_index("Variant")
    assert list(energy.index) == [v for v, seeds in runs.items()
                                  if seeds[0].config.physics.energy_penalty]
    recommended = runs["physics_recommended"]
    row = energy.loc["physics_recommended"]
    assert math.isnan(row["Steady drift (mean)"])     # 1 physics epoch, the settle window's
    within = [(run.energy_steps["drift"] <= row["Target"]).mean() for run in recommended]
    assert row["Steps within target"] == pytest.approx(sum(within) / 3)
    assert math.isnan(row["Lambda, steady (mean)"])   # no steady state: no steps in it
    assert sum(int(part.split(" ", 1)[0]) for part in
               row["Drift status (seeds)"].split(", ")) == 3
    assert "## Energy conservation" in text and "| physics_depth " in section(
        text, "## Energy conservation")
    assert text.count("Fixing **") == 2 and "| + dual_lambda |" in text
    assert "each fix alone on the replica (2 more rows) is not run" in text
    writes = text[text.index("## What the variants write"):text.index("## Variants")]
    assert "by one run of each variant (its lowest seed)" in writes
    assert [line.split(" | ")[0].strip("| ") for line in writes.splitlines()
            if line.startswith("|")][2:] == list(runs)
    assert "Unfinished" not in text
    assert (path.parent / "tiny" / "val_ppl.png").is_file()
    assert text.count("than the control on average over 3 seeds") == len(ALL) - 1
    # A second run of the study reuses every finished run.
    before = {str(r.run.steps): r.run.steps.read_text() for s in runs.values() for r in s}
    study.run_study(options)
    assert all(Path(p).read_text() == text for p, text in before.items())


def test_the_report_opens_with_the_operating_point(tmp_path):
    """Every variant's early-stopped (held-out best epoch) and final val PPL against the count
    references of the runs' own data; records without references still render."""
    options = tiny_study(tmp_path, variants=["control", "lstm"], seeds=[0])
    variants = {"control": {"energy_penalty": False},   # trained here, on the fixture: fast
                "lstm": {"architecture": "lstm", "energy_heads": False, "batching": "stream",
                         "energy_penalty": False}}
    runs = {}
    for variant, settings in variants.items():
        run_dir = study.study_dir(options) / variant / "s0"
        train(from_flat({**TINY, "epochs": 2, "heldout_fraction": 0.1, **settings}), run_dir)
        runs[variant] = [load_run(run_dir)]
    frame = statistics.numbers(runs)
    assert set(frame["selected_on"]) == {"held-out"} and frame["best_known"].notna().all()
    assert frame["heldout"].tolist() == [r.epochs["heldout_ppl"].min()   # the chosen epoch's
                                         for seeds in runs.values() for r in seeds]
    text = study_report.write_study_report(options, runs).read_text()
    assert text.index("## Operating point") < text.index("## Conclusion")
    floor = min(ppl["all"] for ppl in runs["control"][0].references["valid"]["ppl"].values())
    point = study_report.operating_point(frame, study_report.count_floor(
        runs["control"][0].references))
    assert point["Early-stopped / best count model"].tolist() == pytest.approx(
        (frame.groupby("variant", sort=False)["best"].mean() / floor).tolist())
    assert "| Kneser-Ney trigram |" in text and "chosen on the held-out split" in text
    assert text.count("does not clear the Kneser-Ney") == 2   # tiny models, 2 epochs
    lstm_best = frame.loc[frame["variant"] == "lstm", "best"].mean()
    for ratio, verdict in ((1.03, "-2.9% against an external reference, within 5% of it"),
                           (0.8, "+25.0% against an external reference, more than 5% above it")):
        reference = tmp_path / f"external-{ratio}.json"
        reference.write_text(json.dumps({
            "command": "python main.py --epochs 2", "tokens": {"train": 1000, "vocab": 50},
            "epochs": [{"epoch": 1}, {"epoch": 2}], "best_val_ppl": lstm_best * ratio}))
        with_reference = dataclasses.replace(options, external={"lstm": str(reference)})
        text = study_report.write_study_report(with_reference, runs).read_text()
        said = " ".join(text.split())
        assert "LSTM (tied), early-stopped val PPL" in said
        assert f"is {verdict}: `python main.py --epochs 2`" in said
        assert "2 epochs on 1,000 training tokens, vocabulary 50" in said
    positions = tmp_path / "position-loss.json"
    positions.write_text(json.dumps([{"name": "lstm_s0", "n": 16, "efold_memory_tokens": {},
                                      "mean_loss_by_context": {"1-1": 5.0, "2-4": 4.5}},
                                     {"name": "control_s0", "n": 16,
                                      "efold_memory_tokens": {"layer 0": [1.5, 3.0],
                                                              "layer 1": [2.0, 9.0]},
                                      "mean_loss_by_context": {"1-1": 5.1, "2-4": 5.2}}]))
    frame_text = study_report.write_study_report(dataclasses.replace(
        options, target="lstm", position_loss=[str(positions)]), runs).read_text()
    target = section(frame_text, "## Against the target")
    ratio = frame.loc[frame["variant"] == "control", "best"].mean() / lstm_best - 1
    assert "| control | 1 |" in " ".join(target.split())
    assert f"{ratio:+.2%}" in target and "at most 5% above it" in " ".join(target.split())
    assert "against the target](tiny/target.png)" in target
    figure = study_figures.target_figure(frame, "lstm", 0.05)
    ax = figure.axes[0]
    names = [tick.get_text() for tick in ax.get_yticklabels()]
    assert names == frame.groupby("variant")["best"].mean().sort_values(
        ascending=False).index.tolist()                        # the best at the top
    assert len(ax.lines) == 2 * len(names)                     # seed dots and a mean bar each
    assert ax.patches[0].get_x() == pytest.approx(lstm_best)   # the band starts at the target
    table = external.position_table(positions)[0]
    assert table["Memory, longest"].tolist()[1] == 9.0 and table["Memory, median"][1] == 2.5
    assert pd.isna(table["Memory, longest"][0]) and "Loss, 2-4 tokens" in table
    assert list(table.columns)[-2:] == ["Memory, longest", "Memory, median"]
    assert table["Context used, tokens"].tolist() == ["2-4", "1-1"]   # 5.2 never beats 5.1
    assert table["Gain from context"].tolist() == [0.5, 0.0]
    assert "### How much context each model uses" in frame_text
    gaps = external.position_gaps(table, "lstm")
    assert gaps["Run"].tolist() == ["control_s0"]                 # the target's own row goes
    assert gaps["Against"].tolist() == ["lstm_s0"]
    assert gaps.iloc[0, 2:].tolist() == [0.1, 0.7]                # 5.1 - 5.0, 5.2 - 4.5
    assert external.position_gaps(table, "transformer") is None
    assert "the target's run of the same seed (nats" in " ".join(frame_text.split())
    seeds = pd.DataFrame({"Run": ["lstm_s1", "control_s1", "control_s2", "lstm_s0"],
                          "Loss, 1-1 tokens": [4.0, 4.5, 4.7, 5.0]})
    paired = external.position_gaps(seeds, "lstm")                # seed by seed; s2 has none
    assert paired.to_dict("list") == {"Run": ["control_s1"], "Against": ["lstm_s1"],
                                      "Loss, 1-1 tokens": [0.5]}
    for run in (r for seeds in runs.values() for r in seeds):  # records made before them
        run.references.clear()
    text = study_report.write_study_report(options, runs).read_text()
    assert "Count references are not available" in text and "| Kneser-Ney" not in text


def test_records_let_a_fresh_machine_reuse_finished_runs(tmp_path, monkeypatch):
    """A study's finished runs are saved as records (no checkpoints) and restored on a machine
    whose runs/ is gone, so nothing is trained twice; a record of other settings is not."""
    records = tmp_path / "records"
    options = tiny_study(tmp_path, variants=["control", "physics_reference"], seeds=[0],
                         workers=1, records=str(records))
    trained = study.run_study(options)
    saved = {p.relative_to(records).as_posix() for p in records.rglob("*") if p.is_file()}
    assert saved == {f"{v}/s0/{f}" for v in ("control", "physics_reference") for f in (
        "config.yaml", "env.json", "metrics/initial.json", "metrics/references.json",
        "metrics/steps.jsonl", "metrics/epochs.jsonl", "samples.json")}

    shutil.rmtree(tmp_path / "runs")                               # a fresh machine
    submitted: list = []
    monkeypatch.setattr(study, "run_jobs", lambda jobs, **_: submitted.extend(jobs))
    restored = study.run_study(options)
    assert submitted == []
    for variant in trained:
        assert restored[variant][0].epochs.equals(trained[variant][0].epochs)
        assert restored[variant][0].finished
    # What each variant writes, from the records (no checkpoint): the first fixed prompt.
    samples = study_report.variant_samples(restored)
    firsts = {v: trained[v][0].run.read_samples()[0] for v in trained}
    assert samples.prompt == text.literal(firsts["control"]["prompt"])
    assert samples.table.frame.to_dict("list") == {
        "Variant": list(trained), "Seed": [0, 0],
        "Continuation": [text.literal(firsts[v]["continuation"]) for v in trained]}
    assert samples.same_draws and not samples.missing

    for change in ({"epochs": 3}, {"overrides": {**options.overrides, "lr": 1e-2}}):
        submitted.clear()
        other = dataclasses.replace(options, run_dir=str(tmp_path / "other"), **change)
        study.run_study(other)                  # a longer budget, another setting: train
        assert len(submitted) == 2
        assert not (tmp_path / "other" / "control" / "s0" / "config.yaml").exists()


def test_records_keep_the_runs_that_finished_before_a_crash(tmp_path, monkeypatch):
    options = tiny_study(tmp_path, variants=["control"], seeds=[0, 1], workers=1,
                         records=str(tmp_path / "records"))

    def crash_after_the_first(jobs, **_):
        run_job(jobs[0])
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(study, "run_jobs", crash_after_the_first)
    with pytest.raises(RuntimeError, match="went away"):
        study.run_study(options)
    assert (tmp_path / "records" / "control" / "s0" / "metrics" / "epochs.jsonl").is_file()
    assert not (tmp_path / "records" / "control" / "s1").exists()


def test_records_are_saved_after_the_runs_not_before(tmp_path, monkeypatch):
    """A record written while the study's runs train changes the tree they record the commit
    of (records are tracked): a finished run's record is saved at the end, not the start."""
    options = tiny_study(tmp_path, variants=["control"], seeds=[0, 1], workers=1,
                         records=str(tmp_path / "records"))
    run_job(study.plan(options)[0])                     # finished before the study starts
    record = tmp_path / "records" / "control" / "s0" / "metrics" / "epochs.jsonl"
    seen: list[bool] = []
    monkeypatch.setattr(study, "run_jobs", lambda jobs, **_: seen.append(record.exists()))
    study.run_study(options)
    assert seen == [False] and record.is_file()


def test_the_ablation_params_are_the_studys_runs():
    """params/ablation.yaml runs part of params/study.yaml: the same runs, budget and fixes."""
    full, part = study.load_study("params/study.yaml"), study.load_study("params/ablation.yaml")
    assert set(part.variants) <= set(full.variants)
    assert study.study_dir(part) == study.study_dir(full) and part.records == full.records
    for key in ("seeds", "epochs", "physics_start_epoch", "data_params", "ablation"):
        assert getattr(part, key) == getattr(full, key), key
    jobs = {str(job.run_dir): job.config for job in study.plan(full)}
    assert all(jobs[str(job.run_dir)] == job.config for job in study.plan(part))


def test_the_regularised_control_differs_from_the_control_in_its_regularisers_only():
    """control_regularised is the control at a recipe that changes dropout and weight decay
    alone: what it is compared on is the regularisation physics is said to provide."""
    options = study.load_study("params/study_tuned.yaml")
    control, regularised = (study.run_config(options, v, 0)
                            for v in ("control", "control_regularised"))
    assert set(regularised.differences(control, allowed="")) <= {"name", "dropout",
                                                                   "weight_decay"}
    assert regularised.differences(control, allowed="").keys() - {"name"}


def test_the_energy_table_reads_lambda_in_the_steady_state_only():
    """lambda over the physics steps after the settle window: the first physics epoch (where
    lambda starts at its initial value whatever the drift) is left out."""
    epochs = pd.DataFrame({"epoch": [0, 1, 2, 3], "phase": ["warmup", "physics", "physics",
                                                            "physics"],
                           "energy_steps": [0, 2, 2, 2]})
    steps = pd.DataFrame({"epoch": [1, 1, 2, 2, 3, 3],
                          "lambda": [0.05, 0.04, 0.0, 0.2, 0.1, 0.3]})
    run = SimpleNamespace(config=SimpleNamespace(criteria=SimpleNamespace(settle_epochs=1)),
                          phase=lambda name: epochs[epochs["phase"] == name],
                          energy_steps=steps)
    assert list(study_report.steady_lambda(run)) == [0.0, 0.2, 0.1, 0.3]


def test_the_context_benchmark_table_reads_its_results_file(tmp_path):
    """Milliseconds per token by N for each model of a benchmarks/context.py results file, and
    the longest N's over the shortest's as its last row; a model stopped at some N (its cell
    absent there) is n/a there."""
    results = {"settings": {"models": {"a": {"settings": {}}, "b": {"settings": {"x": 1}}}},
               "rows": [{"n": 128, "batch": 4, "models": {"a": {"ms_per_token": 0.30012},
                                                          "b": {"ms_per_token": 0.5}}},
                        {"n": 16384, "batch": 1, "models": {"a": {"ms_per_token": 0.33}}}],
               "time_per_token_longest_over_shortest": {"a": 1.1}}
    path = tmp_path / "context.json"
    path.write_text(json.dumps(results))
    frame, read = external.context_table(path)
    assert read == results
    assert frame["N"].tolist() == ["128", "16,384", "longest / shortest"]
    assert frame["a"].tolist() == [0.3, 0.33, 1.1]
    assert frame["b"].iloc[0] == 0.5 and frame["b"].iloc[1:].isna().all()


def test_a_screened_variant_trains_at_the_first_seed_only(tmp_path):
    """screened: the variant's one run is planned, loaded and expected; its other seeds are
    neither trained nor reported missing."""
    options = tiny_study(tmp_path, variants=["control", "plain"], screened=["plain"])
    runs = [Path(job.run_dir) for job in study.plan(options)]
    assert [r.relative_to(study.study_dir(options)).as_posix() for r in runs
            if r.parent.name == "plain"] == ["plain/s0"]
    assert sum(r.parent.name == "control" for r in runs) == 3
    frame = pd.DataFrame({"variant": ["control"] * 3 + ["plain"], "seed": [0, 1, 2, 0],
                          "finished": True})
    assert study_report.missing_runs(options, frame) == []
    assert study_report.missing_runs(options, frame.iloc[:3]) == ["plain seed 0"]
    with pytest.raises(ConfigError, match="screened: name variants of the study"):
        tiny_study(tmp_path, screened=["control"])

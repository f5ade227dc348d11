"""The recipe search (physlm.search): its file, its draws, a 3-trial search on the fixture
corpus, a search that survives its driver's crash, and its report."""

from __future__ import annotations

import json
import math
from concurrent.futures import Executor, Future
from pathlib import Path

import optuna
import pytest
import yaml

from physlm import search, search_report
from physlm.errors import ConfigError
from physlm.runs import load_run

from .conftest import TINY

DATA = {**TINY, "heldout_fraction": 0.2, "epochs": 2, "max_train_batches": 3}
SPACE = {"optimizer": {"choices": ["adamw", "sgd"]},
         "lr": {"by": "optimizer", "adamw": {"low": 1e-3, "high": 1e-2, "log": True},
                "sgd": {"low": 0.1, "high": 1.0, "log": True}},
         "momentum": {"by": "optimizer", "sgd": {"choices": [0.0, 0.9]}},
         "dropout": {"low": 0.0, "high": 0.3}}


class InlineExecutor(Executor):
    """Runs each job when it is submitted, in this process; `crash_after` submissions it
    raises KeyboardInterrupt, as a killed driver would stop."""

    def __init__(self, crash_after: int | None = None) -> None:
        self.crash_after, self.submitted = crash_after, 0

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self.crash_after is not None and self.submitted == self.crash_after:
            raise KeyboardInterrupt("simulated crash of the driver")
        self.submitted += 1
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:  # the future carries it, as a process pool's would
            future.set_exception(error)
        return future


def write_search(folder: Path, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.yaml").write_text(yaml.safe_dump(DATA))
    (folder / "model.yaml").write_text(yaml.safe_dump({"energy_penalty": False}))
    values = {"name": "tiny", "params": str(folder / "model.yaml"),
              "data_params": str(folder / "data.yaml"), "epochs": 2, "trials": 3,
              "startup_trials": 2, "workers": 1, "space": SPACE,
              "run_dir": str(folder / "runs"), "report_dir": str(folder / "reports"),
              **overrides}
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))   # the space keeps its order
    return path


# ---------------------------------------------------------------- the search file
@pytest.mark.parametrize("change, message", [
    ({"trials": 0}, "trials must be >= 1"),
    ({"space": {"lr": {"low": 1e-3}}}, "lr: expected"),
    ({"space": {"lr": {"by": "optimizer", "sgd": {"low": 0.1, "high": 1}}}},
     "by: 'optimizer' must name an earlier setting"),
    ({"space": {"optimizer": {"choices": ["sgd"]},
                "lr": {"by": "optimizer", "adam": {"low": 0.1, "high": 1}}}},
     r"\['adam'\] are not choices of optimizer"),
    ({"trails": 3}, "did you mean 'trials'"),
    ({"fixed": {"epoch": 2}}, "did you mean 'epochs'"),
    ({"first": [{"optimizer": "sgd", "lr": 99.0, "momentum": 0.9, "dropout": 0.1}]},
     r"first recipe 1: lr: 99.0 is outside its range"),
    ({"first": [{"optimizer": "adamw", "lr": 5e-3, "momentum": 0.9, "dropout": 0.1}]},
     r"first recipe 1: \['momentum'\] are not drawn for this recipe"),
    ({"first": [{"optimizer": "sgd", "lr": 0.5, "momentum": 0.9}]},
     "first recipe 1: dropout is missing"),
    ({"fixed": {"heldout_fraction": 0.0}}, "set heldout_fraction > 0"),
])
def test_a_bad_search_file_is_one_clear_error(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        search.load_search(write_search(tmp_path, **change))


def test_a_setting_by_a_choice_is_drawn_only_for_that_choice():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    draws = [search.suggest(study.ask(), SPACE) for _ in range(30)]
    assert {d["optimizer"] for d in draws} == {"adamw", "sgd"}
    for draw in draws:
        low, high = (1e-3, 1e-2) if draw["optimizer"] == "adamw" else (0.1, 1.0)
        assert low <= draw["lr"] <= high
        assert ("momentum" in draw) == (draw["optimizer"] == "sgd")


# ---------------------------------------------------------------- searching
def test_a_recipe_given_first_is_tried_first_and_only_once(tmp_path):
    """`first`: the public recipe is trial 0, whole; the search then draws; a driver that
    continues the search (here to a third trial) does not try it again."""
    public = {"optimizer": "sgd", "lr": 0.5, "momentum": 0.0, "dropout": 0.1}

    def settings(study: optuna.Study) -> list[dict]:
        return [json.loads(t.user_attrs["settings"]) for t in study.trials]

    study = search.run_search(search.load_search(
        write_search(tmp_path, first=[public], trials=2)), InlineExecutor())
    assert settings(study)[0] == public and settings(study)[1] != public
    study = search.run_search(search.load_search(
        write_search(tmp_path, first=[public], trials=3)), InlineExecutor())
    assert len(study.trials) == 3 and settings(study).count(public) == 1


def test_a_three_trial_search_scores_each_trial_on_its_held_out_loss(tmp_path):
    spec = search.load_search(write_search(tmp_path))
    lines: list[str] = []
    study = search.run_search(spec, InlineExecutor(), log=lines.append)
    assert len(study.trials) == 3 and len(lines) == 3
    for trial in study.trials:
        assert trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        run = load_run(spec.runs / f"trial-{trial.number}")
        heldout = run.epochs["heldout_loss"].tolist()
        assert list(trial.intermediate_values.values()) == pytest.approx(heldout)
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert trial.value == pytest.approx(min(heldout)) and len(heldout) == spec.epochs
        assert run.config.to_flat()["optimizer"] == trial.params["optimizer"]
        assert run.env["valid_batches"] == 1   # validation cut to one batch: never used
    # The storage is the search: a second driver finds every trial done and trains nothing.
    again = search.run_search(spec, InlineExecutor(crash_after=0))
    assert [t.value for t in again.trials] == [t.value for t in study.trials]


def test_a_crashed_driver_leaves_a_search_the_next_one_finishes_identically(tmp_path):
    straight = search.run_search(search.load_search(write_search(tmp_path / "a")),
                                 InlineExecutor())
    spec = search.load_search(write_search(tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        search.run_search(spec, InlineExecutor(crash_after=1))   # trial 0 after one epoch
    stored = search.open_study(spec).trials
    assert [t.state for t in stored] == [optuna.trial.TrialState.RUNNING]
    assert len(stored[0].intermediate_values) == 1
    resumed = search.run_search(spec, InlineExecutor())
    assert [t.params for t in resumed.trials] == [t.params for t in straight.trials]
    assert [t.value for t in resumed.trials] == [t.value for t in straight.trials]
    assert [t.state for t in resumed.trials] == [t.state for t in straight.trials]


def test_a_trial_that_cannot_train_fails_once_and_the_search_goes_on(tmp_path):
    spec = search.load_search(write_search(tmp_path, trials=2, space={
        "lr": {"choices": [1e9]}}, fixed={"max_bad_steps": 1}))
    lines: list[str] = []
    study = search.run_search(spec, InlineExecutor(), log=lines.append)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all("failed" in line or "diverged" in line for line in lines)


def test_a_trial_worse_than_a_uniform_guess_is_pruned_at_once(tmp_path):
    spec = search.load_search(write_search(tmp_path, trials=1, epochs=3, space={
        "optimizer": {"choices": ["sgd"]}, "lr": {"choices": [300.0]}},
        fixed={"grad_clip": 100.0}))
    lines: list[str] = []
    study = search.run_search(spec, InlineExecutor(), log=lines.append)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED and "uniform guess" in lines[0]
    run, last = load_run(spec.runs / "trial-0"), list(trial.intermediate_values.values())[-1]
    assert len(run.epochs) == 1 < spec.epochs
    assert search.perplexity(last) > run.env["vocab_size"] and last > run.initial["heldout_loss"]


def test_the_report_shows_the_trials_the_best_and_the_importances(tmp_path):
    spec = search.load_search(write_search(tmp_path))
    study = search.run_search(spec, InlineExecutor())
    path = search_report.write_search_report(spec, spec.report_dir)
    text = path.read_text()
    best = min(t.value for t in study.trials if t.value is not None)
    assert f"{math.exp(best):,.2f}" in text
    assert "## The best trials" in text and "## Every trial" in text
    assert path.name == "tiny.md" and (path.parent / "tiny" / "heldout_ppl.png").is_file()
    assert "What mattered" in text
    counted = json.loads((spec.runs / "trial-0" / "metrics" / "references.json").read_text())
    trigram = counted["heldout"]["ppl"]["kn_trigram"]["all"]
    assert f"Kneser-Ney trigram {trigram:,.2f}" in text
    floor = min(model["all"] for model in counted["heldout"]["ppl"].values())
    verdict = "is below the best of them" if math.exp(best) < floor else "is not below"
    assert verdict in " ".join(text.split())
    recipe = search_report.write_recipe(spec, tmp_path / "recipe.yaml")
    best_trial = study.best_trial
    written = yaml.safe_load(recipe.read_text())
    assert written == {**spec.fixed, **search.suggest(optuna.trial.FixedTrial(
        best_trial.params), spec.space)}
    assert f"trial {best_trial.number}" in recipe.read_text().splitlines()[0]


def finished_trials(values: list[float], params: list[dict]) -> optuna.Study:
    distributions = {"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True),
                     "dropout": optuna.distributions.FloatDistribution(0.0, 0.5)}
    study = optuna.create_study()
    for value, drawn in zip(values, params, strict=True):
        study.add_trial(optuna.trial.create_trial(params=drawn, distributions=distributions,
                                                  value=value))
    return study


def test_importances_need_enough_trials_and_leave_out_what_no_trial_varied():
    """Two trials that differ in dropout alone give no table (PED-ANOVA would give lr a
    share); over enough trials a setting they all share is left out."""
    two = finished_trials([4.0, 4.2], [{"lr": 0.01, "dropout": 0.1}, {"lr": 0.01, "dropout": 0.3}])
    assert search_report.importances(two).empty
    n = search_report.IMPORTANCE_TRIALS
    varied = finished_trials([4.0 + 0.1 * i for i in range(n)],
                             [{"lr": 0.01, "dropout": 0.05 * i} for i in range(n)])
    assert list(search_report.importances(varied)["Setting"]) == ["dropout"]
    both = finished_trials([4.0 + 0.1 * i for i in range(n)],
                           [{"lr": 0.01 * (i + 1), "dropout": 0.05 * i} for i in range(n)])
    shares = search_report.importances(both)
    assert set(shares["Setting"]) == {"lr", "dropout"}
    assert list(shares["Importance"]) == sorted(shares["Importance"], reverse=True)

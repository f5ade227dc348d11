"""Recipe search: Optuna's TPE over one architecture's training recipe, at a fixed budget.

A search is a YAML file (params/search_<architecture>.yaml): the recipe it starts from
(`params`, `data_params`), the budget (`epochs`: every trial sees the same training
tokens), the number of trials, and the space, one entry per setting:

    lr_schedule: {choices: [constant, cosine, plateau]}
    dropout: {low: 0.0, high: 0.5}
    lr: {by: optimizer, adamw: {low: 1e-4, high: 1e-2, log: true}, sgd: {...}}

(`by`: the range depends on another setting's choice; Optuna sees one parameter per
choice, `lr@adamw`, which its grouped multivariate TPE treats as a conditional space).

A trial is an ordinary physlm run (`<run_dir>/trial-<n>`), scored on the held-out lines of
the training split (`heldout_fraction`), never on the validation split. Trials advance one
epoch per job, so the driver, the only process that opens the SQLite storage, reports each
epoch's held-out loss to Optuna and prunes between epochs: the median rule once three
trials have finished, and at once a trial worse than both a uniform guess over its
vocabulary and its own untrained model (diverging: it would only waste its epochs). A trial's
value is its best held-out loss over the budget (early stopping). The jobs run on any
`concurrent.futures.Executor` (the CLI's: physlm.executor's Ray, local or a cluster).

A crash loses nothing: a run resumes from its checkpoint, and a trial left RUNNING in the
storage is continued by the next driver from the epochs its run directory holds, so a
search stopped here continues later, on another machine too (with its storage file).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from physlm.config import REPORTS_ROOT, RUNS_ROOT, Config, from_flat
from physlm.errors import ConfigError
from physlm.files import read_json
from physlm.runs import RunDirectory
from physlm.values import parse_options, read_params_file

OBJECTIVE = "heldout_loss"   # the epoch record's field a trial is scored on
PRUNER_STARTUP = 3           # finished trials before the median rule prunes
# Every trial's own settings: its validation figures are never used, so one batch of it.
TRIAL = {"progress": False, "max_eval_batches": 1}


@dataclass
class SearchSpec:
    """One search: which recipe, what budget, which space, where it is kept."""

    name: str
    params: str                                  # the architecture's params file
    space: dict[str, dict[str, Any]]
    data_params: str | None = "params/wt2_proxy.yaml"
    epochs: int = 6
    trials: int = 30
    seed: int = 0                                # the sampler's and every trial's seed
    startup_trials: int = 8                      # random trials before TPE
    prune_after: int = 1                         # epochs every trial trains unpruned
    fixed: dict[str, Any] = field(default_factory=dict)   # settings of every trial
    workers: int = 2                             # trials trained at once
    run_dir: str | None = None                   # default runs/search/<name>
    storage: str | None = None                   # default <run_dir>/search.sqlite3
    report_dir: str = REPORTS_ROOT
    recipe: str | None = None                    # where the best trial's recipe is written
    # Recipes tried before any draw, in the space's settings: the public recipe the model
    # comes from, so that the search is checked against it. A recipe already tried is not
    # tried again (a restarted driver, a longer search).
    first: list[dict[str, Any]] = field(default_factory=list)

    @property
    def runs(self) -> Path:
        return Path(self.run_dir or f"{RUNS_ROOT}/search/{self.name}")

    @property
    def storage_path(self) -> Path:
        return Path(self.storage) if self.storage else self.runs / "search.sqlite3"


def load_search(path: str | Path, overrides: dict[str, Any] | None = None) -> SearchSpec:
    """Read and check a search file; `overrides` replace its top-level keys."""
    values = {"name": Path(path).stem, **read_params_file(path), **(overrides or {})}
    spec = parse_options(SearchSpec, values, f"search setting (in {path})")
    for key in ("epochs", "trials", "startup_trials", "prune_after", "workers"):
        if getattr(spec, key) < 1:
            raise ConfigError(f"{path}: {key} must be >= 1, got {getattr(spec, key)}")
    for key, entry in spec.space.items():
        _check_entry(path, key, entry, spec.space)
    for number, recipe in enumerate(spec.first, 1):
        try:
            optuna_params(recipe, spec.space)
        except ConfigError as error:
            raise ConfigError(f"{path}: first recipe {number}: {error}") from error
    if trial_config(spec, {}).data.heldout_fraction == 0:   # and the base recipe is valid
        raise ConfigError(f"{path}: trials are scored on held-out lines: set heldout_fraction "
                          "> 0 in its data_params, params or fixed settings")
    return spec


def _check_entry(path: str | Path, key: str, entry: Any, space: dict[str, Any]) -> None:
    """A range is {choices: [...]} or {low, high[, log]}; a `by` entry maps each choice of
    an earlier setting to such a range (choices it leaves out keep the setting's default)."""
    if isinstance(entry, dict) and "by" in entry:
        by = entry["by"]
        if by not in space or "choices" not in space[by] or list(space).index(by) > list(
                space).index(key):
            raise ConfigError(f"{path}: {key}: by: {by!r} must name an earlier setting "
                              "with choices")
        ranges = {k: v for k, v in entry.items() if k != "by"}
        unknown = set(ranges) - set(space[by]["choices"])
        if unknown:
            raise ConfigError(f"{path}: {key}: {sorted(unknown)} are not choices of {by}")
        for choice, sub in ranges.items():
            _check_entry(path, f"{key}@{choice}", sub, space)
    elif not (isinstance(entry, dict) and ("choices" in entry and entry["choices"]
                                           or {"low", "high"} <= set(entry))):
        raise ConfigError(f"{path}: {key}: expected {{choices: [...]}} or {{low: .., high: ..}}"
                          f", got {entry!r}")


def optuna_params(recipe: dict[str, Any], space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A whole recipe as the draw Optuna would name it (`suggest`'s names: `lr@sgd`);
    ConfigError for a setting missing, outside its range, or not drawn for this recipe."""
    params: dict[str, Any] = {}
    for key, entry in space.items():
        name = key
        if "by" in entry:
            if recipe.get(entry["by"]) not in entry:
                continue
            name, entry = f"{key}@{recipe[entry['by']]}", entry[recipe[entry["by"]]]
        if key not in recipe:
            raise ConfigError(f"{key} is missing")
        value = recipe[key]
        inside = (value in entry["choices"] if "choices" in entry
                  else isinstance(value, int | float) and entry["low"] <= value <= entry["high"])
        if not inside:
            raise ConfigError(f"{key}: {value!r} is outside its range {entry}")
        params[name] = value
    drawn = {name.split("@")[0] for name in params}
    if set(recipe) - drawn:
        raise ConfigError(f"{sorted(set(recipe) - drawn)} are not drawn for this recipe")
    return params


def perplexity(loss: float) -> float:
    """exp(loss), inf where it would overflow (a diverged trial)."""
    return math.exp(loss) if loss < 700 else math.inf


def suggest(trial: optuna.Trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Draw one recipe from the space: setting -> value (a `by` range after its choice)."""
    drawn: dict[str, Any] = {}
    for key, entry in space.items():
        if "by" in entry:
            choice = drawn[entry["by"]]
            if choice in entry:
                drawn[key] = _draw(trial, f"{key}@{choice}", entry[choice])
        else:
            drawn[key] = _draw(trial, key, entry)
    return drawn


def _draw(trial: optuna.Trial, name: str, entry: dict[str, Any]) -> Any:
    if "choices" in entry:
        return trial.suggest_categorical(name, entry["choices"])
    low, high, log = entry["low"], entry["high"], entry.get("log", False)
    if isinstance(low, int) and isinstance(high, int) and not log:
        return trial.suggest_int(name, low, high)
    return trial.suggest_float(name, float(low), float(high), log=log)


def trial_config(spec: SearchSpec, settings: dict[str, Any], number: int = 0) -> Config:
    """The run of one trial: data params <- the recipe <- fixed settings <- the draw."""
    data = read_params_file(spec.data_params) if spec.data_params else {}
    return from_flat({**data, **read_params_file(spec.params), **spec.fixed, **settings,
                      **TRIAL, "epochs": spec.epochs, "seed": spec.seed,
                      "name": f"{spec.name}-trial-{number}"})


def train_epochs(config: Config, run_dir: str, until_epoch: int) -> list[dict[str, Any]]:
    """A job: train (or resume) the trial's run up to `until_epoch`; its epoch records. It
    holds the run directory's lock: a straggler of a killed driver makes it fail cleanly
    (RunBusyError) instead of writing beside it."""
    from physlm.trainer import train

    with RunDirectory(run_dir).lock():
        return train(config, run_dir, until_epoch=until_epoch)


def sampler(spec: SearchSpec, trial_number: int) -> optuna.samplers.TPESampler:
    """The sampler of one trial, seeded by the search's seed and the trial's number: TPE keeps
    nothing but its random state between trials (the history is in the storage), so a driver
    restarted after a crash draws what an uninterrupted one would have drawn."""
    with warnings.catch_warnings():   # `group` is marked experimental; it is what we want
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=spec.seed * 100_003 + trial_number,
                                          n_startup_trials=spec.startup_trials,
                                          multivariate=True, group=True)


def open_study(spec: SearchSpec) -> optuna.Study:
    spec.storage_path.parent.mkdir(parents=True, exist_ok=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP,
                                         n_warmup_steps=spec.prune_after - 1)
    return optuna.create_study(study_name=spec.name, storage=f"sqlite:///{spec.storage_path}",
                               sampler=sampler(spec, 0), pruner=pruner, direction="minimize",
                               load_if_exists=True)


@dataclass
class _Running:
    trial: optuna.Trial
    config: Config
    run_dir: str
    reported: int = 0      # epochs already reported to Optuna


def run_search(spec: SearchSpec, executor: Executor,
               log: Callable[[str], None] = print) -> optuna.Study:
    """Run trials until `spec.trials` exist and none is running, `spec.workers` at a time on
    `executor`; returns the study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(spec)
    queue = [_resume(study, spec, frozen) for frozen in study.get_trials(deepcopy=False)
             if frozen.state == optuna.trial.TrialState.RUNNING]
    in_flight: dict[Future, _Running] = {}

    def submit(item: _Running) -> None:
        job = executor.submit(train_epochs, item.config, item.run_dir, item.reported + 1)
        in_flight[job] = item

    while True:
        while len(in_flight) < spec.workers and (queue or len(study.trials) < spec.trials):
            submit(queue.pop(0) if queue else _ask(study, spec))
        if not in_flight:
            return study
        finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
        for future in finished:
            item = in_flight.pop(future)
            if _advance(study, spec, item, future, log):
                submit(item)


def _ask(study: optuna.Study, spec: SearchSpec) -> _Running:
    study.sampler = sampler(spec, len(study.trials))
    tried = [json.loads(t.user_attrs["settings"]) for t in study.trials
             if "settings" in t.user_attrs]
    untried = [recipe for recipe in spec.first if recipe not in tried]
    if untried:   # the next ask takes it whole
        study.enqueue_trial(optuna_params(untried[0], spec.space))
    trial = study.ask()
    settings = suggest(trial, spec.space)
    trial.set_user_attr("settings", json.dumps(settings))
    return _running(spec, trial, settings)


def _resume(study: optuna.Study, spec: SearchSpec, frozen: optuna.trial.FrozenTrial
            ) -> _Running:
    trial = optuna.Trial(study, frozen._trial_id)   # Optuna's own handle on a stored trial
    item = _running(spec, trial, json.loads(frozen.user_attrs["settings"]))
    item.reported = len(frozen.intermediate_values)
    return item


def _running(spec: SearchSpec, trial: optuna.Trial, settings: dict[str, Any]) -> _Running:
    run_dir = str(spec.runs / f"trial-{trial.number}")
    return _Running(trial, trial_config(spec, settings, trial.number), run_dir)


def _advance(study: optuna.Study, spec: SearchSpec, item: _Running, future: Future,
             log: Callable[[str], None]) -> bool:
    """Report the epoch a job finished; prune, finish, or ask for the next epoch (True)."""
    trial, number = item.trial, item.trial.number
    try:
        records = future.result()
    except Exception as error:   # diverged, or a recipe the model cannot train
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log(f"search {spec.name}: trial {number} failed: {str(error).splitlines()[0]}")
        return False
    for record in records[item.reported:]:
        value = record[OBJECTIVE]
        if not math.isfinite(value):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log(f"search {spec.name}: trial {number} diverged at epoch {record['epoch'] + 1}")
            return False
        trial.report(value, record["epoch"])
    item.reported = len(records)
    run = RunDirectory(item.run_dir)
    if "references" not in study.user_attrs:   # the count models on the held-out lines, once
        study.set_user_attr("references", read_json(run.references)["heldout"]["ppl"])
    losses = [record[OBJECTIVE] for record in records]
    epoch, best = len(records), min(losses)
    if epoch >= spec.epochs:
        study.tell(trial, best)
        log(f"search {spec.name}: trial {number} done: best held-out PPL {perplexity(best):,.1f}")
        return False
    # Worse than a uniform guess and than the untrained model: diverging, whatever the median.
    bound = max(math.log(run.read_env()["vocab_size"]), read_json(run.initial)[OBJECTIVE])
    if losses[-1] > bound or trial.should_prune():
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        why = "worse than untrained and a uniform guess" if losses[-1] > bound else \
            "above the median"
        log(f"search {spec.name}: trial {number} pruned after epoch {epoch}, {why} "
            f"(held-out PPL {perplexity(losses[-1]):,.4g})")
        return False
    return True

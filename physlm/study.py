"""The study: does physics help a language model? Many runs, compared with their spread.

Each (variant, seed) is an ordinary physlm run in `<run_dir>/<variant>/s<seed>`, so it is
resumable and reusable: re-running the study skips finished runs and resumes unfinished
ones. A variant is a params file (params/<variant>.yaml) over the study's data settings;
the study fixes the budget (epochs, physics_start_epoch) and the seed:

    config = defaults <- data params <- params/<variant>.yaml <- budget, seed, name

Runs whose warmup equals the control's (the reference and depth recipes) fork from the
control's warmup checkpoint instead of training it again (physlm.runs.fork_from).

Statistics and the report (physlm.study_report) compare every variant with the control,
seed by seed.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from physlm.config import WARMUP_INVARIANT, Config, from_flat, read_params_file
from physlm.pool import TrainJob, run_jobs
from physlm.runs import RunData, load_run
from physlm.values import ConfigError, coerce, suggest

PARAMS = Path(__file__).resolve().parents[1] / "params"
CONTROL = "control"


@dataclass
class StudyOptions:
    """The study's own settings; every variant's other settings come from params files."""

    name: str = "study"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: list[str] = field(default_factory=lambda: [
        "plain", "physics_reference", "physics_recommended", "physics_depth", CONTROL,
        "lstm", "transformer"])
    epochs: int = 6
    physics_start_epoch: int = 4
    data_params: str | None = "params/wt2_proxy.yaml"   # the data every variant trains on
    overrides: dict[str, Any] = field(default_factory=dict)  # config keys for every run
    run_dir: str | None = None                          # default runs/<name>
    report_dir: str = "reports"
    workers: int = 2

    def validate(self) -> StudyOptions:
        problems = [message for ok, message in (
            (len(self.seeds) >= 1, "seeds: give at least one seed (3 or more to compare)"),
            (len(set(self.seeds)) == len(self.seeds), "seeds must differ"),
            (CONTROL in self.variants, "variants must include 'control': the baseline"),
            (0 <= self.physics_start_epoch < self.epochs,
             "physics_start_epoch must be in [0, epochs): physics must run"),
            (self.workers >= 1, "workers must be >= 1")) if not ok]
        for variant in self.variants:
            if not (PARAMS / f"{variant}.yaml").is_file():
                problems.append(f"variant {variant!r} has no params/{variant}.yaml")
        if problems:
            raise ConfigError("invalid study:\n  " + "\n  ".join(problems))
        return self


STUDY_KEYS = tuple(f.name for f in dataclasses.fields(StudyOptions))


def study_options(values: dict[str, Any]) -> StudyOptions:
    """Options from a flat mapping (a study params file, papermill parameters)."""
    hints = typing.get_type_hints(StudyOptions)
    options: dict[str, Any] = {}
    for key, value in values.items():
        if key not in STUDY_KEYS:
            raise ConfigError(f"unknown study parameter {key!r}{suggest(key, STUDY_KEYS)}")
        if value is None:
            continue
        if key in ("seeds", "variants"):
            value = [value] if isinstance(value, int | str) else list(value)
            options[key] = [coerce(key, v, int if key == "seeds" else str) for v in value]
        elif key == "overrides":
            options[key] = dict(value)
        else:
            options[key] = coerce(key, value, hints[key])
    return StudyOptions(**options).validate()


def load_study(params_file: str | Path | None = None,
               overrides: dict[str, Any] | None = None) -> StudyOptions:
    values = read_params_file(params_file) if params_file else {}
    return study_options({**values, **{k: v for k, v in (overrides or {}).items()
                                       if v is not None}})


def run_config(options: StudyOptions, variant: str, seed: int) -> Config:
    data = read_params_file(options.data_params) if options.data_params else {}
    recipe = read_params_file(PARAMS / f"{variant}.yaml")
    budget = {"epochs": options.epochs, "physics_start_epoch": options.physics_start_epoch,
              "seed": seed, "name": f"{variant}_s{seed}", "progress": False}
    return from_flat({**data, **recipe, **options.overrides, **budget})


def study_dir(options: StudyOptions) -> Path:
    return Path(options.run_dir or Path("runs") / options.name)


def run_path(options: StudyOptions, variant: str, seed: int) -> Path:
    return study_dir(options) / variant / f"s{seed}"


def plan(options: StudyOptions) -> list[TrainJob]:
    """Every run of the study, the controls first: the runs whose warmup equals their
    seed's control's (the reference and depth recipes) fork from it when it is done."""
    jobs = [TrainJob(run_config(options, CONTROL, seed), run_path(options, CONTROL, seed))
            for seed in options.seeds]
    for variant in (v for v in options.variants if v != CONTROL):
        for seed in options.seeds:
            config, control = run_config(options, variant, seed), jobs[
                options.seeds.index(seed)]
            shares_warmup = not config.differences(control.config, allowed=WARMUP_INVARIANT)
            jobs.append(TrainJob(config, run_path(options, variant, seed),
                                 fork=control.run_dir if shares_warmup else None))
    return jobs


def run_study(options: StudyOptions) -> dict[str, list[RunData]]:
    """Train (or reuse) every run of the study; return the runs by variant."""
    run_jobs(plan(options), workers=options.workers)
    return load_study_runs(options)


def load_study_runs(options: StudyOptions) -> dict[str, list[RunData]]:
    """The study's runs that exist, by variant (a run not started yet is left out)."""
    paths = {v: [run_path(options, v, seed) for seed in options.seeds] for v in options.variants}
    return {variant: [load_run(p) for p in found if (p / "config.yaml").is_file()]
            for variant, found in paths.items()}

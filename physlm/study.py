"""The study: does physics help a language model? Many runs, compared with their spread.

Each (variant, seed) is an ordinary physlm run in `<run_dir>/<variant>/s<seed>`, so it is
resumable and reusable: re-running the study skips finished runs and resumes unfinished
ones. A variant is a params file (params/<variant>.yaml) over the study's data settings,
trained with its architecture's recipe (`recipes`: the tuned optimizer, schedule, batch,
regularisation of params/recipe_<architecture>.yaml; a variant may name its own); the study
fixes the budget (epochs, and physics_start_epoch unless the variant's file sets it: the
later warmup of a drift-reduction variant) and the seed:

    config = defaults <- data params <- params/<variant>.yaml <- recipe <- budget, seed, name

The replica and the ablation keep the original's recipe (SPEC section 7): they measure it.

Runs whose warmup equals the control's (the reference and depth recipes) fork from the
control's warmup checkpoint instead of training it again (physlm.runs.fork_from).

The ablation (`ablation`: fixes in order, each a mapping of settings) starts from the
original's semantics, params/replica.yaml, and adds one fix per row; a row identical to a
study variant is that variant's runs (physlm.history compares each row with the previous).

With `records` set, every finished run's record (physlm.runs: config, provenance, metrics;
no checkpoints) is kept there, and a run missing here is restored from it: a study can be
finished over several machines whose runs/ is not kept, and reported on a fresh clone.

Statistics and the report (physlm.study_report) compare every variant with its control,
seed by seed: the study's control, or the variant its entry in physlm.variants names
(physics on the improved layer against the improved layer without it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from physlm.config import (
    REPORTS_ROOT,
    RUNS_ROOT,
    Config,
    ModelConfig,
    PhysicsConfig,
    TrainConfig,
    from_flat,
    read_params_file,
)
from physlm.errors import ConfigError, one_line
from physlm.executor import TrainJob, run_jobs
from physlm.runs import RunData, RunDirectory, load_run
from physlm.sections import RESUMABLE, WARMUP_INVARIANT
from physlm.values import parse_options
from physlm.variants import CONTROL, REPLICA, VARIANTS, control_of

PARAMS = Path(__file__).resolve().parents[1] / "params"
@dataclass
class StudyOptions:
    """The study's own settings; every variant's other settings come from params files. The
    budget's defaults are the configuration's (physlm.config)."""

    name: str = "study"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    epochs: int = TrainConfig.epochs
    physics_start_epoch: int = PhysicsConfig.physics_start_epoch
    data_params: str | None = "params/wt2_proxy.yaml"   # the data every variant trains on
    overrides: dict[str, Any] = field(default_factory=dict)  # config keys for every run
    # Architecture (or a variant's name, which wins) -> the params file of its training recipe.
    recipes: dict[str, str] = field(default_factory=dict)
    # Fix name -> the settings that fix it, applied one after another to params/replica.yaml
    # (given as a mapping, or as the name of a YAML file that holds it).
    ablation: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_dir: str | None = None                          # default runs/<name>
    report_dir: str = REPORTS_ROOT
    records: str | None = None                          # finished runs' records, kept there
    # Variant -> the results file of an external reference trained on the same data's tokens
    # (benchmarks/external_wlm.py: the public word_language_model script), set beside it.
    external: dict[str, str] = field(default_factory=dict)
    # Results files of the context benchmark (benchmarks/context.py), shown in the report.
    context: list[str] = field(default_factory=list)
    # Results files of benchmarks/position_loss.py (how much context each model uses).
    position_loss: list[str] = field(default_factory=list)
    # Variants screened at the first seed only: not promising there, so not trained at the
    # others (issue 23's procedure); their spread is n/a and no paired difference is made.
    screened: list[str] = field(default_factory=list)
    # A variant every other is measured against (its early-stopped val PPL; "reached" within
    # criteria.ppl_tolerance): issue 23's tuned LSTM.
    target: str | None = None
    workers: int = 2                                    # runs at once per machine (no GPU)
    address: str | None = None                          # a Ray cluster to join (physlm.executor)

    def validate(self) -> StudyOptions:
        """The study's own rules; each variant's settings are checked as any run's are
        (Config.validate: the physics schedule, ...), for the first seed."""
        problems = [message for ok, message in (
            (len(self.seeds) >= 1, "seeds: give at least one seed (3 or more to compare)"),
            (len(set(self.seeds)) == len(self.seeds), "seeds must differ"),
            (CONTROL in self.variants, "variants must include 'control': the baseline"),
            *((control_of(v) in self.variants, f"variant {v} is paired against "
               f"{control_of(v)}: add {control_of(v)} to variants") for v in self.variants),
            (self.workers >= 1, "workers must be >= 1"),
            *((variant in self.variants and Path(path).is_file(), f"external: {variant} -> "
               f"{path} needs the variant among variants and the results file")
              for variant, path in self.external.items()),
            *((Path(path).is_file(), f"{key}: {path} is not a file (a results file of "
               f"benchmarks/{key}.py)") for key in ("context", "position_loss")
              for path in getattr(self, key)),
            (self.target is None or self.target in self.variants,
             f"target: {self.target} must be among variants"),
            (set(self.screened) <= set(self.variants) - {CONTROL},
             "screened: name variants of the study other than the control"),
            (all(re.fullmatch(r"[A-Za-z0-9_-]+", fix) for fix in self.ablation),
             "ablation fixes are named by letters, digits, '_' or '-' (a folder name)"))
            if not ok]
        for variant in self.variants + ([REPLICA] if self.ablation else []):
            if not (PARAMS / f"{variant}.yaml").is_file():
                problems.append(f"variant {variant!r} has no params/{variant}.yaml")
            elif self.seeds:
                try:
                    run_config(self, variant, self.seeds[0])
                except ConfigError as error:
                    problems.append(f"variant {variant}: {one_line(error)}")
        if problems:
            raise ConfigError("invalid study:\n  " + "\n  ".join(problems))
        return self

    def seeds_of(self, variant: str) -> list[int]:
        """The seeds `variant` trains at: the first alone when it is screened."""
        return self.seeds[:1] if variant in self.screened else self.seeds


def study_options(values: dict[str, Any]) -> StudyOptions:
    """Options from a flat mapping (a study params file, papermill parameters); an ablation
    given as a file name is read from that file."""
    if isinstance(values.get("ablation"), str):
        try:
            values = {**values, "ablation": read_params_file(values["ablation"])}
        except ConfigError as error:
            raise ConfigError(f"ablation: {one_line(error)}; give a mapping of fix: settings, "
                              "or the YAML file that holds one") from error
    return parse_options(StudyOptions, values, "study parameter").validate()


def load_study(params_file: str | Path | None = None,
               overrides: dict[str, Any] | None = None) -> StudyOptions:
    values = read_params_file(params_file) if params_file else {}
    return study_options({**values, **{k: v for k, v in (overrides or {}).items()
                                       if v is not None}})


def run_config(options: StudyOptions, variant: str, seed: int,
               fixes: dict[str, Any] | None = None, name: str | None = None) -> Config:
    data = read_params_file(options.data_params) if options.data_params else {}
    own = read_params_file(PARAMS / f"{variant}.yaml")
    budget = {"epochs": options.epochs,
              "physics_start_epoch": own.get("physics_start_epoch", options.physics_start_epoch),
              "seed": seed, "name": f"{name or variant}_s{seed}", "progress": False}
    return from_flat({**data, **own, **recipe(options, variant, own), **(fixes or {}),
                      **options.overrides, **budget})


def recipe(options: StudyOptions, variant: str, own: dict[str, Any]) -> dict[str, Any]:
    """The training recipe `variant` trains with: its own entry in `recipes`, else its
    architecture's; none for the replica (and so the ablation), which keeps the original's."""
    if variant == REPLICA:
        return {}
    architecture = own.get("architecture", ModelConfig.architecture)
    path = options.recipes.get(variant, options.recipes.get(architecture))
    return read_params_file(path) if path else {}


def study_dir(options: StudyOptions) -> Path:
    return Path(options.run_dir or Path(RUNS_ROOT) / options.name)


def run_path(options: StudyOptions, variant: str, seed: int) -> Path:
    return study_dir(options) / variant / f"s{seed}"


@dataclass(frozen=True)
class AblationRow:
    label: str                  # "replica", then the name of the fix this row adds
    fixes: dict[str, Any]       # every fix up to this row
    same_as: str | None         # the study variant these settings are, if any


def ablation_rows(options: StudyOptions) -> list[AblationRow]:
    """The replica, then one more fix per row (none without an ablation)."""
    if not options.ablation:
        return []
    labels, fixes, rows = [REPLICA, *options.ablation], {}, []
    for index, label in enumerate(labels):
        if index:
            fixes = {**fixes, **options.ablation[label]}
        config = run_config(options, REPLICA, options.seeds[0], fixes)
        same_as = next((v for v in options.variants if not config.differences(
            run_config(options, v, options.seeds[0]), allowed=RESUMABLE)), None)
        rows.append(AblationRow(label, fixes, same_as))
    return rows


def ablation_path(options: StudyOptions, index: int, row: AblationRow, seed: int) -> Path:
    if row.same_as:
        return run_path(options, row.same_as, seed)
    return study_dir(options) / "ablation" / f"{index}_{row.label}" / f"s{seed}"


def plan(options: StudyOptions) -> list[TrainJob]:
    """Every run of the study, the controls first: the runs whose warmup equals their
    seed's control's (the reference and depth recipes, most ablation rows; a variant's own
    control where it names one) fork from it when it is done."""
    jobs = [TrainJob(run_config(options, CONTROL, seed), run_path(options, CONTROL, seed))
            for seed in options.seeds]

    def add(config: Config, path: Path, seed: int, against: str = CONTROL) -> None:
        control = run_config(options, against, seed)
        shares_warmup = not config.differences(control, allowed=WARMUP_INVARIANT)
        jobs.append(TrainJob(config, path, fork=run_path(options, against, seed)
                             if shares_warmup else None))

    for variant in (v for v in options.variants if v != CONTROL):
        for seed in options.seeds_of(variant):
            add(run_config(options, variant, seed), run_path(options, variant, seed), seed,
                control_of(variant))
    for index, row in enumerate(ablation_rows(options)):
        for seed in (s for s in options.seeds if not row.same_as):
            add(run_config(options, REPLICA, seed, row.fixes, name=f"ablation{index}"),
                ablation_path(options, index, row, seed), seed)
    return jobs


def run_study(options: StudyOptions) -> dict[str, list[RunData]]:
    """Train (or reuse) every run of the study; return the runs by variant. Finished runs
    are not trained again (a restored record has no checkpoint to resume from). Records are
    saved after the runs, not before: records tracked in the tree and written at the start
    would make every run the study then starts record a '+dirty' commit."""
    restore_records(options)
    try:
        run_jobs([job for job in plan(options)
                  if not RunDirectory(job.run_dir).finished_as(job.config)],
                 workers=options.workers, address=options.address)
    finally:  # what finished before a crash is kept too
        save_records(options)
    return load_study_runs(options)


def _records(options: StudyOptions) -> list[tuple[TrainJob, RunDirectory, RunDirectory]]:
    """Each run of the study with its run directory and its record's (`options.records`)."""
    return [(job, RunDirectory(job.run_dir), RunDirectory(
        Path(options.records) / Path(job.run_dir).relative_to(study_dir(options))))
        for job in plan(options)] if options.records else []


def save_records(options: StudyOptions) -> None:
    """Save every finished run's record in `options.records`."""
    for job, run, record in _records(options):
        if run.finished_as(job.config):
            run.copy_record_to(record)


def restore_records(options: StudyOptions) -> None:
    """Restore the record of a run that is missing here (used only for the same settings)."""
    for job, run, record in _records(options):
        if not run.holds_run and record.finished_as(job.config):
            record.copy_record_to(run)


def _existing(paths: list[Path]) -> list[RunData]:
    return [load_run(p) for p in paths if (p / "config.yaml").is_file()]


def load_study_runs(options: StudyOptions) -> dict[str, list[RunData]]:
    """The study's runs that exist, by variant (a run not started yet is left out)."""
    return {v: _existing([run_path(options, v, seed) for seed in options.seeds_of(v)])
            for v in options.variants}


def load_ablation_runs(options: StudyOptions) -> dict[str, list[RunData]]:
    """The ablation's runs that exist, by row label, in row order."""
    return {row.label: _existing([ablation_path(options, i, row, s) for s in options.seeds])
            for i, row in enumerate(ablation_rows(options))}

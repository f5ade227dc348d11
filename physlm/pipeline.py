"""The notebook pipeline: parameters -> one configuration -> stage notebooks -> report.

`notebooks/phase3.ipynb` collects its papermill parameters, resolves them into a
`Config` and calls `run_pipeline`, which executes the stage notebooks with papermill:

    warmup.ipynb     train(config, run_dir, until_epoch=config.warmup_epochs)  (physics off)
    physics.ipynb    train(config, run_dir): the remaining epochs, physics penalty on
    control          the same two stages with energy_penalty: false, in <run_dir>/control
    analysis.ipynb   tables, plots and the report (physlm.report.write_report: markdown with
                     its figures, and the same as one HTML page), which it also displays

The executed copy of every stage is kept in <run_dir>/notebooks/<stage>.ipynb (the
control's in <run_dir>/control/notebooks/). Every stage receives the same resolved
configuration (`Config.to_flat()`, as the parameter `config_overrides`). A training
stage whose epochs are already in the run's checkpoint is skipped, so re-running the
pipeline reuses finished work and a re-run after a crash resumes from the last
checkpoint. A failing stage raises `StageError`, which names the stage, the error and
where its executed notebook is. The notebooks work in the repository root (launch
papermill there, or from notebooks/), so relative paths in parameters (params_file,
run_dir, data_dir, report_dir) are relative to the repository root in every stage.

While a training stage runs, its epochs are reported one line each (physlm.progress), also
in the terminal of `papermill notebooks/phase3.ipynb ...`. The pipeline holds the lock of the
run directory and of its control directory throughout (RunDirectory.lock), so two pipelines
never train the same run at once. `install_error_display` makes the notebooks show physlm's
own errors (a bad parameter, missing data, a failed stage) as one line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import time
import types
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from physlm.config import ALIASES, KEYS, REPORTS_ROOT, Config, from_flat, load_config
from physlm.errors import USER_ERRORS, ConfigError, NotWritableError, StageError, one_line
from physlm.executor import threads_per_worker
from physlm.files import why_not_writable
from physlm.progress import follow, say
from physlm.runs import RunDirectory, default_run_dir
from physlm.values import parse_options, suggest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO_ROOT / "notebooks"
# Stage kernels log errors only: their start-up warnings would land in the caller's output.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]


@dataclass
class PipelineOptions:
    """Settings of the pipeline itself; every other parameter is a `Config` key."""

    params_file: str | None = None   # YAML parameter file (flat config keys)
    run_dir: str | None = None       # default runs/<name> (Config.run_name)
    control_run: bool = True         # also the physics-off baseline (see trains_control)
    report_dir: str = REPORTS_ROOT
    workers: int = 1                 # 2: the physics stages of run and control side by side

    def validate(self) -> PipelineOptions:
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1 (2: the physics stages of the run and its "
                              f"control side by side), got {self.workers}")
        return self


PIPELINE_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PipelineOptions))


# ------------------------------------------------------------------ parameters
def notebook_parameters(namespace: Mapping[str, Any],
                        names_before: Iterable[str]) -> dict[str, Any]:
    """The parameters a notebook was given: the names defined after `names_before`.

    Papermill injects `-p`/`-f` values as variables after the parameters cell, also
    names the cell does not define; so every new name counts, except private names
    (`_x`) and modules.
    """
    before = set(names_before)
    return {name: value for name, value in namespace.items()
            if name not in before and not name.startswith("_")
            and not isinstance(value, types.ModuleType)}


def resolve(params: Mapping[str, Any]) -> tuple[Config, Path, PipelineOptions]:
    """Split parameters into pipeline options and config keys; build the validated config.

    Config precedence: package defaults < params_file < the other parameters; a value
    of None means "not set". Raises ConfigError for an unknown name (naming the closest
    valid one) or a bad value.
    """
    for key in params:
        if key not in KEYS and key not in PIPELINE_KEYS and key not in ALIASES:
            raise ConfigError(f"unknown parameter {key!r}{suggest(key, KEYS + PIPELINE_KEYS)}")
    params = {key: value for key, value in params.items() if value is not None}
    options = parse_options(PipelineOptions, {key: value for key, value in params.items()
                                              if key in PIPELINE_KEYS},
                            "pipeline parameter").validate()
    config = load_config(options.params_file,
                         {key: value for key, value in params.items()
                          if key not in PIPELINE_KEYS})
    run_dir = Path(options.run_dir or default_run_dir(config)).resolve()
    return config, run_dir, options


def non_default_settings(config: Config) -> dict[str, Any]:
    """The settings of `config` that differ from the package defaults."""
    defaults = Config().to_flat()
    return {key: value for key, value in config.to_flat().items() if value != defaults[key]}


# ------------------------------------------------------------------ stages
def stage_done(config: Config, run_dir: str | Path, until_epoch: int) -> bool:
    """Whether the run in `run_dir` is this configuration's run and has `until_epoch` epochs.

    A run with other (non-resumable) settings is never reused: its stage runs and the
    trainer explains the conflict. overwrite: true, or resume: false, never reuses.
    """
    run = RunDirectory(run_dir)
    if config.train.overwrite or not config.train.resume or not run.config.exists():
        return False
    return not run.settings_changed(config) and run.completed_epochs() >= until_epoch


def run_stage(name: str, notebook: str | Path, run_dir: str | Path,
              parameters: dict[str, Any]) -> Path:
    """Execute a stage notebook with papermill; return the executed copy.

    The copy is <run_dir>/notebooks/<notebook name>, written also when the stage fails.
    """
    start = time.perf_counter()
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output = RunDirectory(run_dir).notebooks / Path(notebook).name
    output.parent.mkdir(parents=True, exist_ok=True)
    say(f"{name}: running (executed notebook: {output})")
    try:
        papermill.execute_notebook(str(notebook), str(output), parameters=parameters,
                                   kernel_name="python3", progress_bar=False, log_output=False,
                                   cwd=str(REPO_ROOT), extra_arguments=KERNEL_ARGUMENTS)
    except PapermillExecutionError as error:
        raise StageError(name, error.ename, error.evalue, output) from None
    except Exception as error:  # the kernel died or did not start, a timeout, ...
        raise StageError(name, type(error).__name__, str(error), output) from error
    say(f"{name}: done in {time.perf_counter() - start:.0f}s")
    return output


def train_stage(stage: str, config: Config, run_dir: Path, label: str = "",
                threads: int | None = None) -> None:
    """One training stage ("warmup" or "physics") of a run; skipped when its epochs are done.

    overwrite and resume: false apply to the run's start; the physics stage continues it.
    """
    if stage == "physics":
        config = from_flat({**config.to_flat(), "overwrite": False, "resume": True})
    until = config.warmup_epochs if stage == "warmup" else config.train.epochs
    if stage_done(config, run_dir, until):
        say(f"{label}{stage}: done already ({until} epochs in {run_dir}), reused")
        return
    with (follow(run_dir, f"{label}{stage}", config.train.epochs, until)
          if config.train.progress else contextlib.nullcontext()):
        run_stage(f"{label}{stage}", NOTEBOOKS / f"{stage}.ipynb", run_dir,
                  {"run_dir": str(run_dir), "config_overrides": config.to_flat(),
                   "torch_threads": threads})


def train_run(config: Config, run_dir: str | Path, label: str = "") -> None:
    """The warmup and physics stages of one run, one after the other."""
    for stage in ("warmup", "physics"):
        train_stage(stage, config, Path(run_dir), label)


def train_with_control(config: Config, run: RunDirectory, workers: int = 1) -> None:
    """The run and its physics-off control. The control starts from a copy of the run's
    warmup checkpoint when the warmups are the same (RunDirectory.fork_from), and with
    `workers` 2 the two post-warmup stages run side by side, each kernel with its share of
    the cores."""
    control = config.control()
    train_stage("warmup", config, run.root)
    if run.control.fork_from(run, control):
        say(f"control warmup: forked from the run's warmup ({run.warmup_checkpoint})")
    else:
        train_stage("warmup", control, run.control.root, "control ")
    stages = [(config, run.root, ""), (control, run.control.root, "control ")]
    if workers < 2:
        for stage_config, root, label in stages:
            train_stage("physics", stage_config, root, label)
        return
    threads = threads_per_worker(2)
    with ThreadPoolExecutor(2) as pool:  # each stage is a kernel process; threads only wait
        futures = [pool.submit(train_stage, "physics", c, root, label, threads)
                   for c, root, label in stages]
        for future in futures:
            future.result()


def check_ready(config: Config, run: RunDirectory, options: PipelineOptions) -> None:
    """What the stages will need, checked before the first one starts, creating nothing: the
    data files are there, the device is here, report_dir can be written, and the run
    directory (and the control's) accepts these settings. A refusal leaves no trace: no run
    directory, lock or executed notebook."""
    from physlm.data import check_sources
    from physlm.distributed import resolve_device

    if not NOTEBOOKS.is_dir():
        raise FileNotFoundError(f"stage notebooks not found in {NOTEBOOKS}; the pipeline needs "
                                "a source checkout (git clone, then pip install -e .)")
    check_sources(config.data)
    resolve_device(config.train.device)
    reason = why_not_writable(options.report_dir)
    if reason:
        raise NotWritableError(f"report_dir {options.report_dir}: {reason}; choose another "
                               "report_dir")
    run.check_accepts(config)
    if trains_control(config, options):
        run.control.check_accepts(config.control())


def trains_control(config: Config, options: PipelineOptions) -> bool:
    """Whether the pipeline trains the control: asked for, and not the run itself (a run
    without the energy penalty, a baseline, is its own physics-off control)."""
    return options.control_run and config.control() != config


def run_pipeline(config: Config, run_dir: str | Path, options: PipelineOptions) -> Path:
    """Warmup, physics, control (if options.control_run) and analysis; return the report.

    The report is reports/<name>.md with its figures, and reports/<name>.html, one page.
    The run directory and its control directory stay locked until the end: the stage
    kernels, separate processes, write in them while this process holds the locks.
    """
    run = RunDirectory(Path(run_dir).resolve())
    report_dir = Path(options.report_dir).resolve()
    check_ready(config, run, options)
    with run.lock(), run.control.lock():
        if trains_control(config, options):
            train_with_control(config, run, options.workers)
        else:
            if options.control_run:
                say("control: none to train (the run has no energy penalty: it is its own "
                    "physics-off control)")
            train_run(config, run.root)
        run_stage("analysis", NOTEBOOKS / "analysis.ipynb", run.root,
                  {"run_dir": str(run.root), "report_dir": str(report_dir)})
    report = report_dir / f"{run.name}.md"
    say(f"analysis: wrote {report} and {report.with_suffix('.html')}")
    return report


# ------------------------------------------------------------------ report
def report_figures(report_path: str | Path) -> list[Path]:
    """The image files a markdown report links (`![caption](path)`), in order."""
    report_path = Path(report_path)
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", report_path.read_text(encoding="utf-8"))
    return [report_path.parent / unquote(link) for link in links]


# ------------------------------------------------------------------ errors in notebooks
def install_error_display(shell: Any = None) -> bool:
    """Make IPython show physlm's own errors (physlm.errors.USER_ERRORS) as one line,
    `physlm: <message>`, in the notebook and in the error papermill reports in its terminal;
    other errors keep their traceback (and `%tb` still prints the full one). Returns whether
    a shell was found."""
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return False
        shell = get_ipython()
    if shell is None:
        return False

    def show(shell: Any, etype: type, value: BaseException, tb: Any,
             tb_offset: int | None = None) -> list[str]:
        sys.last_type, sys.last_value, sys.last_traceback = etype, value, tb  # for %tb
        sys.last_exc = value
        stb = [f"physlm: {one_line(value)}"]
        shell._showtraceback(etype, value, stb)  # what IPython's showtraceback ends with
        return stb

    shell.set_custom_exc(tuple(USER_ERRORS), show)
    return True

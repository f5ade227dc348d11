"""Tests of the notebook pipeline (physlm.pipeline) and the notebooks it executes."""

from __future__ import annotations

import ast
import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest
import torch
import yaml

from physlm import pipeline, progress, report
from physlm.config import KEYS, Config, ConfigError, from_flat
from physlm.errors import RunBusyError
from physlm.files import append_jsonl, read_jsonl
from physlm.pipeline import PIPELINE_KEYS, StageError
from physlm.report import fmt
from physlm.runs import RunDirectory, default_run_dir
from physlm.trainer import train

from .test_report import KINDS_OF_RUN

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO_ROOT / "notebooks"
SMOKE = yaml.safe_load((REPO_ROOT / "params" / "smoke.yaml").read_text())
REPORT_SECTIONS = [
    "# physlm report", "## Summary", "## Model configuration", "## Training configuration",
    "## Dataset", "## Warmup epochs", "## Physics epochs", "## Energy conservation",
    "## Energy-loss progression", "## Lambda evolution", "## Final results vs. control",
    "## Success criteria", "## Phase comparison", "## Plots", "## Provenance",
]


def parameters_cell(name: str) -> str:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    return cell.source


# ------------------------------------------------------------------ notebooks
@pytest.mark.parametrize("name", ["phase3", "warmup", "physics", "analysis"])
def test_notebooks_are_clean_and_parameterised(name):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    assert notebook.cells[0].cell_type == "markdown"
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


def test_phase3_parameters_cell_names_every_setting_once_and_points_to_the_defaults():
    """Each setting is one line `name = None  # what it is`; the defaults live in physlm/config.py
    (and PipelineOptions), which the cell points to instead of restating them."""
    source = parameters_cell("phase3")
    assigned = {node.targets[0].id: node.value for node in ast.parse(source).body}
    assert set(assigned) == set(KEYS) | set(PIPELINE_KEYS), "the cell must name every setting"
    assert all(isinstance(v, ast.Constant) and v.value is None for v in assigned.values())
    lines = [line for line in source.splitlines() if re.match(r"\w+ = ", line)]
    assert len(lines) == len(assigned)
    for line in lines:
        assert re.fullmatch(r"\w+ = None  # \S.*", line), f"one comment saying what it is: {line}"
        assert not re.search(r"(package|pipeline) default", line), f"restates a default: {line}"
        assert len(line) <= 100, line
    assert "physlm/config.py" in source and "PipelineOptions" in source
    assert re.search(r"run_dir = None  # .*runs/<name>", source)


# ------------------------------------------------------------------ parameters
def test_notebook_parameters_are_the_names_defined_after_the_snapshot():
    namespace = {"re": re, "In": [], "epochs": 3, "seed": None, "typo": 1, "_private": 2,
                 "imported_later": pytest}
    assert pipeline.notebook_parameters(namespace, {"re", "In"}) == {
        "epochs": 3, "seed": None, "typo": 1}


def test_unknown_parameter_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match="unknown parameter 'epoch'.*did you mean 'epochs'"):
        pipeline.resolve({"epoch": 3})
    with pytest.raises(ConfigError, match="did you mean 'control_run'"):
        pipeline.resolve({"control_runs": False})


def test_wrong_type_gives_the_config_error():
    with pytest.raises(ConfigError, match="epochs: expected int, got str 'ten'"):
        pipeline.resolve({"epochs": "ten"})
    with pytest.raises(ConfigError, match="control_run: expected bool"):
        pipeline.resolve({"control_run": "maybe"})


def test_resolve_precedence_and_run_dir(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO_ROOT)
    config, run_dir, options = pipeline.resolve(
        {"params_file": "params/smoke.yaml", "epochs": 2, "seed": None, "control_run": "false"})
    assert config.train.epochs == 2                  # parameter over the file
    assert config.model.d_model == SMOKE["d_model"]  # file over the default
    assert config.train.seed == Config().train.seed  # None: not set
    assert run_dir == REPO_ROOT / "runs" / "smoke" and options.control_run is False
    assert options.report_dir == "reports"

    _, run_dir, options = pipeline.resolve({"run_dir": tmp_path / "x"})
    assert run_dir == tmp_path / "x" and options.control_run is True
    assert pipeline.resolve({})[1] == REPO_ROOT / default_run_dir(Config())
    assert pipeline.resolve({"name": "x"})[1] == REPO_ROOT / "runs" / "x"


# ------------------------------------------------------------------ stages
def _in_process_stage(calls):
    """A run_stage stand-in that does what the stage notebook does, without a kernel."""
    def run_stage(name, notebook, run_dir, parameters):
        calls.append(name)
        if Path(notebook).stem == "analysis":
            report.write_report(run_dir, out_dir=parameters["report_dir"])
        else:
            config = from_flat(parameters["config_overrides"])
            warmup = Path(notebook).stem == "warmup"
            train(config, run_dir, until_epoch=config.warmup_epochs if warmup else None)
        return Path(run_dir) / "notebooks" / Path(notebook).name
    return run_stage


def test_finished_stages_are_reused_and_an_interrupted_run_resumes(tmp_path, tiny_config,
                                                                   monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(pipeline, "run_stage", _in_process_stage(calls))
    config, run_dir = tiny_config(), tmp_path / "run"
    train(config, run_dir, until_epoch=config.physics.physics_start_epoch)  # "crashed" after warmup

    pipeline.train_run(config, run_dir)
    assert calls == ["physics"]
    assert len(read_jsonl(RunDirectory(run_dir).epochs)) == config.train.epochs

    steps = RunDirectory(run_dir).steps.read_bytes()
    pipeline.train_run(config, run_dir)
    assert calls == ["physics"] and RunDirectory(run_dir).steps.read_bytes() == steps

    # More epochs continue the run; other settings or overwrite do not reuse it.
    assert not pipeline.stage_done(tiny_config(epochs=4), run_dir, 4)
    assert not pipeline.stage_done(tiny_config(seed=1), run_dir, 1)
    assert not pipeline.stage_done(tiny_config(overwrite=True), run_dir, 1)
    assert pipeline.stage_done(tiny_config(max_eval_batches=2), run_dir, 3)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_control_forks_from_the_runs_warmup_and_equals_one_from_scratch(
        tmp_path, tiny_config, monkeypatch, workers):
    """The control does not train the warmup again: it starts from the run's warmup
    checkpoint; its metrics equal those of a control trained alone (timing aside)."""
    calls: list[str] = []
    monkeypatch.setattr(pipeline, "run_stage", _in_process_stage(calls))
    config, run = tiny_config(epochs=3, physics_start_epoch=2), RunDirectory(tmp_path / "run")
    pipeline.train_with_control(config, run, workers=workers)
    assert sorted(calls) == ["control physics", "physics", "warmup"]
    assert run.control.read_env()["forked_from"] == {"run": "..", "epoch": 2}
    assert len(read_jsonl(run.control.epochs)) == len(read_jsonl(run.epochs)) == 3
    if workers == 2:   # in one process the two stages share torch's RNG: no exact equality
        return         # (the pipeline runs them in separate kernels; see the smoke test)
    train(config.control(), tmp_path / "alone")
    volatile = {"time_s", "tokens_per_s", "val_time_s", "train_time_s"}
    for name in ("steps", "epochs"):
        forked, alone = (read_jsonl(getattr(r, name)) for r in (run.control,
                                                                 RunDirectory(tmp_path / "alone")))
        assert [{k: v for k, v in r.items() if k not in volatile} for r in forked] == \
            [{k: v for k, v in r.items() if k not in volatile} for r in alone]


def test_failing_stage_names_the_stage_and_keeps_its_notebook(tmp_path, tiny_config):
    run_dir = tmp_path / "run"
    config = tiny_config(data_dir=str(tmp_path / "missing"))
    with pytest.raises(StageError) as caught:
        pipeline.train_run(config, run_dir)
    error = caught.value
    executed = run_dir / "notebooks" / "warmup.ipynb"
    assert (error.stage, error.ename, error.notebook) == ("warmup", "DataError", executed)
    assert "stage 'warmup' failed with DataError: data_dir: folder not found" in str(error)
    assert str(executed) in str(error)
    outputs = [o for c in nbformat.read(executed, as_version=4).cells for o in c.get("outputs", [])]
    assert any(o.output_type == "error" and o.ename == "DataError" for o in outputs)


def test_the_pipeline_holds_the_run_and_control_locks_for_all_stages(tmp_path, tiny_config,
                                                                     monkeypatch):
    run = RunDirectory(tmp_path / "run")
    held = []

    def stage(name, notebook, run_dir, parameters):
        held.append((name, (run.root / ".lock.holder").read_text().split()[0],
                     (run.control.root / ".lock.holder").read_text().split()[0]))
        return run.notebooks / Path(notebook).name

    monkeypatch.setattr(pipeline, "run_stage", stage)
    options = pipeline.PipelineOptions(report_dir=str(tmp_path / "reports"))
    pipeline.run_pipeline(tiny_config(), run.root, options)
    me = str(os.getpid())
    # (the stand-in stages write no warmup checkpoint, so the control trains its own warmup)
    assert held == [(name, me, me) for name in ("warmup", "control warmup", "physics",
                                                "control physics", "analysis")]
    assert not (run.root / ".lock.holder").exists()  # released

    # Another process holding the run: the pipeline stops at once, naming it.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from physlm.runs import RunDirectory\n"
         f"with RunDirectory({str(run.root)!r}).lock():\n print('held', flush=True); "
         "time.sleep(60)"], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        held.clear()
        with pytest.raises(RunBusyError, match=rf"in use by process {holder.pid}"):
            pipeline.run_pipeline(tiny_config(), run.root, options)
        assert held == []
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("kind", list(KINDS_OF_RUN))
def test_every_kind_of_run_gets_its_report_from_the_pipeline(kind, tmp_path, tiny_config,
                                                             monkeypatch, capsys):
    """A baseline, a physics-free ResNet-BK and a control alone through the pipeline: the
    analysis stage writes the report, markdown and page, as `physlm report` does, of the
    model that ran; a run without the energy penalty is its own control, so none is trained."""
    calls: list[str] = []
    monkeypatch.setattr(pipeline, "run_stage", _in_process_stage(calls))
    overrides, trained = KINDS_OF_RUN[kind]
    config = tiny_config(epochs=2, **overrides)
    options = pipeline.PipelineOptions(report_dir=str(tmp_path / "reports"))
    with pytest.warns(UserWarning) if kind == "physics_free" else contextlib.nullcontext():
        path = pipeline.run_pipeline(config, tmp_path / "run", options)
    own_control = not config.physics.energy_penalty
    # (physics-free: the warmup is every epoch, and the control forks at its end)
    assert calls == (["warmup", "analysis"] if kind == "physics_free" else
                     ["warmup", "physics", "analysis"])
    assert ("control: none to train" in capsys.readouterr().out) == own_control
    assert (tmp_path / "run" / "control").exists() != own_control
    assert f"trained {trained} with " in path.read_text()
    assert path.with_suffix(".html").is_file()
    assert sorted(p.name for p in pipeline.report_figures(path)) == [
        "gradients.png", "losses.png", "perplexity.png", "time.png"]


@pytest.mark.parametrize(("mistake", "message"), [
    ({"data_dir": "nowhere"}, "data_dir: folder not found"),
    ({"device": "cuda"}, "CUDA is not available here"),
    ({"report_dir": "{file}/reports"}, "report_dir {file}/reports: not a directory"),
    ({"d_model": 32}, "d_model: 16 in the run, 32 now"),
    ({"resume": False}, "already holds a run"),
], ids=["data", "device", "report_dir", "settings", "resume"])
def test_the_pipeline_checks_what_it_needs_before_the_first_stage(
        tmp_path, tiny_config, monkeypatch, mistake, message):
    """Missing data, an absent device, an unwritable report_dir or a run directory that holds
    another run stop the pipeline before any stage, leaving nothing behind (no run directory,
    lock or executed notebook)."""
    if "device" in mistake and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    blocker = tmp_path / "file"
    blocker.write_text("")
    old = tmp_path / "old"
    if "d_model" in mistake or "resume" in mistake:   # a run of the tiny settings is there
        train(tiny_config(epochs=1, physics_start_epoch=0), old)
    monkeypatch.setattr(pipeline, "run_stage", lambda *args: pytest.fail("a stage ran"))
    options = {key: str(value).replace("{file}", str(blocker)) for key, value in mistake.items()
               if key in PIPELINE_KEYS}
    config = tiny_config(**{key: value for key, value in mistake.items()
                            if key not in PIPELINE_KEYS})
    run_dir = old if old.exists() else tmp_path / "runs" / "run"
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(Exception, match=re.escape(message.replace("{file}", str(blocker)))):
        pipeline.run_pipeline(config, run_dir, pipeline.PipelineOptions(**options))
    assert sorted(tmp_path.rglob("*")) == before


def test_workers_must_be_at_least_one():
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        pipeline.resolve({"workers": 0})


# ------------------------------------------------------------------ progress
def epoch_record(epoch: int, phase: str = "physics") -> dict:
    return {"epoch": epoch, "phase": phase, "train_loss": 6.0, "val_ppl": 1403.4288,
            "drift": 0.1 if phase == "physics" else None, "lambda": 0.05, "time_s": 10.0 * epoch}


def test_progress_reports_each_new_epoch_record_while_a_stage_runs(tmp_path, capsys):
    run = RunDirectory(tmp_path / "run")
    run.epochs.parent.mkdir(parents=True)
    append_jsonl(run.epochs, [epoch_record(0, "warmup")])  # an earlier stage's: not reported

    def stage():  # the stage kernel appending epoch records, one torn while being written
        time.sleep(0.05)
        append_jsonl(run.epochs, [epoch_record(1)])
        with open(run.epochs, "a") as handle:
            handle.write('{"epoch": 2, "phase": "phys')
            handle.flush()
            time.sleep(0.05)
            handle.write('ics", "train_loss": 5.5, "val_ppl": 900.0, "drift": 0.2, '
                         '"lambda": 0.06, "time_s": 30.0}\n')
        time.sleep(0.05)

    with progress.follow(run.root, "physics", epochs=3, until_epoch=3, poll_s=0.01) as tail:
        writer = threading.Thread(target=stage)
        writer.start()
        writer.join()
        assert tail.lines, "reported while the stage runs"
    printed = capsys.readouterr().out.splitlines()
    assert printed == tail.lines and len(printed) == 2
    assert re.fullmatch(r"physics: epoch 2/3  train loss 6\.0000  val PPL 1,403\.43  drift 0\.1  "
                        r"lambda 0\.05  elapsed 0:0\d  ETA 0:10", printed[0]), printed[0]
    assert re.fullmatch(r"physics: epoch 3/3  train loss 5\.5000  val PPL 900\.00  drift 0\.2  "
                        r"lambda 0\.06  elapsed 0:0\d  ETA 0:00", printed[1]), printed[1]
    line = progress.epoch_line("warmup", epoch_record(0, "warmup"), 10, 4, 3725, 600)
    assert line.endswith("drift -  lambda 0.05  elapsed 1:02:05  ETA 30:00"), line


def test_train_run_follows_each_training_stage(tmp_path, tiny_config, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "run_stage", _in_process_stage([]))
    pipeline.train_run(tiny_config(progress=True), tmp_path / "run", label="x ")
    out = capsys.readouterr().out
    assert [line.split("  ")[0] for line in out.splitlines() if "  train loss" in line] == [
        "x warmup: epoch 1/3", "x physics: epoch 2/3", "x physics: epoch 3/3"]


# ------------------------------------------------------------------ end to end
def papermill_command(*arguments: str) -> subprocess.CompletedProcess:
    """Run the papermill command as a user does (its terminal output captured), from the repo.

    Without PYTEST_CURRENT_TEST in their environment the kernels capture their output as under
    a terminal (ipykernel leaves it alone inside pytest)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_CURRENT_TEST"}
    return subprocess.run([sys.executable, "-m", "papermill", *arguments], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)


def table_rows(markdown: str) -> dict[str, list[str]]:
    """The rows of the markdown tables in `markdown` as cells, by their first cell."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith("|")]
    return {cells[0]: cells[1:] for cells in rows}


@pytest.mark.slow
def test_phase3_notebook_runs_the_whole_pipeline_on_the_smoke_parameters(tmp_path, monkeypatch):
    run_dir, report_dir = tmp_path / "run", tmp_path / "reports"
    executed = tmp_path / "phase3.ipynb"
    result = papermill_command(
        str(NOTEBOOKS / "phase3.ipynb"), str(executed), "-p", "params_file", "params/smoke.yaml",
        "-p", "run_dir", str(run_dir), "-p", "report_dir", str(report_dir), "-p", "workers", "2")
    terminal = (result.stdout + result.stderr).replace("\r", "\n")  # progress bars: \r
    assert result.returncode == 0, terminal[-3000:]

    # The terminal of the papermill command shows every stage and one line per epoch.
    assert re.search(r"^control warmup: forked from the run's warmup", terminal, re.M)
    for label, epochs in (("warmup", [1]), ("physics", [2, 3]), ("control physics", [2, 3])):
        assert re.search(rf"^{label}: running \(executed notebook: ", terminal, re.M), label
        for epoch in epochs:
            line = re.search(rf"^{label}: epoch {epoch}/3  train loss [\d.]+  val PPL [\d,.]+  "
                             r"drift \S+  lambda \S+  elapsed \d+:\d\d  ETA \d+:\d\d$",
                             terminal, re.M)
            assert line, (label, epoch, terminal[-3000:])
    assert "analysis: running" in terminal and "Traceback" not in terminal

    main, control = RunDirectory(run_dir), RunDirectory(run_dir).control
    for run, stages in ((main, ("warmup", "physics", "analysis")),
                        (control, ("physics",))):
        for path in (run.config, run.vocab, run.env, run.steps, run.epochs, run.checkpoint):
            assert path.is_file(), path
        for stage in stages:
            assert (run.notebooks / f"{stage}.ipynb").is_file(), (run.root, stage)
    assert not (run_dir / ".lock.holder").exists()  # the pipeline's lock is released
    saved = yaml.safe_load(main.config.read_text())
    assert {key: saved[key] for key in SMOKE} == SMOKE
    assert yaml.safe_load(control.config.read_text()) == {**saved, "energy_penalty": False}
    epochs = read_jsonl(main.epochs)
    control_epochs = read_jsonl(control.epochs)
    assert [r["phase"] for r in epochs] == ["warmup"] + ["physics"] * (SMOKE["epochs"] - 1)
    assert [r["phase"] for r in control_epochs] == ["warmup"] * SMOKE["epochs"]

    # The report: sections, figures, and numbers equal to the metrics files.
    report = report_dir / "run.md"
    text = report.read_text()
    positions = [text.find(section) for section in REPORT_SECTIONS]
    assert -1 not in positions and positions == sorted(positions), positions
    figures = pipeline.report_figures(report)
    assert len(figures) >= 4 and all(f.is_file() and f.parent == report_dir / "run"
                                     for f in figures)
    last, control_last = epochs[-1], control_epochs[-1]
    assert f"Validation perplexity: final {fmt(last['val_ppl'], 'ppl')}" in text
    assert f"the control's final {fmt(control_last['val_ppl'], 'ppl')}" in text
    rows = table_rows(text)
    for name, record in (("run", last), ("control", control_last)):
        assert rows[name][:4] == [str(len(epochs)), fmt(record["val_loss"], "loss"),
                                  fmt(record["val_ppl"], "ppl"),
                                  fmt(record["val_ppl_batch_mean"], "ppl")], rows[name]

    # The HTML page: the report with its figures embedded, no code.
    html = report.with_suffix(".html").read_text(encoding="utf-8")
    for heading in ("physlm report: run", "Summary", "Final results vs. control", "Provenance"):
        assert re.search(rf"<h[12][^>]*>{re.escape(heading)}", html), heading
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', html)) == len(figures)
    assert "<script src=" not in html
    assert "write_report" not in html and "inline_figures" not in html
    assert 'class="jp-InputArea' not in html and "In&nbsp;[" not in html

    # The entry notebook shows the report path and two figures, and the epoch lines.
    notebook = nbformat.read(executed, as_version=4)
    outputs = [o for c in notebook.cells for o in c.get("outputs", [])]
    assert any(f"report: {report.resolve()}" in o.get("text", "") for o in outputs)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    assert any("physics: epoch 3/3  train loss" in o.get("text", "") for o in outputs)

    # Running the stages again reuses everything: no stage notebook is executed.
    def no_stage(*args, **kwargs):
        raise AssertionError(f"stage executed again: {args[0]}")

    monkeypatch.setattr(pipeline, "run_stage", no_stage)
    steps = main.steps.read_bytes(), control.steps.read_bytes()
    config = from_flat(saved)
    pipeline.train_run(config, run_dir)
    pipeline.train_run(config.control(), control.root)
    assert (main.steps.read_bytes(), control.steps.read_bytes()) == steps

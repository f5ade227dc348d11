"""Tests of the notebook pipeline (physlm.pipeline) and the notebooks it executes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml

from physlm import pipeline
from physlm.config import KEYS, Config, ConfigError, from_flat
from physlm.pipeline import PIPELINE_KEYS, PipelineOptions, StageError
from physlm.report import fmt
from physlm.files import read_jsonl
from physlm.runs import RunDirectory
from physlm.trainer import train

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


def test_phase3_parameters_cell_lists_every_setting_with_the_package_default():
    """Each config key is `name = None  # type, package default <literal>` (Config() value)."""
    source = parameters_cell("phase3")
    assigned = {node.targets[0].id: node.value for node in ast.parse(source).body}
    assert set(assigned) == set(KEYS) | set(PIPELINE_KEYS), "the cell must name every setting"
    assert all(isinstance(v, ast.Constant) and v.value is None for v in assigned.values())

    defaults = {**Config().to_flat(), **vars(PipelineOptions())}
    documented = {}
    for line in source.splitlines():
        match = re.match(r"(\w+) = None  # .*?(package|pipeline) default (.+?)(?: \(.*\))?$", line)
        if match:
            name, kind, literal = match.groups()
            assert (kind == "package") == (name in KEYS), line
            documented[name] = ast.literal_eval(literal)
    assert set(documented) == set(KEYS) | {"control_run", "report_dir"}
    for name, value in documented.items():
        assert value == defaults[name] and type(value) is type(defaults[name]), name


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
    assert pipeline.resolve({})[1] == REPO_ROOT / "runs" / "phase3"


# ------------------------------------------------------------------ stages
def _in_process_stage(calls):
    """A run_stage stand-in that does what the stage notebook does, without a kernel."""
    def run_stage(name, notebook, run_dir, parameters):
        calls.append(name)
        config = from_flat(parameters["config_overrides"])
        warmup = Path(notebook).stem == "warmup"
        train(config, run_dir, until_epoch=config.physics.physics_start_epoch if warmup else None)
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


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_phase3_notebook_runs_the_whole_pipeline_on_the_smoke_parameters(tmp_path, monkeypatch):
    run_dir, report_dir = tmp_path / "run", tmp_path / "reports"
    executed = tmp_path / "phase3.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOKS / "phase3.ipynb"), str(executed),
        parameters={**SMOKE, "run_dir": str(run_dir), "report_dir": str(report_dir)},
        kernel_name="python3", progress_bar=False, cwd=str(REPO_ROOT))

    main, control = RunDirectory(run_dir), RunDirectory(run_dir).control
    for run, stages in ((main, ("warmup", "physics", "analysis")),
                        (control, ("warmup", "physics"))):
        for path in (run.config, run.vocab, run.env, run.steps, run.epochs, run.checkpoint):
            assert path.is_file(), path
        for stage in stages:
            assert (run.notebooks / f"{stage}.ipynb").is_file(), (run.root, stage)
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
    assert f"Final validation perplexity: {fmt(last['val_ppl'])} against " \
           f"{fmt(control_last['val_ppl'])} for the control run" in text
    for name, record in (("run", last), ("control", control_last)):
        row = (f"| {name} | {len(epochs)} | {fmt(record['val_loss'])} | {fmt(record['val_ppl'])}"
               f" | {fmt(record['val_ppl_batch_mean'])} |")
        assert row in text

    # The entry notebook shows the report path and two figures.
    notebook = nbformat.read(executed, as_version=4)
    outputs = [o for c in notebook.cells for o in c.get("outputs", [])]
    assert any(f"report: {report.resolve()}" in o.get("text", "") for o in outputs)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2

    # Running the stages again reuses everything: no stage notebook is executed.
    def no_stage(*args, **kwargs):
        raise AssertionError(f"stage executed again: {args[0]}")

    monkeypatch.setattr(pipeline, "run_stage", no_stage)
    steps = main.steps.read_bytes(), control.steps.read_bytes()
    config = from_flat(saved)
    pipeline.train_run(config, run_dir)
    pipeline.train_run(config.control(), control.root)
    assert (main.steps.read_bytes(), control.steps.read_bytes()) == steps

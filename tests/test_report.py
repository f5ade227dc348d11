"""Tests of the markdown report (physlm.report) and its figures (physlm.plots).

A real tiny run and its control are trained once for the module; tests that
need other situations (no control, a bidirectional model, an unfinished run,
a drift far above the target) edit copies of the saved files, as the report
only ever reads those.
"""

from __future__ import annotations

import contextlib
import html as html_lib
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from physlm import criteria as criteria_module
from physlm import plots, report, report_tables, text
from physlm.__main__ import main
from physlm.build import build_model
from physlm.config import from_flat
from physlm.files import read_jsonl, write_jsonl
from physlm.model import count_parameters
from physlm.runs import RunDirectory, find_control, load_run
from physlm.trainer import train

TINY = {"dataset": "fixture", "d_model": 16, "n_layers": 2, "n_seq": 16, "vocab_size": 300,
        "batch_size": 8, "epochs": 3, "physics_start_epoch": 1, "max_train_batches": 4,
        "max_eval_batches": 2, "progress": False}
HEADINGS = ["# physlm report: run", "## Summary", "## Model configuration",
            "## Training configuration", "## Dataset", "## Warmup epochs", "## Physics epochs",
            "## Energy conservation", "## Energy-loss progression", "## Lambda evolution",
            "## Final results vs. control", "## Against count references", "## Success criteria",
            "## Phase comparison", "## What the model writes", "## Robustness", "## Plots",
            "## Provenance"]
FIGURES = ["energy_drift", "lambda", "losses", "perplexity", "time", "gradients"]


# ---------------------------------------------------------------- helpers

def section(text: str, heading: str) -> str:
    """The body of one `## heading` section."""
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def tables(block: str) -> list[list[dict[str, str]]]:
    """Every markdown table in `block`, as lists of {header: cell} rows."""
    found, lines = [], []
    for line in [*block.splitlines(), ""]:
        if line.startswith("|"):
            lines.append([cell.strip() for cell in line.strip("|").split(" | ")])
        elif lines:
            header, body = lines[0], lines[2:]
            found.append([dict(zip(header, row, strict=True)) for row in body])
            lines = []
    return found


def settings(block: str) -> dict[str, str]:
    """The first Setting | Value table of a section, as a dict."""
    return {row["Setting"]: row["Value"] for row in tables(block)[0]}


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def close(cell: str, value: float) -> bool:
    """The cell shows `value` to its kind's precision (4 significant digits or decimals)."""
    return number(cell) == pytest.approx(value, rel=5e-4, abs=5e-5)


def criteria(text: str) -> dict[str, str]:
    return {row["Criterion"]: row["Status"] for row in tables(section(text, "Success criteria"))[0]}


def copy_run(source: Path, target: Path, control: bool = True) -> Path:
    ignore = ["checkpoints"] + ([] if control else ["control"])
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*ignore))
    return target


def edit_epochs(run_dir: Path, **values: float) -> None:
    path = run_dir / "metrics" / "epochs.jsonl"
    write_jsonl(path, [{**r, **values} for r in read_jsonl(path)])


def render(run_dir: Path, control_dir: Path | None = None) -> str:
    """The report's markdown without drawing its figures (fast; write_report draws them)."""
    run, control = load_run(run_dir), find_control(run_dir, control_dir)
    return report.render_report(report.report_data(run, control, {}, run_dir,
                                                   "python -m physlm report"))


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real three-epoch run (one warmup, two physics epochs) and its physics-off control."""
    root = tmp_path_factory.mktemp("report") / "run"
    train(from_flat(TINY), root)
    train(from_flat({**TINY, "energy_penalty": False}), root / "control")
    return root


@pytest.fixture(scope="module")
def written(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = report.write_report(run_dir, out_dir=tmp_path_factory.mktemp("reports"))
    return path, path.read_text()


# ---------------------------------------------------------------- the report of a real run

def test_report_file_and_every_figure_exist(written: tuple[Path, str]) -> None:
    path, text = written
    assert path.name == "run.md"
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert [Path(link).name for link in links] == [f"{name}.png" for name in FIGURES]
    for link in links:
        figure = path.parent / link
        assert figure.parent == path.parent / "run"
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_section_is_present_in_order(written: tuple[Path, str]) -> None:
    _, text = written
    positions = [text.index(heading + "\n") for heading in HEADINGS]
    assert positions == sorted(positions)
    assert "> ⚠️" not in text  # a finished, causal physics run with a control: no warning


def test_tables_hold_the_metrics_values(run_dir: Path, written: tuple[Path, str]) -> None:
    _, text = written
    epochs = read_jsonl(run_dir / "metrics" / "epochs.jsonl")
    control = read_jsonl(run_dir / "control" / "metrics" / "epochs.jsonl")
    env = json.loads((run_dir / "env.json").read_text())

    warmup = tables(section(text, "Warmup epochs"))[0]
    assert [row["Epoch"] for row in warmup] == ["1"]
    assert close(warmup[0]["Val PPL"], epochs[0]["val_ppl"])
    physics = tables(section(text, "Physics epochs"))[0]
    assert [row["Epoch"] for row in physics] == ["2", "3"]
    last = physics[-1]
    assert close(last["Val PPL"], epochs[-1]["val_ppl"])
    assert close(last["Val PPL (batch mean)"], epochs[-1]["val_ppl_batch_mean"])
    assert close(last["Lambda"], epochs[-1]["lambda"])
    assert close(last["Drift"], epochs[-1]["drift"])
    assert close(last["Energy MSE (raw)"], epochs[-1]["train_energy_mse"])

    model = settings(section(text, "Model configuration"))
    assert number(model["Parameters (total)"]) == env["parameters"]["total"]
    assert count_parameters(*build_model(from_flat(TINY), env["vocab_size"])) == env["parameters"]

    final = {row["Run"]: row for row in tables(section(text, "Final results vs. control"))[0]}
    assert close(final["run"]["Val PPL"], epochs[-1]["val_ppl"])
    assert close(final["control"]["Val PPL"], control[-1]["val_ppl"])


def test_router_table_shows_each_layers_load_entropy_and_a_dead_expert(
        run_dir: Path, tmp_path: Path) -> None:
    epochs = read_jsonl(run_dir / "metrics" / "epochs.jsonl")
    title = f"Load entropy (of {math.log(4):.3f})"                 # 4 experts: log 4
    router = tables(section(render(run_dir), "Model configuration"))[1]
    for row, load, entropy in zip(router, epochs[-1]["expert_load"],
                                  epochs[-1]["load_entropy_per_layer"], strict=True):
        assert number(row["Expert 1"]) == pytest.approx(load[0], abs=5e-4)   # 3 decimals
        assert number(row[title]) == pytest.approx(entropy, abs=5e-4)
    dead = copy_run(run_dir, tmp_path / "run")
    edit_epochs(dead, expert_load=[[1.0, 0.0, 0.0, 0.0], [0.25] * 4])
    router = tables(section(render(dead), "Model configuration"))[1]
    assert [row[title] for row in router] == ["0.000", "1.386"]


def test_average_drift_is_the_mean_over_computed_physics_steps(
        run_dir: Path, written: tuple[Path, str]) -> None:
    _, text = written
    steps = [r for r in read_jsonl(run_dir / "metrics" / "steps.jsonl")
             if r["physics"] and r["energy_computed"] and not r["skipped"]]
    energy = settings(section(text, "Energy conservation"))
    assert close(energy["Average drift (all physics steps)"],
                 sum(r["drift"] for r in steps) / len(steps))
    steady = [r for r in steps if r["epoch"] == 2]      # after TINY's one settle epoch
    assert close(energy["Steady-state drift"], sum(r["drift"] for r in steady) / len(steady))
    assert close(energy["Maximum drift"], max(r["drift"] for r in steps))
    lambdas = settings(section(text, "Lambda evolution"))
    assert close(lambdas["Final (mean over layers)"], steps[-1]["lambda"])


def test_load_run_gives_dataframes(run_dir: Path) -> None:
    run = load_run(run_dir)
    assert run.name == "run" and run.finished and run.config.trains_with_physics
    assert len(run.epochs) == 3 and list(run.epochs["phase"]) == ["warmup", "physics", "physics"]
    assert len(run.steps) == 12 and run.config.model.d_model == 16
    assert find_control(run_dir).config.physics.energy_penalty is False
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_run(run_dir / "metrics")


# ---------------------------------------------------------------- statuses follow the data

DRIFT = "Steady-state drift <= target (after 1 settle epoch)"
FINAL_PPL, BEST_PPL = "Final val PPL vs the control", "Best val PPL vs the control's best"


def test_drift_status_follows_the_data(run_dir: Path, tmp_path: Path) -> None:
    target = yaml.safe_load((run_dir / "config.yaml").read_text())["energy_target_drift"]
    for drift, expected in ((1e6, criteria_module.NOT_MET), (target / 2, criteria_module.MET)):
        copy = copy_run(run_dir, tmp_path / f"drift{drift}" / "run")
        edit_epochs(copy, drift=drift, drift_max=drift)
        text = render(copy)
        assert criteria(text)[DRIFT] == expected
        energy = settings(section(text, "Energy conservation"))
        assert energy["Status (steady state <= target, not degenerate)"] == expected
        assert close(energy["Steady-state drift"], drift)


@pytest.mark.parametrize("spread", [0.0, 1e-4, 0.1])
def test_collapsed_heads_are_degenerate_never_met(run_dir: Path, tmp_path: Path,
                                                  spread: float) -> None:
    """Heads that barely vary meet any drift target: the report calls that degenerate (the
    reference floor is the target itself, 0.1), never met."""
    copy = copy_run(run_dir, tmp_path / "run")
    edit_epochs(copy, drift=0.0, drift_max=0.0, energy_spread_per_layer=[spread, 5.0])
    text = render(copy)
    assert criteria(text)[DRIFT] == criteria_module.DEGENERATE
    assert criteria(text)["Energy constraint not degenerate (min spread of H)"] == \
        criteria_module.NOT_MET
    assert "layers 1 are degenerate" in section(text, "Summary")
    assert criteria_module.MET not in settings(section(text, "Energy conservation"))[
        "Status (steady state <= target, not degenerate)"].split()


def test_perplexity_criteria_are_two_sided_and_flag_an_overfitting_control(
        run_dir: Path, tmp_path: Path) -> None:
    ppls = [r["val_ppl"] for r in read_jsonl(run_dir / "control" / "metrics" / "epochs.jsonl")]
    cases = {  # control val PPL per epoch -> (final status, best status)
        "same": (ppls, criteria_module.MET, criteria_module.MET),
        "control much worse, improving": ([p * 10 for p in ppls], criteria_module.BETTER,
                                          criteria_module.BETTER),
        "control much better": ([p * 0.1 for p in ppls], criteria_module.NOT_MET,
                                 criteria_module.NOT_MET),
        "control overfits": ([ppls[0], ppls[1] * 0.1, ppls[2] * 10], criteria_module.FLAGGED,
                             criteria_module.NOT_MET)}
    for name, (control_ppls, final, best) in cases.items():
        copy = copy_run(run_dir, tmp_path / name / "run")
        path = copy / "control" / "metrics" / "epochs.jsonl"
        write_jsonl(path, [{**r, "val_ppl": p} for r, p in zip(read_jsonl(path), control_ppls,
                                                                 strict=True)])
        text = render(copy)
        assert (criteria(text)[FINAL_PPL], criteria(text)[BEST_PPL]) == (final, best), name
        assert ("The control overfits" in section(text, "Summary")) == (name == "control overfits")


def test_an_unfinished_control_makes_every_comparison_not_evaluated(
        run_dir: Path, tmp_path: Path) -> None:
    copy = copy_run(run_dir, tmp_path / "run")
    path = copy / "control" / "metrics" / "epochs.jsonl"
    write_jsonl(path, read_jsonl(path)[:1])
    text = render(copy)
    assert criteria(text)[FINAL_PPL] == criteria(text)[BEST_PPL] == criteria_module.NOT_EVALUATED
    assert "the control is unfinished (1 of 3 epochs)" in section(text, "Summary")
    assert "nothing is compared" in section(text, "Summary")


def test_learning_is_judged_against_the_untrained_model(run_dir: Path, tmp_path: Path) -> None:
    initial = json.loads((run_dir / "metrics" / "initial.json").read_text())["val_loss"]
    assert criteria(render(run_dir))["Val loss below the untrained model's"] == \
        criteria_module.MET
    copy = copy_run(run_dir, tmp_path / "run")
    edit_epochs(copy, val_loss=initial + 1)
    assert criteria(render(copy))["Val loss below the untrained model's"] == \
        criteria_module.NOT_MET


COUNT_FLOOR = "Best-epoch val PPL below the best count model's"


def test_the_count_references_are_a_floor_that_can_fail(run_dir: Path, tmp_path: Path) -> None:
    """The run against the count models of its own data (metrics/references.json): not met
    for a tiny model, met once the count models are made worse, n/a without references."""
    text = render(run_dir)
    rows = tables(section(text, "Against count references"))[0]
    stored = json.loads((run_dir / "metrics" / "references.json").read_text())["valid"]["ppl"]
    floor = min(ppl["all"] for ppl in stored.values())
    assert [row["Model"] for row in rows[:3]] == ["add-one unigram", "Kneser-Ney bigram",
                                                  "Kneser-Ney trigram"]
    best = load_run(run_dir).best_epoch()
    run_best = next(row for row in rows if row["Model"] == f"run, best epoch ({best[1]})")
    assert close(run_best["Ratio to the best count model"], best[0] / floor)
    assert close(run_best["Val PPL (non-<unk>)"], load_run(run_dir).best_record()["val_ppl_known"])
    assert criteria(text)[COUNT_FLOOR] == criteria_module.NOT_MET
    assert "Run `run` does not clear the" in text and "The control does not clear the" in text
    assert "Val PPL (non-<unk>)" in section(text, "Warmup epochs")

    copy = copy_run(run_dir, tmp_path / "run")
    path = copy / "metrics" / "references.json"
    worse = json.loads(path.read_text())
    for ppl in worse["valid"]["ppl"].values():
        ppl.update(all=ppl["all"] * 1e3, known=ppl["known"] * 1e3)
    path.write_text(json.dumps(worse))
    text = render(copy)
    assert criteria(text)[COUNT_FLOOR] == criteria_module.MET
    assert "Run `run` clears the" in text
    path.unlink()   # a record made before runs stored references
    text = render(copy)
    assert criteria(text)[COUNT_FLOOR] == criteria_module.NOT_EVALUATED
    assert "No count references" in section(text, "Against count references")


def test_missing_control_means_no_baseline(run_dir: Path, tmp_path: Path) -> None:
    copy = copy_run(run_dir, tmp_path / "run", control=False)
    text = render(copy)
    assert "No control run; no baseline." in section(text, "Final results vs. control")
    assert "no control run, so no baseline" in section(text, "Summary")
    assert criteria(text)[FINAL_PPL] == criteria_module.NOT_EVALUATED
    with_control = render(copy, control_dir=run_dir / "control")
    assert "The control matches the run" in with_control


def test_bidirectional_run_is_flagged(run_dir: Path, tmp_path: Path,
                                      written: tuple[Path, str]) -> None:
    assert "Not a causal language model" not in written[1]
    copy = copy_run(run_dir, tmp_path / "run")
    config = yaml.safe_load((copy / "config.yaml").read_text())
    (copy / "config.yaml").write_text(yaml.safe_dump({**config, "bk_mode": "bidirectional"}))
    text = render(copy)
    assert "Not a causal language model" in text[:text.index("## Summary")]
    assert "control is not a comparable baseline" in text  # bk_mode now differs


def test_unfinished_run_reports_what_exists(run_dir: Path, tmp_path: Path) -> None:
    copy = copy_run(run_dir, tmp_path / "run")
    epochs = read_jsonl(copy / "metrics" / "epochs.jsonl")
    write_jsonl(copy / "metrics" / "epochs.jsonl", epochs[:1])
    text = render(copy)
    head = text[:text.index("## Summary")]
    assert "Unfinished run" in head and "1 of 3 epochs" in head
    assert "physics phase has not started yet" in head
    assert criteria(text)["Training finished all epochs"] == criteria_module.NOT_MET

    for path in (copy / "metrics" / "epochs.jsonl", copy / "metrics" / "steps.jsonl"):
        path.unlink()
    path = report.write_report(copy, out_dir=tmp_path / "empty")  # figures of no data too
    empty = path.read_text()
    assert "0 of 3 epochs" in empty and all(h + "\n" in empty for h in HEADINGS[1:])
    assert len(list((tmp_path / "empty" / "run").glob("*.png"))) == len(FIGURES)


def test_physics_off_run_says_the_penalty_never_ran(run_dir: Path, tmp_path: Path) -> None:
    """A control reported alone: no physics epoch, so no physics section, criterion or count
    of "0 physics" epochs; its epochs are one table."""
    text = render(run_dir / "control")
    assert "The physics penalty never ran" in text[:text.index("## Summary")]
    assert "for 3 of 3 epochs, on the language-model loss alone" in section(text, "Summary")
    assert "physics)" not in section(text, "Summary") and DRIFT not in criteria(text)
    assert "## Epochs\n" in text and "## Warmup epochs" not in text
    for heading in ("Physics epochs", "Energy conservation", "Lambda evolution",
                    "Final results vs. control", "Phase comparison"):
        assert f"## {heading}" not in text, heading


def test_model_without_energy_heads(run_dir: Path, tmp_path: Path) -> None:
    """A plain ResNet-BK run logs no energy or lambda fields; the report still works."""
    copy = copy_run(run_dir / "control", tmp_path / "plain")
    config = yaml.safe_load((copy / "config.yaml").read_text())
    (copy / "config.yaml").write_text(yaml.safe_dump({**config, "energy_heads": False}))
    energy_keys = {"energy_computed", "energy_mse", "drift", "lambda", "energy_mse_per_layer",
                   "drift_per_layer", "lambda_per_layer", "kinetic", "potential",
                   "train_energy_mse", "drift_max", "energy_steps"}
    for name in ("steps", "epochs"):
        path = copy / "metrics" / f"{name}.jsonl"
        write_jsonl(path, [{k: v for k, v in r.items() if k not in energy_keys}
                           for r in read_jsonl(path)])
    text = render(copy)
    assert "## Lambda evolution" not in text
    assert settings(section(text, "Model configuration"))["energy_heads"] == "no"
    assert len(report_tables.lambda_table(load_run(copy))) == 3
    run = load_run(copy)
    assert list(plots.make_figures(run, None)) == FIGURES[2:]   # no energy, no multiplier


def test_cli_writes_the_report(run_dir: Path, tmp_path: Path, capsys, monkeypatch,
                               tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.getbasetemp()
    monkeypatch.chdir(base)  # the regenerate command names paths relative to the working dir
    assert main(["report", str(run_dir), "--out-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "run.md"),
                                               str(tmp_path / "run.html")]
    assert (tmp_path / "run" / "energy_drift.png").is_file()
    assert f"python -m physlm report {run_dir.relative_to(base)} --out-dir " \
           f"{tmp_path.relative_to(base)}" in (tmp_path / "run.md").read_text()


# ---------------------------------------------------------------- formatting and figures

@pytest.mark.parametrize(("value", "name", "written"), [
    (5.902033805, "Val loss", "5.9020"), (0.1305043, "Energy loss (weighted)", "0.1305"),
    (1.97961237, "Energy MSE (raw)", "1.9796"), (-0.57484, "loss", "-0.5748"),
    (365.780638, "Val PPL", "365.78"), (12345.678, "Val PPL (batch mean)", "12,345.68"),
    (0.0503444, "Time (s)", "0.1"), (1234.56, "Time/epoch (s, phase mean)", "1,234.6"),
    (11590.297, "Tokens/s", "11,590"), (2_000_000.0, "Tokens/s (phase mean)", "2,000,000"),
    (60065, "Tokens", "60,065"), (np.int64(1234567), "Parameters (total)", "1,234,567"),
    (0.09311104565, "Lambda", "0.09311"), (np.float64(0.12489932), "Lambda (mean)", "0.1249"),
    (1.1777763, "Drift", "1.178"), (2.0e6, "Drift", "2,000,000"), (1e-5, "Drift (max)", "0.00001"),
    (0.0, "Drift", "0"), (0.05, "lambda_energy_init", "0.05"), (0.117, "fraction", "0.117"),
    (0.25, "percent", "25.0%"), (-0.0488, "change", "-4.88%"),
    (None, "Val loss", text.NA), (math.nan, "Val PPL", text.NA), (math.inf, "Drift", "inf"),
    (True, "energy_heads", "yes"), ("causal", "bk_mode", "causal"), ("a|b", "", "a\\|b"),
    ([0.09311104, 0.12489932], "Per layer", "0.09311, 0.1249"), ([], "Per layer", text.NA)])
def test_numbers_are_written_by_kind(value: object, name: str, written: str) -> None:
    """Losses 4 decimals, perplexities 2, times 1, counts as integers with thousands
    separators, lambda/drift 4 significant digits; never scientific notation. `name` is a
    kind, or a report column or row whose kind is declared (report_tables.KINDS)."""
    kind = name if name in text.FORMATS else report_tables.KINDS.get(name)
    assert text.fmt(value, kind) == written


def test_tables_format_columns_by_kind_and_align_numbers_right() -> None:
    frame = pd.DataFrame({"Epoch": [1, 2], "Phase": ["warmup", "physics"],
                          "Val loss": [5.9, 5.784956], "Val PPL": [365.780638, None],
                          "Tokens/s": [2e6, 11590.297], "Drift": [1.1777763, 2e6]})
    markdown = text.table(text.Table(frame, report_tables.KINDS))
    assert tables(markdown)[0] == [
        {"Epoch": "1", "Phase": "warmup", "Val loss": "5.9000", "Val PPL": "365.78",
         "Tokens/s": "2,000,000", "Drift": "1.178"},
        {"Epoch": "2", "Phase": "physics", "Val loss": "5.7850", "Val PPL": text.NA,
         "Tokens/s": "11,590", "Drift": "2,000,000"}]
    rule = [cell.strip() for cell in markdown.splitlines()[1].strip("|").split("|")]
    assert [cell.endswith(":") and not cell.startswith(":") for cell in rule] == [
        True, False, True, True, True, True]
    assert "e+" not in markdown and "e-" not in markdown
    # A Setting | Value (or Metric | ...) table takes each row's kind from the row's name.
    rows = pd.DataFrame({"Setting": ["Val PPL", "Tokens/s", "Lambda", "Time (s)"],
                         "Value": pd.Series([365.780638, 11590.297, 0.0931110, 3.14159],
                                            dtype=object)})
    assert settings(text.table(text.Table(rows, report_tables.KINDS))) == {
        "Val PPL": "365.78", "Tokens/s": "11,590", "Lambda": "0.09311", "Time (s)": "3.1"}
    assert text.table(frame.iloc[0:0]) == "_(no rows)_"


def test_report_columns_are_formatted_by_kind(written: tuple[Path, str]) -> None:
    _, text = written
    kinds = {"Train loss": r"\d+\.\d{4}", "Energy MSE (raw)": r"\d+\.\d{4}",
             "Val PPL": r"[\d,]+\.\d{2}", "Time (s)": r"[\d,]+\.\d", "Tokens/s": r"[\d,]+",
             "Epoch": r"\d+", "Lambda": r"[\d,.]+", "Drift": r"[\d,.]+"}
    for row in tables(section(text, "Physics epochs"))[0]:
        for column, pattern in kinds.items():
            assert re.fullmatch(pattern, row[column]), (column, row[column])
        for column in ("Lambda", "Drift"):  # at most 4 significant digits
            assert len(re.sub(r"[,.]", "", row[column]).lstrip("0")) <= 4, row[column]
    assert not re.search(r"\de[+-]\d", text)


def test_report_holds_no_absolute_path(run_dir: Path, tmp_path: Path, monkeypatch,
                                       written: tuple[Path, str]) -> None:
    """Data files by name and checksum; directories relative to the working directory, or by
    name when they lie elsewhere; a regenerate command with relative paths."""
    env = json.loads((run_dir / "env.json").read_text())
    absolute = [str(run_dir.parent), str(tmp_path), str(Path.home()), "/root", "/work", "/tmp"]
    absolute += list(env["data_files"].values())
    copy = copy_run(run_dir, tmp_path / "runs" / "run")
    monkeypatch.chdir(tmp_path)
    text = report.write_report(copy, out_dir=tmp_path / "reports").read_text()
    for report_text in (text, written[1]):  # the run below the working directory, and not
        assert not [path for path in absolute if path in report_text]
    provenance = settings(section(text, "Provenance"))
    assert provenance["Run directory"] == "runs/run"
    assert provenance["Control directory"] == "runs/run/control"
    assert provenance["Regenerate with"] == "`python -m physlm report runs/run --out-dir reports`"
    files = tables(section(text, "Dataset"))[1]
    assert [row["File"] for row in files] == [Path(p).name for p in env["data_files"].values()]
    assert [row["sha256"] for row in files] == list(env["data_checksums"].values())
    assert settings(section(written[1], "Provenance"))["Run directory"] == "run"


def test_figures_have_titles_and_labels(run_dir: Path) -> None:
    run = load_run(run_dir)
    figures = plots.make_figures(run, find_control(run_dir))
    assert list(figures) == FIGURES == list(report.FIGURE_CAPTIONS)
    for figure in figures.values():
        for ax in figure.axes:
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()


def test_a_target_met_by_the_heads_alone_is_not_called_met(run_dir: Path, tmp_path: Path) -> None:
    """Drift below target while the energy gradient is ~0 (lambda at its floor): the heads
    met it alone, so the report says so instead of "met"."""
    copy = copy_run(run_dir, tmp_path / "run")
    edit_epochs(copy, drift=0.0, drift_max=0.0)
    path = copy / "metrics" / "steps.jsonl"
    write_jsonl(path, [{**r, "energy_grad_norm": 0.0} for r in read_jsonl(path)])
    text = render(copy)
    assert criteria(text)[DRIFT] == criteria_module.INACTIVE
    assert "The penalty is inactive in the steady state" in text[:text.index("## Summary")]


# ---------------------------------------------------------------- what the model writes

SAMPLES = "What the model writes"


def edit_samples(run_dir: Path, **values: object) -> list[dict[str, object]]:
    """Change every record of the run's samples.json; return the new records."""
    run = RunDirectory(run_dir)
    records = [{**r, **values} for r in run.read_samples()]
    run.write_samples(records)
    return records


def test_the_run_and_its_control_write_side_by_side_from_their_records(
        run_dir: Path, tmp_path: Path, written: tuple[Path, str]) -> None:
    """The continuations in samples.json, one row per fixed prompt; a report regenerated
    from the records (no checkpoint, no vocabulary) shows the same section."""
    ours, theirs = (RunDirectory(d).read_samples() for d in (run_dir, run_dir / "control"))
    assert len(ours) == len(theirs) == 3
    block = section(written[1], SAMPLES)
    assert "40 words, drawn at temperature 0.8, no top-k, seed 0, by the last checkpoint" in block
    assert "Each prompt starts from the same random numbers (the same seed)" in block
    assert "The control draws the same numbers too" in block
    rows = tables(block)[0]
    assert [row["Prompt"] for row in rows] == [text.literal(r["prompt"]) for r in ours]
    assert [row["Run"] for row in rows] == [text.literal(r["continuation"]) for r in ours]
    assert [row["Control"] for row in rows] == [text.literal(r["continuation"]) for r in theirs]

    record = tmp_path / "record"
    RunDirectory(run_dir).copy_record_to(RunDirectory(record))
    RunDirectory(run_dir / "control").copy_record_to(RunDirectory(record / "control"))
    assert not (record / "checkpoints").exists() and not (record / "vocab.json").exists()
    assert section(render(record), SAMPLES) == block


def test_a_run_without_samples_says_so_in_one_line(run_dir: Path, tmp_path: Path) -> None:
    copy = copy_run(run_dir, tmp_path / "run")
    (copy / "samples.json").unlink()
    lines = section(render(copy), SAMPLES).strip().splitlines()[1:]
    assert [line for line in lines if line] == [
        "No samples: the run has no samples.json (the trainer writes it when a run finishes; "
        f"`python -m physlm generate {copy.name} --write` writes it from the last checkpoint)."]
    config = yaml.safe_load((copy / "config.yaml").read_text())
    (copy / "config.yaml").write_text(yaml.safe_dump({**config, "bk_mode": "bidirectional"}))
    assert "No samples: the bidirectional model reads the word it predicts" in section(
        render(copy), SAMPLES)


def test_a_control_without_samples_or_drawn_otherwise_is_named(run_dir: Path,
                                                               tmp_path: Path) -> None:
    copy = copy_run(run_dir, tmp_path / "run")
    (copy / "control" / "samples.json").unlink()
    block = section(render(copy), SAMPLES)
    assert "The control has no samples.json." in block and "numbers too" not in block
    assert [row["Control"] for row in tables(block)[0]] == [text.NA] * 3
    shutil.copy(run_dir / "control" / "samples.json", copy / "control")
    edit_samples(copy / "control", seed=1, top_k=5)
    block = section(render(copy), SAMPLES)
    assert ("run: 40 words, drawn at temperature 0.8, no top-k, seed 0, by the last checkpoint; "
            "control: 40 words, drawn at temperature 0.8, top-k 5, seed 1, by the last "
            "checkpoint") in block
    assert "same random numbers" not in block
    edit_samples(copy, temperature=0.0)
    assert "the most likely word each time (temperature 0)" in section(render(copy), SAMPLES)


HOSTILE = "<script>alert(1)</script> a | b &amp; `rm -rf` *not bold* [link](x) \\ ~~no~~"


def html_of(markdown: str) -> str:
    """The HTML page of a report (report.render_html)."""
    return report.render_html(markdown, "report")


def test_continuations_are_text_in_the_markdown_and_the_html(run_dir: Path,
                                                             tmp_path: Path) -> None:
    """Markup in a continuation (HTML, a table pipe, code, emphasis, a link) is shown as the
    characters it is made of: one cell in the markdown table, text in the HTML page."""
    copy = copy_run(run_dir, tmp_path / "run")
    for run in (copy, copy / "control"):
        edit_samples(run, continuation=HOSTILE, prompt="The <b>city</b> | of")
    block = section(render(copy), SAMPLES)
    rows = tables(block)[0]                       # three cells per row: no pipe split a cell
    assert all(row["Run"] == row["Control"] != HOSTILE for row in rows)
    assert "<script>" not in block and "`" not in block.split("\n\n", 2)[2]
    html = html_of(block)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", html, re.S)
    shown = html_lib.escape(HOSTILE, quote=False)    # the text, as HTML writes text
    assert cells == [html_lib.escape("The <b>city</b> | of", quote=False), shown, shown] * 3
    shown_table = html[html.index("<table>"):html.index("</table>")]
    for markup in ("<script", "<b>", "<code>", "<em>", "<strong>", "<a ", "<del>"):
        assert markup not in shown_table, markup
    assert "<script" not in html


def test_literal_escapes_what_markdown_would_read():
    assert text.literal("a <unk>  b\n|c| & `d` *e* _f_") == (
        "a &lt;unk&gt; b &#124;c&#124; &amp; &#96;d&#96; &#42;e&#42; &#95;f&#95;")
    assert text.literal("the city @-@ 1 , \"quoted\" (x)") == "the city @-@ 1 , \"quoted\" (x)"


# ---------------------------------------------------------------- every kind of run

BASELINE = {"energy_heads": False, "energy_penalty": False}
KINDS_OF_RUN = {  # name -> (settings over TINY, what its summary says it trained)
    "lstm": ({**BASELINE, "architecture": "lstm"}, "an LSTM (embedding tied to the output)"),
    "transformer": ({**BASELINE, "architecture": "transformer"},
                    "a Transformer (causal GPT, pre-LN)"),
    "physics_free": ({"physics_start_epoch": 2}, "a ResNet-BK model"),
    "control": ({"energy_penalty": False}, "a ResNet-BK model"),
}


@pytest.mark.parametrize("kind", list(KINDS_OF_RUN))
def test_every_kind_of_run_gets_a_report_of_its_own_architecture(
        kind: str, tmp_path: Path, capsys) -> None:
    """A baseline, a physics-free ResNet-BK and a control alone: `physlm report` writes the
    markdown, its figures and the HTML page, and the report speaks of the model that ran (no
    BK core or experts for a baseline, no "0 physics" epochs, no physics sections)."""
    overrides, trained = KINDS_OF_RUN[kind]
    config = from_flat({**TINY, "epochs": 2, "max_train_batches": 2, "max_eval_batches": 1,
                        **overrides})
    with pytest.warns(UserWarning) if kind == "physics_free" else contextlib.nullcontext():
        train(config, tmp_path / kind)
    assert main(["report", str(tmp_path / kind), "--out-dir", str(tmp_path / "out")]) == 0
    md, html = (tmp_path / "out" / f"{kind}.{suffix}" for suffix in ("md", "html"))
    assert capsys.readouterr().out.split() == [str(md), str(html)]
    text = md.read_text()
    summary = section(text, "Summary")
    assert f"trained {trained} with " in summary, summary
    assert "for 2 of 2 epochs, on the language-model loss alone" in summary
    assert ("BK core" in summary) == (config.model.architecture == "resnet_bk")
    model = settings(section(text, "Model configuration"))
    assert model["architecture"] == config.model.architecture
    assert ("num_experts" in model) == ("bk_mode" in model) == ("BK core" in summary)
    assert ("n_heads" in model) == (kind == "transformer")
    assert "lambda_lr" not in settings(section(text, "Training configuration"))
    assert "physics)" not in text and "## Physics epochs" not in text
    assert "Router load" not in text if kind in ("lstm", "transformer") else True
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert [Path(link).stem for link in links] == FIGURES[2:]
    assert all((md.parent / link).read_bytes()[:4] == b"\x89PNG" for link in links)
    page = html.read_text()
    assert re.search(rf"<h1>physlm report: {kind}</h1>", page)
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == len(links)


# ---------------------------------------------------------------- the HTML page

def test_inline_figures_embeds_local_images_only(tmp_path):
    (tmp_path / "my run").mkdir()
    (tmp_path / "my run" / "a b.png").write_bytes(b"\x89PNG fake")
    text = ("# R\n\n![Loss, per epoch](my%20run/a%20b.png)\n\n![web](https://x.org/y.png)\n\n"
            "![gone](missing.png) and [a link](my%20run/a%20b.png)\n\n![new](new.png)\n")
    inlined = report.inline_figures(text, tmp_path, {tmp_path / "new.png": b"\x89PNG"})
    assert "![Loss, per epoch](data:image/png;base64,iVBORyBmYWtl)" in inlined
    assert "![web](https://x.org/y.png)" in inlined and "![gone](missing.png)" in inlined
    assert "[a link](my%20run/a%20b.png)" in inlined
    assert "![new](data:image/png;base64,iVBORw==)" in inlined   # drawn, not written yet


def test_html_page_is_the_report_with_its_figures_and_no_script(
        written: tuple[Path, str]) -> None:
    path, text = written
    page = path.with_suffix(".html").read_text(encoding="utf-8")
    assert "<title>physlm report: run</title>" in page and "<script" not in page
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        assert re.search(rf"<h[123]>{re.escape(heading)}</h[123]>", page), heading
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == len(FIGURES)
    assert page.count("<table>") == text.count("\n|:") + text.count("\n|-")


def test_html_page_escapes_what_comes_from_the_run(run_dir: Path, tmp_path: Path) -> None:
    """A run's settings and records are text, never markup, in the page: a data_dir named as
    an HTML handler and a record holding a javascript: link stay inert (and visible)."""
    copy = copy_run(run_dir, tmp_path / "run")
    attack = "<img src=x onerror=alert(1)>"
    config = yaml.safe_load((copy / "config.yaml").read_text())
    (copy / "config.yaml").write_text(yaml.safe_dump({**config, "data_dir": attack}))
    env = json.loads((copy / "env.json").read_text())
    env.update(git_commit="[x](javascript:alert(2))", device="<script>alert(3)</script>")
    (copy / "env.json").write_text(json.dumps(env))
    path = report.write_report(copy, out_dir=tmp_path / "out")
    assert attack in path.read_text()       # the markdown says what the setting is
    page = path.with_suffix(".html").read_text()
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    for live in ("<img src=x", "onerror=alert(1)>", "javascript:", "<script>"):
        assert live not in page, live


# ---------------------------------------------------------------- unfinished runs

def test_a_running_run_is_reported_in_progress(run_dir: Path, tmp_path: Path) -> None:
    """An unfinished run shows its finished epochs and says whether it is being trained now
    (its directory is locked by a live process) or stopped."""
    copy = copy_run(run_dir, tmp_path / "run", control=False)
    epochs = copy / "metrics" / "epochs.jsonl"
    write_jsonl(epochs, read_jsonl(epochs)[:2])
    stopped = render(copy)
    assert "It is not running now" in stopped and "in progress" not in stopped
    with RunDirectory(copy).lock():
        running = render(copy)
    head = running[:running.index("## Summary")]
    assert f"The run is in progress: process {os.getpid()} (" in head
    assert "2 of 3 epochs finished" in head
    assert len(tables(section(running, "Physics epochs"))[0]) == 1


def test_an_unfinished_control_is_not_called_the_same_budget(run_dir: Path,
                                                             tmp_path: Path) -> None:
    copy = copy_run(run_dir, tmp_path / "run")
    epochs = copy / "control" / "metrics" / "epochs.jsonl"
    write_jsonl(epochs, read_jsonl(epochs)[:2])
    summary = section(render(copy), "Summary")
    assert "against a control run with the energy penalty off" in summary
    assert "same model, data, seed and budget" not in summary
    assert "the control is unfinished (2 of 3 epochs)" in summary
    assert "(same model, data, seed and budget)" in section(render(run_dir), "Summary")


def test_a_report_that_fails_leaves_the_previous_one(run_dir: Path, tmp_path: Path,
                                                     monkeypatch) -> None:
    """Everything is drawn and rendered before the first file is replaced: a report of new
    data that fails (or is killed) mid-way leaves the previous report whole."""
    copy = copy_run(run_dir, tmp_path / "run")
    out = tmp_path / "out"
    report.write_report(copy, out_dir=out)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    edit_epochs(copy, val_ppl=1e6, val_loss=13.8, train_loss=13.8)   # other figures now

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "render_report", killed)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(copy, out_dir=out)
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before

"""The bad-input matrix (issue 20): mistakes and faults, each declared once as data, run
through the command line (`python -m physlm train|report|study`) and papermill
(`papermill notebooks/phase3.ipynb ...`) as a user would (tests/bad_inputs.py runs them).

Every case says what it runs, how its folder is damaged first (`setup`), and what the
last line of the output must name. An error must end with one `physlm` line naming what
to fix: non-zero exit, no Python traceback (papermill frames the notebook's error with
its own, which it does not let a notebook shorten), at most a few lines, and nothing on
disk added, removed or rewritten. A fault physlm handles (`succeeds`) exits 0 and says
what it did. Cases that still fail are `xfail(strict=True)`, naming the issue's item.

    python -m tests.test_bad_inputs [--subprocess] [--no-papermill] [-k NAME]

prints the tally: each case's class (clean, noisy or wrong) and the totals.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from .bad_inputs import (
    Case,
    classify,
    corpus,
    corrupt_line,
    edit,
    empty,
    folder,
    garbage,
    half_lines,
    held,
    last_digit_cut,
    last_lines_cut,
    run_case,
    tally,
    torn,
    trained,
    without,
    write,
)
from .test_reliability import WORDS


# ------------------------------------------------------------------ the cases
def train(*arguments: str) -> tuple[str, ...]:
    return ("physlm", "train", "--params", "{params}", "--run-dir", "{run}", *arguments)


def sets(*assignments: str) -> tuple[str, ...]:
    return tuple(word for a in assignments for word in ("--set", a))


def report(*arguments: str) -> tuple[str, ...]:
    return ("physlm", "report", "{run}", "--out-dir", "{out}", *arguments)


def study(*assignments: str) -> tuple[str, ...]:
    return ("physlm", "study", "--params", "{tmp}/study.yaml", *sets(*assignments))


def papermill(*parameters: str) -> tuple[str, ...]:
    return ("papermill", *(w for p in parameters for w in ("-p", *p.split("=", 1))))


STUDY = write("study.yaml", yaml.safe_dump({
    "name": "tiny", "seeds": [0], "variants": ["control"], "epochs": 2,
    "physics_start_epoch": 1, "data_params": "{params}", "run_dir": "{tmp}/study",
    "report_dir": "{out}", "workers": 1}))
RUN = trained()
REPORTED = ("out", "out/*")   # what a report writes
WROTE = ("out/run.md", "out/run.html")
BASELINE = {"energy_heads": False, "energy_penalty": False}
# Papermill reads the file of -f itself, before the notebook runs: what it says of a file
# that is not a flat mapping cannot come from physlm (README, Parameters).
PAPERMILL_READS_F = "5 (-f is read by papermill itself: cannot be fixed from physlm)"

CASES = [
    # --- train: parameters
    Case("unknown-parameter", train(*sets("epoch=2")), ("'epoch'", "did you mean 'epochs'")),
    Case("wrong-type", train(*sets("epochs=ten")), ("epochs: expected int",)),
    Case("out-of-range", train(*sets("lr=-1")), ("lr must be > 0",)),
    Case("not-finite", train(*sets("lr=.nan")), ("lr must be a finite number",)),
    Case("physics-start-after-end", train(*sets("physics_start_epoch=5")),
         ("physics_start_epoch (5) > epochs (2)",)),
    Case("malformed-set", train(*sets("epochs=[1,")), ("epochs=[1,", "not a valid YAML value")),
    Case("set-without-value", train(*sets("epochs")), ("expected key=value", "'epochs'")),
    Case("seed-too-large", train(*sets(f"seed={2**50}")), ("seed must be in [0, 2**32)",)),
    Case("device-typo", train(*sets("device=gpu")), ("device must be 'auto', 'cpu' or",)),
    Case("cuda-missing", train(*sets("device=cuda")), ("cuda", "use device: auto or cpu"),
         cuda_absent=True),
    Case("name-with-a-path", train(*sets("name=../x")), ("name must be letters",)),
    Case("old-and-new-name", train(*sets("physics=true", "energy_penalty=true")),
         ("'physics' is the old name of 'energy_penalty'",)),
    Case("penalty-without-heads", train(*sets("energy_heads=false")),
         ("energy_penalty: true needs energy_heads: true",)),
    Case("baseline-with-heads", train(*sets("architecture=lstm")),
         ("energy_heads: true needs architecture: resnet_bk",)),
    Case("choice-typo", train(*sets("bk_mode=casual")), ("did you mean 'causal'",)),
    Case("multiplier-out-of-range", train(*sets("lambda_energy_init=20")),
         ("lambda_energy_init must lie in",)),
    Case("heads-fitted-on-absolute-energy", train(*sets("fit_heads_in_warmup=true")),
         ("fit_heads_in_warmup needs energy_scale: relative",)),
    Case("negative-until-epoch", train("--until-epoch", "-1"), ("--until-epoch must be >= 0",)),
    Case("unknown-option", train("--epochs", "3"), ("unrecognized arguments: --epochs 3",)),
    Case("baseline-needs-no-physics-start",
         train(*sets("architecture=lstm", "energy_heads=false", "energy_penalty=false",
                     "physics_start_epoch=4")),
         ("2 epochs in",), succeeds=True, leaves=("run", "run/*"), item="7 (one rule)"),
    # --- train: the parameter file
    Case("params-missing", ("physlm", "train", "--params", "{tmp}/nope.yaml"),
         ("parameter file not found", "nope.yaml")),
    Case("params-is-a-directory", ("physlm", "train", "--params", "{tmp}", "--run-dir", "{run}"),
         ("is a directory",), item="7 (not found for a directory)"),
    Case("params-not-utf8", train(), ("params.yaml is not UTF-8 text",),
         (write("params.yaml", b"epochs: 2\nname: caf\xe9\n"),)),
    Case("params-a-list", train(), ("must hold a mapping",), (write("params.yaml", "- 2\n"),)),
    Case("params-malformed", train(), ("params.yaml is not valid YAML",),
         (write("params.yaml", "epochs: [2,\n"),)),
    Case("params-unknown-key", train(), ("did you mean 'epochs'",),
         (write("params.yaml", "epcohs: 2\n"),)),
    Case("params-key-not-text", train(), ("parameter names are text",),
         (write("params.yaml", "1: 2\n"),)),
    Case("params-list-value", train(), ("epochs: expected int",),
         (write("params.yaml", "epochs: [1]\n"),)),
    # --- train: data
    Case("data-dir-missing", train(*sets("data_dir={tmp}/nowhere")),
         ("data_dir: folder not found", "nowhere")),
    Case("data-dir-is-a-file", train(*sets("data_dir={params}")),
         ("data_dir", "params.yaml", "not a folder"), item="7 (not found vs is a directory)"),
    Case("train-file-missing", train(*sets("train_file={tmp}/no.raw", "valid_file={tmp}/no.raw")),
         ("train_file: file not found", "no.raw")),
    Case("train-file-is-a-directory", train(*sets("train_file={tmp}", "valid_file={tmp}")),
         ("train_file", "is a directory"), item="7 (not found for a directory)"),
    Case("data-dir-without-train-split", train(*sets("data_dir={tmp}/data")),
         ("has no train split",), (write("data/wiki.valid.raw", WORDS),)),
    Case("empty-valid-split", train(*sets("data_dir={tmp}/data")),
         ("valid split", "holds no tokens"), (corpus(WORDS, " \n \n"),)),
    Case("corpus-shorter-than-a-sequence", train(*sets("data_dir={tmp}/data")),
         ("or lower n_seq",), (corpus(WORDS, " a b c \n"),)),
    Case("corpus-not-utf8", train(*sets("data_dir={tmp}/data")),
         ("wiki.train.raw is not UTF-8", "re-encode it"),
         (corpus(b" caf\xe9 au lait \n" * 20, WORDS),)),
    Case("batch-larger-than-the-data", train(*sets("batch_size=100000")),
         ("batch_size",), item="7 (batch_size beyond the data)"),
    # --- train: the run directory
    Case("run-dir-under-a-file", ("physlm", "train", "--params", "{params}", "--run-dir",
                                  "{params}/run"), ("not a directory", "choose another run_dir")),
    Case("run-dir-is-a-file", ("physlm", "train", "--params", "{params}", "--run-dir",
                               "{params}"), ("params.yaml", "not a directory")),
    Case("resume-other-settings", train(*sets("d_model=32")),
         ("d_model: 16 in the run, 32 now",), (RUN,),
         item="Done when (.lock left behind)"),
    Case("resume-refused", train(*sets("resume=false")), ("already holds a run",), (RUN,),
         item="Done when (.lock left behind)"),
    Case("checkpoint-truncated", train(), ("last.pt", "delete it"),
         (RUN, edit("run/checkpoints/last.pt", half_lines)),
         item="Done when (.lock left behind)"),
    Case("checkpoint-garbage", train(), ("last.pt", "delete it"),
         (RUN, edit("run/checkpoints/last.pt", garbage)),
         item="Done when (.lock left behind)"),
    Case("checkpoint-is-a-directory", train(), ("is a directory", "last.pt"),
         (RUN, folder("run/checkpoints/last.pt")),
         item="Done when (.lock left behind)"),
    Case("vocabulary-garbage", train(), ("cannot read vocabulary", "vocab.json"),
         (RUN, edit("run/vocab.json", garbage)),
         item="Done when (.lock left behind)"),
    Case("config-empty", train(), ("damaged run directory", "config.yaml", "damaged"),
         (RUN, edit("run/config.yaml", empty)), absent=("overwrite",),
         item="2 (damaged config read as defaults)"),
    Case("config-truncated", train(), ("config.yaml", "damaged"),
         (RUN, edit("run/config.yaml", last_lines_cut)), absent=("overwrite",),
         item="2 (damaged config read as defaults)"),
    Case("config-cut-mid-line", train(), ("config.yaml", "damaged"),
         (RUN, edit("run/config.yaml", last_digit_cut)), absent=("overwrite",),
         item="2 (damaged config read as defaults)"),
    Case("config-garbage", train(), ("config.yaml",), (RUN, edit("run/config.yaml", garbage)),
         item="4 (traceback)"),
    Case("env-garbage", train(), ("env.json", "damaged"), (RUN, edit("run/env.json", garbage)),
         item="4 (traceback)"),
    Case("steps-corrupt-line", train(), ("steps.jsonl:2", "damaged"),
         (RUN, edit("run/metrics/steps.jsonl", corrupt_line(2))),
         item="4 (traceback)"),
    Case("epochs-corrupt-line", train(), ("epochs.jsonl:1", "damaged"),
         (RUN, edit("run/metrics/epochs.jsonl", corrupt_line(1))),
         item="4 (traceback)"),
    Case("steps-torn-by-a-kill", train(), ("physlm: warning: ", "steps.jsonl", "torn"),
         (trained(until_epoch=1), edit("run/metrics/steps.jsonl", torn)), succeeds=True,
         leaves=("run/*",), item="4 (a torn line dropped in silence)"),
    Case("run-busy", train(), ("is in use by process", "python -c"), (held(),)),
    Case("run-busy-by-the-pipeline", train(), ("is in use by", "pipeline"),
         (held(as_kernel=True),), absent=("ipykernel_launcher",), item="7 (lock holder)"),
    Case("diverging", train(*sets("lr=1e10", "max_bad_steps=2", "max_train_batches=4")),
         ("consecutive steps had a non-finite loss", "lr"), absent=("last.pt",),
         leaves=("run", "run/*"), item="7 (a checkpoint that does not exist)"),
    # --- report
    Case("report-not-a-run", ("physlm", "report", "{tmp}", "--out-dir", "{out}"),
         ("not a run directory", "no config.yaml")),
    Case("report-missing-run", report(), ("not a run directory", "{run}")),
    Case("report-out-dir-under-a-file", ("physlm", "report", "{run}", "--out-dir",
                                         "{params}/out"), ("--out-dir", "not a directory"),
         (RUN,)),
    Case("report-config-garbage", report(), ("damaged run directory", "config.yaml"),
         (RUN, edit("run/config.yaml", garbage))),
    Case("report-config-unknown-key", report(), ("damaged run directory", "no_such_setting"),
         (RUN, edit("run/config.yaml", lambda d: d + b"no_such_setting: 3\n"))),
    Case("report-config-empty", report(), ("config.yaml", "damaged"),
         (RUN, edit("run/config.yaml", empty)), item="2 (damaged config read as defaults)"),
    Case("report-config-truncated", report(), ("config.yaml", "damaged"),
         (RUN, edit("run/config.yaml", last_lines_cut)),
         item="2 (damaged config read as defaults)"),
    Case("report-env-garbage", report(), ("env.json", "damaged"),
         (RUN, edit("run/env.json", garbage)), item="4 (traceback)"),
    Case("report-initial-garbage", report(), ("initial.json", "damaged"),
         (RUN, edit("run/metrics/initial.json", garbage)), item="4 (traceback)"),
    Case("report-steps-corrupt-line", report(), ("steps.jsonl:3", "damaged"),
         (RUN, edit("run/metrics/steps.jsonl", corrupt_line(3))), item="4 (traceback)"),
    Case("report-epochs-corrupt-line", report(), ("epochs.jsonl:1", "damaged"),
         (RUN, edit("run/metrics/epochs.jsonl", corrupt_line(1))), item="4 (traceback)"),
    Case("report-last-line-corrupt", report(), ("epochs.jsonl:2", "damaged"),
         (RUN, edit("run/metrics/epochs.jsonl", corrupt_line(2))), item="4 (traceback)"),
    Case("report-epoch-without-val-loss", report(), ("epochs.jsonl:1", "val_loss"),
         (RUN, edit("run/metrics/epochs.jsonl", without("val_loss"))), item="4 (traceback)"),
    Case("report-steps-torn-by-a-kill", report(), ("physlm: warning: ", "steps.jsonl", "torn"),
         (RUN, edit("run/metrics/steps.jsonl", torn)), succeeds=True, leaves=REPORTED,
         item="4 (a torn line dropped in silence)"),
    Case("report-control-dir-not-a-run", report("--control-dir", "{tmp}/nowhere"),
         ("nowhere", "no config.yaml"), (RUN,)),
    Case("report-control-alone", report(), WROTE, (trained(energy_penalty=False),),
         succeeds=True, leaves=REPORTED, item="1 (no physics epoch)"),
    Case("report-physics-free", report(), WROTE, (trained(physics_start_epoch=2),),
         succeeds=True, leaves=REPORTED, item="1 (no physics epoch)"),
    Case("report-stopped-after-warmup", report(), WROTE,
         (trained(until_epoch=1),), succeeds=True, leaves=REPORTED, item="1 (no physics epoch)"),
    Case("report-of-a-running-run", report(), WROTE, (trained(until_epoch=1), held()),
         succeeds=True, leaves=REPORTED, item="1 (a running pipeline)"),
    Case("report-no-epoch-yet", report(), WROTE,
         (RUN, lambda tmp: shutil.rmtree(tmp / "run" / "metrics")), succeeds=True,
         leaves=REPORTED),
    Case("report-lstm", report(), WROTE, (trained(**BASELINE, architecture="lstm"),),
         succeeds=True, leaves=REPORTED, item="1b (a baseline's report)"),
    Case("report-transformer", report(), WROTE,
         (trained(**BASELINE, architecture="transformer"),), succeeds=True, leaves=REPORTED,
         item="1b (a baseline's report)"),
    # --- study
    Case("study-seeds-not-integers", study("seeds=1.5"), ("seeds",), (STUDY,),
         item="4 (traceback)"),
    Case("study-overrides-not-a-mapping", study("overrides=5"), ("overrides",), (STUDY,),
         item="4 (traceback)"),
    Case("study-ablation-not-a-mapping", study("ablation=x"), ("ablation",), (STUDY,),
         item="4 (traceback)"),
    Case("study-variant-outside-params", study("variants=[control, ../params/smoke]"),
         ("variant", "../params/smoke"), (STUDY,), item="7 (variant path)"),
    Case("study-unknown-variant", study("variants=[control, nope]"), ("params/nope.yaml",),
         (STUDY,)),
    Case("study-without-control", study("variants=[plain]"), ("must include 'control'",),
         (STUDY,)),
    Case("study-unknown-setting", study("seed=1"), ("did you mean 'seeds'",), (STUDY,)),
    Case("study-same-seed-twice", study("seeds=[0, 0]"), ("seeds must differ",), (STUDY,)),
    Case("study-no-workers", study("workers=0"), ("workers must be >= 1",), (STUDY,)),
    Case("study-physics-never-runs",
         study("physics_start_epoch=3", "variants=[control, physics_reference]"),
         ("physics_start_epoch",), (STUDY,), item="7 (one rule)"),
    Case("study-params-missing", ("physlm", "study", "--params", "{tmp}/nope.yaml"),
         ("not found", "nope.yaml")),
    Case("study-override-unknown-key", study("overrides={epoch: 1}"),
         ("'epoch'", "did you mean 'epochs'"), (STUDY,)),
    Case("study-data-params-missing", study("data_params={tmp}/nope.yaml"),
         ("not found", "nope.yaml"), (STUDY,)),
    # --- papermill notebooks/phase3.ipynb
    Case("pm-unknown-parameter", papermill("epcohs=3"), ("did you mean 'epochs'",)),
    Case("pm-wrong-type", papermill("epochs=ten"), ("epochs: expected int",)),
    Case("pm-out-of-range", papermill("epochs=-3"), ("epochs must be >= 1",)),
    Case("pm-option-wrong-type", papermill("control_run=maybe"), ("control_run",)),
    Case("pm-params-missing", papermill("params_file={tmp}/nope.yaml"),
         ("parameter file not found", "nope.yaml")),
    Case("pm-params-a-list", papermill("params_file={tmp}/list.yaml"), ("must hold a mapping",),
         (write("list.yaml", "- epochs: 3\n"),)),
    Case("pm-params-not-utf8", papermill("params_file={params}"), ("params.yaml", "UTF-8"),
         (write("params.yaml", b"epochs: 2\nname: caf\xe9\n"),), item="5 (no file named)"),
    Case("pm-params-is-a-directory", papermill("params_file={tmp}"), ("is a directory",),
         item="7 (not found for a directory)"),
    Case("pm-f-a-list", ("papermill", "-f", "{tmp}/list.yaml"), ("list.yaml",),
         (write("list.yaml", "- epochs: 3\n"),), item=PAPERMILL_READS_F, waits=True),
    Case("pm-f-malformed", ("papermill", "-f", "{tmp}/bad.yaml"), ("bad.yaml",),
         (write("bad.yaml", "epochs: [3,\n"),), item=PAPERMILL_READS_F, waits=True),
    Case("pm-no-workers", papermill("params_file={params}", "control_run=False", "workers=0"),
         ("workers must be >= 1",), item="5 (workers 0 accepted)"),
    Case("pm-data-dir-missing", papermill("params_file={params}", "data_dir={tmp}/nowhere"),
         ("data_dir", "nowhere"), item="6 (checked too late)"),
    Case("pm-cuda-missing", papermill("params_file={params}", "device=cuda"), ("cuda",),
         cuda_absent=True, item="6 (checked too late)"),
    Case("pm-report-dir-unwritable",
         papermill("params_file={params}", "control_run=False", "report_dir={params}/reports"),
         ("report_dir", "not a directory"), item="6 (checked too late)"),
    Case("pm-run-busy", papermill("params_file={params}"), ("is in use by process",),
         (held(),)),
    Case("pm-config-empty", papermill("params_file={params}", "control_run=False"),
         ("config.yaml", "damaged"), (RUN, edit("run/config.yaml", empty)),
         absent=("overwrite",), item="2 (damaged config read as defaults)"),
    Case("pm-resume-other-settings", papermill("params_file={params}", "d_model=32"),
         ("d_model: 16 in the run, 32 now",), (RUN,), item="6 (checked too late)"),
    Case("pm-physics-free", papermill("params_file={params}", "physics_start_epoch=2",
                                      "control_run=False"),
         ("reports/run.md", "reports/run.html"), succeeds=True,
         leaves=("run", "run/*", "reports", "reports/*"), item="1 (no physics epoch)"),
]


# ------------------------------------------------------------------ the test
def _marks(case: Case) -> list[pytest.MarkDecorator]:
    marks = [pytest.mark.slow] if case.papermill else []
    if case.cuda_absent:
        marks.append(pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"))
    if case.waits:
        marks.append(pytest.mark.xfail(strict=True, reason=f"issue 20, item {case.item}"))
    return marks


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=_marks(c)) for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    outcome = run_case(case, tmp_path)
    kind, why = classify(case, outcome, tmp_path)
    assert kind == "clean", f"{kind}: {why}\n--- output ---\n{outcome.output[-4000:]}"


@pytest.mark.slow
def test_the_shared_kernel_says_what_papermill_says(tmp_path: Path) -> None:
    """A papermill case run in the shared kernel (the default) ends as papermill itself ends
    it: the same exit code, the same lines after papermill's framing, the same files."""
    case = next(c for c in CASES if c.name == "pm-resume-other-settings")
    assert case.shares_a_kernel
    judged = []
    for in_process in (True, False):
        tmp = tmp_path / f"in_process={in_process}"
        tmp.mkdir()
        outcome = run_case(case, tmp, in_process=in_process)
        kind, last = classify(case, outcome, tmp)
        judged.append((outcome.code, kind, last.replace(str(tmp), "{tmp}"), outcome.changed))
    assert judged[0] == judged[1] and judged[0][1] == "clean", judged


def test_the_matrix_is_large_and_names_every_case_once() -> None:
    names = [case.name for case in CASES]
    assert len(names) >= 60 and len(set(names)) == len(names)
    assert all(case.names for case in CASES)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the bad-input tally (issue 20)")
    parser.add_argument("--subprocess", action="store_true",
                        help="run the CLI cases as `python -m physlm` processes (slower)")
    parser.add_argument("--no-papermill", action="store_true", help="leave out papermill cases")
    parser.add_argument("-k", default="", help="only cases whose name holds this")
    args = parser.parse_args()
    chosen = [c for c in CASES if args.k in c.name and not (args.no_papermill and c.papermill)
              and not (c.cuda_absent and torch.cuda.is_available())]
    tally(chosen, in_process=not args.subprocess)

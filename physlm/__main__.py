"""Command line: everything the notebooks do, without a notebook.

    python -m physlm train  --params params/phase3.yaml --set epochs=2 --run-dir runs/x
    python -m physlm report runs/x
    python -m physlm generate runs/x [--prompt "The castle"] [--tokens 40] [--seed 0] [--write]
    python -m physlm study  --params params/study_smoke.yaml [--set epochs=2] [--report-only]
    python -m physlm search --params params/search_lstm.yaml [--set trials=40] [--report-only]

study and search run their runs on Ray: `--address HOST:PORT` joins a cluster (default
RAY_ADDRESS, else one started on this machine for the command).

The benchmarks are not part of the package: `python benchmarks/bench.py` (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

import physlm
from physlm.config import REPORTS_ROOT, load_config
from physlm.errors import CommandError, GenerationError, known_error, one_line
from physlm.values import parse_assignment

PACKAGE = Path(physlm.__file__).resolve().parent


def _config(args: argparse.Namespace):
    return load_config(args.params, dict(parse_assignment(text) for text in args.set))


def _train(args: argparse.Namespace) -> None:
    from physlm.runs import RunDirectory, default_run_dir
    from physlm.trainer import train

    if args.until_epoch is not None and args.until_epoch < 0:
        raise CommandError("invalid argument", f"--until-epoch must be >= 0 (the epoch index "
                           f"to stop before), got {args.until_epoch}", 2)
    config = _config(args)
    run_dir = args.run_dir or default_run_dir(config)
    # One writer per run directory; under torchrun rank 0 writes and holds it.
    holds = os.environ.get("RANK", "0") == "0"
    with RunDirectory(run_dir).lock() if holds else contextlib.nullcontext():
        records = train(config, run_dir, until_epoch=args.until_epoch)
    print(f"{len(records)} epochs in {run_dir}")


def _report(args: argparse.Namespace) -> None:
    from physlm.files import why_not_writable
    from physlm.report import write_report
    from physlm.runs import RunDirectory

    run = RunDirectory(args.run_dir)
    if not run.config.is_file():
        raise CommandError("not a run directory", f"{args.run_dir} has no config.yaml; give "
                           "the run_dir of a training run", 2)
    run.read_config()  # a damaged one is named before anything is written
    reason = why_not_writable(args.out_dir)
    if reason:
        raise CommandError("cannot write", f"--out-dir {args.out_dir}: {reason}; choose "
                           "another --out-dir", 1)
    report = write_report(args.run_dir, out_dir=args.out_dir, control_dir=args.control_dir,
                          name=args.name)
    print(f"{report}\n{report.with_suffix('.html')}")


def _study(args: argparse.Namespace) -> None:
    from physlm import study, study_report

    options = study.load_study(args.params, {**dict(parse_assignment(t) for t in args.set),
                                             "address": args.address})
    if args.report_only:
        study.restore_records(options)
        study.save_records(options)
    runs = study.load_study_runs(options) if args.report_only else study.run_study(options)
    print(study_report.write_study_report(options, runs))


def _search(args: argparse.Namespace) -> None:
    from physlm import search, search_report
    from physlm.executor import RayExecutor

    spec = search.load_search(args.params, dict(parse_assignment(t) for t in args.set))
    if not args.report_only:
        with RayExecutor(args.address, spec.workers) as executor:
            search.run_search(spec, executor)
    print(search_report.write_search_report(spec, spec.report_dir))
    if spec.recipe and search_report.write_recipe(spec, spec.recipe):
        print(spec.recipe)


def _generate(args: argparse.Namespace) -> None:
    from physlm import generate
    from physlm.runs import RunDirectory

    settings = generate.SampleSettings(tokens=args.tokens, temperature=args.temperature,
                                       top_k=args.top_k, seed=args.seed).check()
    given = args.prompt is not None
    if args.write:
        if given:
            raise GenerationError("--write keeps the continuations of the run's fixed prompts "
                                  "in its samples.json: leave out --prompt")
        with RunDirectory(args.run_dir).lock():   # one writer per run directory
            samples = generate.write_samples(args.run_dir, settings, args.checkpoint)
    else:
        run_model = generate.load_run_model(args.run_dir, args.checkpoint)
        prompts = [args.prompt] if given else generate.validation_prompts(run_model.config)
        samples = [generate.generate(run_model, prompt, settings) for prompt in prompts]
    unknown = list(dict.fromkeys(word for sample in samples for word in sample.unknown))
    if unknown:
        print(f"physlm: note: read as <unk> (not in the run's vocabulary): {' '.join(unknown)}",
              file=sys.stderr)
    for sample in samples:
        print(sample.continuation if given else f"[{sample.prompt}] {sample.continuation}")
    if args.write:
        print(f"physlm: note: wrote {RunDirectory(args.run_dir).samples}", file=sys.stderr)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file=None, line: str | None = None) -> None:
    """physlm's own warnings as one line, `physlm: warning: <message>` (others as Python
    shows them)."""
    if Path(filename).resolve().is_relative_to(PACKAGE):
        print(f"physlm: warning: {one_line(str(message))}", file=file or sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    physlm.passive_openmp()   # before any command imports torch
    argv = sys.argv[1:] if argv is None else argv
    # Sampling's defaults live with it (an import of torch, which every command makes anyway).
    from physlm.generate import CHECKPOINTS, SampleSettings

    parser = argparse.ArgumentParser(prog="physlm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train or resume a run")
    train.add_argument("--params", help="YAML parameter file (flat keys)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one parameter (repeatable)")
    train.add_argument("--run-dir", type=Path, help="default runs/<name>")
    train.add_argument("--until-epoch", type=int, help="stop before this epoch index")
    train.set_defaults(handler=_train)

    report = commands.add_parser("report", help="write the report of a saved run (markdown "
                                 "with its figures, and the same as one HTML page)")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--out-dir", type=Path, default=Path(REPORTS_ROOT))
    report.add_argument("--control-dir", type=Path, help="default <run_dir>/control")
    report.add_argument("--name", help="the report's name (default: the run directory's)")
    report.set_defaults(handler=_report)

    study = commands.add_parser("study", help="train (or reuse) a study's runs and report it")
    study.add_argument("--params", required=True, help="the study's YAML file")
    study.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one study setting (repeatable), e.g. epochs=2")
    study.add_argument("--report-only", action="store_true", help="report the runs that exist")
    cluster = "join this Ray cluster (default RAY_ADDRESS, else start one on this machine)"
    study.add_argument("--address", help=cluster)
    study.set_defaults(handler=_study)

    search = commands.add_parser("search", help="search a model's training recipe (Optuna)")
    search.add_argument("--params", required=True, help="the search's YAML file")
    search.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one search setting (repeatable), e.g. trials=40")
    search.add_argument("--report-only", action="store_true",
                        help="train nothing: report the trials in the storage")
    search.add_argument("--address", help=cluster)
    search.set_defaults(handler=_search)

    sampling = commands.add_parser(
        "generate", help="print the continuation of a prompt by a run's model",
        description="Sample from a run's model. Without --prompt: the continuations of the "
                    "run's fixed validation prompts, each after its [prompt].")
    sampling.add_argument("run_dir", type=Path)
    defaults = SampleSettings()
    sampling.add_argument("--prompt", help="the text to continue (whitespace-separated words)")
    sampling.add_argument("--tokens", type=int, default=defaults.tokens,
                          help="words to write (default %(default)s)")
    sampling.add_argument("--temperature", type=float, default=defaults.temperature,
                          help="0 takes the most likely word (default %(default)s)")
    sampling.add_argument("--top-k", type=int, default=defaults.top_k,
                          help="draw from the k most likely words only (default: all)")
    sampling.add_argument("--seed", type=int, default=defaults.seed,
                          help="seed of the draws (default %(default)s)")
    sampling.add_argument("--checkpoint", choices=CHECKPOINTS, default=CHECKPOINTS[0],
                          help="whose weights (default %(default)s)")
    sampling.add_argument("--write", action="store_true",
                          help="also keep the fixed prompts' continuations in the run's "
                               "samples.json, which its report shows")
    sampling.set_defaults(handler=_generate)

    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            args.handler(args)
    except KeyboardInterrupt:
        print("physlm: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as error:
        known = known_error(error)
        if known is None:
            raise
        label, code = known
        print(f"physlm: {label}: {one_line(error)}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())

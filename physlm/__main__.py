"""Command line: everything the notebooks do, without a notebook.

    python -m physlm train  --params params/phase3.yaml --set epochs=2 --run-dir runs/x
    python -m physlm report runs/x
    python -m physlm study  --params params/study_smoke.yaml [--set epochs=2] [--report-only]
                            [--address HOST:PORT]   (a Ray cluster; default: one on this machine)
    python -m physlm bench  [--quick] [--only step,energy,eval,bk,scaling,moe]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path

from physlm.config import load_config
from physlm.values import ConfigError, parse_assignment


class CommandError(Exception):
    """A command's input is unusable: printed as `physlm: <label>: <message>`, exit `code`."""

    def __init__(self, label: str, message: str, code: int) -> None:
        super().__init__(message)
        self.label, self.code = label, code


def _config(args: argparse.Namespace):
    overrides = dict(parse_assignment(text) for text in args.set)
    try:
        return load_config(args.params, overrides)
    except UnicodeDecodeError as error:  # the parameter file, the only text read here
        raise ConfigError(f"{args.params} is not UTF-8 text (undecodable byte at offset "
                          f"{error.start}); re-encode it to UTF-8") from error


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
    try:
        run.read_config()
    except (ConfigError, UnicodeDecodeError) as error:
        raise CommandError("damaged run directory", f"{run.config}: {_one_line(error)}; "
                           "restore the file, or train the run again", 1) from error
    reason = why_not_writable(args.out_dir)
    if reason:
        raise CommandError("cannot write", f"--out-dir {args.out_dir}: {reason}; choose "
                           "another --out-dir", 1)
    print(write_report(args.run_dir, out_dir=args.out_dir, control_dir=args.control_dir,
                       name=args.name))


def _study(args: argparse.Namespace) -> None:
    from physlm import study, study_report

    options = study.load_study(args.params, {**dict(parse_assignment(t) for t in args.set),
                                             "address": args.address})
    if args.report_only:
        study.sync_records(options)
    runs = study.load_study_runs(options) if args.report_only else study.run_study(options)
    print(study_report.write_study_report(options, runs))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the checkout's benchmarks/bench.py, with its own options
        import importlib.util

        import physlm

        script = Path(physlm.__file__).resolve().parents[1] / "benchmarks" / "bench.py"
        if not script.is_file():
            print(f"physlm: bench needs a source checkout: no {script}", file=sys.stderr)
            return 2
        spec = importlib.util.spec_from_file_location("bench", script)
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        return bench.main(argv[1:])
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

    report = commands.add_parser("report", help="write the markdown report of a saved run")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--out-dir", type=Path, default=Path("reports"))
    report.add_argument("--control-dir", type=Path, help="default <run_dir>/control")
    report.add_argument("--name", help="the report's name (default: the run directory's)")
    report.set_defaults(handler=_report)

    study = commands.add_parser("study", help="train (or reuse) a study's runs and report it")
    study.add_argument("--params", required=True, help="the study's YAML file")
    study.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one study setting (repeatable), e.g. epochs=2")
    study.add_argument("--report-only", action="store_true", help="report the runs that exist")
    study.add_argument("--address", help="join this Ray cluster (default RAY_ADDRESS, else start "
                       "one on this machine)")
    study.set_defaults(handler=_study)

    commands.add_parser("bench", help="benchmarks (python -m physlm bench -h)")

    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        print("physlm: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as error:
        known = _known_error(error)
        if known is None:
            raise
        label, code = known
        print(f"physlm: {label}: {_one_line(error)}", file=sys.stderr)
        return code
    return 0


def _known_error(error: Exception) -> tuple[str, int] | None:
    """(label, exit code) of the errors a user can act on: 2 for input, 1 for the run.
    An error of the operating system is labelled by what it is ("not a directory",
    "no space left on device", ...) and names its file."""
    if isinstance(error, CommandError):
        return error.label, error.code
    if isinstance(error, ConfigError):
        return "configuration error", 2
    from physlm.checkpoint import CheckpointError  # imported here: they import torch
    from physlm.data import DataError
    from physlm.distributed import DeviceError
    from physlm.executor import ClusterError
    from physlm.files import NotWritableError
    from physlm.runs import RunBusyError, RunConflictError
    from physlm.trainer import TrainingError

    for kind, label, code in ((DataError, "data error", 2),
                              (CheckpointError, "checkpoint error", 1),
                              (TrainingError, "cannot train", 1),
                              (DeviceError, "cannot train", 1),
                              (ClusterError, "cluster error", 1),
                              (RunBusyError, "run directory busy", 1),
                              (RunConflictError, "cannot train", 1),
                              (NotWritableError, "cannot write", 1)):
        if isinstance(error, kind):
            return label, code
    if isinstance(error, OSError):
        return (error.strerror or "file error").lower(), 1
    return None


def _one_line(error: Exception) -> str:
    """The message on one line: "a:\n  b\n  c" becomes "a: b; c". An error of the operating
    system ("[Errno 20] Not a directory: 'x'") is its file names (the label says the rest)."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        return " -> ".join(str(name) for name in (error.filename, error.filename2) if name)
    text = re.sub(r":\s*\n\s*", ": ", str(error).strip())
    return re.sub(r"\s*\n\s*", "; ", text)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: everything the notebooks do, without a notebook.

    python -m physlm train  --params params/phase3.yaml --set epochs=2 --run-dir runs/x
    python -m physlm report runs/x
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from physlm.config import ConfigError, load_config, parse_assignment


def _config(args: argparse.Namespace):
    overrides = dict(parse_assignment(text) for text in args.set)
    return load_config(args.params, overrides)


def _train(args: argparse.Namespace) -> None:
    from physlm.trainer import train

    config = _config(args)
    run_dir = args.run_dir or Path("runs") / (Path(args.params).stem if args.params else "default")
    records = train(config, run_dir, until_epoch=args.until_epoch)
    print(f"{len(records)} epochs in {run_dir}")


def _report(args: argparse.Namespace) -> None:
    from physlm.report import write_report

    path = write_report(args.run_dir, out_dir=args.out_dir)
    print(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="physlm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train or resume a run")
    train.add_argument("--params", help="YAML parameter file (flat keys)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one parameter (repeatable)")
    train.add_argument("--run-dir", type=Path, help="run directory (default runs/<params name>)")
    train.add_argument("--until-epoch", type=int, help="stop before this epoch index")
    train.set_defaults(handler=_train)

    report = commands.add_parser("report", help="write the markdown report of a saved run")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--out-dir", type=Path, default=Path("reports"))
    report.set_defaults(handler=_report)

    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except ConfigError as error:
        print(f"physlm: configuration error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

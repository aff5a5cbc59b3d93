"""`compt-scale` entry point.

Each subcommand lives next to the code it drives and exposes `register(subparsers)`; the parser it
adds sets `func(args) -> int`. Any CompTError (bad spec, missing file, NaN loss, ...) ends as one line
on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import EXIT_BAD_INPUT, CompTError

# Order is the order shown in --help: the data flow chain -> stage -> grow -> train -> export.
COMMAND_MODULES = [
    "compt_scale.chain.cli",      # demo, chain, stage
    "compt_scale.chain.tune_lr",  # tune-lr
    "compt_scale.grow_cli",       # grow
    "compt_scale.planning_cli",   # plan, macs, report
    "compt_scale.launch.cli",     # slurm
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compt-scale", description="Chain-of-Models Pre-Training at scale")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # a command group not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CompTError as e:
        print(f"compt-scale: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("compt-scale: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

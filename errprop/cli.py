"""Command-line interface: ``errprop demo``, ``errprop analyze MODEL``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import _cli_analyze, _cli_budget, _cli_compare, _demo
from . import _cli_sweep


def _bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer, got {text!r}") from None
    if not 2 <= value <= 16:
        raise argparse.ArgumentTypeError(f"bits must be from 2 to 16, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """Bad command lines get one line on stderr (and the pointer to --help), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="errprop",
        description="Simulate how quantization error enters a neural network and propagates "
                    "through its layers: exact (fake-quant) and first-order, per node and source.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _demo.add_parser(sub, _bits)
    _cli_analyze.add_parser(sub, _bits)
    _cli_budget.add_parsers(sub, _bits)
    _cli_compare.add_parser(sub, _bits)
    _cli_sweep.add_parser(sub, _bits)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, ImportError, OSError) as exc:
        print(f"errprop: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

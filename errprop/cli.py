"""Command-line interface: ``errprop demo``, ``errprop analyze MODEL``, ...

Errors end in one line on stderr, never a traceback: ``errprop: error: <message>`` with exit
code 2 for anything wrong with what errprop was given (command line, files, sizes), and
``errprop: internal error: ...`` with exit code 1 for an exception errprop did not expect
(a bug; ``--traceback`` shows where it happened).
"""

from __future__ import annotations

import argparse
import struct
import sys
import zipfile
import zlib
from collections.abc import Sequence
from typing import NoReturn

from . import _cli_analyze, _cli_budget, _cli_compare, _demo
from . import _cli_sweep
from ._sweep_store import SweepBusyError

#: errors of file formats read through other libraries (module, class), if imported
_FORMAT_ERRORS = (("safetensors", "SafetensorError"), ("google.protobuf.message", "DecodeError"),
                  ("onnx.checker", "ValidationError"),
                  ("onnx.shape_inference", "InferenceError"))


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
    help_ = "on an error, show Python's traceback instead of one line (for bug reports)"
    parser.add_argument("--traceback", action="store_true", help=help_)
    for command in sub.choices.values():  # SUPPRESS: `errprop --traceback CMD` stays True
        command.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                             help=help_)
    return parser


def _format_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "this file cannot be read": the standard library's (zip, deflate,
    binary layout, truncation) and those of the format libraries already imported."""
    found: list[type[BaseException]] = [zipfile.BadZipFile, zlib.error, struct.error, EOFError]
    for module, name in _FORMAT_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def error_line(exc: BaseException, args: argparse.Namespace) -> tuple[str, int]:
    """The one line printed for ``exc`` and the exit code: 2 for bad input, 1 for a bug."""
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, (ValueError, TypeError, ImportError, OSError, SweepBusyError)):
        return _one_line(str(exc) or what), 2
    if isinstance(exc, _format_errors()):
        model = getattr(args, "model", None)
        return _one_line((f"cannot read {model}: " if model else "cannot read a file: ")
                         + what), 2
    if isinstance(exc, MemoryError):
        return _one_line(f"out of memory ({what}); try a smaller batch, model or sample "
                         f"count"), 2
    if isinstance(exc, RecursionError):
        return _one_line(f"the input is nested too deeply to process ({what})"), 2
    return _one_line(f"{what} (errprop did not expect this: it is a bug, please report it; "
                     f"rerun with --traceback to see where it happened)"), 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.traceback:
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("errprop: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place errors become one line
        line, code = error_line(exc, args)
        kind = "error" if code == 2 else "internal error"
        print(f"errprop: {kind}: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())

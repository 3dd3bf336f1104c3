"""Argument types and input files for the command line: numbers with bounds, UTF-8 text,
one clear line when wrong."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from ._files import FileFormatError


def number(cast: type = float, *, low: float | None = None, high: float | None = None,
           above: bool = False, what: str = "a number") -> Callable[[str], float]:
    """An argparse ``type`` parsing ``cast`` within ``[low, high]`` (``(low, high]`` when
    ``above``); the error names what was expected and what was given."""

    def parse(text: str) -> float:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if low is not None and (value <= low if above else value < low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


def read_utf8(path: Path, what: str) -> str:
    """The text of ``path``; a file that is not UTF-8 is a :class:`FileFormatError` naming
    the file and the first bad byte (Python's own message names neither)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(path, f"the {what} is not UTF-8 text (byte {exc.start}: "
                              f"{data[exc.start:exc.start + 1]!r}); save it as UTF-8") from None

"""Argument types for the command line: numbers with bounds, one clear line when wrong."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


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


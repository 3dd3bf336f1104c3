"""Validation of user-given scalars and arrays, with messages that name what is wrong.

Python's truthiness and NumPy's casts accept far too much: ``bool("no")`` is True,
``True`` is the integer 1, ``np.asarray("3.5", float)`` parses a string and a complex
array casts to real with only a warning. Every public entry point checks its
arguments with these functions, so a wrong type is refused where it is given, with
the owner (``"Uniform"``, ``"Attention 'attn1'"``, ``"analyze"``), the argument and the
value in the message.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from numbers import Integral, Real

import numpy as np

Array = np.ndarray


def _got(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_bool(value: object, owner: str, what: str) -> bool:
    """``value`` if it is ``True``/``False`` (Python or NumPy bool), else a TypeError."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{owner}: {what} must be True or False, got {_got(value)}")


def check_int(value: object, owner: str, what: str, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """An integer (not a bool, float or string) within ``[minimum, maximum]``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (Integral, np.integer)):
        raise TypeError(f"{owner}: {what} must be an integer, got {_got(value)}")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        raise ValueError(f"{owner}: {what} must be an integer in [{lo}, {hi}], got {v}")
    return v


def check_real(value: object, owner: str, what: str, *, minimum: float | None = None,
               positive: bool = False, finite: bool = True) -> float:
    """A real number (not a bool, complex or string); finite unless ``finite=False``;
    ``> 0`` if ``positive``; ``>= minimum`` if given."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (Real, np.integer,
                                                                      np.floating)):
        raise TypeError(f"{owner}: {what} must be a real number, got {_got(value)}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{owner}: {what} must be a number, got NaN")
    if finite and math.isinf(v):
        raise ValueError(f"{owner}: {what} must be a finite number, got {v}")
    if positive and not v > 0:
        raise ValueError(f"{owner}: {what} must be positive, got {v}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{owner}: {what} must be at least {minimum}, got {v}")
    return v


def check_seed(seed: object, owner: str, *, allow_none: bool = True) -> int | None:
    """A non-negative integer seed (or None, where a fresh entropy seed is meant)."""
    if seed is None and allow_none:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (Integral, np.integer)) \
            or int(seed) < 0:
        hint = " or None" if allow_none else ""
        raise ValueError(f"{owner}: seed must be a non-negative integer{hint}, got "
                         f"{_got(seed)}")
    return int(seed)


def check_rng(rng: object, owner: str) -> np.random.Generator | None:
    """``rng`` if it is a ``numpy.random.Generator`` or None."""
    if rng is None or isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"{owner}: rng must be a numpy.random.Generator (numpy.random."
                    f"default_rng(seed)) or None, got {_got(rng)}")


def real_array(value: object, owner: str, what: str) -> Array:
    """``value`` as a float64 array; refuses strings, complex numbers and objects.

    NumPy would parse ``"1.5"`` into a number and drop the imaginary part of a complex
    array with only a ComplexWarning; a quantization analysis of either is meaningless.
    """
    arr = np.asarray(value)
    kind = arr.dtype.kind
    if kind == "c":
        raise TypeError(f"{owner}: {what} is complex ({arr.dtype}); errprop analyses real "
                        f"networks: pass the real part explicitly if that is what you mean")
    if kind not in "biuf":
        raise TypeError(f"{owner}: {what} must be a real numeric array, got "
                        f"{type(value).__name__} of dtype {arr.dtype}")
    return np.asarray(arr, dtype=np.float64)


def check_choice(value: object, owner: str, what: str, choices: Iterable[str]) -> str:
    """``value`` if it is one of the strings ``choices``, else a ValueError listing them
    (with a suggestion for a near miss)."""
    options = tuple(choices)
    if isinstance(value, str) and value in options:
        return value
    close = difflib.get_close_matches(value, options, n=1) if isinstance(value, str) else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{owner}: {what} must be one of {', '.join(map(repr, options))}, got "
                     f"{_got(value)}{hint}")

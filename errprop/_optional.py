"""Optional heavy dependencies, imported only when a feature needs them."""

from __future__ import annotations

import importlib
from typing import Any


def optional(module: str, *, feature: str, extra: str, package: str | None = None) -> Any:
    """``import module``, or an ImportError naming the feature and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        name = package or module.split(".")[0]
        raise ImportError(f'{feature} needs {name}, an optional extra: pip install '
                          f'"errprop[{extra}]" (or pip install {name})') from exc

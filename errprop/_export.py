"""Table exports shared by budgets, matrices, splits, sensitivity studies and reports."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def json_safe(v: Any) -> Any:
    """``v`` with NaN/inf as None (JSON has neither) and NumPy scalars as Python numbers."""
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def json_text(doc: Any) -> str:
    """Indented JSON of ``doc`` (see :func:`json_safe`), ending with a newline."""
    return json.dumps(json_safe(doc), indent=1, allow_nan=False) + "\n"


def csv_text(records: Sequence[dict[str, Any]], fieldnames: Sequence[str] | None = None) -> str:
    """CSV of the records (columns: ``fieldnames``, else the first record's keys), ``\\n``
    line ends."""
    buf = io.StringIO()
    names = list(fieldnames) if fieldnames is not None else (list(records[0]) if records else [])
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()

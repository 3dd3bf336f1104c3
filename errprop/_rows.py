"""Tangent rows keyed by source: where two values meet, their rows are summed by key.

A first-order error travels as ``(keys, rows)``: ``rows[i]`` is the error that source
``keys[i]`` causes in the value, and a key that is absent means exactly zero. At a join
(``skip + branch`` today; any ``Add`` merge of a general graph) the two sides' rows are
aligned by key, not by position, so branches that each add sources cannot mix them up.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

Array = np.ndarray


def add_keyed(a_keys: Sequence[Hashable], a: Array | None, b_keys: Sequence[Hashable],
              b: Array | None) -> tuple[list[Hashable], Array | None]:
    """``(keys, rows)`` of the sum of two keyed tangents (``rows`` of shape ``(len(keys),
    ...)``; ``None`` for no rows). The keys are ``a``'s, then ``b``'s new ones, in order.

    A residual branch starts from its skip's rows and only appends: then the sum is
    ``b`` with ``a`` added to its first rows (the same floats as a positional sum)."""
    if a is None:
        return list(b_keys), b
    if b is None:
        return list(a_keys), a
    n = len(a_keys)
    if list(b_keys[:n]) == list(a_keys):
        out = b.copy()
        out[:n] += a
        return list(b_keys), out
    known = set(a_keys)
    keys = list(a_keys) + [k for k in b_keys if k not in known]
    pos = {k: i for i, k in enumerate(keys)}
    shape = np.broadcast_shapes(a.shape[1:], b.shape[1:])
    out = np.zeros((len(keys), *shape), dtype=np.result_type(a, b))
    out[:n] += a
    out[[pos[k] for k in b_keys]] += b
    return keys, out

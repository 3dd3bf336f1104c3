"""Keyed tangent rows (errprop._rows.add_keyed) against a dict-of-rows reference."""

import numpy as np
import pytest

from errprop._rows import add_keyed


def _as_dict(keys, rows):
    return {} if rows is None else {k: rows[i] for i, k in enumerate(keys)}


def _reference(a_keys, a, b_keys, b):
    out = dict(_as_dict(a_keys, a))
    for k, r in _as_dict(b_keys, b).items():
        out[k] = out[k] + r if k in out else r
    return out


@pytest.mark.parametrize("a_keys, b_keys", [
    (["x", "W1"], ["x", "W1", "W2"]),      # a residual branch: extends the skip
    (["x", "W1"], ["W2", "x"]),            # two branches that each add sources
    (["x"], ["W2", "W3"]),                 # disjoint
    ([], ["W2"]), (["x"], []),
])
def test_sum_is_aligned_by_key(a_keys, b_keys, rng):
    a = rng.standard_normal((len(a_keys), 3, 4)) if a_keys else None
    b = rng.standard_normal((len(b_keys), 3, 4)) if b_keys else None
    keys, rows = add_keyed(a_keys, a, b_keys, b)
    ref = _reference(a_keys, a, b_keys, b)
    assert keys == list(dict.fromkeys([*a_keys, *b_keys]))
    got = _as_dict(keys, rows)
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])


def test_extension_is_bitwise_the_positional_sum(rng):
    a = rng.standard_normal((2, 5))
    b = rng.standard_normal((3, 5))
    keys, rows = add_keyed(["p", "q"], a, ["p", "q", "r"], b)
    expected = b.copy()
    expected[:2] += a
    assert keys == ["p", "q", "r"]
    np.testing.assert_array_equal(rows, expected)
    assert rows is not b  # the branch's rows are not modified in place

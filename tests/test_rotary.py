"""Rotary position embedding: against the complex-number definition of RoFormer (Su et al.
2021, eq. 13: feature pair j at position m is multiplied by exp(i m θ_j)), its rules by
check_rule, and inside a decomposed attention graph."""

from __future__ import annotations

import numpy as np
import pytest

import errprop as ep
from errprop.testing import check_rule

RNG = np.random.default_rng(11)


def _complex_reference(x, base=10000.0, layout="half", rotary_dim=None, scaling=1.0,
                       offset=0):
    d = x.shape[-1]
    r = d if rotary_dim is None else rotary_dim
    T = x.shape[-2]
    theta = base ** (-2.0 * np.arange(r // 2) / r)
    m = (offset + np.arange(T)) / scaling
    rot = np.exp(1j * m[:, None] * theta[None, :])  # (T, r/2)
    xr = x[..., :r]
    if layout == "half":
        z = xr[..., : r // 2] + 1j * xr[..., r // 2:]
        w = z * rot
        out = np.concatenate([w.real, w.imag], axis=-1)
    else:
        z = xr[..., 0::2] + 1j * xr[..., 1::2]
        w = z * rot
        out = np.stack([w.real, w.imag], axis=-1).reshape(xr.shape)
    return np.concatenate([out, x[..., r:]], axis=-1)


@pytest.mark.parametrize("kw", [{}, {"layout": "interleaved"}, {"rotary_dim": 4},
                                {"base": 500000.0, "scaling": 8.0, "offset": 5},
                                {"layout": "interleaved", "rotary_dim": 6, "offset": 2}])
def test_rotary_equals_the_complex_definition(kw):
    x = RNG.normal(size=(2, 3, 7, 8))  # batch, heads, tokens, head_dim
    np.testing.assert_allclose(ep.Rotary(8, **kw).forward(x), _complex_reference(x, **kw),
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rotary_rules(layout):
    check_rule(ep.Rotary(8, layout=layout, rotary_dim=6), RNG.normal(size=(2, 5, 8)))


def test_rotary_keeps_norms_and_relative_positions():
    """RoPE's defining property: q_m · k_n depends on m - n only."""
    op = ep.Rotary(8)
    q, k = RNG.normal(size=8), RNG.normal(size=8)
    seq_q = op.forward(np.broadcast_to(q, (1, 10, 8)).copy())[0]
    seq_k = op.forward(np.broadcast_to(k, (1, 10, 8)).copy())[0]
    np.testing.assert_allclose(seq_q[7] @ seq_k[4], seq_q[3] @ seq_k[0], rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(seq_q, axis=-1), np.linalg.norm(q), rtol=1e-13)


def test_rotary_in_attention_graph_analyzes():
    d, H = 8, 2
    W = [RNG.normal(size=(d, d)) / np.sqrt(d) for _ in range(4)]
    x = ep.Input()

    def heads(t):
        return ep.Transpose((1, 0, 2))(ep.Reshape((H, d // H))(t))

    q = ep.Rotary(d // H, name="rope_q")(heads(ep.Linear(W[0], name="q")(x)))
    k = ep.Rotary(d // H, name="rope_k")(heads(ep.Linear(W[1], name="k")(x)))
    v = heads(ep.Linear(W[2], name="v")(x))
    s = ep.Softmax(axis=-1)(ep.Scale(0.5)(ep.MatMul(transpose_b=True)(q, k)))
    o = ep.Reshape((d,), axes=2)(ep.Transpose((1, 0, 2))(ep.MatMul()(s, v)))
    net = ep.Graph(x, ep.Linear(W[3], name="o")(o))
    xs = RNG.normal(size=(2, 6, d))
    rep = ep.analyze(net, xs, ep.QuantConfig(weights=ep.Uniform(10)))
    assert ep.relative_residual(rep.exact, rep.first_order) < 0.01
    # reference forward: plain NumPy with the complex RoPE
    def split(t):
        return t.reshape(2, 6, H, d // H).transpose(0, 2, 1, 3)
    qq = _complex_reference(split(xs @ W[0].T))
    kk = _complex_reference(split(xs @ W[1].T))
    S = qq @ np.swapaxes(kk, -1, -2) * 0.5
    A = np.exp(S - S.max(-1, keepdims=True))
    A /= A.sum(-1, keepdims=True)
    ref = (A @ split(xs @ W[2].T)).transpose(0, 2, 1, 3).reshape(2, 6, d) @ W[3].T
    np.testing.assert_allclose(net(xs), ref, rtol=1e-12, atol=1e-12)


def test_rotary_bad_input():
    with pytest.raises(ValueError, match="even"):
        ep.Rotary(7)
    with pytest.raises(ValueError, match="layout"):
        ep.Rotary(8, layout="halves")
    with pytest.raises(ValueError, match="at least 3 axes|token"):
        ep.Sequential([ep.Rotary(8)])(np.ones((2, 8)))


def test_rotary_saves_and_loads(tmp_path):
    net = ep.Sequential([ep.Rotary(8, base=500.0, layout="interleaved", rotary_dim=6,
                                   scaling=2.0, offset=3, name="rope")])
    ep.save(net, tmp_path / "m")
    back = ep.load(tmp_path / "m")
    x = RNG.normal(size=(2, 5, 8))
    np.testing.assert_array_equal(back(x), net(x))
    assert back["rope"].config() == net["rope"].config()

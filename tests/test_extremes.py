"""Numerical extremes: results stay finite and meaningful, or the error says why."""

import numpy as np
import pytest

import errprop as ep

W8 = ep.QuantConfig(weights=ep.Uniform(8, granularity="channel"), activations=ep.Uniform(8))


def _finite(report):
    for node in report.nodes.values():
        assert np.all(np.isfinite(node.exact)), node.name
        assert np.all(np.isfinite(node.first_order)), node.name


def test_huge_logits_saturate_softmax_without_nan(rng):
    net = ep.transformer(8, 2, 16, 1, seed=0)
    att = net["block0.attn"]
    att.params["Wq"] *= 1e4  # logits ~1e4: one-hot attention rows
    x = rng.standard_normal((2, 5, 8))
    report = ep.analyze(net, x, W8)
    _finite(report)
    assert report.nodes["block0.attn"].diagnostics["saturated"] > 0.9
    assert np.all(np.isfinite(report.std)) and np.all(np.isfinite(report.worst_case))
    mc = ep.monte_carlo(net, x, W8, samples=20, seed=0, quantiles=())
    assert np.isfinite(mc.mse)


def test_constant_rows_into_layernorm(rng):
    """Var = 0: x̂ = 0, the gain is 1/sqrt(eps), and the diagnostics flag it."""
    ln = ep.LayerNorm(np.ones(6), np.zeros(6))
    net = ep.Sequential([ep.Linear(np.eye(6)), ln])
    x = np.full((3, 6), 2.5)
    report = ep.analyze(net, x, ep.QuantConfig(activations=ep.Uniform(8)))
    _finite(report)
    assert report.nodes["ln1"].diagnostics["flat_norm"] == 1.0
    np.testing.assert_allclose(report.output, 0.0)


def test_zero_weights_quantize_to_zero_error(rng):
    net = ep.Sequential([ep.Linear(np.zeros((4, 3)), np.zeros(4)), ep.Activation("tanh"),
                         ep.Linear(rng.standard_normal((2, 4)))])
    x = rng.standard_normal((5, 3))
    for granularity in ("tensor", "channel"):
        config = ep.QuantConfig(weights=ep.Uniform(4, granularity=granularity),
                                biases=ep.Uniform(4))
        report = ep.analyze(net, x, config)
        _finite(report)
        assert np.all(report.sources["fc1.W"].error == 0)
        assert np.all(report.sources["fc1.b"].error == 0)
        assert np.isfinite(report.mse)


@pytest.mark.parametrize("batch, tokens", [(1, 1), (1, 4), (3, 1)])
def test_single_token_and_batch_of_one(batch, tokens, rng):
    net = ep.transformer(8, 2, 16, 2, seed=1)
    x = rng.standard_normal((batch, tokens, 8))
    report = ep.analyze(net, x, W8)
    _finite(report)
    assert report.std.shape == (batch, tokens, 8)
    mc = ep.monte_carlo(net, x, W8, samples=30, seed=1, quantiles=())
    assert mc.mean.shape == (batch, tokens, 8)
    # a single token attends only to itself: attention is exactly its value/output path
    if tokens == 1:
        att = net["block0.attn"]
        h = net["block0.ln1"].forward(x)
        P = att.params
        v = h @ P["Wv"].T + P.get("bv", 0.0)
        np.testing.assert_allclose(att.forward(h), v @ P["Wo"].T + P.get("bo", 0.0),
                                   atol=1e-12)


def test_sixteen_bits_in_float32_monte_carlo_is_refused_with_a_reason(rng):
    """16-bit steps are ~1e-5 of the range, within 100x of float32's resolution: float32
    Monte Carlo warns (naming the sources) instead of silently polluting the error."""
    net = ep.mlp([16, 32, 8], "gelu", seed=2)
    x = rng.standard_normal((32, 16))
    config = ep.QuantConfig(weights=ep.Uniform(16, granularity="channel"))
    with pytest.warns(UserWarning, match="fc1.W.*float64"):
        ep.monte_carlo(net, x, config, samples=20, seed=3, dtype=np.float32, quantiles=())
    b = ep.monte_carlo(net, x, config, samples=400, seed=3, quantiles=())
    assert ep.analyze(net, x, config).mse == pytest.approx(b.mse, rel=0.2)


def test_nan_and_inf_inputs_are_refused_by_name(rng):
    net = ep.mlp([3, 4, 2], seed=0)
    x = rng.standard_normal((2, 3))
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN/Inf"):
        ep.analyze(net, x, W8)
    with pytest.raises(ValueError, match="NaN/Inf"):
        ep.monte_carlo(net, x, W8, samples=4)
    with pytest.raises(ValueError, match="'W'"):
        ep.Linear(np.array([[1.0, np.inf]]))


def test_overflowing_network_names_the_node(rng):
    net = ep.Sequential([ep.Linear(np.full((2, 2), 1e200)), ep.Linear(np.full((2, 2), 1e200))])
    x = rng.standard_normal((1, 2))
    with pytest.raises(ValueError, match="node 'fc2'"):
        ep.analyze(net, x, ep.QuantConfig(input=ep.Uniform(8)))
    with pytest.raises(ValueError, match="'fc1.W'.*overflows"):  # the step itself
        ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(8)))


# ------------------------------------------------------------- huge and tiny rows (B6)
from decimal import Decimal, localcontext  # noqa: E402

from errprop.testing import check_rule  # noqa: E402

SCALES = [1e160, 1e300, 1e-300]


def _decimal_norm(x, gamma, beta, eps, kind):
    """The normalization of one float row in decimal arithmetic with enough digits (1100)
    that every float and every sum of them is exact (no overflow, no rounded mean)."""
    with localcontext() as ctx:
        ctx.prec = 1100
        xs = [Decimal(float(v)) for v in x]
        d = Decimal(len(xs))
        if kind == "layernorm":
            mu = sum(xs) / d
            xs = [v - mu for v in xs]
        sq = sum(v * v for v in xs)
        if kind == "l2":
            root = max(sq.sqrt(), Decimal(eps))
            return np.array([float(v / root) for v in xs])
        root = (sq / d + Decimal(eps)).sqrt()
        return np.array([float(Decimal(float(g)) * v / root + Decimal(float(b)))
                         for v, g, b in zip(xs, gamma, beta)])


def _norm_ops(rng, d=6):
    gamma, beta = rng.uniform(0.5, 1.5, d), rng.standard_normal(d)
    return {"layernorm": (ep.LayerNorm(gamma, beta), gamma, beta, 1e-5),
            "rmsnorm": (ep.RMSNorm(gamma), gamma, np.zeros(d), 1e-6),
            "l2": (ep.L2Normalize(), None, None, 1e-12)}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm", "l2"])
def test_norms_of_huge_and_tiny_rows_match_a_decimal_reference(kind, scale, rng):
    """Before the fix x*x overflowed from 1.3e154: LayerNorm returned beta, RMSNorm and
    L2Normalize 0, with no error; at 1e-300 the rows are dominated by eps (or divided by
    it, L2Normalize) exactly as the formula says."""
    op, gamma, beta, eps = _norm_ops(rng)[kind]
    x = scale * rng.standard_normal((4, 6))
    x[1] = 3.0 * scale  # a constant row: zero variance
    y = op.forward(x)
    d = x.shape[-1]
    g = gamma if gamma is not None else np.ones(d)
    b = beta if beta is not None else np.zeros(d)
    want = np.stack([_decimal_norm(row, g, b, eps, kind) for row in x])
    np.testing.assert_allclose(y, want, rtol=1e-13, atol=1e-300)
    # a whole network: the same numbers, and the per-node checks stay quiet
    net = ep.Sequential([op])
    np.testing.assert_allclose(net(x), want, rtol=1e-13, atol=1e-300)


class _Prescaled(ep.Op):
    """``op(c·x)``: ``check_rule`` of this op checks ``op``'s rules at the huge or tiny
    input ``c·x`` with tangents ``c·Δx`` (finite differences of unit-size inputs)."""

    def __init__(self, op, c):
        super().__init__()
        self.op, self.c = op, c
        self.params, self.param_kinds = op.params, op.param_kinds

    def _s(self, a):
        return None if a is None else self.c * a

    def forward(self, x, params=None):
        return self.op.forward(self.c * x, params)

    def jvp(self, x, y, dx, dparams):
        return self.op.jvp(self.c * x, y, self._s(dx), dparams)

    def vjp(self, x, y, g, params=()):
        gx, gp = self.op.vjp(self.c * x, y, g, params)
        return self.c * gx, gp

    def jvp2(self, x, y, a, b, dparams):
        return self.op.jvp2(self.c * x, y, self._s(a), self._s(b), dparams)

    def abs_jvp(self, x, y, r, rparams):
        return self.op.abs_jvp(self.c * x, y, self._s(r), rparams)

    def norm_jvp(self, x, y, r, rparams):
        return self.op.norm_jvp(self.c * x, y, self._s(r), rparams)


@pytest.mark.parametrize("scale", [1e160, 1e300])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm", "l2"])
def test_norm_rules_at_huge_inputs(kind, scale, rng):
    """Every rule (jvp, vjp, jvp2, abs, norm) at inputs near 1e300, against finite
    differences of the forward; before the fix the forward was constant there."""
    op = _norm_ops(rng)[kind][0]
    x = rng.standard_normal((3, 6))
    check_rule(_Prescaled(op, scale), x)
    # the rules see the same x̂ as at scale 1: J(c·x)·(c·Δx) = J(x)·Δx up to eps/c²
    dx = rng.standard_normal(x.shape)
    unit = type(op)(**op.params, **{**op.config(), "eps": op.eps * 1e-200})
    np.testing.assert_allclose(op.jvp(scale * x, op.forward(scale * x), scale * dx, {}),
                               unit.jvp(x, unit.forward(x), dx, {}), rtol=1e-12)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_tiny_rows_have_the_eps_gain(kind, rng):
    """At 1e-300 the variance is far below eps: Δy = γ ⊙ P Δx / sqrt(eps) (P the centring
    for LayerNorm, the identity for RMSNorm), finite, and flagged as flat."""
    op, gamma, _, eps = _norm_ops(rng)[kind]
    x = 1e-300 * rng.standard_normal((3, 6))
    dx = rng.standard_normal(x.shape)
    centred = dx - dx.mean(axis=-1, keepdims=True) if kind == "layernorm" else dx
    np.testing.assert_allclose(op.jvp(x, op.forward(x), dx, {}),
                               gamma * centred / np.sqrt(eps), rtol=1e-12)
    assert op.diagnose(x, op.forward(x), dx) == {"flat_norm": 1.0}


def test_rmsnorm_of_a_zero_row_is_flagged_and_finite(rng):
    """The convention at zero: y = 0, the derivative γ Δx / sqrt(eps) (the exact
    derivative of the eps-regularised map), and the row is reported as flat."""
    gamma = rng.uniform(0.5, 1.5, 5)
    net = ep.Sequential([ep.Linear(np.zeros((5, 5))), ep.RMSNorm(gamma)])
    x = rng.standard_normal((2, 5))
    report = ep.analyze(net, x, ep.QuantConfig(activations=ep.Uniform(8)))
    _finite(report)
    assert report.nodes["rms1"].diagnostics["flat_norm"] == 1.0
    op = net["rms1"]
    dx = rng.standard_normal((2, 5))
    np.testing.assert_allclose(op.jvp(np.zeros((2, 5)), np.zeros((2, 5)), dx, {}),
                               gamma * dx / np.sqrt(op.eps), rtol=1e-14)


@pytest.mark.parametrize("scale", SCALES)
def test_softmax_of_huge_and_tiny_logits(scale, rng):
    """Max-subtracted: one-hot rows at 1e160 and 1e300 (the gaps are ≫ 745), uniform rows
    at 1e-300 (exp of 1e-300 is 1 in float64)."""
    x = scale * rng.standard_normal((3, 7))
    y = ep.Softmax().forward(x)
    if scale > 1:
        want = np.eye(7)[np.argmax(x, axis=-1)]
    else:
        want = np.full((3, 7), 1 / 7)
    np.testing.assert_allclose(y, want, rtol=1e-15, atol=0)
    assert np.all(np.isfinite(ep.Softmax().jvp(x, y, rng.standard_normal(x.shape), {})))


@pytest.mark.parametrize("kind", sorted(ep.ACTIVATIONS))
def test_activations_at_huge_inputs_have_their_limits(kind):
    """|x| = 1e200: every activation has reached its asymptote; before the fix x², x³
    overflowed inside GELU's derivatives (0 · inf = NaN, a RuntimeWarning)."""
    x = np.array([[1e200, -1e200, 1e300, -1e300]])
    op = ep.Activation(kind)
    y = op.forward(x)
    limits = {"relu": (np.maximum(x, 0), x > 0), "gelu": (np.maximum(x, 0), x > 0),
              "gelu_tanh": (np.maximum(x, 0), x > 0), "silu": (np.maximum(x, 0), x > 0),
              "tanh": (np.sign(x), 0 * x), "sigmoid": (1.0 * (x > 0), 0 * x),
              "identity": (x, 1 + 0 * x)}
    f, d1 = limits[kind]
    ones = np.ones_like(x)
    np.testing.assert_array_equal(y, f)
    np.testing.assert_array_equal(op.jvp(x, y, ones, {}), 1.0 * d1)
    np.testing.assert_array_equal(op.jvp2(x, y, ones, None, {}), 0 * x)

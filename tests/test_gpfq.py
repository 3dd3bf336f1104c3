"""GPFQ / SPFQ: the vectorized path following against a plain loop written here, the
over-parametrization slope (Zhang & Saab 2023), and their use inside QuantConfig
(analyze and monte_carlo apply exactly the stored matrices)."""

import numpy as np
import pytest

import errprop
from errprop import Fixed, QuantConfig, Uniform


def reference_gpfq(W, X, Xt, bits, step, uniforms=None):
    """Neuron by neuron, coordinate by coordinate, in Python scalars and loops.

    ``step``: one float per row. ``uniforms[a][t]``: SPFQ's dither, or None for GPFQ.
    """
    K = 2 ** (bits - 1) - 1
    out, N = len(W), len(W[0])
    m = len(X)
    Q = [[0.0] * N for _ in range(out)]
    for a in range(out):
        d = step[a]
        u = [0.0] * m
        for t in range(N):
            col = [X[i][t] for i in range(m)]
            colt = [Xt[i][t] for i in range(m)]
            v = [u[i] + W[a][t] * col[i] for i in range(m)]
            norm = sum(c * c for c in colt)
            z = sum(colt[i] * v[i] for i in range(m)) / norm if norm > 0 else W[a][t]
            r = z / d
            if uniforms is None:
                k = float(round(r))  # Python rounds half to even
            else:
                k = float(np.floor(r + uniforms[a][t]))
            k = min(max(k, -K), K)
            Q[a][t] = k * d
            u = [v[i] - Q[a][t] * colt[i] for i in range(m)]
    return np.array(Q)


def _layer(rng, out, n, m):
    return rng.standard_normal((out, n)), rng.standard_normal((m, n))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_gpfq_equals_plain_loop(bits, granularity):
    rng = np.random.default_rng(bits)
    W, X = _layer(rng, 5, 17, 6)
    Xt = X + 0.1 * rng.standard_normal(X.shape)
    Xt[:, 3] = 0.0  # a dead input of the quantized network
    Q = errprop.gpfq(W, X, bits, X_tilde=Xt, granularity=granularity)
    K = 2 ** (bits - 1) - 1
    amax = np.abs(W).max(axis=1) if granularity == "channel" else np.full(5, np.abs(W).max())
    ref = reference_gpfq(W.tolist(), X.tolist(), Xt.tolist(), bits, (amax / K).tolist())
    np.testing.assert_array_equal(Q, ref)


def test_spfq_equals_plain_loop_with_the_same_draws():
    rng = np.random.default_rng(7)
    W, X = _layer(rng, 4, 13, 5)
    Q = errprop.spfq(W, X, 3, seed=11)
    # the documented order: one uniform per neuron, drawn per input coordinate
    u = np.random.default_rng(11).random((13, 4)).T
    step = np.abs(W).max(axis=1) / 3
    ref = reference_gpfq(W.tolist(), X.tolist(), X.tolist(), 3, step.tolist(), u.tolist())
    np.testing.assert_array_equal(Q, ref)


def test_spfq_is_reproducible_and_random():
    rng = np.random.default_rng(1)
    W, X = _layer(rng, 8, 64, 16)
    a, b = errprop.spfq(W, X, 4, seed=3), errprop.spfq(W, X, 4, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, errprop.spfq(W, X, 4, seed=4))
    step = np.abs(W).max(axis=1, keepdims=True) / 7
    k = a / step
    np.testing.assert_allclose(k, np.rint(k), atol=1e-12)
    assert np.abs(np.rint(k)).max() <= 7


def _rel(X, W, Q):
    Y = X @ W.T
    return float(np.sum((Y - X @ Q.T) ** 2) / np.sum(Y ** 2))


@pytest.mark.parametrize("bits", [3, 4])
def test_gpfq_beats_round_to_nearest_when_overparametrized(bits):
    rng = np.random.default_rng(2)
    W, X = _layer(rng, 32, 512, 32)
    rtn = _rel(X, W, Uniform(bits, granularity="channel").quantize(W))
    g = _rel(X, W, errprop.gpfq(W, X, bits))
    s = _rel(X, W, errprop.spfq(W, X, bits, seed=0))
    assert g < rtn / 4 and s < rtn / 2


def test_overparametrization_slope():
    """Relative squared output error vs N/m in log-log: about -1 for GPFQ and SPFQ
    (Zhang & Saab 2023, Gaussian weights, an alphabet wide enough not to saturate),
    about 0 for round-to-nearest on the same grid."""
    rng = np.random.default_rng(0)
    m, step = 32, 0.5  # fixed step δ = σ_w / 2; 8 bits: ±127 δ never saturates
    ratios = np.array([2, 4, 8, 16, 32])
    errs = {"rtn": [], "gpfq": [], "spfq": []}
    for r in ratios:
        W, X = _layer(rng, 32, m * r, m)
        errs["rtn"].append(_rel(X, W, np.clip(np.rint(W / step), -127, 127) * step))
        errs["gpfq"].append(_rel(X, W, errprop.gpfq(W, X, 8, step=step)))
        errs["spfq"].append(_rel(X, W, errprop.spfq(W, X, 8, step=step, seed=int(r))))
    slope = {k: np.polyfit(np.log(ratios), np.log(v), 1)[0] for k, v in errs.items()}
    assert -1.3 < slope["gpfq"] < -0.7
    assert -1.3 < slope["spfq"] < -0.7
    assert abs(slope["rtn"]) < 0.15


def test_errors_are_clear():
    W = np.ones((3, 4))
    with pytest.raises(ValueError, match="samples, in"):
        errprop.gpfq(W, np.ones((5, 3)), 4)
    with pytest.raises(ValueError, match="bits"):
        errprop.gpfq(W, np.ones((5, 4)), 1)
    with pytest.raises(ValueError, match="X_tilde"):
        errprop.gpfq(W, np.ones((5, 4)), 4, X_tilde=np.ones((4, 4)))
    with pytest.raises(ValueError, match="shape"):
        Fixed(W).fit(np.ones((4, 3)))


# ---------------------------------------------------------------- inside QuantConfig
def _net(seed=0):
    return errprop.mlp([12, 48, 24, 5], activation="tanh", seed=seed)


def _fake_quant(net, x, matrices):
    """The quantized network by hand: every Linear with its stored matrix."""
    h = x
    for name, op in net.layers():
        params = dict(op.params)
        if name in matrices:
            params["W"] = matrices[name]
        h = op.forward(h, params)
    return h


@pytest.mark.parametrize("method", ["gpfq", "spfq"])
def test_gpfq_config_analyze_reproduces_the_matrices(method):
    net = _net()
    x = np.random.default_rng(5).standard_normal((64, 12))
    cfg = errprop.gpfq_config(net, x, 3, method=method, seed=1)
    rep = errprop.analyze(net, x, cfg)
    matrices = {name: spec["weights"].values for name, spec in cfg.overrides.items()}
    assert sorted(matrices) == sorted(n for n, op in net.layers() if isinstance(op, errprop.Linear))
    expected = _fake_quant(net, x, matrices) - net(x)
    np.testing.assert_allclose(rep.exact, expected, rtol=0, atol=1e-13)
    for name, Q in matrices.items():
        src = rep.sources[f"{name}.W"]
        W = dict(net.layers())[name].params["W"]
        np.testing.assert_array_equal(src.error, Q - W)
        np.testing.assert_array_equal(src.model.mean, Q - W)
        assert not src.model.var.any() and not src.model.width.any()
    # layer-by-layer path following beats round-to-nearest on the same grid
    rtn = errprop.analyze(net, x, QuantConfig(weights=Uniform(3, granularity="channel")))
    assert np.mean(rep.exact ** 2) < np.mean(rtn.exact ** 2)


def test_gpfq_config_follows_the_quantized_network():
    net = _net(1)
    x = np.random.default_rng(6).standard_normal((40, 12))
    cfg = errprop.gpfq_config(net, x, 4)
    first = cfg.overrides["fc1"]["weights"].values
    np.testing.assert_array_equal(first, errprop.gpfq(net.layers()[0][1].params["W"], x, 4))
    # fc2 sees the float input X and the input X̃ of the network with fc1 quantized
    ops = dict(net.layers())
    X = ops["tanh1"].forward(ops["fc1"].forward(x))
    Xt = ops["tanh1"].forward(ops["fc1"].forward(x, {"W": first}))
    np.testing.assert_array_equal(cfg.overrides["fc2"]["weights"].values,
                                  errprop.gpfq(ops["fc2"].params["W"], X, 4, X_tilde=Xt))


@pytest.mark.parametrize("mode", ["noise", "quantize"])
def test_monte_carlo_returns_the_deterministic_error(mode):
    net = _net(2)
    x = np.random.default_rng(8).standard_normal((16, 12))
    cfg = errprop.gpfq_config(net, x, 3)
    exact = errprop.analyze(net, x, cfg).exact
    mc = errprop.monte_carlo(net, x, cfg, samples=8, seed=0, mode=mode)
    np.testing.assert_allclose(mc.mean, exact, rtol=0, atol=1e-12)
    np.testing.assert_allclose(mc.std, 0.0, atol=1e-12)


def test_monte_carlo_mixes_fixed_and_uniform_sources():
    """Fixed weights plus 8-bit activations: the Fixed source adds no variance, so the
    spread is the activations' alone and the mean moves by the fixed error."""
    net = _net(3)
    x = np.random.default_rng(9).standard_normal((16, 12))
    act = QuantConfig(activations=Uniform(8))
    cfg = errprop.gpfq_config(net, x, 3, base=act)
    both = errprop.monte_carlo(net, x, cfg, samples=200, seed=1)
    only_act = errprop.monte_carlo(net, x, act, samples=200, seed=1)
    fixed = errprop.analyze(net, x, errprop.gpfq_config(net, x, 3)).exact
    assert both.std.max() > 0
    # the variance over 80 elements x 200 samples: a few % sampling error; the 3-bit
    # weights change the network's gain a little
    assert 0.8 < np.mean(both.std ** 2) / np.mean(only_act.std ** 2) < 1.25
    assert np.abs(both.mean - fixed).max() < 0.1 * np.abs(fixed).max()

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

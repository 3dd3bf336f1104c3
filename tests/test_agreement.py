"""Analytic first-order statistics against Monte Carlo of the real nonlinear network.

At 8 bits first order holds: the analytic output MSE (exact reverse mode) must lie in
Monte Carlo's 99% interval, per-element std within the sampling tolerance, and the
probe estimate at hidden nodes within the combined error bars. At 3 bits it breaks
down and the comparison must flag nodes.
"""

import numpy as np
import pytest

import errprop as ep

CASES = {
    "mlp": (lambda: ep.mlp([16] + [64] * 6 + [8], "tanh", seed=0), (64, 16)),
    "transformer": (lambda: ep.transformer(16, 2, 32, 2, seed=0), (4, 6, 16)),
}
CONFIGS = {
    "W8": lambda: ep.QuantConfig(weights=ep.Uniform(8, granularity="channel")),
    "W8A8": lambda: ep.QuantConfig(weights=ep.Uniform(8, granularity="channel"),
                                   activations=ep.Uniform(8)),
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("case", CASES)
def test_analytic_inside_monte_carlo_interval(case, config):
    make, shape = CASES[case]
    net, cfg = make(), CONFIGS[config]()
    x = np.random.default_rng(5).standard_normal(shape)
    r = ep.analyze(net, x, cfg)
    S = 1500
    mc = ep.monte_carlo(net, x, cfg, samples=S, seed=11)
    lo, hi = mc.mse_ci
    assert lo <= r.mse <= hi, (r.mse, mc.mse_ci)
    # per element: the sample std of S draws has relative standard error ~ 1/sqrt(2S)
    ratio = mc.std / r.std
    assert np.all(np.abs(ratio - 1) < 5 / np.sqrt(2 * S) + 0.02), np.abs(ratio - 1).max()
    comparison = r.compare(mc, probes=200)
    assert comparison.flagged == [], comparison.table()


def test_breakdown_is_flagged_at_3_bits():
    make, shape = CASES["transformer"]
    net = make()
    x = 3.0 * np.random.default_rng(5).standard_normal(shape)
    cfg = ep.QuantConfig(weights=ep.Uniform(3), activations=ep.Uniform(3))
    r = ep.analyze(net, x, cfg)
    mc = ep.monte_carlo(net, x, cfg, samples=400, seed=11)
    comparison = r.compare(mc)
    assert comparison.flagged, comparison.table()
    assert any("2nd-order" in note for row in comparison.rows for note in row.notes)


def test_compare_without_monte_carlo_notes_kinks_and_saturation():
    net = ep.mlp([16, 64, 64, 4], "relu", seed=0)
    x = np.random.default_rng(0).standard_normal((32, 16))
    r = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(3)))
    comparison = r.compare(probes=16)
    assert [row.name for row in comparison.rows] == list(r.nodes)
    relu = next(row for row in comparison.rows if row.name == "relu1")
    assert any(note.startswith("near kink") for note in relu.notes)
    # the near-kink fraction is the share of ReLU inputs within one error of 0
    fc1 = r.node("fc1")
    expected = np.mean(np.abs(fc1.value) <= np.abs(fc1.first_order))
    assert r.node("relu1").diagnostics["near_kink"] == pytest.approx(expected)
    assert "Monte Carlo" not in comparison.table()
    # a saturated softmax is noted: the share of rows whose top probability > 0.99
    logits = np.random.default_rng(1).standard_normal((40, 6)) * np.linspace(0.1, 20, 40)[:, None]
    net = ep.Sequential([ep.Linear(np.eye(6)), ep.Softmax()])
    rs = ep.analyze(net, logits, ep.QuantConfig(weights=ep.Uniform(8)))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    share = np.mean(p.max(1) > 0.99)
    assert 0.1 < share < 0.9
    assert rs.node("softmax1").diagnostics["saturated"] == pytest.approx(share)
    assert any(n.startswith("saturated") for n in rs.compare(probes=8).rows[-1].notes)

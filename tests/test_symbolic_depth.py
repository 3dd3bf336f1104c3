"""The depth-scaling predictor on constructed coherent and independent residual streams."""

import numpy as np
import pytest

import errprop as ep
import errprop.symbolic as es


def _stream(depth, width, coherent, seed=0, scale=0.05):
    rng = np.random.default_rng(seed)

    def draw():
        return scale * rng.standard_normal((width, width)) / np.sqrt(width)

    A = draw()
    return ep.Sequential([ep.Residual(ep.LayerNorm(np.ones(width), np.zeros(width)),
                                      ep.Linear(A.copy() if coherent else draw()))
                          for _ in range(depth)])


@pytest.mark.parametrize("coherent, regime, slope", [(True, "coherent", 2.0),
                                                     (False, "independent", 1.0)])
def test_predictor_names_the_regime_and_the_measured_slope_agrees(coherent, regime, slope):
    x = np.random.default_rng(1).standard_normal((64, 48))
    report = ep.analyze(_stream(16, 48, coherent), x, ep.QuantConfig(weights=ep.Uniform(6)))
    acc = es.accumulation(report)
    assert acc.regime == regime and acc.terms == 16
    assert abs(acc.exponent - slope) < 0.15, acc
    mse = [np.mean(n.exact ** 2) for n in report.nodes.values() if n.kind == "Residual"]
    measured = es.depth_exponent(np.arange(1, 17), np.array(mse))
    assert abs(measured - slope) < 0.15, measured
    assert "regime" not in str(acc) and regime in str(acc)


def test_coherence_is_the_energy_ratio_and_needs_two_layers():
    rng = np.random.default_rng(5)
    net = ep.Sequential([ep.Residual(ep.Linear(0.1 * rng.standard_normal((3, 3)))),
                         ep.Residual(ep.Linear(0.1 * rng.standard_normal((3, 3))))])
    x = rng.standard_normal((4, 3))
    report = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(2)))
    acc = es.accumulation(report)
    assert acc.coherence == pytest.approx(
        float(np.sum(report.first_order ** 2)) / sum(acc.groups.values()))
    with pytest.raises(ValueError, match="at least two"):
        es.accumulation(ep.analyze(ep.Sequential([ep.Linear(rng.standard_normal((3, 3)))]), x,
                                   ep.QuantConfig(weights=ep.Uniform(2))))

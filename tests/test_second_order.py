"""Taylor-mode second order: it corrects first order where first order leaves its range.

References: the exact fake-quant error, and for a single linear layer the closed form
(exact error = first order + the cross term Δx·ΔWᵀ, so second order is exact there).
"""

import numpy as np
import pytest

import errprop as ep


def test_single_linear_layer_second_order_is_exact(rng):
    net = ep.Sequential([ep.Linear(rng.standard_normal((6, 9)), rng.standard_normal(6))])
    x = rng.standard_normal((4, 9))
    q = ep.Uniform(3)
    r = ep.analyze(net, x, ep.QuantConfig(weights=q, biases=q, input=q))
    assert r.residual > 1e-3  # first order misses the cross term ...
    np.testing.assert_allclose(r.second_order, r.exact, rtol=1e-11, atol=1e-14)  # ... not 2nd


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_transformer_at_4_bits_per_channel(norm):
    # the target: at 4-bit per-channel weights, second order's residual is at least 3x
    # smaller than first order's
    net = ep.transformer(64, 4, 256, 2, norm=norm, seed=0)
    x = np.random.default_rng(0).standard_normal((8, 16, 64))
    r = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(4, granularity="channel"),
                                          biases=ep.Uniform(8), norms=ep.Uniform(8)))
    assert r.second_order_residual < r.residual / 3, (r.residual, r.second_order_residual)


def test_second_order_residual_is_order_step_squared():
    net = ep.mlp([32] + [256] * 8 + [10], "tanh", seed=0)
    x = np.random.default_rng(100).standard_normal((256, 32))
    bits = np.arange(6, 11)
    res = [ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(int(b)))).second_order_residual
           for b in bits]
    factor = 2.0 ** -np.polyfit(bits, np.log2(res), 1)[0]
    assert 3.0 < factor < 5.5, (factor, res)


def test_second_order_does_not_fix_relu_kinks():
    # units that flip sign are not described by any derivative: the O(√step) residual stays
    net = ep.mlp([32] + [256] * 8 + [10], "relu", seed=0)
    x = np.random.default_rng(100).standard_normal((256, 32))
    r = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(8)))
    assert r.second_order_residual > 0.8 * r.residual


def test_every_node_has_a_second_order_prediction(rng):
    net = ep.transformer(8, 2, 16, 2, seed=0)
    x = rng.standard_normal((2, 3, 8))
    r = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(6), activations=ep.Uniform(8),
                                          input=ep.Uniform(8)))
    assert list(r.second_order_nodes) == list(r.nodes)
    for name, pred in r.second_order_nodes.items():
        assert pred.shape == r.node(name).exact.shape

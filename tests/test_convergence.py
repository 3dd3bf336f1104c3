"""First order converges to the exact error: O(step) through smooth ops, O(√step) through ReLU.

Weight-only quantization errors are deterministic, so the relative residual
‖exact − first_order‖/‖exact‖ must shrink ~2× per extra bit over 6..12 bits
when every op is smooth (tanh, GELU, SiLU, sigmoid, softmax, LayerNorm) and only
~√2 ≈ 1.4× per bit through ReLU, where units within one error of 0 flip.
The exact error is an independent fake-quant forward of the float ops.
"""

import numpy as np
import pytest

import errprop as ep

BITS = range(6, 13)


def _mlp(act, seed):
    net = ep.mlp([32] + [256] * 8 + [10], act, seed=seed)
    x = np.random.default_rng(seed + 100).standard_normal((256, 32))
    return net, x


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("act", ["tanh", "gelu", "silu", "sigmoid", "gelu_tanh"])
def test_smooth_mlp_residual_is_order_step(act, seed):
    study = ep.convergence(*_mlp(act, seed), BITS)
    assert 1.75 < study.factor_per_bit < 2.35, study.markdown()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_relu_mlp_residual_is_order_sqrt_step(seed):
    study = ep.convergence(*_mlp("relu", seed), BITS)
    assert 1.25 < study.factor_per_bit < 1.6, study.markdown()


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_transformer_residual_is_order_step(norm, granularity):
    net = ep.transformer(64, 4, 256, 2, norm=norm, seed=3)
    x = np.random.default_rng(7).standard_normal((8, 16, 64))
    study = ep.convergence(net, x, BITS, config=lambda b: ep.QuantConfig(
        weights=ep.Uniform(b, granularity=granularity), biases=ep.Uniform(b),
        norms=ep.Uniform(b)))
    assert 1.8 < study.factor_per_bit < 2.25, study.markdown()


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_rms_agrees_better_than_vectors(act):
    study = ep.convergence(*_mlp(act, 0), BITS)
    for row in study.rows:
        assert row.rms_residual < 0.5 * row.residual, study.markdown()


def test_activation_noise_matches_in_rms_not_pointwise():
    # Activation rounding is noise: first order gets the error's size right but
    # is not a pointwise prediction. Check the size statistically (large batch).
    net, x = _mlp("gelu", 0)
    r = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(8), activations=ep.Uniform(8)))
    rms_e = np.sqrt(np.mean(r.exact ** 2))
    rms_f = np.sqrt(np.mean(r.first_order ** 2))
    assert abs(rms_f - rms_e) / rms_e < 0.1


def test_single_linear_layer_first_order_is_exact(rng):
    # y = x Wᵀ + b is affine in (W, b): first order has no neglected term
    W, b = rng.standard_normal((7, 5)), rng.standard_normal(7)
    net = ep.Sequential([ep.Linear(W, b)])
    x = rng.standard_normal((11, 5))
    r = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(3), biases=ep.Uniform(3)))
    np.testing.assert_allclose(r.first_order, r.exact, rtol=1e-12, atol=1e-14)


def test_neglected_term_is_the_cross_term(rng):
    # with weight and input quantization, exact − first_order = Δx ΔWᵀ exactly
    W = rng.standard_normal((6, 9))
    net = ep.Sequential([ep.Linear(W)])
    x = rng.standard_normal((4, 9))
    q = ep.Uniform(4)
    r = ep.analyze(net, x, ep.QuantConfig(weights=q, input=q))
    dW = r.sources["fc1.W"].error
    dx = r.sources["input"].error
    np.testing.assert_allclose(r.exact - r.first_order, dx @ dW.T, rtol=1e-10, atol=1e-14)

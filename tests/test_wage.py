"""WAGE-style training arithmetic: the quantized backward pass, analytic vs Monte Carlo."""

import numpy as np
import pytest

import errprop as ep


def _wage_q(x, bits):
    """WAGE's Q(x, k) on x / Shift(max|x|), scaled back (Wu et al. 2018), written here."""
    sigma = 2.0 ** (1 - bits)
    shift = 2.0 ** np.round(np.log2(np.max(np.abs(x))))
    u = x / shift
    return shift * np.clip(sigma * np.round(u / sigma), -1 + sigma, 1 - sigma)


def _data(seed=0, batch=32, n_in=6, n_out=4):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, n_in)), rng.standard_normal((batch, n_out))


def test_shift_quantizer_is_wage_q():
    rng = np.random.default_rng(1)
    for bits in (2, 4, 8):
        for scale in (0.013, 0.7, 3.0, 5.9):  # max|x| below and above the √2 boundary
            x = rng.uniform(-scale, scale, (50, 7))
            q = ep.ShiftQuantizer(bits, rounding="nearest")
            np.testing.assert_array_equal(q.quantize(x), _wage_q(x, bits))


def test_single_layer_closed_form():
    """One Linear, MSE loss, float forward: Var ΔG_ij = Σ_n x_nj² p(1-p)s_E² + p_G(1-p_G)s_G²."""
    x, t = _data()
    rng = np.random.default_rng(2)
    W, b = rng.standard_normal((4, 6)) * 0.5, rng.standard_normal(4) * 0.1
    net = ep.Sequential([ep.Linear(W, b)])
    config = ep.WAGE(bits_w=None, bits_a=None, bits_g=6, bits_e=5, shift="ceil")
    res = ep.gradient_error(net, x, t, config, samples=0, smooth=False)

    def frac_var(v, bits):
        s = 2.0 ** (1 - bits) * 2.0 ** np.ceil(np.log2(np.max(np.abs(v))))
        p = v / s - np.floor(v / s)
        return p * (1 - p) * s * s

    e = 2 * (x @ W.T + b - t) / t.size
    G = e.T @ x
    expected = frac_var(e, 5).T @ (x * x) + frac_var(G, 6)
    np.testing.assert_allclose(res.gradient["fc1"], G, rtol=1e-12)
    np.testing.assert_allclose(res.var["fc1"], expected, rtol=1e-10)
    np.testing.assert_array_equal(res.mean["fc1"], 0.0)
    # Monte Carlo: Q_G rounds a G that E's noise has moved (p_G spreads, the variance
    # averaged over that move is smooth=True's); then the per-element variances agree
    mc = ep.gradient_error(net, x, t, config, samples=2000, seed=3)
    ratio = mc.mc_var["fc1"] / mc.var["fc1"]
    assert abs(np.mean(ratio) - 1) < 0.03, np.mean(ratio)
    assert mc.rows[0].inside


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_mlp_analytic_inside_monte_carlo_interval(loss):
    x, t = _data()
    if loss == "cross_entropy":
        t = np.random.default_rng(5).integers(0, 4, len(x))
    net = ep.mlp([6, 16, 12, 4], "tanh", seed=0)
    res = ep.gradient_error(net, x, t, ep.WAGE(shift="ceil"), loss=loss, samples=600, seed=1)
    for row in res.rows:
        assert not row.scale_flip and row.clipped == 0
        assert row.inside, res.table()
        assert row.relative_analytic < 0.05


def test_mlp_with_weight_errors_in_the_reference():
    """reference='float_operands': e ΔW and eᵀΔa enter as a deterministic mean; 2-bit weights."""
    x, t = _data(batch=24)
    net = ep.mlp([6, 16, 12, 4], "tanh", seed=0)
    res = ep.gradient_error(net, x, t, ep.WAGE(bits_w=3), samples=600, seed=4,
                            reference="float_operands")
    for row in res.rows:
        assert row.inside, res.table()
    # the mean gradient error (weights in the transposed products) is predicted per element
    for name in res.mean:
        se = np.sqrt(res.mc_var[name] / res.samples)
        scale = np.sqrt(np.mean(res.mean[name] ** 2))
        assert np.sqrt(np.mean((res.mc_mean[name] - res.mean[name]) ** 2)) < \
            0.05 * scale + 4 * np.sqrt(np.mean(se ** 2))


def test_stochastic_rounding_is_unbiased():
    """Mean gradient error ≈ 0 by Monte Carlo: its mean square is the variance of a mean."""
    x, t = _data()
    net = ep.mlp([6, 16, 12, 4], "relu", seed=2)
    S = 800
    res = ep.gradient_error(net, x, t, ep.WAGE(bits_e=6, bits_g=6, shift="ceil"),
                            samples=S, seed=7)
    for row in res.rows:
        name = row.layer
        live = res.mc_var[name] > 0
        z2 = res.mc_mean[name][live] ** 2 / (res.mc_var[name][live] / S)
        # z² of unbiased means is chi-square(1): mean 1, sd sqrt(2/n)
        assert abs(np.mean(z2) - 1) < 5 * np.sqrt(2 / z2.size), (name, np.mean(z2))
    floor = ep.gradient_error(net, x, t, ep.WAGE(bits_e=6, bits_g=6, shift="ceil",
                                                 rounding_e="floor", rounding_g="floor"),
                              samples=50, seed=7)
    assert all(r.bias_mc > 0.3 * r.mse_mc for r in floor.rows)
    # and the analytic model carries the floor bias
    assert all(r.bias_analytic > 0.3 * r.mse_analytic for r in floor.rows)


def test_smoothed_variance_against_sampling():
    rng = np.random.default_rng(0)
    for p, sigma in [(0.3, 0.0), (0.02, 0.1), (0.7, 0.5), (0.5, 2.0), (0.1, 4.0)]:
        w = p + rng.normal(0, sigma, 400_000)
        fr = w - np.floor(w)
        got = float(ep.smoothed_sr_variance(p, sigma))
        assert got == pytest.approx(np.mean(fr * (1 - fr)), abs=2e-3)


def test_errors():
    x, t = _data()
    net = ep.transformer(d_model=8, heads=2, d_ff=16, blocks=1, seed=0)
    with pytest.raises(ValueError, match="MLP"):
        ep.gradient_error(net, np.zeros((2, 3, 8)), np.zeros((2, 3, 8)))
    mlp = ep.mlp([6, 8, 4], seed=0)
    with pytest.raises(ValueError, match="target"):
        ep.gradient_error(mlp, x, t[:, :3])
    with pytest.raises(ValueError, match="class indices"):
        ep.gradient_error(mlp, x, np.full(len(x), 7), loss="cross_entropy")
    with pytest.raises(ValueError, match="bits_e"):
        ep.WAGE(bits_e=1)
    with pytest.raises(ValueError, match="samples"):
        ep.gradient_error(mlp, x, t, samples=1)

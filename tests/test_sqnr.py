"""Published facts about uniform quantization, and the bias that bias correction removes.

* b-bit round-to-nearest of a full-scale uniform signal: SQNR = 20·log10(2^b) ≈ 6.02·b dB
  on a full-range (2^b-level, mid-rise-covered) grid, and 20·log10(2^b − 2) dB with
  errprop's default symmetric restricted-range quantizer fitted to the signal.
* E[ΔW·x] = ΔW·E[x] for fixed weight rounding (the basis of bias correction).
"""

import numpy as np
import pytest

import errprop as ep

BITS = range(4, 13)


def _sqnr(x, q):
    return 10 * np.log10(np.mean(x ** 2) / np.mean((q - x) ** 2))


@pytest.mark.parametrize("bits", BITS)
def test_full_range_grid_gives_6_02_db_per_bit(bits):
    # signal uniform over the 2^b rounding cells of a full-range grid with step s
    s = 1.0
    grid = ep.UniformGrid(np.array(s), np.array(0.0), -2 ** (bits - 1), 2 ** (bits - 1) - 1,
                          "nearest")
    x = np.random.default_rng(bits).uniform(-(2 ** (bits - 1) + 0.5) * s,
                                            (2 ** (bits - 1) - 0.5) * s, 2_000_000)
    # the 2^b cells sit half a step off-centre: the law is for the signal's variance
    e = grid.quantize(x) - x
    sqnr = 10 * np.log10(np.var(x) / np.mean(e ** 2))
    assert sqnr == pytest.approx(20 * np.log10(2.0 ** bits), abs=0.05)


@pytest.mark.parametrize("bits", BITS)
def test_default_quantizer_on_a_full_scale_signal(bits):
    x = np.random.default_rng(bits).uniform(-1.0, 1.0, 2_000_000)
    q = ep.Uniform(bits).quantize(x)
    assert _sqnr(x, q) == pytest.approx(20 * np.log10(2.0 ** bits - 2), abs=0.05)


def test_bias_is_delta_w_times_mean_input(rng):
    W = rng.standard_normal((5, 8))
    x = rng.standard_normal((200, 8)) + 0.7  # inputs with a nonzero mean
    q = ep.Uniform(4)
    r = ep.analyze(ep.Sequential([ep.Linear(W)]), x, ep.QuantConfig(weights=q))
    dW = q.quantize(W) - W
    np.testing.assert_allclose(r.bias, dW @ x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(r.exact_bias, r.bias, rtol=1e-12)  # linear: exact
    np.testing.assert_allclose(sum(r.bias_contributions.values()), r.bias, rtol=1e-12)

"""clip="mse" finds the least-squares clipping range over the whole ratio interval:
against Max (1960)'s optimal uniform quantizer for a Gaussian and against a dense
brute-force search written here."""

import numpy as np
import pytest

import errprop as ep


def _sqnr(x, q):
    return 10 * np.log10(np.mean(x * x) / np.mean((q - x) ** 2))


def test_two_bit_gaussian_reaches_max_1960_optimum():
    # 3 levels {-Δ, 0, Δ}: Max (1960), Table II (uniform, N = 3): Δ = 1.224σ, MSE 0.1902σ²,
    # i.e. SQNR 7.21 dB. The optimum clips at ~0.25 of the max of 4·10⁵ samples, below
    # the old search's floor of 0.3 (which gave 6.72 dB).
    x = np.random.default_rng(0).standard_normal(400_000)
    grid = ep.Uniform(2, clip="mse").fit(x)
    assert grid.scale.ravel()[0] == pytest.approx(1.224, abs=0.01)
    assert _sqnr(x, grid.quantize(x)) == pytest.approx(10 * np.log10(1 / 0.1902), abs=0.01)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("dist", ["gauss", "laplace", "uniform"])
def test_mse_clip_is_within_a_hair_of_a_dense_search(bits, dist):
    rng = np.random.default_rng(bits)
    x = {"gauss": rng.standard_normal, "laplace": rng.laplace,
         "uniform": lambda n: rng.uniform(-1, 1, n)}[dist](20_000)
    qmax = 2 ** (bits - 1) - 1
    amax = np.max(np.abs(x))
    best = np.inf
    for r in np.linspace(1e-3, 1.0, 1500):  # an independent symmetric quantizer
        s = r * amax / qmax
        e = np.clip(np.rint(x / s), -qmax, qmax) * s - x
        best = min(best, float(np.mean(e * e)))
    got = ep.Uniform(bits, clip="mse").quantize(x) - x
    assert np.mean(got * got) <= best * 1.002


def test_mse_clip_per_channel_searches_each_row():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((3, 20_000)) * np.array([[1.0], [10.0], [0.1]])
    W[1, 0] = 1e3  # one outlier row: its optimum clips hard
    grid = ep.Uniform(2, granularity="channel", clip="mse").fit(W)
    for a in range(3):
        row = ep.Uniform(2, clip="mse").fit(W[a])
        np.testing.assert_allclose(grid.scale[a], row.scale.ravel()[0], rtol=1e-12)
    assert grid.scale[1, 0] == pytest.approx(12.24, rel=0.02)  # the outlier is clipped away

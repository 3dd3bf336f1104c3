"""Uniform quantizers, their error models, and fake-quant analysis, against independent references.

Every expected value here comes from code written in this file, following the
documented semantics of :class:`errprop.Uniform` (never from errprop's output):

* a plain-NumPy reference fake-quantizer (``ref_fit`` / ``RefGrid``) that handles
  each scale group with an explicit loop over group labels, compared elementwise
  with errprop for every granularity, range, clipping, scale and rounding rule;
* statistical checks of the per-element error model (Monte Carlo with
  tolerances derived from the sample size, fixed seeds);
* the textbook SQNR of round-to-nearest on a full-scale uniform signal;
* a hand-written fake-quant forward of an MLP compared with ``analyze``;
* PyTorch's ``fake_quantize_per_tensor_affine`` / ``..._per_channel_affine``;
* clear error messages for bad input.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pytest

import errprop as ep

EPS = np.finfo(np.float64).eps
ALL_BITS = [2, 3, 4, 7, 8, 12, 16]
SHAPES = [(40,), (8, 12), (3, 4, 6)]  # last axes all divisible by the group size 2


# --------------------------------------------------------------------------- reference
def ref_qrange(bits: int, symmetric: bool = True, restricted_range: bool = True) -> tuple[int, int]:
    """Integer range of the documented grids."""
    if symmetric:
        half = 2 ** (bits - 1)
        return (-(half - 1) if restricted_range else -half), half - 1
    return 0, 2**bits - 1


def ref_pow2_up(s: float) -> float:
    """Smallest power of two >= s, exactly (via the binary exponent, no logarithms)."""
    mantissa, exponent = math.frexp(s)  # s = mantissa * 2**exponent, 0.5 <= mantissa < 1
    return math.ldexp(1.0, exponent - 1) if mantissa == 0.5 else math.ldexp(1.0, exponent)


def ref_group_labels(shape, granularity, group_size=None, channel_axis=0) -> np.ndarray:
    """An integer label per element: elements with the same label share a scale."""
    idx = np.indices(shape)
    if granularity == "tensor" or len(shape) == 0:
        return np.zeros(shape, dtype=int)
    if granularity == "channel":
        return idx[channel_axis % len(shape)]
    # group: consecutive runs of group_size elements along the last axis
    block = idx[-1] // group_size
    if len(shape) == 1:
        return block
    lead = np.ravel_multi_index(tuple(idx[:-1]), shape[:-1])
    return lead * (shape[-1] // group_size) + block


def ref_scale_zero(lo: float, hi: float, *, bits, symmetric=True, restricted_range=True,
                   scale="float") -> tuple[float, float]:
    """Scale and zero point of one group whose (clipped) data range is [lo, hi]."""
    qmin, qmax = ref_qrange(bits, symmetric, restricted_range)
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # the range always contains 0
    if symmetric:
        amax = max(-lo, hi)
        s = amax / (qmax if restricted_range else (2**bits - 1) / 2)
    else:
        s = (hi - lo) / (2**bits - 1)
    if s == 0.0:
        s = 1.0  # an all-zero group: any scale represents it exactly
    if scale == "pow2":
        s = ref_pow2_up(s)
    z = 0.0 if symmetric else float(min(max(round(-lo / s), qmin), qmax))  # round(): half-even
    return s, z


def ref_group_range(v: np.ndarray, *, symmetric=True, clip="minmax", percentile=99.99):
    """The data range [lo, hi] of one group before the grid is laid on it."""
    if clip == "percentile" and percentile < 100:
        if symmetric:
            a = float(np.percentile(np.abs(v), percentile))
            return -a, a
        return float(np.percentile(v, 100 - percentile)), float(np.percentile(v, percentile))
    if symmetric:
        a = float(np.max(np.abs(v)))
        return -a, a
    return float(np.min(v)), float(np.max(v))


@dataclass
class RefGrid:
    """Reference fitted grid: one scale and zero point per element."""

    scale: np.ndarray
    zero: np.ndarray
    qmin: int
    qmax: int
    rounding: str = "nearest"

    @property
    def lo(self):
        return (self.qmin - self.zero) * self.scale

    @property
    def hi(self):
        return (self.qmax - self.zero) * self.scale

    def quantize(self, x, rng=None):
        u = x / self.scale
        if self.rounding == "nearest":
            q = np.round(u)  # NumPy rounds half to even
        elif self.rounding == "floor":
            q = np.floor(u)
        else:
            q = np.floor(u + rng.random(np.shape(u)))
        q = np.clip(q + self.zero, self.qmin, self.qmax)
        return (q - self.zero) * self.scale


def ref_fit(x, bits, *, symmetric=True, granularity="tensor", group_size=None,
            rounding="nearest", clip="minmax", scale="float", restricted_range=True,
            percentile=99.99, channel_axis=0, ratio=1.0) -> RefGrid:
    """Reference calibration; ``ratio`` shrinks every group's range (for the MSE search)."""
    x = np.asarray(x, dtype=np.float64)
    labels = ref_group_labels(x.shape, granularity, group_size, channel_axis)
    s_arr, z_arr = np.empty(x.shape), np.empty(x.shape)
    for label in np.unique(labels):
        mask = labels == label
        lo, hi = ref_group_range(x[mask], symmetric=symmetric, clip=clip, percentile=percentile)
        s, z = ref_scale_zero(lo * ratio, hi * ratio, bits=bits, symmetric=symmetric,
                              restricted_range=restricted_range, scale=scale)
        s_arr[mask], z_arr[mask] = s, z
    qmin, qmax = ref_qrange(bits, symmetric, restricted_range)
    return RefGrid(s_arr, z_arr, qmin, qmax, rounding)


def ref_fake_quant(x, spec: dict, *, channel_axis=0, rng=None):
    return ref_fit(x, channel_axis=channel_axis, **spec).quantize(np.asarray(x, float), rng=rng)


# (Uniform kwargs, channel_axis given to fit)
CONFIGS = {
    "sym": ({}, 0),
    "sym-full-range": ({"restricted_range": False}, 0),
    "asym": ({"symmetric": False}, 0),
    "channel0": ({"granularity": "channel"}, 0),
    "channel-1": ({"granularity": "channel"}, -1),
    "channel-1-asym": ({"granularity": "channel", "symmetric": False}, -1),
    "channel0-full": ({"granularity": "channel", "restricted_range": False}, 0),
    "group2": ({"granularity": "group", "group_size": 2}, 0),
    "group2-asym": ({"granularity": "group", "group_size": 2, "symmetric": False}, 0),
    "pct90": ({"clip": "percentile", "percentile": 90.0}, 0),
    "pct90-asym-channel": ({"clip": "percentile", "percentile": 90.0, "symmetric": False,
                            "granularity": "channel"}, 0),
    "pct-default-channel-1": ({"clip": "percentile", "granularity": "channel"}, -1),
    "pow2": ({"scale": "pow2"}, 0),
    "pow2-asym-group": ({"scale": "pow2", "symmetric": False, "granularity": "group",
                         "group_size": 2}, 0),
    "pow2-channel-full": ({"scale": "pow2", "granularity": "channel",
                           "restricted_range": False}, -1),
}


def _data(rng, shape, offset=0.3):
    # an offset so that asymmetric grids have a nonzero zero point
    return rng.normal(offset, 1.0, size=shape)


# ------------------------------------------------------------ 1. quantizer vs reference
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_quantize_matches_reference(bits, shape, name, rng):
    kwargs, axis = CONFIGS[name]
    x = _data(rng, shape)
    grid = ep.Uniform(bits, **kwargs).fit(x, channel_axis=axis)
    ref = ref_fit(x, bits, channel_axis=axis, **kwargs)
    assert (grid.qmin, grid.qmax) == (ref.qmin, ref.qmax)
    np.testing.assert_array_equal(np.broadcast_to(grid.scale, x.shape), ref.scale)
    np.testing.assert_array_equal(np.broadcast_to(grid.zero_point, x.shape), ref.zero)
    np.testing.assert_array_equal(grid.quantize(x), ref.quantize(x))
    # the one-step convenience does the same
    np.testing.assert_array_equal(ep.Uniform(bits, **kwargs).quantize(x, channel_axis=axis),
                                  ref.quantize(x))


@pytest.mark.parametrize("name", ["sym", "asym", "channel0", "group2-asym", "pct90", "pow2"])
@pytest.mark.parametrize("rounding", ["floor", "stochastic"])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_floor_and_stochastic_rounding_match_reference(bits, rounding, name, rng):
    kwargs, axis = CONFIGS[name]
    x = _data(rng, (8, 12))
    grid = ep.Uniform(bits, rounding=rounding, **kwargs).fit(x, channel_axis=axis)
    ref = ref_fit(x, bits, rounding=rounding, channel_axis=axis, **kwargs)
    # stochastic rounding: identical generators give identical draws
    got = grid.quantize(x, rng=np.random.default_rng(2024))
    np.testing.assert_array_equal(got, ref.quantize(x, rng=np.random.default_rng(2024)))


def test_nearest_rounds_half_to_even():
    # max|x| = 127 with 8 bits gives scale 1, so these are exact ties
    x = np.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 126.5, 127.0])
    np.testing.assert_array_equal(ep.Uniform(8).quantize(x), [0, 2, 2, 4, 0, -2, -2, 126, 127])
    np.testing.assert_array_equal(ep.Uniform(8, rounding="floor").quantize(x),
                                  [0, 1, 2, 3, -1, -2, -3, 126, 127])


def test_asymmetric_hand_example():
    # 2 bits on [-1, 3]: scale 4/3, zero point round(0.75) = 1, grid {-4/3, 0, 4/3, 8/3}
    x = np.array([-1.0, 0.0, 0.6, 0.7, 2.0, 3.0])
    grid = ep.Uniform(2, symmetric=False).fit(x)
    s = 4 / 3
    assert grid.scale.item() == s and grid.zero_point.item() == 1
    np.testing.assert_allclose(grid.quantize(x), [-s, 0, 0, s, 2 * s, 2 * s], rtol=1e-15)


def test_asymmetric_range_is_widened_to_contain_zero(rng):
    x = rng.uniform(2.0, 5.0, size=100)  # all positive: the range becomes [0, 5]
    grid = ep.Uniform(4, symmetric=False).fit(x)
    assert grid.zero_point.item() == 0
    assert grid.scale.item() == pytest.approx(x.max() / 15, rel=1e-15)
    assert grid.quantize(np.zeros(1)).item() == 0.0  # zero is exactly representable


def test_full_range_uses_the_extra_negative_level():
    # full range, 3 bits: [-4, 3], scale = max|x| / 3.5
    x = np.array([-3.5, 3.5, 1.0])
    grid = ep.Uniform(3, restricted_range=False).fit(x)
    assert (grid.qmin, grid.qmax) == (-4, 3)
    np.testing.assert_array_equal(grid.quantize(x), [-4.0, 3.0, 1.0])


def test_all_zero_channel_is_exact():
    x = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    q = ep.Uniform(4, granularity="channel").quantize(x)
    np.testing.assert_array_equal(q[0], 0.0)
    assert np.all(np.isfinite(q))


@pytest.mark.parametrize("k", [-20, -3, -1, 0, 1, 2, 4, 10, 30])
@pytest.mark.parametrize("bits", [4, 8])
def test_pow2_scale_rounds_up_exactly_at_power_of_two_boundaries(bits, k):
    """The float scale just above 2**k must become 2**(k+1): the range never shrinks."""
    qmax = 2 ** (bits - 1) - 1
    float_scale = np.nextafter(2.0**k, np.inf)
    x = np.array([qmax * float_scale, -0.25 * qmax * float_scale])
    grid = ep.Uniform(bits, scale="pow2").fit(x)
    expected = ref_pow2_up(np.max(np.abs(x)) / qmax)  # exact ceil to a power of two
    assert grid.scale.item() == expected
    assert grid.scale.item() >= np.max(np.abs(x)) / qmax
    assert not grid.error_model(x).clipped.any()  # the data range is still representable


@pytest.mark.parametrize("k", [-7, 0, 3])
def test_pow2_scale_exact_powers_are_kept(k):
    x = np.array([127 * 2.0**k, -0.5 * 2.0**k])
    assert ep.Uniform(8, scale="pow2").fit(x).scale.item() == 2.0**k


# ---------------------------------------------------------------------- MSE clipping
def _group_sse(x, q, labels):
    return np.array([np.sum((q - x)[labels == g] ** 2) for g in np.unique(labels)])


@pytest.mark.parametrize("dist", ["normal", "laplace"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_mse_clip_is_no_worse_than_minmax_and_near_the_best(bits, granularity, symmetric, dist):
    rng = np.random.default_rng(bits * 7 + symmetric)
    x = getattr(rng, dist)(size=(4, 400)) + (0.0 if symmetric else 0.5)
    spec = dict(bits=bits, symmetric=symmetric, granularity=granularity)
    labels = ref_group_labels(x.shape, granularity)
    grid = ep.Uniform(clip="mse", **spec).fit(x)
    sse = _group_sse(x, grid.quantize(x), labels)
    sse_minmax = _group_sse(x, ref_fit(x, **spec).quantize(x), labels)
    best = np.min([_group_sse(x, ref_fit(x, ratio=r, **spec).quantize(x), labels)
                   for r in np.linspace(0.005, 1.0, 400)], axis=0)
    assert np.all(sse <= sse_minmax * (1 + 1e-12))
    # the chosen clip is within a small factor of the best over a 0.0025-step grid
    assert np.all(sse <= 1.2 * best)
    # and the chosen range is a ratio in [1e-3, 1] of the min-max range
    minmax_scale = ref_fit(x, **spec).scale
    ratio = np.broadcast_to(grid.scale, x.shape) / minmax_scale
    assert np.all((ratio >= 1e-3 * (1 - 1e-12)) & (ratio <= 1 + 1e-12))


# ----------------------------------------------------------------------- 2. error model
def _roundoff(x, grid):
    """Float64 roundoff allowance for comparing |Q(x)-x| to max_abs (a few ulps)."""
    return 8 * EPS * (np.abs(x) + np.broadcast_to(grid.scale, np.shape(x)))


CLIP_RULES = [{"clip": "minmax"}, {"clip": "percentile", "percentile": 95.0}, {"clip": "mse"},
              {"clip": "percentile", "percentile": 90.0, "symmetric": False,
               "granularity": "channel"}]


@pytest.mark.parametrize("clip", CLIP_RULES, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("rounding", ["nearest", "floor", "stochastic"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_model_bound_and_clipped_elements(bits, rounding, clip, rng):
    x = rng.standard_normal((10, 200))
    grid = ep.Uniform(bits, rounding=rounding, **clip).fit(x)
    model = grid.error_model(x)
    for seed in range(3):
        e = grid.quantize(x, rng=np.random.default_rng(seed)) - x
        # |Q(x) - x| <= max_abs for every element (up to float64 roundoff, see _roundoff)
        assert np.all(np.abs(e) <= model.max_abs + _roundoff(x, grid))
        # clipped elements carry their exact, deterministic error
        np.testing.assert_array_equal(model.mean[model.clipped], e[model.clipped])
    assert np.all(model.var[model.clipped] == 0.0)
    # clipped == outside the representable range, computed independently
    lo = (grid.qmin - np.broadcast_to(grid.zero_point, x.shape)) * grid.scale
    hi = (grid.qmax - np.broadcast_to(grid.zero_point, x.shape)) * grid.scale
    np.testing.assert_array_equal(model.clipped, (x < lo) | (x > hi))
    if clip["clip"] == "percentile":
        assert model.clipped.any()  # the test exercises real clipping
    if clip["clip"] == "minmax" and clip.get("symmetric", True):
        assert not model.clipped.any()


@pytest.mark.parametrize("rounding", ["nearest", "floor"])
def test_error_model_in_range_moments(rounding, rng):
    x = rng.standard_normal(500)
    grid = ep.Uniform(6, rounding=rounding, clip="percentile", percentile=98.0).fit(x)
    m = grid.error_model(x)
    inside = ~m.clipped
    s = grid.scale.item()
    np.testing.assert_allclose(m.var[inside], s * s / 12, rtol=1e-15)
    if rounding == "nearest":
        np.testing.assert_array_equal(m.mean[inside], 0.0)
        np.testing.assert_allclose(m.max_abs[inside], s / 2, rtol=1e-15)
    else:
        np.testing.assert_allclose(m.mean[inside], -s / 2, rtol=1e-15)
        np.testing.assert_allclose(m.max_abs[inside], s, rtol=1e-15)


def test_stochastic_rounding_moments_by_monte_carlo():
    rng = np.random.default_rng(99)
    # 4 bits, max|x| = 7 * 0.25: the scale is exactly 0.25, so grid points are exact
    s = 0.25
    x = np.concatenate([rng.uniform(-1.75, 1.75, 37), [-1.75, 0.5, 1.0]])
    grid = ep.Uniform(4, rounding="stochastic").fit(x)
    assert grid.scale.item() == s
    n = 40_000
    e = grid.quantize(np.broadcast_to(x, (n, x.size)), rng=rng) - x  # n draws per element
    p = x / s - np.floor(x / s)
    var = p * (1 - p) * s * s
    m = grid.error_model(x)
    np.testing.assert_allclose(m.var, var, rtol=1e-12, atol=1e-30)
    np.testing.assert_array_equal(m.mean, 0.0)
    # E e = 0 (unbiased): 5 standard errors of the mean of n draws
    assert np.all(np.abs(e.mean(axis=0)) <= 5 * np.sqrt(var / n) + 1e-15)
    # Var e = p(1-p)s²: the mean of e² over n draws has variance (mu4 - var²)/n, where
    # e is -p·s w.p. 1-p and (1-p)·s w.p. p, so mu4 = p(1-p)(p³ + (1-p)³)s⁴
    mu4 = p * (1 - p) * (p**3 + (1 - p) ** 3) * s**4
    se = np.sqrt((mu4 - var**2) / n)
    assert np.all(np.abs(np.mean(e * e, axis=0) - var) <= 5 * se + 1e-15)
    # the exact bound: e takes only its two neighbours; on-grid points are exact
    assert np.all(np.abs(e).max(axis=0) <= m.max_abs + 8 * EPS * (np.abs(x) + s))
    on_grid = p == 0
    assert on_grid.sum() == 3 and np.all(e[:, on_grid] == 0) and np.all(m.max_abs[on_grid] == 0)


def test_stochastic_rounding_is_unbiased_over_uniform_data():
    rng = np.random.default_rng(5)
    x = rng.uniform(-1.0, 1.0, 400_000)
    grid = ep.Uniform(5, rounding="stochastic").fit(x)
    e = grid.quantize(x, rng=rng) - x
    # with p ~ U[0, 1): Var e = E[p(1-p)] s² = s²/6, so the mean has standard error
    # s / sqrt(6N); E e⁴ = E[p(1-p)(p³+(1-p)³)] s⁴ = s⁴/15, so the sample variance has
    # relative standard error sqrt((36/15 - 1) / N)
    s = grid.scale.item()
    assert abs(e.mean()) <= 5 * s / np.sqrt(6 * x.size)
    assert np.var(e) == pytest.approx(s * s / 6, rel=5 * np.sqrt(1.4 / x.size))


def test_floor_rounding_mean_error_is_minus_half_a_step():
    rng = np.random.default_rng(6)
    x = rng.uniform(-1.0, 1.0, 400_000)
    grid = ep.Uniform(6, rounding="floor").fit(x)
    s = grid.scale.item()
    e = grid.quantize(x) - x
    assert np.all((e <= 0) & (e > -s * (1 + 1e-12)))
    # e ~ U(-s, 0]: its sample mean has standard error s / sqrt(12 N)
    assert abs(e.mean() + s / 2) <= 5 * s / np.sqrt(12 * x.size)
    free = np.floor(x / s) * s != x  # values on the grid (the range's end) stay exact
    assert np.mean(grid.error_model(x).mean) == pytest.approx(-s / 2 * np.mean(free),
                                                              rel=1e-12)
    # the sample variance of U(-s, 0] has relative standard error sqrt(0.8 / N)
    assert np.var(e) == pytest.approx(s * s / 12, rel=5 * np.sqrt(0.8 / x.size))


def test_nearest_rounding_mean_error_is_zero_statistically():
    rng = np.random.default_rng(8)
    x = rng.uniform(-1.0, 1.0, 400_000)
    grid = ep.Uniform(6).fit(x)
    s = grid.scale.item()
    e = grid.quantize(x) - x
    assert abs(e.mean()) <= 5 * s / np.sqrt(12 * x.size)
    assert np.var(e) == pytest.approx(s * s / 12, rel=5 * np.sqrt(0.8 / x.size))


# ------------------------------------------------------------------------------ 3. SQNR
@pytest.mark.parametrize("bits", range(4, 13))
def test_sqnr_of_full_scale_uniform_signal(bits):
    """Published fact: uniform noise s²/12 on a full-scale uniform signal of power A²/3 with
    s = A/(2^(b-1)-1) gives SQNR = 10·log10(4A²/s²) = 20·log10(2^b - 2) dB."""
    rng = np.random.default_rng(1000 + bits)
    amp = 3.7
    x = np.concatenate([rng.uniform(-amp, amp, 200_000), [-amp, amp]])  # exactly full scale
    e = ep.Uniform(bits).quantize(x) - x
    sqnr = 10 * np.log10(np.mean(x * x) / np.mean(e * e))
    assert sqnr == pytest.approx(20 * np.log10(2.0**bits - 2), abs=0.1)
    assert ep.sqnr_db(x, e) == pytest.approx(sqnr, abs=1e-9)


# ----------------------------------------------------------------- 4. analyze vs reference
def ref_network(net, x, *, params=None, acts=None, inp=None):
    """Float and fake-quantized forward of an errprop tanh MLP, written from scratch.

    params: {"fc1.W": spec, ...}; acts: {"fc1": spec, ...} (input of that Linear);
    inp: spec for the network input. A spec is a dict of Uniform keyword arguments.
    """
    params, acts = params or {}, acts or {}
    layers = net.layers()
    float_inputs = {}
    h = x
    for name, op in layers:
        if isinstance(op, ep.Linear):
            float_inputs[name] = h
            h = h @ op.params["W"].T + op.params["b"]
        else:
            assert op.kind == "tanh"
            h = np.tanh(h)
    y = h
    h = x if inp is None else ref_fake_quant(x, inp, channel_axis=-1)
    for name, op in layers:
        if isinstance(op, ep.Linear):
            if name in acts:  # calibrated on the float activation, applied to the quantized one
                h = ref_fit(float_inputs[name], channel_axis=-1, **acts[name]).quantize(h)
            W, b = op.params["W"], op.params["b"]
            if f"{name}.W" in params:
                W = ref_fake_quant(W, params[f"{name}.W"], channel_axis=0)
            if f"{name}.b" in params:
                b = ref_fake_quant(b, params[f"{name}.b"], channel_axis=0)
            h = h @ W.T + b
        else:
            h = np.tanh(h)
    return y, h, float_inputs


LINEARS = ("fc1", "fc2", "fc3")


def _every(kind, spec):
    """The same spec for a parameter ("W" or "b") of every Linear, or for every input ("in")."""
    return {n: spec for n in LINEARS} if kind == "in" else {f"{n}.{kind}": spec for n in LINEARS}


U = ep.Uniform
ANALYZE_CASES = {
    "weights": (ep.QuantConfig(weights=U(6)), dict(params=_every("W", {"bits": 6}))),
    "weights-channel": (ep.QuantConfig(weights=U(4, granularity="channel")),
                        dict(params=_every("W", {"bits": 4, "granularity": "channel"}))),
    "weights-group-asym": (
        ep.QuantConfig(weights=U(3, symmetric=False, granularity="group", group_size=4)),
        dict(params=_every("W", {"bits": 3, "symmetric": False, "granularity": "group",
                                 "group_size": 4}))),
    "weights+biases": (ep.QuantConfig(weights=U(6), biases=U(4)),
                       dict(params={**_every("W", {"bits": 6}), **_every("b", {"bits": 4})})),
    "weights+activations": (ep.QuantConfig(weights=U(8), activations=U(6)),
                            dict(params=_every("W", {"bits": 8}),
                                 acts=_every("in", {"bits": 6}))),
    "activations-asym": (ep.QuantConfig(activations=U(5, symmetric=False)),
                         dict(acts=_every("in", {"bits": 5, "symmetric": False}))),
    "activations-channel": (ep.QuantConfig(activations=U(5, granularity="channel")),
                            dict(acts=_every("in", {"bits": 5, "granularity": "channel"}))),
    "input": (ep.QuantConfig(input=U(5)), dict(inp={"bits": 5})),
    "input+weights+activations": (
        ep.QuantConfig(input=U(4, symmetric=False), weights=U(7), activations=U(7)),
        dict(inp={"bits": 4, "symmetric": False}, params=_every("W", {"bits": 7}),
             acts=_every("in", {"bits": 7}))),
    "override-fc1": (
        ep.QuantConfig(weights=U(8), overrides={"fc1": {"weights": U(4)}}),
        dict(params={"fc1.W": {"bits": 4}, "fc2.W": {"bits": 8}, "fc3.W": {"bits": 8}})),
    "override-glob": (
        ep.QuantConfig(weights=U(8), overrides={"fc*": {"biases": U(5)}}),
        dict(params={**_every("W", {"bits": 8}), **_every("b", {"bits": 5})})),
    "override-later-wins": (
        ep.QuantConfig(weights=U(8), overrides={"fc*": {"weights": U(6)},
                                                "fc2": {"weights": U(3)}}),
        dict(params={"fc1.W": {"bits": 6}, "fc2.W": {"bits": 3}, "fc3.W": {"bits": 6}})),
    "override-none-disables": (
        ep.QuantConfig(weights=U(5), activations=U(6),
                       overrides={"fc3": {"weights": None}, "fc1": {"activations": None}}),
        dict(params={"fc1.W": {"bits": 5}, "fc2.W": {"bits": 5}},
             acts={"fc2": {"bits": 6}, "fc3": {"bits": 6}})),
}


@pytest.fixture
def mlp_and_input(rng):
    # in-features 8, 16, 12 are all divisible by the group size 4 used below
    return ep.mlp([8, 16, 12, 3], "tanh", seed=0), rng.standard_normal((64, 8))


@pytest.mark.parametrize("case", list(ANALYZE_CASES))
def test_analyze_exact_error_matches_reference_forward(case, mlp_and_input):
    net, x = mlp_and_input
    config, ref_spec = ANALYZE_CASES[case]
    y, yq, float_inputs = ref_network(net, x, **ref_spec)
    assert np.max(np.abs(yq - y)) > 1e-6  # the case injects real error
    report = ep.analyze(net, x, config)
    np.testing.assert_allclose(report.output, y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(report.exact, yq - y, rtol=0, atol=1e-12)
    # exactly the expected sources, each with the reference's injected error
    expected = set(ref_spec.get("params", {})) | {f"{n}.in" for n in ref_spec.get("acts", {})}
    if "inp" in ref_spec:
        expected.add("input")
    assert set(report.sources) == expected
    ops = dict(net.layers())
    for name, spec in ref_spec.get("params", {}).items():
        layer, param = name.split(".")
        p = ops[layer].params[param]
        np.testing.assert_array_equal(report.sources[name].error,
                                      ref_fake_quant(p, spec, channel_axis=0) - p)
    first = net.layers()[0][0]
    for layer, spec in ref_spec.get("acts", {}).items():
        a = float_inputs[layer]
        grid = ref_fit(a, channel_axis=-1, **spec)  # calibrated on the float activation
        if layer == first and "inp" in ref_spec:
            # the first layer reads the quantized network input: one rounding, not two
            a = ref_fake_quant(x, ref_spec["inp"], channel_axis=-1)
        np.testing.assert_array_equal(report.sources[f"{layer}.in"].error, grid.quantize(a) - a)
    if "inp" in ref_spec:
        np.testing.assert_array_equal(report.sources["input"].error,
                                      ref_fake_quant(x, ref_spec["inp"], channel_axis=-1) - x)


def test_fc1_weight_source_error_and_grid(mlp_and_input):
    net, x = mlp_and_input
    report = ep.analyze(net, x, ep.QuantConfig(weights=U(4, granularity="channel")))
    W = dict(net.layers())["fc1"].params["W"]
    ref = ref_fit(W, 4, granularity="channel", channel_axis=0)
    src = report.sources["fc1.W"]
    np.testing.assert_array_equal(src.error, ref.quantize(W) - W)
    np.testing.assert_array_equal(np.broadcast_to(src.grid.scale, W.shape), ref.scale)
    assert src.kind == "weight" and src.source.layer == "fc1"
    # one scale per output row
    assert np.all(ref.scale == np.max(np.abs(W), axis=1, keepdims=True) / 7)


# ------------------------------------------------------------------------------ 5. torch
# What we found with torch 2.13 (CPU):
# * fake_quantize_per_tensor_affine accepts float64 tensors (and returns float64), but the
#   arithmetic is float32: outputs are float32-rounded and x·(1/scale) is formed in float32,
#   so at 16 bits a value within ~|x/s|·2^-23 of a rounding tie may round the other way.
# * fake_quantize_per_channel_affine rejects a float64 scale ("Scale must be Float or
#   BFloat16, found Double") but accepts float64 input with a float32 scale and then computes
#   in float64 with a float32 reciprocal of the scale (again: rare flips next to ties).
# So the data are built such that errprop's fitted scale is exactly a float32 number (torch
# gets *the same* scale), elements next to a rounding tie are left out (at most a few %),
# and the rest is compared exactly (per tensor: after rounding errprop's output to float32).
def _torch_data(rng, shape, qmax, axis=None):
    """Float32-representable data whose max|x| per group is qmax · (a float32 scale)."""
    x = rng.standard_normal(shape).astype(np.float32).astype(np.float64)
    if axis is None:
        s = float(np.float32(rng.uniform(0.01, 0.1)))
        x.flat[0] = qmax * s
        x = np.clip(x, -qmax * s, qmax * s)
        return x, np.float64(s)
    n = shape[axis]
    s = rng.uniform(0.01, 0.1, n).astype(np.float32).astype(np.float64)
    sb = np.expand_dims(s, [i for i in range(len(shape)) if i != axis])
    x = np.clip(x, -qmax * sb, qmax * sb)
    first = [slice(None)] * len(shape)
    first[(axis + 1) % len(shape)] = 0
    x[tuple(first)] = (qmax * sb).squeeze() if len(shape) > 1 else qmax * s
    return x, sb


def _not_near_tie(x, scale):
    u = np.abs(x / scale)
    return np.abs(u - np.floor(u) - 0.5) > 8 * 2.0**-24 * (u + 1)


@pytest.mark.parametrize("shape", [(500,), (40, 30), (6, 7, 8)], ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 12, 16])
def test_per_tensor_nearest_matches_torch(bits, shape, torch):
    rng = np.random.default_rng(bits)
    qmin, qmax = ref_qrange(bits)
    x, s = _torch_data(rng, shape, qmax)
    grid = ep.Uniform(bits).fit(x)
    assert grid.scale.item() == s and float(np.float32(s)) == s  # torch gets the same scale
    got = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), grid.scale.item(), 0,
                                                grid.qmin, grid.qmax).numpy()
    keep = _not_near_tie(x, s)
    assert keep.mean() > 0.95
    ours = grid.quantize(x).astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(got[keep], ours[keep])


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 12, 16])
def test_per_channel_nearest_matches_torch(bits, axis, torch):
    rng = np.random.default_rng(100 + bits)
    x, s = _torch_data(rng, (24, 50), ref_qrange(bits)[1], axis=axis)
    grid = ep.Uniform(bits, granularity="channel").fit(x, channel_axis=axis)
    np.testing.assert_array_equal(grid.scale, s)  # the same (float32-exact) scales
    n = x.shape[axis]
    got = torch.fake_quantize_per_channel_affine(
        torch.from_numpy(x), torch.from_numpy(s.ravel()).float(),
        torch.zeros(n, dtype=torch.int32), axis, grid.qmin, grid.qmax).numpy()
    assert got.dtype == np.float64
    keep = _not_near_tie(x, s)
    assert keep.mean() > 0.95
    np.testing.assert_array_equal(got[keep], grid.quantize(x)[keep])


# ------------------------------------------------------------------------- 6. bad input
@pytest.mark.parametrize("bits", [1, 17, 0, -8, 8.5, True, "8", None])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=rf"bits must be an integer from 2 to 16, got {bits!r}"):
        ep.Uniform(bits)


def test_numpy_integer_bits_are_accepted():
    assert ep.Uniform(np.int64(8)).qmax == 127


@pytest.mark.parametrize("field, value", [("rounding", "round"), ("granularity", "row"),
                                          ("clip", "max"), ("scale", "log")])
def test_unknown_choices(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be one of .*got '{value}'"):
        ep.Uniform(8, **{field: value})


@pytest.mark.parametrize("group_size", [None, 0, -2, 2.5, True])
def test_group_needs_a_positive_integer_group_size(group_size):
    with pytest.raises(ValueError, match=rf"granularity='group' needs a positive integer "
                                         rf"group_size, got {group_size!r}"):
        ep.Uniform(8, granularity="group", group_size=group_size)


def test_group_size_without_group_granularity():
    with pytest.raises(ValueError, match="group_size is only used with granularity='group'"):
        ep.Uniform(8, group_size=4)


def test_group_size_must_divide_the_last_axis():
    q = ep.Uniform(8, granularity="group", group_size=5)
    with pytest.raises(ValueError, match=r"group_size 5 does not divide the last axis.*\(4, 12\)"):
        q.fit(np.ones((4, 12)))


@pytest.mark.parametrize("percentile", [0, -1, 100.5, float("nan")])
def test_bad_percentile(percentile):
    with pytest.raises(ValueError, match="percentile must be (in|a number)"):
        ep.Uniform(8, clip="percentile", percentile=percentile)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_fit_rejects_nan_and_inf(bad):
    x = np.array([[1.0, 2.0], [bad, 0.5]])
    with pytest.raises(ValueError, match="NaN/Inf"):
        ep.Uniform(8).fit(x)
    with pytest.raises(ValueError, match=r"parameter 'fc1\.W' contains NaN/Inf"):
        ep.Uniform(8).fit(x, what="parameter 'fc1.W'")


@pytest.mark.parametrize("shape", [(0,), (3, 0)])
def test_fit_rejects_empty(shape):
    with pytest.raises(ValueError, match=rf"empty .*{re.escape(str(shape))}"):
        ep.Uniform(8).fit(np.zeros(shape))


def test_stochastic_rounding_needs_an_rng():
    x = np.linspace(-1, 1, 11)
    with pytest.raises(ValueError, match="rng"):
        ep.Uniform(8, rounding="stochastic").fit(x).quantize(x)
    with pytest.raises(ValueError, match="rng"):
        ep.Uniform(8, rounding="stochastic").quantize(x)


@pytest.mark.parametrize("field", ["weights", "biases", "activations", "input", "norms"])
def test_config_rejects_a_non_quantizer(field):
    with pytest.raises(TypeError, match=rf"{field} must be a quantizer.*got int"):
        ep.QuantConfig(**{field: 8})
    with pytest.raises(TypeError, match=r"overrides\['fc1'\]\['weights'\] must be a quantizer"):
        ep.QuantConfig(overrides={"fc1": {"weights": "int8"}})


def test_override_matching_no_layer(mlp_and_input):
    net, x = mlp_and_input
    config = ep.QuantConfig(weights=U(8), overrides={"fc9": {"weights": U(4)}})
    with pytest.raises(ValueError, match=r"'fc9' matches no layer; did you mean 'fc"):
        ep.analyze(net, x, config)


@pytest.mark.parametrize("key", ["weight", "input", "bias"])
def test_override_with_unknown_field(key):
    with pytest.raises(ValueError, match=rf"override 'fc1' has unknown field '{key}'"):
        ep.QuantConfig(overrides={"fc1": {key: U(4)}})


def test_asymmetric_range_near_float64_limit():
    # hi - lo would overflow: the scale is still computed finitely ...
    x = np.array([-1e153, 0.0, 1.7e308 / 1e155])
    grid = ep.Uniform(8, symmetric=False).fit(x)
    assert np.all(np.isfinite(grid.scale)) and np.all(np.isfinite(grid.quantize(x)))
    # ... and a step whose square (the noise variance) overflows is a clear error
    with pytest.raises(ValueError, match="squared overflows float64"):
        ep.Uniform(8, symmetric=False).fit(np.array([-1e308, 0.0, 1e308]))


def test_stochastic_rounding_without_a_generator_says_so():
    x = np.linspace(-1, 1, 7)
    for arithmetic in ("float64", "torch"):
        grid = ep.Uniform(4, rounding="stochastic", arithmetic=arithmetic).fit(x)
        with pytest.raises(ValueError, match="stochastic rounding needs a random generator"):
            grid.quantize(x)
        np.testing.assert_allclose(grid.quantize(x, rng=np.random.default_rng(0)), x,
                                   atol=float(np.max(grid.scale)))
    with pytest.raises(ValueError, match="ShiftQuantizer: stochastic rounding"):
        ep.ShiftQuantizer(4, rounding="stochastic").quantize_stack(x[None], None)

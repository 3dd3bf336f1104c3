"""Hardware-gap sources: the gap between a float fake-quant simulation and an integer-only
kernel (int8 x int8 -> k-bit accumulator -> fixed-point requantization), written here in
plain Python integers, is explained line by line by the sources IntegerKernel adds."""

import math

import numpy as np
import pytest

import errprop
from errprop import Activation, IntegerKernel, Linear, QuantConfig, Sequential, Uniform


# ------------------------------------------------------------------ the reference kernel
def _round_half_away(u):
    return math.floor(u + 0.5) if u >= 0 else -math.floor(-u + 0.5)


def _quantize_multiplier(M):
    """TFLite QuantizeMultiplier: M = M0 * 2^(shift - 31)."""
    frac, shift = math.frexp(M)
    M0 = _round_half_away(frac * 2 ** 31)
    if M0 == 2 ** 31:
        M0, shift = M0 // 2, shift + 1
    return M0, shift


def _srdhm(a, b):
    """gemmlowp SaturatingRoundingDoublingHighMul (no saturation case here)."""
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    q = ab + nudge
    return q // (1 << 31) if q >= 0 else -((-q) // (1 << 31))


def _rdbpot(x, e):
    mask = (1 << e) - 1
    rem = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> e) + (1 if rem > threshold else 0)


def _mbqm(acc, M0, shift):
    left, right = max(shift, 0), max(-shift, 0)
    return _rdbpot(_srdhm(acc * (1 << left), M0), right)


def _wrap(a, bits):
    return (a + 2 ** (bits - 1)) % 2 ** bits - 2 ** (bits - 1)


def _pow2_up(s):
    m, e = math.frexp(s)
    return 2.0 ** (e - 1 if m == 0.5 else e)


def integer_kernel(W1, b1, W2, b2, x, bits, pow2=False):
    """fc1 -> relu -> fc2 as an int8 pipeline; returns the dequantized output of fc2."""
    scale = _pow2_up if pow2 else (lambda s: s)
    s_x1 = scale(np.abs(x).max() / 127)
    h = np.maximum(x @ W1.T + b1, 0.0)  # float activations calibrate fc2's input scale
    s_x2 = scale(np.abs(h).max() / 127)
    s_w1 = [scale(v) for v in np.abs(W1).max(axis=1) / 127]
    s_w2 = [scale(v) for v in np.abs(W2).max(axis=1) / 127]
    W1i = [[int(np.rint(w / s_w1[o])) for w in row] for o, row in enumerate(W1)]
    W2i = [[int(np.rint(w / s_w2[o])) for w in row] for o, row in enumerate(W2)]
    out = np.empty((x.shape[0], W2.shape[0]))
    for n, xn in enumerate(x):
        xi = [max(-127, min(127, _round_half_away(v / s_x1))) for v in xn]
        hi = []
        for o in range(W1.shape[0]):
            acc = sum(a * w for a, w in zip(xi, W1i[o])) + int(np.rint(b1[o] / (s_x1 * s_w1[o])))
            acc = _wrap(acc, bits)
            M0, shift = _quantize_multiplier(s_x1 * s_w1[o] / s_x2)
            hi.append(max(0, min(127, _mbqm(acc, M0, shift))))  # ReLU fused as the clamp
        for o in range(W2.shape[0]):
            acc = sum(a * w for a, w in zip(hi, W2i[o])) + int(np.rint(b2[o] / (s_x2 * s_w2[o])))
            out[n, o] = _wrap(acc, bits) * s_x2 * s_w2[o]
    return out


def _setup(seed=0, batch=24):
    rng = np.random.default_rng(seed)
    W1, b1 = rng.standard_normal((32, 16)) / 4, rng.standard_normal(32) / 10
    W2, b2 = rng.standard_normal((8, 32)) / 6, rng.standard_normal(8) / 10
    net = Sequential([Linear(W1, b1, name="fc1"), Activation("relu"), Linear(W2, b2, name="fc2"),
                      Activation("identity")])
    return net, (W1, b1, W2, b2), rng.standard_normal((batch, 16))


GAP = ("fc1.in.rounding", "fc1.acc", "fc2.in.rescale", "fc2.in.rounding", "fc2.acc")


@pytest.mark.parametrize("bits, pow2, additive", [(14, False, False), (16, False, True),
                                                  (32, True, False)])
def test_gap_to_integer_kernel_is_explained_line_by_line(bits, pow2, additive):
    net, params, x = _setup()
    scale = "pow2" if pow2 else "float"
    sim = QuantConfig(weights=Uniform(8, granularity="channel", scale=scale),
                      activations=Uniform(8, scale=scale))
    hw = QuantConfig(weights=sim.weights, activations=sim.activations,
                     hardware=IntegerKernel(accumulator_bits=bits, overflow="wrap",
                                            rounding="half_away", multiplier="fixed"))
    kernel = integer_kernel(*params, x, bits, pow2)
    r_sim = errprop.analyze(net, x, sim)
    r_hw = errprop.analyze(net, x, hw)
    assert tuple(n for n in r_hw.sources if n not in r_sim.sources) == GAP
    total_gap = kernel - (r_sim.output + r_sim.exact)
    # the exact run with the gap sources IS the integer kernel
    np.testing.assert_allclose(r_hw.output + r_hw.exact, kernel, rtol=0, atol=1e-9)
    # line by line: each source added in turn (telescoping: sums to the gap exactly)
    names = list(r_sim.sources)
    lines = {}
    base = _subset(net, x, r_hw, names)
    for g in GAP:
        names.append(g)
        now = _subset(net, x, r_hw, names)
        lines[g] = now - base
        base = now
    np.testing.assert_allclose(sum(lines.values()), total_gap, rtol=0, atol=1e-9)
    # and each line alone on top of the simulation: the sum misses only the interactions
    alone = {g: _subset(net, x, r_hw, [*r_sim.sources, g]) - _subset(net, x, r_hw,
                                                                     list(r_sim.sources))
             for g in GAP}
    miss = np.linalg.norm(sum(alone.values()) - total_gap) / np.linalg.norm(total_gap)
    _print(bits, pow2, total_gap, lines, alone, miss)
    assert np.linalg.norm(total_gap) > 0
    if additive:  # rare overflow, no ties: the lines do not interact
        assert miss < 1e-9
    requant = [g for g in GAP if ".in." in g]
    if pow2:  # shift-only rescaling: ties are frequent, gemmlowp rounds twice
        assert all(np.any(lines[g] != 0) for g in ("fc2.in.rescale", "fc2.in.rounding"))
    else:  # a Q31 multiplier: no tie and no flip on this batch
        assert all(np.all(lines[g] == 0) for g in requant)
    budget = r_hw.budget(by="source")
    assert all(g in [row.name for row in budget.rows] for g in GAP)


def _subset(net, x, report, names):
    from errprop._budget import exact_subset

    # in the report's order: a gap source acts on the value before the input grid rounds it
    return exact_subset(net, x, report, [n for n in report.sources if n in names])


def _print(bits, pow2, total, lines, alone, miss):
    rms = lambda a: float(np.sqrt(np.mean(a ** 2)))  # noqa: E731
    print(f"\nk={bits} pow2={pow2}: total gap rms {rms(total):.3e}; alone-sum miss {miss:.2e}")
    for g in lines:
        print(f"  {g:16s} in turn {rms(lines[g]):.3e}  alone {rms(alone[g]):.3e}")


def test_accumulator_bits_wage_rule():
    assert errprop.accumulator_bits(8, 8, 16) == 19
    assert errprop.accumulator_bits(8, 8, 1024) == 25
    # the rule is tight: 8-bit restricted-range products summed 16 times
    assert 16 * 127 * 127 < 2 ** 18 < 16 * 127 * 127 * 2


def test_no_overflow_at_the_wage_width_and_ties_only_for_rounding():
    net, params, x = _setup(seed=1)
    config = QuantConfig(weights=Uniform(8, granularity="channel"), activations=Uniform(8),
                         hardware=IntegerKernel(accumulator_bits=errprop.accumulator_bits(8, 8, 32)))
    r = errprop.analyze(net, x, config)
    for name in ("fc1.acc", "fc2.acc"):
        # only the int32 bias rounding (at most half an accumulator unit per output)
        unit = r.sources[name].grid.acc_scale
        assert np.all(np.abs(r.sources[name].error) <= unit / 2 + 1e-15)


def test_multiplier_matches_tflite_reference():
    rng = np.random.default_rng(2)
    from errprop._hwgap import multiply_by_quantized_multiplier, quantize_multiplier

    M = np.exp(rng.uniform(-12, 0, 200))
    acc = rng.integers(-2 ** 20, 2 ** 20, 200)
    M0, shift = quantize_multiplier(M)
    ref = [_mbqm(int(a), *_quantize_multiplier(float(m))) for a, m in zip(acc, M)]
    np.testing.assert_array_equal(multiply_by_quantized_multiplier(acc, M0, shift), ref)
    even = multiply_by_quantized_multiplier(acc, M0, shift, "half_even")
    exact = acc * (M0 / 2.0 ** (31 - shift))
    assert np.all(np.abs(even - exact) <= 0.5)


def test_clear_errors():
    net, _, x = _setup()
    with pytest.raises(TypeError, match="IntegerKernel"):
        QuantConfig(hardware="int8")
    with pytest.raises(ValueError, match="overflow"):
        IntegerKernel(overflow="clip")
    last = Sequential([Linear(np.eye(4), name="fc")])
    with pytest.raises(ValueError, match="identity"):
        QuantConfig(weights=Uniform(8), activations=Uniform(8),
                    hardware=IntegerKernel()).sources(last)
    with pytest.raises(ValueError, match="per tensor"):
        QuantConfig(weights=Uniform(8), activations=Uniform(8, granularity="channel"),
                    hardware=IntegerKernel()).sources(net)
    gap = QuantConfig(weights=Uniform(8), activations=Uniform(8),
                      hardware=IntegerKernel()).sources(net)[0].quantizer
    with pytest.raises(ValueError, match="fitted inside"):  # needs the producing layer
        gap.fit(x)


@pytest.mark.parametrize("bits", [16, 32])
def test_monte_carlo_carries_the_gap_sources(bits):
    """Monte Carlo fits the gap sources in context (the producing layer's grids) and draws
    them from their deterministic error model."""
    net, _, x = _setup(batch=64)
    base = dict(weights=Uniform(8, granularity="channel", scale="pow2"),
                activations=Uniform(8, scale="pow2"))
    hw = QuantConfig(**base, hardware=IntegerKernel(accumulator_bits=bits, overflow="wrap",
                                                    rounding="half_away", multiplier="fixed"))
    report = errprop.analyze(net, x, hw)
    mc = errprop.monte_carlo(net, x, hw, samples=400, seed=3, quantiles=())
    assert set(GAP) <= set(report.sources)
    lo, hi = mc.mse_ci
    plain = errprop.monte_carlo(net, x, QuantConfig(**base), samples=400, seed=3,
                                quantiles=())
    if bits == 32:  # small gaps: first order holds and agrees with Monte Carlo
        assert lo * 0.9 <= report.mse <= hi * 1.1
    else:  # 16-bit accumulators wrap: errors as large as the signal, which ReLU partly
        # clips, so first order overshoots (measured 3.4x); Monte Carlo follows the exact run
        assert mc.mse > 2 * plain.mse
        assert mc.mse == pytest.approx(report.exact_mse, rel=0.2)
        assert report.mse > hi

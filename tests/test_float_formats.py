"""Float formats and MX block formats: exact rounding against independent references
(ml_dtypes, NumPy float16, a plain-NumPy MX reference from the OCP spec) and the
relative-error model against the statistics of the actual rounding errors."""

import math

import numpy as np
import pytest

import errprop
from errprop import FloatFormat, MXFormat, QuantConfig

ml_dtypes = pytest.importorskip("ml_dtypes")

DTYPES = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "e4m3": ml_dtypes.float8_e4m3fn,
          "e5m2": ml_dtypes.float8_e5m2}
MAX = {"fp16": 65504.0, "bf16": float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), "e4m3": 448.0,
       "e5m2": 57344.0}


def _ref(name, x):
    """ml_dtypes' conversion of the saturated value (errprop saturates; ml_dtypes gives
    inf / NaN beyond the range)."""
    with np.errstate(over="ignore"):
        return np.clip(x, -MAX[name], MAX[name]).astype(DTYPES[name]).astype(np.float64)


def _all_values(name):
    """Every finite value of the format (from its bit patterns)."""
    dt = DTYPES[name]
    width = np.dtype(dt).itemsize * 8
    bits = np.arange(2 ** width, dtype=np.uint32).astype(np.uint8 if width == 8 else np.uint16)
    with np.errstate(invalid="ignore"):
        v = bits.view(dt).astype(np.float64)
    return np.unique(v[np.isfinite(v)])


def _hard_inputs(name, dtype=np.float64):
    """Every value, every midpoint between neighbours (the ties), one ulp of ``dtype``
    either side of each midpoint, and values beyond the range."""
    v = _all_values(name)
    mid = (v[:-1] + v[1:]) / 2  # exact in float32 too: one bit more than the format
    beyond = np.array([MAX[name] * 1.01, MAX[name] * 4, 1e300, -1e300])
    inf = dtype(np.inf)
    with np.errstate(over="ignore"):
        mid = mid.astype(dtype)
        x = np.concatenate([v, mid, np.nextafter(mid, inf), np.nextafter(mid, -inf)])
    return np.concatenate([x[np.isfinite(x)].astype(np.float64), beyond, -beyond])


def _same(a, b):
    return np.array_equal(a, b) and np.array_equal(np.signbit(a), np.signbit(b))


@pytest.mark.parametrize("name", ["fp16", "bf16", "e4m3", "e5m2"])
def test_rounding_equals_ml_dtypes_on_float32_inputs(name):
    """Exhaustive over the format: all values, all ties, one float32 ulp around each tie,
    and saturation."""
    x = _hard_inputs(name, np.float32)
    assert _same(FloatFormat(name).quantize(x), _ref(name, x))


def test_fp16_equals_ml_dtypes_on_float64_inputs():
    x = _hard_inputs("fp16")
    assert _same(FloatFormat("fp16").quantize(x), _ref("fp16", x))


def _correctly_rounded(name, x):
    """Round-to-nearest-even of float64 ``x`` onto the format, from the table of its
    values (no conversion routine involved), saturating beyond the largest value: the
    nearer neighbour; on an exact tie the one with the even bit pattern."""
    dt = DTYPES[name]
    v = _all_values(name)
    xs = np.clip(x, -MAX[name], MAX[name])
    i = np.clip(np.searchsorted(v, xs), 1, len(v) - 1)
    lo, hi = v[i - 1], v[i]
    # the differences are exact (Sterbenz: neighbours within a factor 2, or one of them 0)
    dlo, dhi = xs - lo, hi - xs
    lo_even = (lo.astype(dt).view(np.uint8 if np.dtype(dt).itemsize == 1 else np.uint16)
               % 2 == 0)
    out = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(lo_even, lo, hi)))
    out = np.where(xs == lo, lo, out)
    # -0.0 and negative values that round to zero keep their sign, as IEEE conversion does
    return np.where(out == 0, np.copysign(0.0, x), out)


@pytest.mark.parametrize("name", ["bf16", "e4m3", "e5m2"])
def test_float64_inputs_are_rounded_once_correctly(name):
    """errprop rounds a float64 input once, to the nearest value of the format (ties to
    even), checked against the format's table of values. ``ml_dtypes`` < 0.7 converts
    float64 through float32 (two roundings, so it differs on ~1e-5 of random inputs,
    always where float32(x) is a tie); 0.7 rounds once. Only what holds for every
    version is asserted of ml_dtypes: it agrees with errprop wherever float32(x) is not
    a tie of the format, and on float32 inputs everywhere (the test above)."""
    rng = np.random.default_rng(0)
    span = {"bf16": 100, "e4m3": 8, "e5m2": 15}[name]
    x = rng.standard_normal(100_000) * np.exp2(rng.uniform(-span, span, 100_000))
    x = np.concatenate([x, _hard_inputs(name)])
    f = FloatFormat(name)
    ours = f.quantize(x)
    assert _same(ours, _correctly_rounded(name, x))
    via32 = np.clip(x, -MAX[name], MAX[name]).astype(np.float32).astype(np.float64)
    tie = np.abs(f.quantize(via32) - via32) == f.fit(via32).error_model(via32).max_abs
    assert tie.sum() > 0  # the hard inputs do reach the double-rounding cases
    ref = _ref(name, x)
    assert _same(ours[~tie], ref[~tie])
    assert np.all(np.abs(ours - x) <= np.abs(ref - x))  # never farther than ml_dtypes


def test_fp16_equals_numpy_float16():
    rng = np.random.default_rng(1)
    x = np.concatenate([_hard_inputs("fp16"), rng.standard_normal(100_000) * 1e-5,
                        rng.standard_normal(100_000) * 1e3])
    x = x[np.abs(x) <= MAX["fp16"]]
    assert _same(FloatFormat("fp16").quantize(x), x.astype(np.float16).astype(np.float64))


def test_saturation_and_subnormals():
    f = FloatFormat("e4m3")
    np.testing.assert_array_equal(f.quantize([464.0, 465.0, 1e9, -1e9]), [448, 448, 448, -448])
    tiny = 2.0 ** -9  # the smallest E4M3 subnormal
    np.testing.assert_array_equal(f.quantize([tiny, 0.5 * tiny, 0.51 * tiny, 1.5 * tiny]),
                                  [tiny, 0.0, tiny, 2 * tiny])
    assert FloatFormat("fp16").quantize(np.array(-1e-30))[()] == 0.0
    assert np.signbit(FloatFormat("fp16").quantize(np.array(-1e-30)))


@pytest.mark.parametrize("name", ["fp16", "bf16", "e4m3", "e5m2"])
def test_error_model_bound_and_uniform_statistics(name):
    """|e| ≤ ulp/2 always; e/ulp has mean 0 and variance 1/12 within its sampling error."""
    rng = np.random.default_rng(2)
    n = 200_000
    span = {"fp16": 8, "bf16": 30, "e4m3": 6, "e5m2": 12}[name]
    x = rng.standard_normal(n) * np.exp2(rng.uniform(-span, span, n))
    grid = FloatFormat(name).fit(x)
    e = grid.quantize(x) - x
    model = grid.error_model(x)
    assert np.all(np.abs(e) <= model.max_abs)
    assert not model.clipped.any() and np.all(model.mean == 0)
    z = e / model.width  # uniform on [-1/2, 1/2] under the model
    assert abs(z.mean()) < 4 * math.sqrt(1 / 12 / n)
    # Var(z²) = 1/80 - 1/144 for a uniform z
    assert abs(np.mean(z ** 2) - 1 / 12) < 4 * math.sqrt((1 / 80 - 1 / 144) / n)
    np.testing.assert_allclose(model.var, model.width ** 2 / 12)


def test_error_model_saturated_elements_are_exact():
    grid = FloatFormat("e4m3").fit(np.array([1000.0, -500.0, 3.0]))
    m = grid.error_model(np.array([1000.0, -500.0, 3.0]))
    np.testing.assert_array_equal(m.clipped, [True, True, False])
    np.testing.assert_array_equal(m.mean[:2], [-552.0, 52.0])
    np.testing.assert_array_equal(m.var[:2], [0.0, 0.0])


def test_analysis_statistics_match_exact_error_statistics():
    """e4m3 activations of an MLP: the analytic output variance (first order, error model)
    against the spread of the exact fake-quant error over many inputs."""
    net = errprop.mlp([16, 32, 8], "tanh", seed=3)
    x = np.random.default_rng(4).standard_normal((4000, 16))
    report = errprop.analyze(net, x, QuantConfig(activations=FloatFormat("e4m3")))
    predicted = report.statistics.mse
    exact = float(np.mean(report.exact ** 2))
    # mean over 32 000 output elements of 4000 independent inputs: a few percent
    assert exact == pytest.approx(predicted, rel=0.1)
    assert np.all(np.abs(report.first_order) <= report.statistics.worst_case * (1 + 1e-9))


def test_float_format_weights_in_budget():
    net = errprop.mlp([8, 16, 4], "relu", seed=5)
    x = np.random.default_rng(6).standard_normal((32, 8))
    report = errprop.analyze(net, x, QuantConfig(weights=FloatFormat("e5m2"),
                                                  activations=FloatFormat("bf16")))
    rows = report.budget(by="source")
    assert rows["fc1.W"].bits == "W8" and rows["fc1.in"].bits == "A16"
    # weights are deterministic: first order converges to the exact error
    assert errprop.relative_residual(report.exact, report.first_order) < 0.2


# ------------------------------------------------------------------ MX block formats
ELEMENT_DTYPES = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2", "e3m2": "float6_e3m2fn",
                  "e2m3": "float6_e2m3fn", "e2m1": "float4_e2m1fn"}
MX = {"mxfp8_e4m3": ("e4m3", 8, 448.0), "mxfp8_e5m2": ("e5m2", 15, 57344.0),
      "mxfp6_e3m2": ("e3m2", 4, 28.0), "mxfp6_e2m3": ("e2m3", 2, 7.5),
      "mxfp4_e2m1": ("e2m1", 2, 6.0), "mxint8": ("int8", 0, 127 / 64)}


def _mx_reference(name, v, block):
    """OCP MX v1.0 section 6.3, one block at a time in plain Python/NumPy; elements
    converted by ml_dtypes (INT8: k·2^-6, k in [-127, 127])."""
    element, emax, top = MX[name]
    flat = v.reshape(-1, v.shape[-1])
    out = np.empty_like(flat)
    for r, row in enumerate(flat):
        for start in range(0, row.size, block):
            vb = row[start:start + block]
            amax = max(abs(float(t)) for t in vb)
            shared = 0 if amax == 0 else math.frexp(amax)[1] - 1 - emax
            X = 2.0 ** min(max(shared, -127), 127)
            p = np.clip(vb / X, -top, top)
            if element == "int8":
                p = np.clip(np.round(p * 64), -127, 127) / 64
            else:
                p = p.astype(getattr(ml_dtypes, ELEMENT_DTYPES[element])).astype(np.float64)
            out[r, start:start + block] = p * X
    return out.reshape(v.shape)


@pytest.mark.parametrize("name", list(MX))
def test_mx_equals_spec_reference(name):
    rng = np.random.default_rng(7)
    v = rng.standard_normal((6, 96)) * np.exp2(rng.uniform(-8, 8, (6, 1)))
    v[0, :32] = 0.0  # an all-zero block
    v[1, 5] = 40.0 * np.abs(v[1]).max()  # an outlier sets its block's scale
    v[2, :32] = 2.0 ** np.arange(32) / 2 ** 20  # the block maximum a power of two
    v[3, 32:64] *= 1e-30  # far below the others
    q = MXFormat(name).quantize(v)
    assert _same(q, _mx_reference(name, v, 32))


def test_mx_ragged_last_block_and_error_model():
    rng = np.random.default_rng(8)
    v = rng.standard_normal((5, 40))
    f = MXFormat("mxfp4_e2m1", block=16)
    q = f.quantize(v)
    padded = np.concatenate([v, np.zeros((5, 8))], axis=1)
    assert _same(q, _mx_reference("mxfp4_e2m1", padded, 16)[:, :40])
    grid = f.fit(v)
    model = grid.error_model(v)
    assert np.all(np.abs(q - v) <= model.max_abs)
    assert model.max_abs.shape == v.shape


def test_mx_scale_choice_puts_block_max_in_top_binade():
    v = np.array([[0.1, -3.0, 2.9, 0.0]])
    grid = MXFormat("mxfp8_e4m3", block=4).fit(v)
    # floor(log2 3) = 1; shared exponent 1 - 8 = -7
    assert grid.block_scale.ravel()[0] == 2.0 ** -7


def test_mx_statistics():
    rng = np.random.default_rng(9)
    v = rng.standard_normal((2000, 64))
    grid = MXFormat("mxint8").fit(v)
    e = grid.quantize(v) - v
    model = grid.error_model(v)
    assert np.all(np.abs(e) <= model.max_abs)
    ratio = np.mean(e ** 2) / np.mean(model.var + model.mean ** 2)
    assert abs(ratio - 1) < 0.02


def test_bad_names():
    with pytest.raises(ValueError, match="'fp16', 'bf16'"):
        FloatFormat("fp8")
    with pytest.raises(ValueError, match="mxfp8_e4m3"):
        MXFormat("mxfp9")
    with pytest.raises(ValueError, match="NaN"):
        FloatFormat("fp16").fit(np.array([np.nan]))

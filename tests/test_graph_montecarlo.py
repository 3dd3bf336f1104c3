"""Monte Carlo on general graphs: merges (Add, Mul, Concat, MatMul), shape ops, fan-out.

References: the fused Attention op (its decomposed graph must draw and give the same
samples), closed forms (a fan-out rounded once, a Concat of two layers), a plain NumPy
loop of the SwiGLU MLP that redraws every sample from the documented random streams,
first-order statistics (``analyze``), the runs themselves for other chunk sizes, and
traced memory for the automatic chunk size.

Statistical tolerances as in test_montecarlo.py: ``K = 5`` standard errors.
"""

import math
import tracemalloc

import dag_models as dm
import numpy as np
import pytest

import errprop as ep
from errprop._montecarlo import MonteCarloResult, monte_carlo

K = 5.0
_EPS = np.finfo(np.float64).eps


def _agree(a: MonteCarloResult, b: MonteCarloResult) -> bool:
    """The two MSE estimates agree within their combined 99% half-widths."""
    ha, hb = (r.mse_ci[1] - r.mse for r in (a, b))
    return abs(a.mse - b.mse) <= np.hypot(ha, hb)


def _w8a8(granularity="tensor", **kw):
    return ep.QuantConfig(weights=ep.Uniform(8, granularity=granularity),
                          activations=ep.Uniform(8), **kw)


# ------------------------------------------------------------------ (a) fused attention
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("mode", ["noise", "quantize"])
def test_decomposed_attention_samples_equal_the_fused_op(mode, granularity):
    # The fused op rounds x once (source attn.in) for Q, K and V; the graph has q.in,
    # k.in and v.in, one rounding of the same x through the same grid: they share one
    # source's samples and take one random stream, so the weights' streams line up
    # (attn.Wq <-> q.W, ...) and every sample is the fused op's. o.in has no fused
    # counterpart: excluded.
    att = dm.fused_attention(seed=1)
    fused, dec = ep.Sequential([att]), dm.decomposed_attention(att)
    x = np.random.default_rng(31).standard_normal((3, 5, 8))
    a = monte_carlo(fused, x, _w8a8(granularity), 150, mode=mode, seed=7, chunk_size=40)
    b = monte_carlo(dec, x, _w8a8(granularity, overrides={"o": {"activations": None}}), 150,
                    mode=mode, seed=7, chunk_size=40)
    scale = float(np.max(np.abs(a.errors)))
    assert scale > 1e-3  # a real error, not float rounding
    np.testing.assert_allclose(b.output, a.output, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(b.errors, a.errors, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(b.mse_samples, a.mse_samples, rtol=1e-10)
    assert b.mse == pytest.approx(a.mse, rel=1e-10)
    np.testing.assert_allclose(b.mse_ci, a.mse_ci, rtol=1e-10)
    np.testing.assert_allclose(b.mean, a.mean, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(b.std, a.std, rtol=1e-8)
    for q in a.quantiles:
        np.testing.assert_allclose(b.quantiles[q], a.quantiles[q], rtol=0, atol=1e-10 * scale)


def test_output_noise_asks_the_op_whether_its_error_is_x_dwt():
    # weight_noise="output" needs the layer's output error to be X ΔWᵀ: true of the
    # decomposed graph's projections, not of the fused op's weights
    att = dm.fused_attention(seed=1)
    fused, dec = ep.Sequential([att]), dm.decomposed_attention(att)
    x = np.random.default_rng(32).standard_normal((2, 6, 8))
    cfg = ep.QuantConfig(weights=ep.Uniform(6, granularity="channel"))
    assert monte_carlo(fused, x, cfg, 4, weight_noise="output").fast_sources == ()
    exact = monte_carlo(dec, x, cfg, 1500, seed=8)
    fast = monte_carlo(dec, x, cfg, 1500, seed=8, weight_noise="output")
    assert fast.fast_sources == ("q.W", "k.W", "v.W", "o.W")
    assert _agree(exact, fast)


# ------------------------------------------------------------------ fan-out, closed forms
def _fan_out(rng):
    """``a(x) + b(x)`` with identity weights: the output error is ``e_a + e_b``."""
    x = ep.Input()
    y = ep.Add(name="join")(ep.Linear(np.eye(8), name="a")(x), ep.Linear(np.eye(8), name="b")(x))
    return ep.Graph(x, y), rng.standard_normal((48, 8))


def _step_and_fixed(x, bits, rounding="nearest"):
    """The per-tensor step and the values on the grid (no error)."""
    s = np.max(np.abs(x)) / (2 ** (bits - 1) - 1)
    level = np.floor(x / s) if rounding == "floor" else np.rint(x / s)
    return s, np.abs(level * s - x) <= 8 * _EPS * np.abs(x)


@pytest.mark.parametrize("mode", ["noise", "quantize"])
@pytest.mark.parametrize("rounding", ["nearest", "floor"])
def test_fan_out_through_one_deterministic_grid_is_one_rounding(mode, rounding, rng):
    # a.in and b.in round the same x through the same grid: e_a = e_b = e, output 2e
    net, x = _fan_out(rng)
    S = 3000
    r = monte_carlo(net, x, ep.QuantConfig(activations=ep.Uniform(8, rounding=rounding)), S,
                    mode=mode, seed=9)
    np.testing.assert_array_equal(r.node("a").mse_samples, r.node("b").mse_samples)
    np.testing.assert_allclose(r.mse_samples, 4 * r.node("a").mse_samples, rtol=1e-12)
    s, fixed = _step_and_fixed(x, 8, rounding)
    assert np.all(r.std[fixed] == 0) and np.all(r.mean[fixed] == 0)
    std = 2 * s / math.sqrt(12)  # 2e, e uniform on a cell of width s
    mean = -s if rounding == "floor" else 0.0
    assert np.all(np.abs(r.std[~fixed] / std - 1) < K * np.sqrt(0.8 / (4 * S)))
    assert np.all(np.abs(r.mean[~fixed] - mean) < K * std / np.sqrt(S))


@pytest.mark.parametrize("mode", ["noise", "quantize"])
@pytest.mark.parametrize("case", ["stochastic", "other grid"])
def test_fan_out_rounded_independently(mode, case, rng):
    # stochastic rounding rounds each reader independently (as analyze's exact run), and
    # so do two different grids: the variances add
    net, x = _fan_out(rng)
    S = 3000
    if case == "stochastic":
        cfg = ep.QuantConfig(activations=ep.Uniform(8, rounding="stochastic"))
        s, _ = _step_and_fixed(x, 8)
        p = x / s - np.floor(x / s)
        var_one = p * (1 - p) * s * s
        var_a = var_b = var_one
    else:
        cfg = ep.QuantConfig(activations=ep.Uniform(8), overrides={"b": {"activations":
                                                                          ep.Uniform(6)}})
        (sa, fa), (sb, fb) = _step_and_fixed(x, 8), _step_and_fixed(x, 6)
        var_a, var_b = np.where(fa, 0, sa * sa / 12), np.where(fb, 0, sb * sb / 12)
    r = monte_carlo(net, x, cfg, S, mode=mode, seed=10)
    independent, shared = np.mean(var_a + var_b), np.mean((np.sqrt(var_a) + np.sqrt(var_b)) ** 2)
    lo, hi = r.mse_ci
    assert lo <= independent <= hi
    assert not lo <= shared <= hi  # a shared rounding would be told apart
    assert r.node("a").mse_ci[0] <= np.mean(var_a) <= r.node("a").mse_ci[1]


def test_concat_of_two_layers_matches_closed_form(rng):
    # each half of the output is its own layer's x ΔWᵀ: per-channel 6-bit steps 2^-6,
    # every row's maximum on the grid (no error there)
    qmax, s = 31, 2.0 ** -6
    Ws = []
    for n_out in (3, 5):
        W = rng.standard_normal((n_out, 24))
        W *= qmax * s / np.max(np.abs(W), axis=1, keepdims=True)
        top = np.argmax(np.abs(W), axis=1)
        W[np.arange(n_out), top] = np.sign(W[np.arange(n_out), top]) * qmax * s
        Ws.append(W)
    net = ep.Sequential([ep.Parallel([ep.Linear(Ws[0])], [ep.Linear(Ws[1])],
                                     merge=ep.Concat(name="cat"))])
    x = rng.standard_normal((10, 24))
    S = 3000
    r = monte_carlo(net, x, ep.QuantConfig(weights=ep.Uniform(6, granularity="channel")), S,
                    seed=11)
    W = np.concatenate(Ws)
    free = np.abs(W) != qmax * s
    std = np.sqrt(s * s / 12 * (x * x) @ free.T)
    assert r.mean.shape == (10, 8)
    assert np.all(np.abs(r.std / std - 1) < K * np.sqrt(2 / (4 * S)))
    assert np.all(np.abs(r.mean) < K * std / np.sqrt(S))


# ------------------------------------------------------------------ (b) SwiGLU, first order
def _swiglu_case(kind, granularity):
    """W8A8 (weights and every layer input), SwiGLU MLP and SwiGLU transformer. gate.in and
    up.in round the same value alike: Monte Carlo samples that rounding once, and the
    analytic statistics take the two sources as one variable (errprop._shared)."""
    if kind == "mlp":
        net, x = dm.swiglu_mlp(), np.random.default_rng(2).standard_normal((4, 5, 8))
        return net, x, _w8a8(granularity)
    net, x = dm.swiglu_transformer(), np.random.default_rng(2).standard_normal((2, 5, 8))
    return net, x, _w8a8(granularity)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_first_order_statistics_inside_the_monte_carlo_interval(kind, granularity):
    net, x, cfg = _swiglu_case(kind, granularity)
    a = ep.analyze(net, x, cfg)
    r = monte_carlo(net, x, cfg, 4000, seed=5, quantiles=())
    assert r.mse_ci[0] <= a.mse <= r.mse_ci[1]
    assert list(r.nodes) == [info.name for info in net.nodes()]


def test_first_order_statistics_take_one_rounding_for_two_sources():
    # Without the shared rounding, gate.in and up.in taken as independent would miss the
    # covariance: the sum of the two sources' variances lies outside Monte Carlo's 99%
    # interval, while errprop's statistics (one variable) lie inside it.
    net, x = dm.swiglu_mlp(), np.random.default_rng(2).standard_normal((4, 5, 8))
    cfg = _w8a8()
    a = ep.analyze(net, x, cfg)
    r = monte_carlo(net, x, cfg, 4000, seed=5, quantiles=())
    assert r.mse_ci[0] <= a.mse <= r.mse_ci[1]
    assert not np.any(a.statistics.var_contributions["up.in"])
    # the independent-sources figure: each reader's variance alone (the other reader's
    # input left unquantized), Var(J_g e) + Var(J_u e) in place of Var((J_g + J_u) e)
    g_only = ep.analyze(net, x, _w8a8(overrides={"up": {"activations": None}}))
    u_only = ep.analyze(net, x, _w8a8(overrides={"gate": {"activations": None}}))
    independent = a.mse - a.statistics.var_contributions["gate.in"].mean() + \
        g_only.statistics.var_contributions["gate.in"].mean() + \
        u_only.statistics.var_contributions["up.in"].mean()
    assert independent < r.mse_ci[0]


# ------------------------------------------------------------------ (b) a NumPy loop
def _silu(t):
    return t / (1.0 + np.exp(-t))


def _words(seed, key, part, n_samples, n):
    """Samples 0..n_samples-1 (one stream block) of the n 32-bit integers per sample of
    ``spawn_key=(key, 0, part)``: whole 64-bit words per sample."""
    words = -(-n // 2)
    gen = np.random.SFC64(np.random.SeedSequence(seed, spawn_key=(key, 0, part)))
    return gen.random_raw(n_samples * words).reshape(n_samples, words).view(np.uint32)[:, :n]


def _uniform_errors(seed, key, n_samples, shape, s):
    """The noise-mode errors of a nearest-rounding source, ``(n_samples, *shape)``:
    ``s·((k + ½)·2^-32 - ½)``, the elements cut into 4 parts along the first axis, each
    from its own stream (the layout documented in errprop._sampling)."""
    rows, per_row = shape[0], int(np.prod(shape[1:]))
    k = np.empty((n_samples, rows * per_row))
    for p in range(4):
        lo, hi = rows * p // 4, rows * (p + 1) // 4
        if hi > lo:
            k[:, lo * per_row:hi * per_row] = _words(seed, key, p, n_samples,
                                                     (hi - lo) * per_row)
    return s * ((k.reshape(n_samples, *shape) + 0.5) * 2.0 ** -32 - 0.5)


def _dither(seed, key, n_samples, shape):
    """Quantize mode's uniforms, ``(n_samples, *shape)`` float64 draws of ``spawn_key=(key, 0)``."""
    gen = np.random.Generator(np.random.SFC64(np.random.SeedSequence(seed,
                                                                     spawn_key=(key, 0))))
    return gen.random((n_samples, *shape))


def _step(v, per_row):
    m = np.max(np.abs(v), axis=tuple(range(1, v.ndim)) if per_row else None,
               keepdims=per_row)
    return m / 127.0


def _swiglu_loop(net, x, mode, granularity, seed, S):
    """``down(silu(gate x̃) ⊙ up x̃)`` sample by sample, every draw reproduced by hand.

    Streams (source order, a shared source taking none): gate.in 0, gate.W 1, up.in
    (shares gate.in: one rounding of x), up.W 2, down.in 3, down.W 4. A value on its
    grid (|Q(v) - v| ≤ 8 eps |v|) has no error in noise mode, and no dither in quantize
    mode while the sample has not moved it."""
    Wg, Wu = net["gate"].params["W"], net["up"].params["W"]
    Wd, bd = net["down"].params["W"], net["down"].params["b"]
    per_row = granularity == "channel"

    def grid(v, step):
        return np.clip(np.rint(v / step), -127, 127) * step

    def fixed(v, step):
        return np.abs(grid(v, step) - v) <= 8 * _EPS * np.abs(v)

    def source(key, float_value, step):
        """The sample-i transform of one source's value (its error law at the float value)."""
        on = fixed(float_value, step)
        if mode == "noise":
            e = np.where(on, 0.0, _uniform_errors(seed, key, S, float_value.shape, step))
            return lambda i, v: v + e[i]
        u = _dither(seed, key, S, float_value.shape)

        def quantize(i, v):
            d = (np.where(on & (v == float_value), 0.5, u[i]) - 0.5) * step
            return grid(v + d, step) - d
        return quantize

    h_float = _silu(x @ Wg.T) * (x @ Wu.T)
    out_float = h_float @ Wd.T + bd
    s_x, s_h = _step(x, False), _step(h_float, False)
    q_x, q_h = source(0, x, s_x), source(3, h_float, s_h)
    q_g, q_u, q_d = (source(k, W, _step(W, per_row)) for k, W in ((1, Wg), (2, Wu), (4, Wd)))
    errors = []
    for i in range(S):
        xs = q_x(i, x)
        h = _silu(xs @ q_g(i, Wg).T) * (xs @ q_u(i, Wu).T)
        errors.append(q_h(i, h) @ q_d(i, Wd).T + bd - out_float)
    return np.array(errors)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("mode", ["noise", "quantize"])
def test_swiglu_samples_match_a_numpy_loop(mode, granularity):
    net = dm.swiglu_mlp(seed=6)
    x = np.random.default_rng(6).standard_normal((4, 5, 8))
    S = 6
    r = monte_carlo(net, x, _w8a8(granularity), S, mode=mode, seed=13, chunk_size=4)
    ref = _swiglu_loop(net, x, mode, granularity, 13, S)
    scale = float(np.max(np.abs(ref)))
    assert scale > 1e-3
    np.testing.assert_allclose(r.errors, ref, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(r.mean, ref.mean(axis=0), rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(r.std, ref.std(axis=0, ddof=1), rtol=1e-7)
    np.testing.assert_allclose(r.mse_samples, np.mean(ref.reshape(S, -1) ** 2, axis=1),
                               rtol=1e-9)


# ------------------------------------------------------------------ (c) chunking
def _attention_swiglu():
    """A pre-norm block with the decomposed attention (MatMul merges) and a SwiGLU MLP
    (a Mul merge), under a mixed config (stochastic and floor rounding, clipping)."""
    att = dm.fused_attention(seed=3)
    rng = np.random.default_rng(5)
    net = ep.Sequential([
        ep.Residual(ep.RMSNorm(rng.normal(1.0, 0.1, 8), name="rms1"),
                    dm.decomposed_attention(att)),
        ep.Residual(ep.RMSNorm(rng.normal(1.0, 0.1, 8), name="rms2"), dm.swiglu_mlp(seed=4))])
    x = np.random.default_rng(0).standard_normal((2, 5, 8))
    cfg = ep.QuantConfig(weights=ep.Uniform(6, rounding="stochastic"), biases=ep.Uniform(8),
                         norms=ep.Uniform(6, rounding="floor"), input=ep.Uniform(6),
                         activations=ep.Uniform(6, clip="percentile", percentile=60),
                         overrides={"down": {"weights": ep.Uniform(5)},
                                    "o": {"weights": ep.Uniform(6, granularity="channel")}})
    return net, x, cfg


@pytest.mark.parametrize("mode,weight_noise,dtype", [("noise", "exact", np.float64),
                                                     ("quantize", "exact", np.float64),
                                                     ("noise", "output", np.float32),
                                                     ("quantize", "exact", np.float32)])
def test_graph_results_do_not_depend_on_chunk_size(mode, weight_noise, dtype):
    net, x, cfg = _attention_swiglu()
    S = 70  # crosses a 64-sample stream block
    runs = [monte_carlo(net, x, cfg, S, mode=mode, chunk_size=c, weight_noise=weight_noise,
                        dtype=dtype, seed=12, quantile_nodes="all") for c in (1, 7, S)]
    assert [r.chunk_size for r in runs] == [1, 7, S]
    if weight_noise == "output":
        assert runs[0].fast_sources == ("o.W", "down.W")
    ref = runs[0]
    assert list(ref.nodes) == [info.name for info in net.nodes()]
    assert {"qk", "pv", "mul", "res1", "res2"} <= set(ref.nodes)
    for r in runs[1:]:
        np.testing.assert_array_equal(r.errors, ref.errors)  # the samples: bitwise
        for name, node in ref.nodes.items():
            np.testing.assert_array_equal(r.nodes[name].mse_samples, node.mse_samples)
            assert r.nodes[name].quantile_samples == S
            for q in ref.quantiles:  # kept samples: bitwise
                np.testing.assert_array_equal(r.nodes[name].quantiles[q], node.quantiles[q])
            # sums over chunks: summation order only
            np.testing.assert_allclose(r.nodes[name].mean, node.mean, rtol=1e-12,
                                       atol=1e-12 * np.max(np.abs(node.mean)))
            np.testing.assert_allclose(r.nodes[name].std, node.std, rtol=1e-12)


@pytest.mark.parametrize("mode", ["noise", "quantize"])
def test_graph_chunk_size_keeps_memory_under_the_limit(mode):
    # long sequences: the decomposed attention's scores (MatMul, Softmax nodes of
    # batch·heads·tokens²) dwarf the other values, and q, k, v stay alive together
    net = dm.decomposed_attention(dm.fused_attention(16, 4, seed=2))
    x = np.random.default_rng(2).standard_normal((2, 128, 16))
    cfg = _w8a8(overrides={"o": {"activations": None}})
    limit = 16 * 2 ** 20
    chunk = monte_carlo(net, x, cfg, 60, memory_limit=limit, quantiles=(), mode=mode).chunk_size
    assert 1 < chunk < 60

    def peak(chunk_size):  # traced bytes, measured by Python's allocator hooks
        tracemalloc.start()
        try:
            monte_carlo(net, x, cfg, 60, chunk_size=chunk_size, quantiles=(), mode=mode)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    # above the persistent arrays (and one sample), a chunk stays under the limit
    assert peak(chunk) - peak(1) < limit


# ------------------------------------------------------------------ (d) ResNet block
@pytest.mark.parametrize("mode", ["noise", "quantize"])
def test_resnet_block_with_projection_shortcut(mode):
    net = dm.resnet_block()
    x = np.random.default_rng(14).standard_normal((16, 6))
    cfg = _w8a8("channel", input=ep.Uniform(8))
    r = monte_carlo(net, x, cfg, 2000, mode=mode, seed=15)
    a = ep.analyze(net, x, cfg)
    assert list(r.nodes) == [info.name for info in net.nodes()]
    for info in net.nodes():
        node = r.node(info.name)
        assert node.mean.shape == a.node(info.name).value.shape
        assert np.all(np.isfinite(node.std)) and node.mse > 0
    np.testing.assert_allclose(r.output, net(x), rtol=1e-13)
    if mode == "noise":  # quantize mode clips moved activations at the range's end
        assert r.mse_ci[0] <= a.mse <= r.mse_ci[1]
        fast = monte_carlo(net, x, cfg, 2000, seed=15, weight_noise="output")
        assert fast.fast_sources == ("conv1.W", "conv2.W", "proj.W")
        assert _agree(r, fast)

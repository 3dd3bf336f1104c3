"""Monte Carlo: closed forms for single layers, the two modes against each other, the
fast output-noise mode against the exact one, chunk independence, float32, errors.

Statistical tolerances come from the sample size (seeds are fixed): a sample mean
is within ``K·σ/√S`` of the truth, a sample standard deviation within
``K·√((κ-1)/(4S))`` relative (``κ`` the kurtosis, bounded per test), a sample
covariance entry within ``K·√(2/S)`` of unit-normalised truth, with ``K = 5``
(≈ 6e-7 per check, so hundreds of checks stay far from a false alarm).
"""

import io
import sys
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import errprop as ep
from errprop import _mc_passes, _sampling
from errprop._montecarlo import MonteCarloResult, _Progress, monte_carlo

K = 5.0


def _single_linear(rng, n_in, n_out, bits, *, shape=None):
    """A Linear layer whose rows have max |W| = qmax·2^-6 exactly: step s = 2^-6 per row,
    no element within an ulp of clipping. Returns (net, x, W, s)."""
    qmax = 2 ** (bits - 1) - 1
    W = rng.standard_normal((n_out, n_in))
    W *= qmax * 2.0 ** -6 / np.max(np.abs(W), axis=1, keepdims=True)
    top = np.argmax(np.abs(W), axis=1)
    rows = np.arange(n_out)
    W[rows, top] = np.sign(W[rows, top]) * qmax * 2.0 ** -6  # exactly, not up to rounding
    x = rng.standard_normal(shape or (12, n_in))
    return ep.Sequential([ep.Linear(W)]), x, W, 2.0 ** -6


def _agree(a: MonteCarloResult, b: MonteCarloResult) -> bool:
    """The two MSE estimates agree within their combined 99% half-widths."""
    ha, hb = (r.mse_ci[1] - r.mse for r in (a, b))
    return abs(a.mse - b.mse) <= np.hypot(ha, hb)


# ------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("mode", ["noise", "quantize"])
def test_single_linear_nearest_matches_closed_form(mode, rng):
    net, x, W, s = _single_linear(rng, 64, 8, 6)
    S = 4000
    r = monte_carlo(net, x, ep.QuantConfig(weights=ep.Uniform(6, granularity="channel")), S,
                    mode=mode, seed=1)
    # ΔW_aj iid uniform on [-s/2, s/2] (in quantize mode: exactly so, by subtractive dither),
    # except each row's maximum, which lies on the grid and has no error
    free = np.abs(W) != np.max(np.abs(W), axis=1, keepdims=True)
    var = s * s / 12 * (x * x) @ free.T
    std = np.sqrt(var)
    # a sum of 64 uniforms: kurtosis < 3
    assert np.all(np.abs(r.std / std - 1) < K * np.sqrt(2 / (4 * S)))
    assert np.all(np.abs(r.mean) < K * std / np.sqrt(S))
    lo, hi = r.mse_ci
    assert lo <= np.mean(var) <= hi
    assert r.mse_samples.shape == (S,) and r.samples == S
    np.testing.assert_allclose(r.output, x @ W.T, rtol=1e-13)


@pytest.mark.parametrize("mode", ["noise", "quantize"])
def test_stochastic_rounding_variance(mode, rng):
    W = rng.standard_normal((6, 32))
    x = rng.standard_normal((10, 32))
    net = ep.Sequential([ep.Linear(W)])
    s = np.max(np.abs(W)) / 7  # 4-bit symmetric, restricted range
    p = W / s - np.floor(W / s)
    var = s * s * (x * x) @ (p * (1 - p)).T  # Σ_j x_j² p_aj (1 - p_aj) s²
    S = 4000
    r = monte_carlo(net, x, ep.QuantConfig(weights=ep.Uniform(4, rounding="stochastic")), S,
                    mode=mode, seed=2)
    std = np.sqrt(var)
    assert np.all(np.abs(r.std / std - 1) < K * np.sqrt(5 / (4 * S)))  # kurtosis ≤ 6
    assert np.all(np.abs(r.mean) < K * std / np.sqrt(S))  # unbiased


@pytest.mark.parametrize("mode", ["noise", "quantize"])
def test_floor_mean_matches_closed_form_and_analyze(mode, rng):
    net, x, W, s = _single_linear(rng, 48, 5, 5)
    cfg = ep.QuantConfig(weights=ep.Uniform(5, granularity="channel", rounding="floor"))
    S = 3000
    r = monte_carlo(net, x, cfg, S, mode=mode, seed=3)
    free = np.abs(W) != np.max(np.abs(W), axis=1, keepdims=True)  # the maxima are on the grid
    mean = -s / 2 * x @ free.T
    std = np.sqrt(s * s / 12 * (x * x) @ free.T)
    assert np.all(np.abs(r.mean - mean) < K * std / np.sqrt(S))
    assert np.all(np.abs(r.std / std - 1) < K * np.sqrt(2 / (4 * S)))
    # first-order statistics are exact for a linear layer: the same law, no sampling
    a = ep.analyze(net, x, cfg)
    np.testing.assert_allclose(a.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(a.std, std, rtol=1e-12)


def _high_bits(kind):
    if kind == "mlp":
        net, x = ep.mlp([16, 48, 48, 6], "tanh", seed=3), np.random.default_rng(3).standard_normal(
            (8, 16))
    else:
        net, x = ep.transformer(16, 2, 32, 1, seed=0), np.random.default_rng(0).standard_normal(
            (2, 4, 16))
    cfg = ep.QuantConfig(weights=ep.Uniform(12, granularity="channel"), biases=ep.Uniform(12),
                         activations=ep.Uniform(12), input=ep.Uniform(12), norms=ep.Uniform(12))
    return net, x, cfg


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
@pytest.mark.parametrize("mode", ["noise", "quantize"])
def test_high_bits_converge_to_first_order_statistics(kind, mode):
    # at 12 bits first order is accurate: analyze's reverse-mode mean and std under the
    # same error models are what the sampled nonlinear network must reproduce
    net, x, cfg = _high_bits(kind)
    a = ep.analyze(net, x, cfg)
    S = 2000
    r = monte_carlo(net, x, cfg, S, mode=mode, seed=21)
    assert np.all(np.abs(r.std / a.std - 1) < K * np.sqrt(3 / (4 * S)))  # kurtosis ≤ 4
    assert r.mse_ci[0] <= a.mse <= r.mse_ci[1]
    if mode == "noise":
        assert np.all(np.abs(r.mean - a.mean) < K * a.std / np.sqrt(S))
    # Not asserted in quantize mode: minmax calibration puts the largest activation on the
    # range's end, and upstream error that pushes it outward is clipped away, a mean bias
    # of about -0.4·σ(upstream) at that element (over 5σ in 4000 samples at 12 bits).


@pytest.mark.parametrize("percentile", [90.0, 20.0])  # few clipped elements / mostly clipped
def test_clipped_weights_carry_their_clipping_error(percentile, rng):
    W = rng.standard_normal((4, 40))
    x = rng.standard_normal((6, 40))
    net = ep.Sequential([ep.Linear(W)])
    bits = 6
    a = np.percentile(np.abs(W), percentile)
    s = a / (2 ** (bits - 1) - 1)
    clip_err = np.clip(W, -a, a) - W
    free = np.abs(W) <= a
    S = 2000
    r = monte_carlo(net, x, ep.QuantConfig(weights=ep.Uniform(bits, clip="percentile",
                                                              percentile=percentile)), S, seed=4)
    mean = x @ clip_err.T  # deterministic part
    std = np.sqrt(s * s / 12 * (x * x) @ free.T)  # uniform noise on the unclipped ones only
    assert np.all(np.abs(r.mean - mean) < K * std / np.sqrt(S))
    assert np.all(np.abs(r.std / std - 1) < K * np.sqrt(2 / (4 * S)))


# ------------------------------------------------------------------ the modes agree
def test_quantize_mode_agrees_with_noise_mode_at_8_bits():
    net = ep.mlp([24, 32, 32, 32, 32, 32, 8], "tanh", seed=5)
    x = np.random.default_rng(5).standard_normal((32, 24))
    runs = {}
    for bits in (8, 3):
        cfg = ep.QuantConfig(weights=ep.Uniform(8, granularity="channel"),
                             activations=ep.Uniform(bits))
        runs[bits] = [monte_carlo(net, x, cfg, 400, mode=m, seed=6) for m in ("noise", "quantize")]
        first = ep.analyze(net, x, cfg).mse
        print(f"\n{bits}-bit activations: noise {runs[bits][0]!r}\n   quantize {runs[bits][1]!r}"
              f"\n   first-order prediction {first:.4g}")
    assert _agree(*runs[8])  # at 3 bits they may disagree: only reported above


def test_quantize_mode_clips_moved_activations(rng):
    # fc2 = identity reads out its quantized input. The largest |activation| sits on the
    # end of its calibrated range; upstream error δ pushing it outward is clipped away.
    # With dither E[rint(t + u)] = t, so the mean error there is exactly -E[δ⁺] (δ
    # pointing outward), -σ/√(2π) for Gaussian δ (here a sum of 32 uniform terms).
    W1 = rng.standard_normal((8, 32)) / np.sqrt(32)
    x = rng.standard_normal((5, 32))
    net = ep.Sequential([ep.Linear(W1), ep.Linear(np.eye(8))])
    cfg = ep.QuantConfig(weights=ep.Uniform(10), activations=ep.Uniform(10),
                         overrides={"fc1": {"activations": None}, "fc2": {"weights": None}})
    S = 20000
    r = monte_carlo(net, x, cfg, S, mode="quantize", seed=16, quantiles=())
    h = x @ W1.T
    i = np.unravel_index(np.argmax(np.abs(h)), h.shape)
    s1 = np.max(np.abs(W1)) / 511
    sigma = s1 * np.sqrt(np.sum(x[i[0]] ** 2) / 12)
    assert abs(r.node("fc1").std[i] / sigma - 1) < K * np.sqrt(2 / (4 * S))
    expected = -np.sign(h[i]) * sigma / np.sqrt(2 * np.pi)
    assert abs(r.mean[i] - expected) < K * r.std[i] / np.sqrt(S) + 0.01 * abs(expected)
    # the noise model adds its noise to the moved activation and never clips it
    noise = monte_carlo(net, x, cfg, S, seed=16, quantiles=())
    assert abs(noise.mean[i]) < K * noise.std[i] / np.sqrt(S)


def test_float32_agrees_with_float64_and_resolves_the_error():
    net = ep.mlp([16, 48, 48, 4], "tanh", seed=7)
    x = np.random.default_rng(7).standard_normal((20, 16))
    cfg = ep.QuantConfig(weights=ep.Uniform(8), activations=ep.Uniform(8))
    r64 = monte_carlo(net, x, cfg, 600, seed=8)
    r32 = monte_carlo(net, x, cfg, 600, seed=8, dtype=np.float32)
    assert r32.dtype == "float32" and r32.errors.dtype == np.float32
    assert _agree(r64, r32)
    assert np.all(np.abs(r32.std / r64.std - 1) < 2 * K * np.sqrt(2 / (4 * 600)))
    # without quantization the float32 "error" is float32 rounding alone: far below
    bare = monte_carlo(net, x, ep.QuantConfig(), 3, dtype=np.float32)
    assert bare.mse < 1e-6 * r32.mse
    assert bare.mse < (1e-6 * np.max(np.abs(bare.output))) ** 2


def test_float32_warns_when_the_step_nears_float32_resolution(rng):
    net, x, _, _ = _single_linear(rng, 32, 4, 8)
    cfg = ep.QuantConfig(weights=ep.Uniform(16), input=ep.Uniform(16))
    with pytest.warns(UserWarning, match="float32.*'fc1.W'.*float64"):
        monte_carlo(net, 1e4 * x, cfg, 4, dtype=np.float32)
    monte_carlo(net, 1e4 * x, cfg, 4)  # float64: no warning (warnings are errors here)
    monte_carlo(net, 1e4 * x, ep.QuantConfig(weights=ep.Uniform(8)), 4, dtype=np.float32)


# ------------------------------------------------------------------ output-noise mode
def test_output_noise_agrees_with_exact_weight_noise():
    net = ep.mlp([64, 64, 64, 8], "tanh", seed=9)
    x = np.random.default_rng(9).standard_normal((4, 64))  # N = 4 rows < 64 inputs
    cfg = ep.QuantConfig(weights=ep.Uniform(6, granularity="channel"), activations=ep.Uniform(8))
    exact = monte_carlo(net, x, cfg, 1500, seed=10)
    fast = monte_carlo(net, x, cfg, 1500, seed=10, weight_noise="output")
    assert fast.fast_sources == ("fc1.W", "fc2.W", "fc3.W") and exact.fast_sources == ()
    assert _agree(exact, fast)


@pytest.mark.parametrize("rounding,clip_one", [("nearest", False), ("floor", False),
                                               ("nearest", True)])
def test_output_noise_single_linear_law(rounding, clip_one, rng):
    # tokens: the noise of all N = batch·tokens rows of one output unit is correlated,
    # with covariance σ_a² X Xᵀ (the same ΔW row meets every row of X); a clipped
    # element j carries its clipping error and no variance: σ_a² (X Xᵀ - x_j x_jᵀ)
    net, x, W, s = _single_linear(rng, 32, 3, 6, shape=(3, 4, 32))
    clip_err = np.zeros_like(W)
    q = ep.Uniform(6, granularity="channel", rounding=rounding)
    if clip_one:
        # column 0 holds every row's largest |W| and the largest inputs, so it would
        # carry half the variance; the range ends halfway between the two largest |W|
        W[:, 0] = 1.5 * W[:, 0] / np.abs(W[:, 0]) * np.max(np.abs(W), axis=1)
        x[..., 0] *= 5
        net = ep.Sequential([ep.Linear(W)])
        q = ep.Uniform(6, granularity="channel", clip="percentile", percentile=100 * 30.5 / 31)
        top = np.sort(np.abs(W), axis=1)
        a = (top[:, -2] + top[:, -1]) / 2
        s = a / 31
        clip_err = np.clip(W, -a[:, None], a[:, None]) - W
        assert np.count_nonzero(clip_err) == 3
    X = x.reshape(12, 32)
    S = 3000
    r = monte_carlo(net, x, ep.QuantConfig(weights=q), S, seed=11, weight_noise="output")
    assert r.fast_sources == ("fc1.W",)
    step = np.broadcast_to(s, (3,))
    # without clipping each row's maximum lies on the grid: no error there either
    free_all = (clip_err == 0) & (np.abs(W) != 31 * step[:, None])
    shift = -step / 2 if rounding == "floor" else np.zeros(3)
    mean = X @ clip_err.T + (X @ free_all.T) * shift
    e = r.errors.reshape(S, 12, 3) - mean
    for a_ in range(3):
        free = free_all[a_]
        cov = step[a_] ** 2 / 12 * X[:, free] @ X[:, free].T
        d = np.sqrt(np.diag(cov))
        assert np.all(np.abs(r.std.reshape(12, 3)[:, a_] / d - 1) < K * np.sqrt(2 / (4 * S)))
        assert np.all(np.abs(r.mean.reshape(12, 3)[:, a_] - mean[:, a_]) < K * d / np.sqrt(S))
        emp = e[:, :, a_].T @ e[:, :, a_] / S
        assert np.max(np.abs(emp - cov) / np.outer(d, d)) < K * np.sqrt(2 / S)


def test_output_noise_falls_back_where_the_law_is_not_iid_per_row(rng):
    net, x, _, _ = _single_linear(rng, 16, 4, 6)
    two_clipped = 100 * 13.5 / 15  # the two largest |W| of 16 lie beyond the range
    for q in (ep.Uniform(6, rounding="stochastic"), ep.Uniform(6, granularity="group",
                                                                 group_size=8),
              ep.Uniform(6, granularity="channel", clip="percentile", percentile=two_clipped)):
        r = monte_carlo(net, x, ep.QuantConfig(weights=q), 4, weight_noise="output")
        assert r.fast_sources == ()


# ------------------------------------------------------------------ the uniform draws
@pytest.mark.parametrize("rounding,dtype", [("nearest", np.float32), ("floor", np.float64)])
def test_noise_mode_weight_errors_are_uniform(rounding, dtype, rng):
    # x = identity: the output of sample s is W_s itself, so its error is ΔW, which must be
    # uniform on [-s/2, s/2] (nearest) or [-s, 0] (floor) per element: Kolmogorov-Smirnov
    # distance of the pooled, standardised errors, and the per-element mean and spread
    net, _, W, s = _single_linear(rng, 24, 6, 7)
    cfg = ep.QuantConfig(weights=ep.Uniform(7, granularity="channel", rounding=rounding))
    S = 3000
    r = monte_carlo(net, np.eye(24), cfg, S, seed=17, dtype=dtype)
    e = r.errors.astype(np.float64).reshape(S, -1) / s  # (S, 24·6) in units of the step
    # each row's maximum lies on the grid: exactly no error there, in every sample
    on_grid = (np.abs(W) == np.max(np.abs(W), axis=1, keepdims=True)).T.ravel()
    assert np.all(e[:, on_grid] == 0)
    e = e[:, ~on_grid]
    u = np.sort((e + (0.5 if rounding == "nearest" else 1.0)).ravel())
    assert u.min() > 0 and u.max() < 1
    ks = np.max(np.abs(u - (np.arange(u.size) + 0.5) / u.size))
    assert ks < 1.63 / np.sqrt(S) / 2  # the 1% critical value is 1.63/√n, n = S·138 here
    mean = -0.5 if rounding == "floor" else 0.0
    assert np.all(np.abs(e.mean(axis=0) - mean) < K * np.sqrt(1 / 12 / S))
    assert np.all(np.abs(e.std(axis=0) / np.sqrt(1 / 12) - 1) < K * np.sqrt(0.8 / (4 * S)))


def test_parallel_draws_and_statistics_match_serial(monkeypatch):
    # large enough for the thread pool (≥ 2^18 draws or statistics elements per chunk);
    # the parts are separate streams, so threads change nothing, bitwise
    net = ep.mlp([96, 640, 8], "tanh", seed=18)
    x = np.random.default_rng(18).standard_normal((64, 96))
    cfg = ep.QuantConfig(weights=ep.Uniform(8, granularity="channel"),
                         activations=ep.Uniform(8))
    if _sampling._threads() is None:  # one CPU: force a pool to exercise the threaded path
        pool = ThreadPoolExecutor(2)
        monkeypatch.setattr(_sampling, "_threads", lambda: pool)
        monkeypatch.setattr(_mc_passes, "_threads", lambda: pool)
    threaded = monte_carlo(net, x, cfg, 12, chunk_size=6, dtype=np.float32, seed=19,
                           quantile_nodes="all")
    monkeypatch.setattr(_sampling, "_threads", lambda: None)
    monkeypatch.setattr(_mc_passes, "_threads", lambda: None)
    serial = monte_carlo(net, x, cfg, 12, chunk_size=6, dtype=np.float32, seed=19,
                         quantile_nodes="all")
    np.testing.assert_array_equal(threaded.errors, serial.errors)
    for name, node in serial.nodes.items():
        np.testing.assert_array_equal(threaded.nodes[name].mse_samples, node.mse_samples)
        np.testing.assert_array_equal(threaded.nodes[name].mean, node.mean)
        np.testing.assert_array_equal(threaded.nodes[name].quantiles[0.5], node.quantiles[0.5])


def _threaded_run_in_child(conn):  # pragma: no cover - runs in a forked child
    net = ep.mlp([96, 640, 8], "tanh", seed=18)
    x = np.random.default_rng(18).standard_normal((64, 96))
    r = monte_carlo(net, x, ep.QuantConfig(weights=ep.Uniform(8)), 4, seed=19)
    conn.send(r.mse_samples)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_sampling_threads_survive_fork():
    # the pool's threads do not exist in a forked child: it must make its own, not hang
    import multiprocessing

    net = ep.mlp([96, 640, 8], "tanh", seed=18)
    x = np.random.default_rng(18).standard_normal((64, 96))
    here = monte_carlo(net, x, ep.QuantConfig(weights=ep.Uniform(8)), 4, seed=19)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_threaded_run_in_child, args=(child,))
    proc.start()
    proc.join(60)
    if proc.is_alive():
        proc.kill()
        pytest.fail("monte_carlo hung in a forked child")
    np.testing.assert_array_equal(parent.recv(), here.mse_samples)


@pytest.mark.parametrize("percentile", [100.0, 95.0, 30.0])
def test_clipping_mask_matches_the_error_model(percentile, rng):
    # the sampler evaluates the error model only outside the range; it must agree with
    # the full model everywhere (values on, within an ulp of, and beyond the range's end)
    W = rng.standard_normal((7, 50))
    W[0, :3] = [np.max(np.abs(W)), -np.max(np.abs(W)), 0.0]
    for rounding in ("nearest", "floor", "stochastic"):
        q = ep.Uniform(5, granularity="channel", clip="percentile", percentile=percentile,
                       rounding=rounding)
        grid = q.fit(W, channel_axis=0, what="W")
        W2 = W.copy()
        W2[1, 0] = np.nextafter(np.broadcast_to(grid.hi, W.shape)[1, 0], np.inf)
        model = grid.error_model(W2)
        clipped, mean = _sampling._clipping(grid, W2)
        np.testing.assert_array_equal(clipped, model.clipped)
        np.testing.assert_array_equal(mean[clipped], model.mean[clipped])


# ------------------------------------------------------------------ per-node quantiles
def test_node_quantiles_match_a_brute_force_run(rng):
    # An independent brute-force sampler written here (its own generator): weight errors
    # uniform on [-s/2, s/2] per row (zero at the on-grid row maxima), run through the network, np.quantile per element at
    # every node. Distribution-free comparison: the reference's empirical CDF at
    # errprop's quantile q̂ must be q within K·√(q(1-q)(1/S + 1/S_ref)) (+1/S_ref for ties).
    bits, qmax = 6, 31
    W1 = rng.standard_normal((5, 6))
    W2 = rng.standard_normal((3, 5))
    b1 = rng.standard_normal(5)
    for W in (W1, W2):  # every row's max |W| exactly on the grid: step 2^-4 per row
        W *= qmax * 2.0 ** -4 / np.max(np.abs(W), axis=1, keepdims=True)
        top = np.argmax(np.abs(W), axis=1)
        W[np.arange(len(W)), top] = np.sign(W[np.arange(len(W)), top]) * qmax * 2.0 ** -4
    s = 2.0 ** -4
    x = rng.standard_normal((4, 6))
    net = ep.Sequential([ep.Linear(W1, b1), ep.Activation("tanh"), ep.Linear(W2)])
    cfg = ep.QuantConfig(weights=ep.Uniform(bits, granularity="channel"))
    qs = (0.02, 0.3, 0.5, 0.9, 0.995)
    S = 4000
    r = monte_carlo(net, x, cfg, S, seed=20, quantiles=qs, chunk_size=300, quantile_nodes="all")

    S_ref = 40000
    g = np.random.default_rng(12345)
    # the row maxima lie on the grid: quantized exactly, no error there
    dW1 = g.uniform(-s / 2, s / 2, (S_ref, 5, 6)) * (np.abs(W1) != qmax * s)
    dW2 = g.uniform(-s / 2, s / 2, (S_ref, 3, 5)) * (np.abs(W2) != qmax * s)
    h = x @ W1.T + b1
    h_s = np.einsum("bi,sji->sbj", x, W1 + dW1) + b1
    a, a_s = np.tanh(h), np.tanh(h_s)
    out_s = np.einsum("sbi,sji->sbj", a_s, W2 + dW2)
    ref = {"fc1": h_s - h, "tanh1": a_s - a, "fc2": out_s - a @ W2.T}
    assert list(r.nodes) == list(ref)
    for name, e_ref in ref.items():
        node = r.node(name)
        assert node.quantile_samples == S
        for q in qs:
            q_hat = node.quantiles[q]
            assert q_hat.shape == e_ref.shape[1:]
            cdf = np.mean(e_ref <= q_hat, axis=0)
            tol = K * np.sqrt(q * (1 - q) * (1 / S + 1 / S_ref)) + 1 / S_ref
            assert np.all(np.abs(cdf - q) < tol), (name, q, np.max(np.abs(cdf - q)), tol)
    np.testing.assert_array_equal(r.node("fc2").quantiles[0.5], r.quantiles[0.5])


def test_node_quantiles_keep_the_first_samples_that_fit():
    net = ep.mlp([8, 16, 16, 4], "tanh", seed=22)
    x = np.random.default_rng(22).standard_normal((10, 8))
    cfg = ep.QuantConfig(weights=ep.Uniform(6), activations=ep.Uniform(6))
    S, K_ = 40, 11
    out_bytes = S * 10 * 4 * 8  # the output keeps every sample (float64)
    hidden = 4 * 10 * 16 * 8  # fc1, tanh1, fc2, tanh2 per sample
    limit = out_bytes + 2 * (K_ * hidden + hidden // 2)
    r = monte_carlo(net, x, cfg, S, seed=23, memory_limit=limit, chunk_size=3,
                    quantile_nodes="all")
    small = monte_carlo(net, x, cfg, K_, seed=23, quantile_nodes="all")  # the first K samples
    assert r.node("fc3").quantile_samples == S
    for name in ("fc1", "tanh1", "fc2", "tanh2"):
        assert r.node(name).quantile_samples == K_ and small.node(name).quantile_samples == K_
        for q in r.quantiles:
            np.testing.assert_array_equal(r.node(name).quantiles[q], small.node(name).quantiles[q])
    # the moments still use every sample
    full = monte_carlo(net, x, cfg, S, seed=23)
    np.testing.assert_array_equal(r.node("fc1").mse_samples, full.node("fc1").mse_samples)
    tiny = monte_carlo(net, x, cfg, S, seed=23, memory_limit=out_bytes + hidden, chunk_size=3,
                       quantile_nodes="all")
    assert tiny.node("fc1").quantile_samples == 0 and tiny.node("fc1").quantiles == {}
    assert tiny.node("fc3").quantile_samples == S


def test_quantiles_at_the_output_only_by_default():
    # exact quantiles at hidden nodes are opt-in (quantile_nodes=); what they are, and
    # everything else, does not depend on which nodes keep samples
    net, x, cfg = _mixed_transformer()
    default = monte_carlo(net, x, cfg, 30, seed=25, chunk_size=7)
    every = monte_carlo(net, x, cfg, 30, seed=25, chunk_size=7, quantile_nodes="all")
    one = monte_carlo(net, x, cfg, 30, seed=25, chunk_size=7, quantile_nodes=["block0.res1"])
    last = net.nodes()[-1].name
    e = default.errors.astype(np.float64)
    for q in (0.005, 0.5, 0.995):  # the output: numpy.quantile of its kept samples
        np.testing.assert_allclose(default.quantiles[q], np.quantile(e, q, axis=0), rtol=1e-12)
        np.testing.assert_array_equal(default.node(last).quantiles[q], default.quantiles[q])
    for name, node in default.nodes.items():
        hidden = name != last
        assert (node.quantiles == {}) == hidden
        assert node.quantile_samples == (0 if hidden else 30)
        assert every.node(name).quantile_samples == 30
        assert (one.node(name).quantile_samples == 30) == (name in ("block0.res1", last))
        np.testing.assert_array_equal(node.mse_samples, every.node(name).mse_samples)
        np.testing.assert_array_equal(node.mean, every.node(name).mean)
    for q in every.quantiles:
        np.testing.assert_array_equal(one.node("block0.res1").quantiles[q],
                                      every.node("block0.res1").quantiles[q])


def test_nodes_selects_what_is_recorded():
    net, x, cfg = _mixed_transformer()
    full = monte_carlo(net, x, cfg, 20, seed=24, chunk_size=6)
    last = net.nodes()[-1].name
    some = monte_carlo(net, x, cfg, 20, seed=24, chunk_size=6, nodes=["block0.res1"])
    only = monte_carlo(net, x, cfg, 20, seed=24, chunk_size=6, nodes=())
    assert list(some.nodes) == ["block0.res1", last] and list(only.nodes) == [last]
    for r in (some, only):  # the same samples, the same statistics
        np.testing.assert_array_equal(r.errors, full.errors)
        for name, node in r.nodes.items():
            np.testing.assert_array_equal(node.mse_samples, full.nodes[name].mse_samples)
            np.testing.assert_allclose(node.std, full.nodes[name].std, rtol=1e-12)
    with pytest.raises(ValueError, match="did you mean .block0.attn."):
        monte_carlo(net, x, cfg, 4, nodes=["block0.attm"])
    with pytest.raises(ValueError, match="nodes must be 'all'"):
        monte_carlo(net, x, cfg, 4, nodes="fc1")


# ------------------------------------------------------------------ engine properties
def _mixed_transformer():
    net = ep.transformer(16, 2, 32, 1, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 5, 16))
    cfg = ep.QuantConfig(weights=ep.Uniform(6, rounding="stochastic"), biases=ep.Uniform(8),
                         norms=ep.Uniform(6, rounding="floor"), input=ep.Uniform(6),
                         activations=ep.Uniform(6, clip="percentile", percentile=60),
                         overrides={"block0.mlp.fc2": {"weights": ep.Uniform(5)}})
    return net, x, cfg


@pytest.mark.parametrize("mode,weight_noise,dtype", [("noise", "exact", np.float64),
                                                     ("quantize", "exact", np.float64),
                                                     ("noise", "output", np.float32),
                                                     ("quantize", "exact", np.float32)])
def test_results_do_not_depend_on_chunk_size(mode, weight_noise, dtype):
    net, x, cfg = _mixed_transformer()
    S = 70  # crosses a 64-sample stream block
    runs = [monte_carlo(net, x, cfg, S, mode=mode, chunk_size=c, weight_noise=weight_noise,
                        dtype=dtype, seed=12, quantile_nodes="all") for c in (1, 7, S)]
    assert [r.chunk_size for r in runs] == [1, 7, S]
    if weight_noise == "output":
        assert runs[0].fast_sources == ("block0.mlp.fc2.W",)
    ref = runs[0]
    for r in runs[1:]:
        np.testing.assert_array_equal(r.errors, ref.errors)  # the samples: bitwise
        np.testing.assert_array_equal(r.mse_samples, ref.mse_samples)
        for q in ref.quantiles:
            np.testing.assert_array_equal(r.quantiles[q], ref.quantiles[q])
        for name, node in ref.nodes.items():
            assert r.nodes[name].quantile_samples == S
            for q in ref.quantiles:  # kept samples: bitwise
                np.testing.assert_array_equal(r.nodes[name].quantiles[q], node.quantiles[q])
        for name, node in ref.nodes.items():  # sums over chunks: summation order only
            np.testing.assert_allclose(r.nodes[name].mean, node.mean, rtol=1e-12,
                                       atol=1e-12 * np.max(np.abs(node.mean)))
            np.testing.assert_allclose(r.nodes[name].std, node.std, rtol=1e-12)
            np.testing.assert_allclose(r.nodes[name].mse, node.mse, rtol=1e-12)


def test_statistics_match_the_kept_samples(rng):
    net, x, cfg = _mixed_transformer()
    r = monte_carlo(net, x, cfg, 50, chunk_size=8, quantiles=(0.0, 0.25, 1.0), seed=13)
    e = r.errors.astype(np.float64)
    np.testing.assert_allclose(r.mean, e.mean(axis=0), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(r.std, e.std(axis=0, ddof=1), rtol=1e-10)
    per_sample = np.mean(e.reshape(50, -1) ** 2, axis=1)
    np.testing.assert_allclose(r.mse_samples, per_sample, rtol=1e-12)
    half = 2.5758293035489004 * per_sample.std(ddof=1) / np.sqrt(50)
    np.testing.assert_allclose(r.mse_ci, (per_sample.mean() - half, per_sample.mean() + half),
                               rtol=1e-12)
    np.testing.assert_array_equal(r.quantiles[0.0], e.min(axis=0))
    np.testing.assert_array_equal(r.quantiles[1.0], e.max(axis=0))
    np.testing.assert_allclose(r.output, net(x), rtol=1e-13)
    # the last node is the output
    last = net.nodes()[-1].name
    np.testing.assert_array_equal(r.node(last).mean, r.mean)


def test_seed_reproduces_and_differs():
    net, x, cfg = _mixed_transformer()
    a = monte_carlo(net, x, cfg, 5, seed=1)
    b = monte_carlo(net, x, cfg, 5, seed=2)
    c = monte_carlo(net, x, cfg, 5, seed=None)
    assert not np.array_equal(a.errors, b.errors)
    np.testing.assert_array_equal(monte_carlo(net, x, cfg, 5, seed=c.seed).errors, c.errors)


@pytest.mark.parametrize("mode", ["noise", "quantize"])
def test_transformer_covers_every_node(mode):
    net = ep.transformer(16, 2, 32, 2, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 5, 16))
    cfg = ep.QuantConfig(weights=ep.Uniform(8), biases=ep.Uniform(8), norms=ep.Uniform(8),
                         activations=ep.Uniform(8), input=ep.Uniform(8))
    r = monte_carlo(net, x, cfg, 200, mode=mode, seed=14)
    a = ep.analyze(net, x, cfg)
    assert list(r.nodes) == [info.name for info in net.nodes()]
    for info in net.nodes():
        node = r.node(info.name)
        assert node.mean.shape == node.std.shape == a.node(info.name).value.shape
        assert np.all(np.isfinite(node.std)) and node.mse > 0
        assert node.mse_ci[0] <= node.mse <= node.mse_ci[1]
    # at 8 bits the first-order statistics describe the sampled error well
    assert 0.7 * a.mse < r.mse < 1.4 * a.mse
    with pytest.raises(KeyError, match="did you mean"):
        r.node("block0.atn")


@pytest.mark.parametrize("mode", ["noise", "quantize"])
def test_chunk_size_keeps_memory_under_the_limit(mode):
    # long sequences: attention scores (batch·heads·tokens²) dwarf the node values
    net = ep.transformer(16, 4, 32, 1, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 128, 16))
    cfg = ep.QuantConfig(weights=ep.Uniform(8), activations=ep.Uniform(8))
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


def test_keeping_samples_for_quantiles_respects_the_limit(rng):
    net, x, _, _ = _single_linear(rng, 8, 4, 8)
    cfg = ep.QuantConfig(weights=ep.Uniform(8))
    with pytest.raises(ValueError, match="quantiles=()"):
        monte_carlo(net, x, cfg, 1000, memory_limit=10_000)
    r = monte_carlo(net, x, cfg, 1000, memory_limit=10_000, quantiles=())
    assert r.errors is None and r.quantiles == {}


def test_progress_line(capsys, rng):
    net, x, _, _ = _single_linear(rng, 8, 4, 8)
    cfg = ep.QuantConfig(weights=ep.Uniform(8))
    monte_carlo(net, x, cfg, 10, chunk_size=3, progress=True)
    err = capsys.readouterr().err
    assert "monte_carlo: 10/10 samples" in err and err.endswith("\n")
    for progress in (False, None):  # None: stderr is not a terminal under pytest
        monte_carlo(net, x, cfg, 10, chunk_size=3, progress=progress)
        assert capsys.readouterr().err == ""


class _FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("first_chunk_seconds,shown", [(0.5, True), (0.1, False)])
def test_automatic_progress_needs_a_terminal_and_a_long_run(first_chunk_seconds, shown):
    # 1 of 10 samples done: expected total 10× the first chunk's time, shown if > 2 s
    for stream, expect in ((_FakeTerminal(), shown), (io.StringIO(), False)):
        bar = _Progress(10, None, stream)
        bar.update(1, first_chunk_seconds)
        bar.update(10, 10 * first_chunk_seconds)
        bar.close()
        assert ("monte_carlo: 10/10 samples" in stream.getvalue()) == expect


def test_overflow_is_reported_per_node():
    # the float output 1.6e308 is finite; 2-bit weight noise (s = 1.2e153) overflows it
    net = ep.Sequential([ep.Linear([[1e153, 1.2e153]]), ep.Activation("identity")])
    x = np.array([[1.6e155, 0.0]])
    np.testing.assert_allclose(net(x), [[1.6e308]])
    with pytest.raises(ValueError, match="node 'fc1': a Monte Carlo sample .*NaN/Inf"):
        monte_carlo(net, x, ep.QuantConfig(weights=ep.Uniform(2)), 20)


# ------------------------------------------------------------------ bad input
def _small():
    return ep.mlp([3, 4, 2], seed=0), np.ones((2, 3)), ep.QuantConfig(weights=ep.Uniform(8))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(samples=1), ValueError, r"samples must be an integer in \[2, inf\], got 1 \(a "
                                  r"standard deviation needs two samples\)"),
    (dict(samples=2.5), TypeError, r"samples must be an integer, got 2.5 \(float\)"),
    (dict(samples=True), TypeError, r"samples must be an integer, got True \(bool\)"),
    (dict(mode="exact"), ValueError, "mode.*'exact'"),
    (dict(dtype=np.float16), ValueError, "dtype.*float16"),
    (dict(dtype="int32"), ValueError, "dtype.*'int32'"),
    (dict(weight_noise="fast"), ValueError, "weight_noise.*'fast'"),
    (dict(weight_noise="output", mode="quantize"), ValueError, "needs mode='noise'"),
    (dict(chunk_size=0), ValueError, "chunk_size.*got 0"),
    (dict(chunk_size="8"), TypeError, r"chunk_size must be an integer, got '8' \(str\)"),
    (dict(memory_limit=-1), ValueError, "memory_limit.*-1"),
    (dict(memory_limit=-5), ValueError, r"monte_carlo: memory_limit \(bytes\) must be an "
                                        r"integer in \[1, inf\], got -5"),
    (dict(memory_limit=0), ValueError, r"memory_limit \(bytes\) must be an integer in "
                                       r"\[1, inf\], got 0"),
    (dict(memory_limit="big"), TypeError, r"monte_carlo: memory_limit \(bytes\) must be an "
                                          r"integer, got 'big' \(str\)"),
    (dict(memory_limit=2.0 ** 30), TypeError, "memory_limit .* must be an integer, got "
                                              "1073741824.0 \\(float\\)"),
    (dict(memory_limit=None), TypeError, "memory_limit .* must be an integer, got None"),
    (dict(quantiles=(0.5, 1.5)), ValueError, "quantile.*1.5"),
    (dict(quantiles="0.5"), TypeError, "quantiles.*'0.5'"),
    (dict(seed=-3), ValueError, "seed.*-3"),
    (dict(seed="abc"), ValueError, r"monte_carlo: seed must be a non-negative integer or None, "
                                   r"got 'abc' \(str\)"),
    (dict(seed=1.0), ValueError, r"seed must be a non-negative integer or None, got 1.0"),
    (dict(quantile_nodes="fc1"), ValueError, "quantile_nodes must be 'all' or a sequence"),
    (dict(quantile_nodes=["fc9"]), ValueError, "quantile_nodes: .*'fc9'.*did you mean"),
    (dict(quantile_nodes=["fc1"], nodes=()), ValueError,
     "quantile_nodes: node 'fc1' is not recorded; add it to nodes="),
    (dict(progress="yes"), TypeError, "progress.*'yes'"),
])
def test_bad_options(kw, exc, match):
    net, x, cfg = _small()
    kw = dict(dict(samples=4), **kw)
    with pytest.raises(exc, match=match):
        monte_carlo(net, x, cfg, **kw)


def test_bad_network_input_and_config():
    net, x, cfg = _small()
    with pytest.raises(TypeError, match="QuantConfig, got dict"):
        monte_carlo(net, x, {"weights": ep.Uniform(8)}, 4)
    with pytest.raises(TypeError, match="Sequential network, got list"):
        monte_carlo([net], x, cfg, 4)
    with pytest.raises(ValueError, match="expects inputs with 3 features.*\\(2, 5\\)"):
        monte_carlo(net, np.ones((2, 5)), cfg, 4)
    with pytest.raises(ValueError, match="NaN/Inf"):
        monte_carlo(net, np.full((2, 3), np.nan), cfg, 4)
    with pytest.raises(ValueError, match="matches no layer"):
        monte_carlo(net, x, ep.QuantConfig(overrides={"fc9": {"weights": ep.Uniform(4)}}), 4)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-s"]))


def test_quantize_mode_keeps_the_grid_arithmetic():
    """The sampler's grid keeps every setting of the fitted grid (arithmetic="torch"
    included), only cast to the run's dtype."""
    import dataclasses
    from errprop._config import Source
    from errprop._sampling import _sampler
    q = ep.Uniform(4, arithmetic="torch")
    value = np.linspace(-1, 1, 12).reshape(3, 4)
    grid = q.fit(value)
    src = Source("fc1.W", "fc1", "weight", "W", q)
    for dtype in (np.float32, np.float64):
        s = _sampler(0, src, value, grid, "quantize", np.dtype(dtype))
        assert s.grid.arithmetic == "torch" and s.grid.scale.dtype == dtype
        for field in dataclasses.fields(grid):
            a, b = getattr(s.grid, field.name), getattr(grid, field.name)
            assert np.array_equal(a, b) if isinstance(b, np.ndarray) else a == b

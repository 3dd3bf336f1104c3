"""First-order output statistics and the worst case, against closed forms and brute force.

References written in the test: the single-layer closed forms
(``std_i = sqrt(s²/12 · Σ_j x_j²)``, worst case ``(s/2)·Σ_j |x_j|`` plus the bias
term, floor mean ``−(s/2)·Σ_j x_j``), a plain-NumPy first-order error of a small MLP
for thousands of error patterns inside the quantizer boxes, and the empirical
variance of those patterns' first-order errors.
"""

import numpy as np
import pytest

import errprop as ep


def _step(q, v):
    return float(np.ravel(q.fit(v).scale)[0])


@pytest.mark.parametrize("tokens", [None, 3])
def test_single_linear_closed_forms(tokens, rng, free):
    W, b = rng.standard_normal((5, 7)), rng.standard_normal(5)
    shape = (4, 7) if tokens is None else (4, tokens, 7)
    x = rng.standard_normal(shape)
    net = ep.Sequential([ep.Linear(W, b)])
    qw, qb = ep.Uniform(6), ep.Uniform(4)
    r = ep.analyze(net, x, ep.QuantConfig(weights=qw, biases=qb))
    sw, sb = _step(qw, W), _step(qb, b)
    # the largest |W| and |b| lie on their grids: no error there
    fw, fb = free(W, sw), free(b, sb)
    if tokens is None:
        std = np.sqrt(sw ** 2 / 12 * (x ** 2) @ fw.T + sb ** 2 / 12 * fb)
        worst = sw / 2 * np.abs(x) @ fw.T + sb / 2 * fb
        np.testing.assert_allclose(r.std, np.broadcast_to(std, r.std.shape), rtol=1e-12)
        np.testing.assert_allclose(r.worst_case, np.broadcast_to(worst, r.std.shape),
                                   rtol=1e-12)
    else:
        # the same weight error hits every token of a sequence: Var Δy[t, a] is still
        # s²/12·Σ_j x[t, j]² per element, but tokens are correlated (checked below)
        std = np.sqrt(sw ** 2 / 12 * (x ** 2) @ fw.T + sb ** 2 / 12 * fb)
        np.testing.assert_allclose(r.std, np.broadcast_to(std, r.std.shape), rtol=1e-12)
    np.testing.assert_allclose(r.mean, 0.0, atol=1e-15)
    assert r.mse == pytest.approx(np.mean(r.std ** 2), rel=1e-12)


def test_floor_rounding_mean(rng):
    W, x = rng.standard_normal((3, 6)), rng.standard_normal((5, 6))
    q = ep.Uniform(5, rounding="floor")
    r = ep.analyze(ep.Sequential([ep.Linear(W)]), x, ep.QuantConfig(weights=q))
    s = _step(q, W)
    fw = np.floor(W / s) * s != W  # the largest |W| is on the grid: floor keeps it
    np.testing.assert_allclose(r.mean, -s / 2 * x @ fw.T, rtol=1e-12)
    assert r.mse == pytest.approx(np.mean(r.std ** 2 + r.mean ** 2), rel=1e-12)


def test_stochastic_rounding_variance_is_exact_given_the_values(rng):
    W, x = rng.standard_normal((3, 6)), rng.standard_normal((5, 6))
    q = ep.Uniform(4, rounding="stochastic")
    r = ep.analyze(ep.Sequential([ep.Linear(W)]), x, ep.QuantConfig(weights=q))
    s = _step(q, W)
    p = W / s - np.floor(W / s)
    var_W = p * (1 - p) * s ** 2
    np.testing.assert_allclose(r.std ** 2, (x ** 2) @ var_W.T, rtol=1e-12)


# ------------------------------------------------------------------- a small MLP by hand
def _mlp_first_order(Ws, bs, x, dWs):
    """First-order output error of tanh MLP(Ws, bs) for weight errors dWs (plain NumPy).

    dWs entries may carry a leading pattern axis P; returns (P, batch, out).
    """
    h, dh = x, 0.0
    for i, (W, b, dW) in enumerate(zip(Ws, bs, dWs)):
        z = h @ W.T + b
        dz = np.einsum("bi,poi->pbo", h, dW)
        if i:
            dz = dz + dh @ W.T
        if i < len(Ws) - 1:
            h, dh = np.tanh(z), (1 - np.tanh(z) ** 2) * dz
        else:
            h, dh = z, dz
    return dh


@pytest.fixture
def small_mlp(rng, free):
    net = ep.mlp([6, 12, 9, 4], "tanh", seed=3)
    x = rng.standard_normal((7, 6))
    q = ep.Uniform(5, granularity="channel")
    r = ep.analyze(net, x, ep.QuantConfig(weights=q))
    Ws = [op.params["W"] for _, op in net.layers() if "W" in op.params]
    bs = [op.params["b"] for _, op in net.layers() if "W" in op.params]
    steps = [np.broadcast_to(q.fit(W).scale, W.shape) for W in Ws]
    # each row's maximum is on its grid and exact: its box has width 0
    steps = [np.where(free(W, s), s, 0.0) for W, s in zip(Ws, steps)]
    return r, Ws, bs, x, steps


def test_worst_case_dominates_random_and_adversarial_patterns(small_mlp, rng):
    r, Ws, bs, x, steps = small_mlp
    P = 4000
    patterns = [s / 2 * rng.uniform(-1, 1, size=(P, *s.shape)) for s in steps]
    corners = [s / 2 * rng.choice([-1.0, 1.0], size=(P, *s.shape)) for s in steps]
    for dWs in (patterns, corners):
        dy = _mlp_first_order(Ws, bs, x, dWs)
        assert np.all(np.abs(dy) <= r.worst_case * (1 + 1e-12))
    # the worst case of one output element is attained by its own sign-aligned pattern
    # (found here by coordinate ascent over the corners, independent of errprop)
    n, i = 2, 1
    e = [s / 2 for s in steps]
    for _ in range(3):
        for li in range(len(e)):
            grad = np.zeros_like(e[li])
            it = np.nditer(grad, flags=["multi_index"])
            for _unused in it:
                unit = [np.zeros((1, *s.shape)) for s in steps]
                unit[li][(0, *it.multi_index)] = 1.0
                grad[it.multi_index] = _mlp_first_order(Ws, bs, x, unit)[0, n, i]
            e[li] = steps[li] / 2 * np.sign(grad)
    best = abs(_mlp_first_order(Ws, bs, x, [a[None] for a in e])[0, n, i])
    assert best == pytest.approx(r.worst_case[n, i], rel=1e-10)


def test_std_matches_the_variance_of_random_patterns(small_mlp, rng):
    # uniform errors in the box have variance s²/12: the first-order error of many
    # such patterns has the predicted per-element variance
    r, Ws, bs, x, steps = small_mlp
    P = 20000
    dWs = [s / 2 * rng.uniform(-1, 1, size=(P, *s.shape)) for s in steps]
    dy = _mlp_first_order(Ws, bs, x, dWs)
    var_hat = dy.var(axis=0)
    # relative standard error of a variance estimate ~ sqrt(2/P) (≤ for near-Gaussian sums)
    tol = 5 * np.sqrt(2.0 / P)
    np.testing.assert_allclose(var_hat / r.std ** 2, 1.0, atol=tol)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_mse_contributions_add_up(norm, rng):
    net = ep.transformer(8, 2, 16, 2, norm=norm, seed=0)
    x = rng.standard_normal((2, 3, 8))
    q = ep.Uniform(6, rounding="floor")
    r = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(6), biases=q, activations=q,
                                          norms=ep.Uniform(7), input=ep.Uniform(8)))
    contrib = r.mse_contributions
    assert set(contrib) == set(r.sources)
    assert sum(contrib.values()) == pytest.approx(r.mse, rel=1e-10)
    assert all(v >= 0 for k, v in r.statistics.var_contributions.items()
               for v in [v.min()])
    np.testing.assert_allclose(sum(r.statistics.worst_contributions.values()), r.worst_case,
                               rtol=1e-12)


def test_transformer_worst_case_bounds_the_exact_error_at_high_bits(rng):
    # at 12 bits the exact error is first order to ~0.1%: the bound must hold for it
    net = ep.transformer(8, 2, 16, 2, seed=1)
    x = rng.standard_normal((2, 4, 8))
    r = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(12), biases=ep.Uniform(12)))
    assert np.all(np.abs(r.exact) <= r.worst_case * 1.01)
    assert np.all(np.abs(r.first_order) <= r.worst_case * (1 + 1e-12))


def test_chunking_does_not_change_statistics(rng):
    net = ep.transformer(8, 2, 16, 1, seed=2)
    x = rng.standard_normal((3, 4, 8))
    cfg = ep.QuantConfig(weights=ep.Uniform(6), activations=ep.Uniform(6))
    big = ep.analyze(net, x, cfg).statistics
    tiny = ep.analyze(net, x, cfg, memory_limit=1).statistics
    for a, b in ((big.std, tiny.std), (big.worst_case, tiny.worst_case),
                 (big.mean, tiny.mean)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize("method, slack", [("bernstein", 1.0), ("hoeffding", 1.0),
                                           ("gaussian", 1.5)])
def test_high_probability_bounds_cover_random_patterns(small_mlp, method, slack, rng):
    r, Ws, bs, x, steps = small_mlp
    P = 20000
    dWs = [s / 2 * rng.uniform(-1, 1, size=(P, *s.shape)) for s in steps]
    dy = np.abs(_mlp_first_order(Ws, bs, x, dWs))
    for confidence in (0.9, 0.99):
        bound = r.bound(confidence, method)
        assert np.all(bound <= r.worst_case)
        miss = np.mean(dy > bound, axis=0)
        delta = 1 - confidence
        # distribution-free bounds must hold; the Gaussian one approximately
        tol = 4 * np.sqrt(delta / P)
        assert miss.max() <= slack * delta + tol, (method, confidence, miss.max())
    # the distribution-free bounds are valid but looser than the Gaussian one
    assert np.all(r.bound(0.99, "gaussian") <= r.bound(0.99, "hoeffding") + 1e-15)


def test_bound_rejects_bad_arguments(small_mlp):
    r = small_mlp[0]
    with pytest.raises(ValueError, match="confidence must be in"):
        r.bound(1.0)
    with pytest.raises(ValueError, match="method must be"):
        r.bound(0.9, "chebyshev")


def test_probe_estimates_match_exact_statistics(rng):
    # at the output the probe estimate must agree with the exact reverse-mode value
    net = ep.transformer(8, 2, 16, 2, seed=4)
    x = rng.standard_normal((3, 4, 8))
    r = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(6), activations=ep.Uniform(6),
                                          biases=ep.Uniform(6, rounding="floor")))
    P = 400
    nodes = r.node_statistics(probes=P, seed=1)
    assert list(nodes) == list(r.nodes)
    out = nodes["ln_f"]
    np.testing.assert_allclose(out.mean, r.mean, rtol=1e-10, atol=1e-16)
    assert abs(out.mse - r.mse) < 4 * out.mse_se
    # per element: relative error of a variance estimate from P Rademacher probes
    ratio = out.std ** 2 / r.std ** 2
    assert np.all(np.abs(ratio - 1) < 5 * np.sqrt(2 / P))


def test_probe_estimates_at_a_hidden_node(small_mlp, rng):
    # the hidden pre-activation fc2 of the hand-written MLP: variance of its first-order
    # error over random uniform patterns, against the probe estimate
    r, Ws, bs, x, steps = small_mlp
    P = 20000
    dWs = [s / 2 * rng.uniform(-1, 1, size=(P, *s.shape)) for s in steps[:2]]
    dy = _mlp_first_order(Ws[:2], bs[:2], x, dWs)  # the first two layers: fc1, tanh, fc2
    est = r.node_statistics(probes=2000, seed=3)["fc2"]
    assert abs(est.mse - np.mean(dy ** 2)) < 4 * est.mse_se + 4 * np.std(
        np.mean(dy.reshape(P, -1) ** 2, axis=1)) / np.sqrt(P)


def test_probe_count_is_validated(small_mlp):
    with pytest.raises(ValueError, match="probes must be an integer >= 2"):
        small_mlp[0].node_statistics(probes=1)


@pytest.mark.parametrize("make, shape", [
    (lambda: ep.mlp([6, 16, 16, 3], "relu", seed=1), (9, 6)),
    (lambda: ep.transformer(8, 2, 16, 2, seed=1), (2, 4, 8)),
    (lambda: ep.transformer(8, 2, 16, 1, norm="post", causal=True, seed=2), (2, 4, 8)),
])
def test_interval_bounds_dominate(make, shape, rng):
    net = make()
    x = rng.standard_normal(shape)
    r = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(6), biases=ep.Uniform(6),
                                          activations=ep.Uniform(6), norms=ep.Uniform(6),
                                          input=ep.Uniform(8)))
    bounds = r.interval_nodes
    assert list(bounds) == list(r.nodes)
    # the first-order error of the actual pattern is one pattern inside the boxes
    for name, node in r.nodes.items():
        assert np.all(np.abs(node.first_order) <= bounds[name] * (1 + 1e-12) + 1e-300), name
    # at the output the interval bound is never tighter than the exact worst case
    assert np.all(bounds[list(bounds)[-1]] >= r.worst_case * (1 - 1e-12))


def test_interval_bound_is_exact_for_one_linear_layer(rng):
    net = ep.Sequential([ep.Linear(rng.standard_normal((3, 5)), rng.standard_normal(3))])
    x = rng.standard_normal((4, 5))
    r = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(6), biases=ep.Uniform(6)))
    np.testing.assert_allclose(r.interval_nodes["fc1"], r.worst_case, rtol=1e-12)


def test_norm_bound_dominates_every_pattern(small_mlp, rng):
    r, Ws, bs, x, steps = small_mlp
    P = 4000
    for draw in (lambda s: s / 2 * rng.uniform(-1, 1, size=(P, *s.shape)),
                 lambda s: s / 2 * rng.choice([-1.0, 1.0], size=(P, *s.shape))):
        dy = _mlp_first_order(Ws, bs, x, [draw(s) for s in steps])
        norms = np.sqrt(np.sum(dy ** 2, axis=-1))  # (P, batch)
        assert np.all(norms <= r.norm_bound * (1 + 1e-12))


def test_norm_bound_on_a_transformer_covers_its_first_order_error(rng):
    net = ep.transformer(8, 2, 16, 2, seed=1)
    x = rng.standard_normal((3, 4, 8))
    r = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(6), biases=ep.Uniform(6),
                                          activations=ep.Uniform(6), norms=ep.Uniform(6)))
    for name, node in r.nodes.items():
        norms = np.sqrt(np.sum(node.first_order.reshape(len(x), -1) ** 2, axis=1))
        assert np.all(norms <= r.norm_bound_nodes[name] * (1 + 1e-12) + 1e-300), name


def test_exact_statistics_refuse_hopeless_sizes_with_guidance(rng):
    net = ep.transformer(8, 2, 16, 1, seed=0)
    x = rng.standard_normal((2, 4, 8))
    r = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(8)), statistics_work_limit=10)
    with pytest.raises(ValueError, match="node_statistics"):
        r.mse
    # the probe estimator still works at the output
    assert r.node_statistics(probes=8)["block0.res2"].mse > 0

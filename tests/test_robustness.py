"""Bit robustness: bit curve, the quantization penalty and its gradient, threshold weights."""

import numpy as np
import pytest

import errprop as ep


def _net_x(act="tanh", seed=1, widths=(5, 7, 6, 3), batch=20):
    x = np.random.default_rng(0).standard_normal((batch, widths[0]))
    return ep.mlp(list(widths), act, seed=seed), x


def test_bit_curve_rows():
    net, x = _net_x(widths=(8, 16, 4), batch=32)
    curve = ep.bit_curve(net, x, bits=range(2, 9), samples=200, seed=0)
    assert [r.bits for r in curve.rows] == list(range(2, 9))
    mse = np.array([r.mse_analytic for r in curve.rows])
    # 4x less MSE per bit (6.02 dB), within 25% per step above 3 bits
    ratios = mse[1:] / mse[:-1]
    assert np.all(np.abs(ratios[2:] / 0.25 - 1) < 0.25), ratios
    # analytic inside the Monte Carlo interval from 4 bits on (noise model, first order)
    assert all(r.inside for r in curve.rows if r.bits >= 4), curve.table()
    # and equal to analyze's reverse-mode MSE
    rep = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(6, granularity="channel")))
    assert curve.rows[4].mse_analytic == pytest.approx(rep.mse, rel=1e-12)
    assert "SQNR" in curve.table()


@pytest.mark.parametrize("act", ["tanh", "gelu", "relu", "sigmoid"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_penalty_equals_report_mse_and_gradient_matches_finite_differences(act, granularity):
    net, x = _net_x(act)
    q = ep.Uniform(4, granularity=granularity)
    pen = ep.QuantizationPenalty(net, x, q)
    value, grads = pen.value_and_grad()
    # the value is the exact reverse-mode first-order output MSE of analyze
    assert value == pytest.approx(ep.analyze(net, x, ep.QuantConfig(weights=q)).mse,
                                  rel=1e-12)
    W = [w.copy() for w in pen.weights]
    rng = np.random.default_rng(3)
    for l, Wl in enumerate(W):
        picks = [tuple(rng.integers(0, n) for n in Wl.shape) for _ in range(4)]
        picks.append(np.unravel_index(np.argmax(np.abs(Wl)), Wl.shape))  # the scale's entry
        for i, j in picks:
            h = 1e-6
            up, dn = [w.copy() for w in W], [w.copy() for w in W]
            up[l][i, j] += h
            dn[l][i, j] -= h
            fd = (pen.value(*up) - pen.value(*dn)) / (2 * h)
            assert grads[l][i, j] == pytest.approx(fd, rel=1e-5,
                                                   abs=1e-7 * np.abs(grads[l]).max())


def test_penalty_gradient_matches_torch_autograd(torch):
    net, x = _net_x("tanh")
    pen = ep.QuantizationPenalty(net, x, ep.Uniform(3, granularity="channel"))
    value, grads = pen.value_and_grad()
    # the same formula written in torch, differentiated by autograd (double backward)
    Ws = [torch.tensor(op.params["W"], requires_grad=True) for _, op in net.layers()
          if isinstance(op, ep.Linear)]
    bs = [torch.tensor(op.params["b"]) for _, op in net.layers() if isinstance(op, ep.Linear)]
    xt = torch.tensor(x, requires_grad=True)
    h, inputs, zs = xt, [], []
    for l, (W, b) in enumerate(zip(Ws, bs)):
        inputs.append(h)
        z = h @ W.T + b
        zs.append(z)
        h = torch.tanh(z) if l < len(Ws) - 1 else z
    qmax = 3.0
    total = 0.0
    K, B = h.shape[1], h.shape[0]
    for k in range(K):
        Jz = torch.autograd.grad(h[:, k].sum(), zs, create_graph=True)
        for l, W in enumerate(Ws):
            s = W.abs().amax(dim=1) / qmax
            # the entry that sets a row's scale is on the grid: no error, its input leaves
            off = torch.ones_like(W).scatter(1, W.abs().argmax(dim=1, keepdim=True), 0.0)
            total = total + ((s * s / 12) * ((inputs[l] ** 2) @ off.T)
                             * Jz[l] ** 2).sum()
    total = total / (B * K)
    total.backward()
    assert value == pytest.approx(total.item(), rel=1e-10)
    for g, W in zip(grads, Ws):
        np.testing.assert_allclose(g, W.grad.numpy(), rtol=1e-8, atol=1e-12)


def test_penalty_rejects_what_it_does_not_model():
    net, x = _net_x()
    with pytest.raises(ValueError, match="round-to-nearest"):
        ep.QuantizationPenalty(net, x, ep.Uniform(4, rounding="stochastic"))
    with pytest.raises(ValueError, match="MLP"):
        ep.QuantizationPenalty(ep.transformer(d_model=8, heads=2, d_ff=8, blocks=1), x)
    pen = ep.QuantizationPenalty(net, x)
    with pytest.raises(ValueError, match="expected 3 weight"):
        pen.value_and_grad(pen.weights[0])


def _quantize_rows(W, bits):
    s = np.max(np.abs(W), axis=1, keepdims=True) / (2 ** (bits - 1) - 1)
    return np.rint(W / s) * s, s


def test_threshold_weights_against_brute_force_flips():
    net, x = _net_x("tanh", widths=(16, 32, 8), batch=64)
    bits = 8
    tw = ep.threshold_weights(net, x, ep.Uniform(bits, granularity="channel"), eps=0.05)
    assert [r.source for r in tw.rows] == ["fc1.W", "fc2.W"]
    W1, b1 = net["fc1"].params["W"], net["fc1"].params["b"]
    W2, b2 = net["fc2"].params["W"], net["fc2"].params["b"]
    Q1, s1 = _quantize_rows(W1, bits)
    Q2, _ = _quantize_rows(W2, bits)

    def forward(A1, A2):
        return np.tanh(x @ A1.T + b1) @ A2.T + b2

    row = tw.row("fc1.W")
    # independent check of which weights are near: distance to the midpoint < eps steps
    u = W1 / s1
    near = np.abs(np.abs(u - np.rint(u)) - 0.5) < 0.05
    np.testing.assert_array_equal(row.mask, near)
    assert row.fraction == pytest.approx(0.1, abs=0.05)  # ≈ 2·eps for spread weights
    # a few weights flipped to the other grid point, through the exact network
    idx = np.argwhere(near)[:3]
    F1 = Q1.copy()
    for i, j in idx:
        F1[i, j] += np.sign(u[i, j] - np.rint(u[i, j])) * s1[i, 0]
    exact = forward(F1, Q2) - forward(Q1, Q2)
    # the first-order prediction of just these flips, from the row's own delta
    sub = np.zeros_like(W1)
    for i, j in idx:
        sub[i, j] = row.delta[i, j]
    pred = ep.analyze(net, x, ep.QuantConfig(overrides={"fc1": {"weights": ep.Fixed(W1 + sub)}}))
    assert np.linalg.norm(exact - pred.first_order) < 0.02 * np.linalg.norm(exact)
    # all near weights of fc1 flipped: first-order vs exact output change and MSE change
    full = forward(Q1 + row.delta, Q2) - forward(Q1, Q2)
    assert np.linalg.norm(full - row.change) < 0.05 * np.linalg.norm(full)
    assert row.mse_change == pytest.approx(row.exact_mse_change, rel=0.1, abs=1e-3 * tw.mse)


def test_threshold_weights_errors():
    net, x = _net_x()
    with pytest.raises(ValueError, match="eps"):
        ep.threshold_weights(net, x, ep.Uniform(4), eps=0.7)
    with pytest.raises(TypeError, match="QuantConfig"):
        ep.threshold_weights(net, x, "int4")

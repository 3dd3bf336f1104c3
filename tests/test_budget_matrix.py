"""Source × node budget matrix and the local / propagated split: closed forms, exact
reverse-mode statistics, hand-written NumPy fake-quant, and the exports."""

import csv
import io
import json
import math

import numpy as np
import pytest

import errprop as ep


def fake_quant(v, bits):
    """Symmetric per-tensor round-to-nearest, levels ±(2^(bits-1) - 1): written independently."""
    top = 2 ** (bits - 1) - 1
    s = np.max(np.abs(v)) / top
    return np.clip(np.round(v / s), -top, top) * s, s


def test_single_linear_sensitivity_and_worst_case_are_the_closed_forms(rng, free):
    """W noise of variance σ² = s²/12 per element off the grid (the largest |W| is on it and
    exact; f marks the others): Var Δy_bi = σ² Σ_j f_ij x_bj², so u(x) = σ·sqrt(mean f) and
    c = sqrt(mean_bi Var Δy_bi) / u; the interval bound of one Linear is the exact worst
    case |x| · (s/2)·f."""
    W = rng.standard_normal((5, 9))
    x = rng.standard_normal((30, 9))
    net = ep.Sequential([ep.Linear(W)])
    report = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(6)))
    m = report.budget_matrix(probes=400, seed=1)
    s = np.max(np.abs(W)) / 31
    f = free(W, s)  # the largest |W| is on the grid: no error there
    u = s / math.sqrt(12) * math.sqrt(np.mean(f))
    V_closed = s * s / 12 * np.mean((x * x) @ f.T)
    c = math.sqrt(V_closed) / u
    assert m.uncertainty[0] == pytest.approx(u, rel=1e-12)
    V, se = m.variance[0, 0], m.variance_se[0, 0]
    assert 0 < se < 0.05 * V
    assert abs(V - V_closed) < 4 * se
    assert m.sensitivity[0, 0] == pytest.approx(c, rel=4 * se / V)
    assert m.component[0, 0] == pytest.approx(m.sensitivity[0, 0] * m.uncertainty[0])
    assert m.share[0, 0] == 1.0 and m.measured_share[0, 0] == 1.0
    assert m.worst[0, 0] == pytest.approx(np.max(np.abs(x) @ (s / 2 * f.T)), rel=1e-12)


def test_shares_sum_to_one_and_measured_is_the_first_order_energy(mlp_case):
    _, _, report = mlp_case
    m = report.budget_matrix(probes=16)
    assert m.nodes == tuple(report.nodes) and m.sources == tuple(report.sources)
    for what in (m.share, m.measured_share, m.worst_share):
        np.testing.assert_allclose(what.sum(axis=1), 1.0, rtol=1e-12)
    for i, n in enumerate(m.nodes):
        for j, s in enumerate(m.sources):
            assert m.measured[i, j] == pytest.approx(
                report.nodes[n].source_rms.get(s, 0.0) ** 2, rel=1e-12, abs=0)
    # a source contributes nothing upstream of its layer
    assert m.variance[m.nodes.index("fc1"), m.sources.index("fc2.W")] == 0.0
    assert m.worst[m.nodes.index("tanh1"), m.sources.index("fc3.in")] == 0.0


def test_probe_variances_agree_with_exact_reverse_mode_statistics(mlp_case):
    """At the output, V_s = mean(Var_s + m_s²) is known exactly by reverse mode; the probe
    estimate lies within 4 standard errors for every source, and so does the total."""
    _, _, report = mlp_case
    m = report.budget_matrix(probes=64, seed=3)
    st = report.statistics
    for j, s in enumerate(m.sources):
        exact = np.mean(st.var_contributions[s] + st.mean_contributions[s] ** 2)
        assert abs(m.variance[-1, j] - exact) <= 4 * m.variance_se[-1, j] + 1e-12 * exact, s
        assert m.variance_se[-1, j] <= 0.1 * m.variance[-1, j]
    total_se = math.sqrt(np.sum(m.variance_se[-1] ** 2))
    assert abs(m.total[-1] - report.mse) <= 4 * total_se
    # the interval bound per source dominates the exact first-order worst case per source
    for j, s in enumerate(m.sources):
        assert m.worst[-1, j] >= np.max(st.worst_contributions[s]) * (1 - 1e-12)


def test_layer_columns_match_the_budget_gain_in_a_transformer(rng):
    """by="layer": c² at the output is the Budget's gain (exact reverse mode), within error."""
    net = ep.transformer(d_model=16, heads=2, d_ff=32, blocks=1, seed=0)
    x = rng.standard_normal((2, 4, 16))
    report = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(6, granularity="channel"),
                                               activations=ep.Uniform(8)))
    m = report.budget_matrix(by="layer", probes=64, worst=False)
    b = report.budget(exact=False)
    assert set(m.sources) == {r.name for r in b.rows}
    for j, layer in enumerate(m.sources):
        gain = m.sensitivity[-1, j] ** 2
        rel = 4 * m.variance_se[-1, j] / m.variance[-1, j]
        assert gain == pytest.approx(b[layer].gain, rel=rel), layer
    assert np.isnan(m.worst).all() and not np.isnan(m.share).any()
    assert "block0.res1" in m.nodes  # every node, residual joins included


def test_chunked_passes_give_the_same_matrix(mlp_case):
    net, x, report = mlp_case
    whole = ep.budget_matrix(net, x, report, probes=8, worst=False)
    parts = ep.budget_matrix(net, x, report, probes=8, worst=False, memory_limit=1)
    np.testing.assert_array_equal(whole.variance, parts.variance)
    np.testing.assert_allclose(whole.total, parts.total, rtol=1e-12)
    assert report.budget_matrix(probes=8, worst=False) is report.budget_matrix(probes=8,
                                                                                worst=False)


def test_local_propagated_split_of_a_two_layer_mlp_matches_numpy(rng):
    """Shadow (local) and propagated error at each layer, and the noise gains, against a
    fake-quant network written here in NumPy."""
    W1, b1 = rng.standard_normal((16, 6)) / 2, rng.standard_normal(16) / 5
    W2, b2 = rng.standard_normal((4, 16)) / 4, rng.standard_normal(4) / 5
    x = rng.standard_normal((40, 6))
    net = ep.Sequential([ep.Linear(W1, b1), ep.Activation("tanh"), ep.Linear(W2, b2)])
    report = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(5),
                                               activations=ep.Uniform(6)))
    split = report.layer_split()

    W1q, _ = fake_quant(W1, 5)
    W2q, _ = fake_quant(W2, 5)
    xq, _ = fake_quant(x, 6)
    h, hq = x @ W1.T + b1, xq @ W1q.T + b1
    a, aq = np.tanh(h), np.tanh(hq)
    a_round, _ = fake_quant(a, 6)  # fc2's grid is calibrated on the float activation
    top = 31
    s_a = np.max(np.abs(a)) / top
    y = a @ W2.T + b2
    yq = np.clip(np.round(aq / s_a), -top, top) * s_a @ W2q.T + b2
    local2, prop2 = a_round @ W2q.T + b2 - y, aq @ W2.T + b2 - y
    mse = lambda v: float(np.mean(v ** 2))  # noqa: E731

    r1, rt, r2 = split["fc1"], split["tanh1"], split["fc2"]
    assert r1.local_mse == pytest.approx(mse(hq - h), rel=1e-10)
    assert r1.propagated_mse == 0 and math.isnan(r1.gain)
    assert rt.local_mse == 0 and rt.input_mse == pytest.approx(mse(hq - h), rel=1e-10)
    assert rt.propagated_mse == pytest.approx(mse(aq - a), rel=1e-10)
    assert rt.gain == pytest.approx(np.sum((aq - a) ** 2) / np.sum((hq - h) ** 2), rel=1e-10)
    assert r2.local_mse == pytest.approx(mse(local2), rel=1e-10)
    assert r2.propagated_mse == pytest.approx(mse(prop2), rel=1e-10)
    assert r2.exact_mse == pytest.approx(mse(yq - y), rel=1e-10)
    assert r2.interaction_mse == pytest.approx(mse(yq - y - local2 - prop2), rel=1e-8)
    assert r2.gain == pytest.approx(np.sum(prop2 ** 2) / np.sum((aq - a) ** 2), rel=1e-10)
    assert r2.local_share == pytest.approx(mse(local2) / (mse(local2) + mse(prop2)))
    # first order: local = e_a W2ᵀ + a ΔW2ᵀ; propagated = the upstream rows at fc2
    local1 = (a_round - a) @ W2.T + a @ (W2q - W2).T
    assert r2.local_mse_first_order == pytest.approx(mse(local1), rel=1e-10)
    d_a = (1 - a ** 2) * ((xq - x) @ W1.T + x @ (W1q - W1).T)  # first order at tanh1
    assert r2.propagated_mse_first_order == pytest.approx(mse(d_a @ W2.T), rel=1e-10)
    assert r2.input_mse_first_order == pytest.approx(mse(d_a), rel=1e-10)
    assert math.isnan(r2.gain_model)  # no budget matrix given


def test_noise_gain_of_a_linear_layer(rng):
    """Input noise into Linear(W): measured gain ‖Δx Wᵀ‖²/‖Δx‖² exactly; under the error model
    (isotropic noise) E‖Δx Wᵀ‖² / E‖Δx‖² = ‖W‖_F² / in, within the probes' error bar."""
    W = rng.standard_normal((7, 11))
    x = rng.standard_normal((25, 11))
    net = ep.Sequential([ep.Activation("identity"), ep.Linear(W)])
    report = ep.analyze(net, x, ep.QuantConfig(input=ep.Uniform(6)))
    m = report.budget_matrix(probes=400, seed=2)
    row = report.layer_split(m)["fc1"]
    dx = report.sources["input"].error
    closed = np.sum((dx @ W.T) ** 2) / np.sum(dx ** 2)
    assert row.gain == pytest.approx(closed, rel=1e-10)
    assert row.gain_first_order == pytest.approx(closed, rel=1e-10)
    assert row.local_mse == 0 and row.propagated_mse_model > 0
    j = m.sources.index("input")
    i = m.nodes.index("fc1")
    # Rademacher probes of uniform σ reproduce E‖Δx‖² exactly at the identity node (up to
    # the last bit of the sum of squares: one element on the grid has σ = 0, and SIMD
    # summation groups the rows differently)
    k = m.nodes.index("identity1")
    assert m.variance_se[k, j] <= 1e-12 * m.variance[k, j]
    rel_se = m.variance_se[i, j] / m.variance[i, j]
    assert row.gain_model == pytest.approx(np.sum(W ** 2) / 11, rel=4 * rel_se)


def test_exports(mlp_case, tmp_path):
    _, _, report = mlp_case
    m = report.budget_matrix(probes=8)
    records = list(csv.DictReader(io.StringIO(m.to_csv())))
    assert len(records) == len(m.nodes) * len(m.sources)
    assert {"node", "source", "u_source", "sensitivity", "component", "share"} <= set(records[0])
    doc = json.loads(m.to_json(tmp_path / "m.json"))
    assert doc["nodes"] == list(m.nodes) and (tmp_path / "m.json").exists()
    md = m.to_markdown(node="fc2")
    assert md.count("\n") == 2 + len(m.sources) and "| fc2.W |" in md
    tex = m.to_latex(caption="budget of fc3")
    assert r"\toprule" in tex and r"fc1.in" in tex and r"\%" in tex
    assert "fc3" in m.table() and "node" in m.matrix("share", format="markdown")
    assert m.matrix("sensitivity").count("\n") == len(m.nodes) + 1
    no_worst = report.budget_matrix(probes=8, worst=False)
    assert json.loads(no_worst.to_json())["records"][0]["worst_case"] is None

    split = report.layer_split(m)
    assert [r.name for r in split.rows] == ["fc1", "tanh1", "fc2", "tanh2", "fc3"]
    assert len(list(csv.DictReader(io.StringIO(split.to_csv())))) == 5
    assert json.loads(split.to_json())["rows"][2]["sources"] == "fc2.in fc2.W fc2.b"
    assert split.to_markdown().count("\n") == 7 and r"\bottomrule" in split.to_latex()
    top = split.sort("exact_mse").rows[0]
    assert top.exact_mse == max(r.exact_mse for r in split.rows)
    assert "gain model" in str(split)


def test_errors(mlp_case):
    net, x, report = mlp_case
    with pytest.raises(ValueError, match="by must be"):
        ep.budget_matrix(net, x, report, by="node")
    with pytest.raises(ValueError, match="probes"):
        ep.budget_matrix(net, x, report, probes=1)
    m = report.budget_matrix(probes=4, worst=False)
    with pytest.raises(KeyError, match="did you mean 'fc2'"):
        m.table("fc22")
    with pytest.raises(ValueError, match="unknown quantity"):
        m.matrix("gain")
    other = ep.analyze(ep.mlp([12, 6], seed=0), x, ep.QuantConfig(weights=ep.Uniform(8)))
    with pytest.raises(ValueError, match="another report"):
        ep.layer_split(net, x, report, matrix=other.budget_matrix(probes=4))
    with pytest.raises(ValueError, match="unknown column"):
        report.layer_split().sort("nope")

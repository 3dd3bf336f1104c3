"""Budgets and the studies built on them on graphs with merges (Mul, MatMul, Add, Concat):
the budget, the budget matrix, the layer split, bit allocation, hardware-gap sources and
convergence, each against an independent reference — the fused Attention op, exact runs
with only some sources quantized (QuantConfig overrides), analyze's first-order rows for a
given error pattern (``Fixed`` quantizers), plain NumPy and a plain-integer kernel."""

from __future__ import annotations

import math

import numpy as np
import pytest

import errprop as ep
import dag_models as dm
from errprop._budget import exact_subset

FIELD = {"weight": "weights", "bias": "biases", "norm": "norms", "activation": "activations"}


def _x_tokens(batch=3, tokens=5, d=8, seed=3):
    return np.random.default_rng(seed).normal(size=(batch, tokens, d))


def _net(which):
    """The SwiGLU MLP on ``(6, 8)`` or the SwiGLU transformer on ``(2, 4, 8)``."""
    if which == "swiglu":
        return dm.swiglu_mlp(), np.random.default_rng(11).normal(size=(6, 8))
    return dm.swiglu_transformer(), _x_tokens(2, 4)


def _close(a, b, tol=1e-10):
    """Equal to ``tol`` relative to the larger (NaN equals NaN)."""
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return abs(a - b) <= tol * max(abs(a), abs(b), 1e-300)


# ------------------------------------------------------------------ budget
def _attention_pair(acts: bool):
    att = dm.fused_attention()
    fused = ep.Sequential([att])
    graph = dm.decomposed_attention(att)
    base = dict(weights=ep.Uniform(5), biases=ep.Uniform(6))
    if acts:
        base["activations"] = ep.Uniform(6)
    x = _x_tokens()
    rf = ep.analyze(fused, x, ep.QuantConfig(**base))
    rd = ep.analyze(graph, x, ep.QuantConfig(**base, overrides={"o": {"activations": None}}
                                              if acts else {}))
    return fused, graph, x, rf, rd


@pytest.mark.parametrize("acts", [False, True])
def test_attention_graph_budget_equals_fused_per_source(acts):
    fused, graph, x, rf, rd = _attention_pair(acts)
    bf, bd = rf.budget(by="source"), rd.budget(by="source")
    assert bf.method == bd.method
    for f, d in dm.ATTENTION_NAMES.items():
        a, b = bf[f], bd[d]
        assert (a.params, a.bits) == (b.params, b.bits)
        for col in ("injected_mse", "output_mse", "gain", "worst_case", "exact_mse"):
            assert _close(getattr(a, col), getattr(b, col)), (f, col, getattr(a, col),
                                                             getattr(b, col))
        assert a.exact_mse > 0
    assert _close(bf.exact_output_mse, bd.exact_output_mse)
    if acts:
        # one rounding of x seen by q, k and v: the three sources are the fused attn.in
        for d in ("q.in", "k.in", "v.in"):
            assert _close(bf["attn.in"].injected_mse, bd[d].injected_mse)
        np.testing.assert_allclose(sum(rd.contributions[f"{k}.in"] for k in "qkv"),
                                   rf.contributions["attn.in"], rtol=0, atol=1e-14)
        ef = exact_subset(fused, x, rf, ["attn.in"])
        ed = exact_subset(graph, x, rd, ["q.in", "k.in", "v.in"])
        assert np.max(np.abs(ef)) > 0
        np.testing.assert_allclose(ed, ef, rtol=0, atol=1e-10 * np.max(np.abs(ef)))
    # every source at once: the graph's exact run is the fused op's
    np.testing.assert_allclose(exact_subset(graph, x, rd, list(rd.sources)), rf.exact,
                               rtol=0, atol=1e-12)


def _only(layer, spec):
    """A config quantizing only ``layer``'s sources with ``spec`` (field -> quantizer)."""
    return ep.QuantConfig(overrides={layer: spec})


SPEC = {"weights": ep.Uniform(5), "activations": ep.Uniform(6)}


@pytest.mark.parametrize("which", ["swiglu", "transformer"])
def test_layer_budget_exact_column_is_the_run_with_only_that_layer(which):
    net, x = _net(which)
    report = ep.analyze(net, x, ep.QuantConfig(**SPEC))
    budget = report.budget(by="layer")
    quantized = {s.source.layer for s in report.sources.values()}
    assert {r.name for r in budget.rows} == quantized
    for row in budget.rows:
        alone = ep.analyze(net, x, _only(row.name, SPEC))
        assert set(alone.sources) == set(row.sources)
        assert _close(row.exact_mse, alone.exact_mse), row.name
    assert _close(budget.total_output_mse, sum(r.output_mse for r in budget.rows))


# ------------------------------------------------------------------ budget matrix
def _fixed_config(report, errors):
    """A config whose only sources are ``errors`` (name -> error array), each injecting
    exactly that error (``Fixed``)."""
    overrides: dict = {}
    for name, e in errors.items():
        src = report.sources[name]
        overrides.setdefault(src.source.layer, {})[FIELD[src.kind]] = ep.Fixed(src.value + e)
    return ep.QuantConfig(overrides=overrides)


def _draws(report, order, seed, probes):
    """The budget matrix's documented probes: per source (stream ``[seed, index]``) its
    mean error, then ``σ·r`` with Rademacher ``r``."""
    out = {}
    for j, name in enumerate(order):
        model = report.sources[name].model
        rng = np.random.default_rng([seed, j])
        r = np.where(rng.random((probes, *model.var.shape)) < 0.5, -1.0, 1.0)
        out[name] = np.concatenate([model.mean[None], np.sqrt(model.var) * r])
    return out


def _reference_variance(net, x, report, members, draws, probes):
    """``V`` at every node of the column ``members``: analyze's first-order error for
    each probe pattern (mean row squared plus the probes' mean square)."""
    per_row = []
    for p in range(1 + probes):
        r = ep.analyze(net, x, _fixed_config(report, {s: draws[s][p] for s in members}))
        per_row.append({n: float(np.mean(v.first_order ** 2)) for n, v in r.nodes.items()})
    return {n: per_row[0][n] + float(np.mean([row[n] for row in per_row[1:]]))
            for n in per_row[0]}


def _single_weight(net, src):
    """A source a per-layer Fixed override can target alone (not one of several weights
    of an Attention, which share the ``weights`` field)."""
    op = net[src.source.layer]
    return src.kind != "weight" or sum(k == "weight" for k in op.param_kinds.values()) == 1


@pytest.mark.parametrize("which, by", [("swiglu", "source"), ("swiglu", "layer"),
                                       ("transformer", "source")])
def test_budget_matrix_equals_first_order_of_its_probes(which, by):
    net, x = _net(which)
    P, seed = 4, 5
    report = ep.analyze(net, x, ep.QuantConfig(**SPEC))
    m = report.budget_matrix(by=by, probes=P, seed=seed, worst=False)
    assert m.nodes == tuple(report.nodes)  # merges included
    order = [s for k in m.sources for s in m.members[k]]
    draws = _draws(report, order, seed, P)
    checked = 0
    for j, key in enumerate(m.sources):
        members = m.members[key]
        if not all(_single_weight(net, report.sources[s]) for s in members):
            continue
        ref = _reference_variance(net, x, report, members, draws, P)
        for i, n in enumerate(m.nodes):
            assert abs(m.variance[i, j] - ref[n]) <= 1e-10 * max(ref[n], 1e-300), \
                (key, n, m.variance[i, j], ref[n])
        if which == "swiglu" and not key.startswith("down"):  # reaches the Mul
            assert m.variance[m.nodes.index("mul"), j] > 0
        checked += 1
    assert checked >= (len(m.sources) if which == "swiglu" else 12)


# ------------------------------------------------------------------ layer split
@pytest.mark.parametrize("which", ["swiglu", "transformer"])
def test_layer_split_local_and_propagated_are_the_partial_runs(which):
    net, x = _net(which)
    report = ep.analyze(net, x, ep.QuantConfig(**SPEC))
    split = report.layer_split()
    assert [r.name for r in split.rows] == [name for name, _ in net.layers()]  # no merges
    quantized = {s.source.layer for s in report.sources.values()}
    off = {"weights": None, "activations": None}
    for row in split.rows:
        own = ep.analyze(net, x, _only(row.name, SPEC)) if row.name in quantized else None
        rest = ep.analyze(net, x, ep.QuantConfig(**SPEC, overrides={row.name: off}))
        local = 0.0 if own is None else own.nodes[row.name].rms_exact ** 2
        local1 = 0.0 if own is None else own.nodes[row.name].rms_first_order ** 2
        prop = rest.nodes[row.name].rms_exact ** 2
        tol = 1e-10 * max(local, prop, 1e-30)
        assert abs(row.local_mse - local) <= tol, (row.name, row.local_mse, local)
        assert abs(row.local_mse_first_order - local1) <= tol, row.name
        assert abs(row.propagated_mse - prop) <= tol, (row.name, row.propagated_mse, prop)
    # the SwiGLU's down projection reads the Mul: its input error is the Mul's
    if which == "swiglu":
        assert _close(split["down"].input_mse, report.nodes["mul"].rms_exact ** 2)
        assert split["down"].propagated_mse > 0
        m = report.budget_matrix(probes=8, worst=False)
        row = report.layer_split(m)["down"]
        V = dict(zip(m.nodes, m.variance))
        assert _close(row.input_mse_model, float(V["mul"].sum()))  # the Mul's, not 'up''s
        own = [j for j, k in enumerate(m.sources) if k.startswith("down.")]
        assert _close(row.local_mse_model, float(V["down"][own].sum()))


# ------------------------------------------------------------------ allocation
def test_allocation_counts_mul_macs_and_meets_the_target_exactly():
    net = dm.swiglu_mlp(d=8, hidden=16)
    x = np.random.default_rng(12).normal(size=(16, 8))
    a_bits = 8
    plan = ep.plan_bits(net, x, target_sqnr_db=28.0, cost="bitops",
                        activations=ep.Uniform(a_bits), candidates=range(3, 9))
    # by hand, per input: three 8x16 / 16x8 products and 16 elementwise products
    assert plan.macs == {"gate": 128.0, "up": 128.0, "mul": 16.0, "down": 128.0}
    assert plan.fixed_cost == 16 * a_bits * a_bits
    hand = sum(128 * b * a_bits for b in plan.bits.values()) + 16 * a_bits * a_bits
    assert plan.cost == hand
    target = float(np.mean(net(x) ** 2)) * 10 ** (-28.0 / 10)
    exact = ep.analyze(net, x, plan.config)
    assert exact.exact_mse <= target
    assert set(plan.bits) == {"gate", "up", "down"} and min(plan.bits.values()) < 8
    # least error within a cost: the fixed part counts against the cap
    cap = hand - 1
    capped = ep.plan_bits(net, x, max_cost=cap, cost="bitops", activations=ep.Uniform(a_bits),
                          candidates=range(3, 9))
    assert capped.cost <= cap and capped.fixed_cost == plan.fixed_cost
    with pytest.raises(ValueError, match="products of activations"):
        ep.plan_bits(net, x, max_cost=3 * 128 * 3 * a_bits, cost="bitops",
                     activations=ep.Uniform(a_bits), candidates=range(3, 9))


def test_decomposed_attention_macs_equal_the_fused_count():
    att = dm.fused_attention(d=8, heads=2)
    x = _x_tokens(2, 5)
    T, d = 5, 8
    hand = 4 * T * d * d + 2 * T * T * d  # projections, q kᵀ and A v
    fused = ep.plan_bits(ep.Sequential([att]), x, target_sqnr_db=20.0, cost="bitops")
    graph = ep.plan_bits(dm.decomposed_attention(att), x, target_sqnr_db=20.0, cost="bitops")
    assert fused.macs == {"attn": hand}
    assert graph.macs == {"q": T * d * d, "k": T * d * d, "v": T * d * d, "qk": T * T * d,
                          "pv": T * T * d, "o": T * d * d}
    assert graph.fixed_cost == 2 * T * T * d * 32 * 32  # activations unquantized: 32 bits


# ------------------------------------------------------------------ hardware gap
def _pow2(s):
    return 2.0 ** np.ceil(np.log2(s))


def _half_away(u):
    t = np.trunc(u)
    return np.where(np.abs(u - t) == 0.5, t + np.sign(u), np.rint(u))


def _silu(z):
    return z / (1.0 + np.exp(-z))


def test_integer_rounding_sources_on_a_swiglu_equal_a_numpy_kernel():
    """Without accumulators the gap is the requantization's rounding mode at every Linear
    input; the Mul's output is quantized from float (no rescale source there)."""
    net = dm.swiglu_mlp()
    x = np.random.default_rng(2).integers(-200, 201, size=(12, 8)) * 2.0 ** -6  # many ties
    x[0, 0] = 200 * 2.0 ** -6
    sim = dict(weights=ep.Uniform(8, granularity="channel"), activations=ep.Uniform(8, scale="pow2"))
    hw = ep.QuantConfig(**sim, hardware=ep.IntegerKernel(accumulator_bits=None))
    report = ep.analyze(net, x, hw)
    gap = [n for n in report.sources if ".in." in n]
    assert gap == ["gate.in.rounding", "up.in.rounding", "down.in.rounding"]
    p = {name: op.params for name, op in net.layers()}

    def wq(W):
        s = np.abs(W).max(axis=1, keepdims=True) / 127
        return np.rint(W / s) * s

    def aq(v, s, rnd):
        return np.clip(rnd(v / s), -127, 127) * s

    h_float = _silu(x @ p["gate"]["W"].T) * (x @ p["up"]["W"].T)
    s_x, s_h = _pow2(np.abs(x).max() / 127), _pow2(np.abs(h_float).max() / 127)

    def kernel(rnd):
        xq = aq(x, s_x, rnd)
        h = _silu(xq @ wq(p["gate"]["W"]).T) * (xq @ wq(p["up"]["W"]).T)
        return aq(h, s_h, rnd) @ wq(p["down"]["W"]).T + p["down"]["b"]

    np.testing.assert_allclose(report.output + report.exact, kernel(_half_away), rtol=0,
                               atol=1e-12)
    plain = ep.analyze(net, x, ep.QuantConfig(**sim))
    np.testing.assert_allclose(plain.output + plain.exact, kernel(np.rint), rtol=0, atol=1e-12)
    assert np.any(report.sources["gate.in.rounding"].error != 0)  # ties rounded away
    assert np.max(np.abs(kernel(_half_away) - kernel(np.rint))) > 0


def _int_linear(x, W, b, bits, s_x):
    """One int8 Linear in plain Python integers: the dequantized, wrapped accumulator."""
    s_w = np.abs(W).max(axis=1) / 127
    out = np.empty((x.shape[0], W.shape[0]))
    for n, xn in enumerate(x):
        xi = [max(-127, min(127, math.floor(abs(v / s_x) + 0.5) * (1 if v >= 0 else -1)))
              for v in xn]
        for o in range(W.shape[0]):
            acc = sum(a * int(np.rint(w / s_w[o])) for a, w in zip(xi, W[o]))
            acc += int(np.rint(b[o] / (s_x * s_w[o])))
            acc = (acc + 2 ** (bits - 1)) % 2 ** bits - 2 ** (bits - 1)
            out[n, o] = acc * s_x * s_w[o]
    return out


def test_accumulators_into_a_mul_through_identity_equal_an_integer_kernel():
    """``(fc1 x ↦ identity) ⊙ (fc2 x ↦ identity)``: each accumulator enters at its own
    identity layer; the exact run is the integer kernel (16-bit accumulators wrap)."""
    rng = np.random.default_rng(4)
    W1, W2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    b1, b2 = rng.normal(size=6) / 10, rng.normal(size=6) / 10
    x_in = ep.Input()
    a = ep.Activation("identity", name="id1")(ep.Linear(W1, b1, name="fc1")(x_in))
    c = ep.Activation("identity", name="id2")(ep.Linear(W2, b2, name="fc2")(x_in))
    net = ep.Graph(x_in, ep.Mul(name="mul")(a, c))
    x = rng.normal(size=(10, 5)) * 20
    cfg = ep.QuantConfig(weights=ep.Uniform(8, granularity="channel"),
                         activations=ep.Uniform(8), biases=None,
                         hardware=ep.IntegerKernel(accumulator_bits=12))
    report = ep.analyze(net, x, cfg)
    assert report.sources["fc1.acc"].source.layer == "id1"
    assert report.sources["fc2.acc"].source.layer == "id2"
    s_x = np.abs(x).max() / 127
    kernel = _int_linear(x, W1, b1, 12, s_x) * _int_linear(x, W2, b2, 12, s_x)
    np.testing.assert_allclose(report.output + report.exact, kernel, rtol=1e-12,
                               atol=1e-12 * np.abs(kernel).max())
    assert np.any(report.sources["fc1.acc"].error != 0)


def test_accumulator_into_a_merge_or_shared_is_refused_naming_the_node():
    full = dict(weights=ep.Uniform(8), activations=ep.Uniform(8),
                hardware=ep.IntegerKernel())
    with pytest.raises(ValueError, match=r"accumulator of 'up' feeds the Mul node 'mul'"):
        ep.QuantConfig(**full).sources(dm.swiglu_mlp())
    with pytest.raises(ValueError, match=r"'conv2' feeds the Add node 'join'"):
        ep.QuantConfig(**full).sources(dm.resnet_block())
    x = ep.Input()
    h = ep.Linear(np.eye(4), name="fc")(x)
    shared = ep.Graph(x, ep.Linear(np.eye(4), name="fc2")(
        ep.Add(name="add")(ep.Activation("relu", name="r")(h),
                           ep.Activation("identity", name="i")(h))))
    with pytest.raises(ValueError, match=r"accumulator of 'fc' is read by 2 nodes \('r', 'i'\)"):
        ep.QuantConfig(**full).sources(shared)
    # a Residual after a Linear shares its output with the skip: refused, not half-applied
    res = ep.Sequential([ep.Linear(np.eye(4), name="fc"),
                         ep.Residual(ep.Linear(np.eye(4), name="fc2"),
                                     ep.Activation("identity", name="i"))])
    with pytest.raises(ValueError, match=r"accumulator of 'fc' is read by 2 nodes"):
        ep.QuantConfig(**full).sources(res)


# ------------------------------------------------------------------ convergence
def test_convergence_on_a_swiglu_halves_per_bit():
    conv = ep.convergence(dm.swiglu_mlp(), np.random.default_rng(13).normal(size=(32, 8)), bits=range(7, 13))
    assert 1.7 < conv.factor_per_bit < 2.4, conv.markdown()


# ------------------------------------------------------------------ sensitivity, robustness
def _swiglu_jacobian(net, x):
    """``∂y/∂x`` of the SwiGLU MLP per batch element, in NumPy: ``(batch, out, in)``."""
    p = {name: op.params for name, op in net.layers()}
    G, U = x @ p["gate"]["W"].T, x @ p["up"]["W"].T
    sig = 1.0 / (1.0 + np.exp(-G))
    dsilu = sig * (1.0 + G * (1.0 - sig))
    Wd = p["down"]["W"]
    return (np.einsum("oj,nj,jk->nok", Wd, dsilu * U, p["gate"]["W"])
            + np.einsum("oj,nj,jk->nok", Wd, G * sig, p["up"]["W"]))


def test_noise_gain_of_a_swiglu_equals_its_numpy_jacobian():
    net = dm.swiglu_mlp()
    x = np.random.default_rng(1).normal(size=(6, 8))
    g = ep.noise_gain(net, x, 8, samples=200, seed=0)
    J = _swiglu_jacobian(net, x)
    model = g.report.sources["input"].model
    energy = (np.einsum("nok,nk->no", J ** 2, model.var)
              + np.einsum("nok,nk->no", J, model.mean) ** 2).sum(axis=1)
    ref = energy / (model.var + model.mean ** 2).sum(axis=1)
    np.testing.assert_allclose(g.first_order, ref, rtol=1e-12)
    assert g.gain_mc_ci[0] <= g.gain <= g.gain_mc_ci[1]  # 8 bits: first order holds


def test_threshold_weights_on_a_swiglu_exact_change_equals_numpy():
    net = dm.swiglu_mlp()
    x = np.random.default_rng(1).normal(size=(6, 8))
    result = ep.threshold_weights(net, x, ep.Uniform(4), eps=0.1)
    p = {name: op.params for name, op in net.layers() if "W" in op.params}

    def forward(Ws):
        g = _silu(x @ Ws["gate"].T)
        return (g * (x @ Ws["up"].T)) @ Ws["down"].T + p["down"]["b"]

    def rtn(W):
        s = np.abs(W).max() / 7
        return np.rint(W / s) * s

    y = forward({k: p[k]["W"] for k in p})
    q = {k: rtn(p[k]["W"]) for k in p}
    base = float(np.mean((forward(q) - y) ** 2))
    assert _close(result.exact_mse, base)
    for row in result.rows:
        layer = row.source.split(".")[0]
        assert row.near > 0
        flipped = float(np.mean((forward({**q, layer: q[layer] + row.delta}) - y) ** 2))
        assert abs(row.exact_mse_change - (flipped - base)) <= 1e-10 * base, row.source

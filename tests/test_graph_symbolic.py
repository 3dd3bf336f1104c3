"""errprop.symbolic on general graphs: the error recursion of graphs with merges (Mul, Add,
Concat, MatMul) and shape ops, evaluated numerically, is the engine's first and second
order; LaTeX shows the product rule; rules are registered per op type; the swiglu
mean-field stream matches exact runs and the engine's statistics."""

import math

import numpy as np
import pytest

import dag_models
import errprop as ep
import errprop.symbolic as es
from errprop._merge import Merge


def _close(a, b, rtol=1e-10):
    scale = max(float(np.max(np.abs(b))), 1e-300)
    assert float(np.max(np.abs(a - b))) <= rtol * scale, float(np.max(np.abs(a - b))) / scale


ALL = dict(weights=ep.Uniform(4), biases=ep.Uniform(6), activations=ep.Uniform(6),
           input=ep.Uniform(6))


def _agrees_at_every_node(net, x, config, second=True):
    report = ep.analyze(net, x, config)
    rec = es.recursion(net, second_order=second)
    got = rec.evaluate(x, report)
    assert set(report.nodes) <= set(got)
    for name, node in report.nodes.items():
        _close(got[name], node.first_order)
    if second:
        both = rec.evaluate(x, report, order=2)
        for name in report.nodes:
            _close(both[name], report.second_order_nodes[name], rtol=1e-9)
    return rec, report


# ------------------------------------------------------------------ SwiGLU MLP
def test_swiglu_recursion_equals_first_and_second_order_at_every_node():
    net = dag_models.swiglu_mlp()
    x = np.random.default_rng(0).standard_normal((16, 8))
    rec, report = _agrees_at_every_node(net, x, ep.QuantConfig(**ALL))
    assert {"gate.in", "up.in", "down.b"} <= set(report.sources)
    # the second-order part at the product is not negligible here
    first, both = rec.evaluate(x, report)["mul"], rec.evaluate(x, report, order=2)["mul"]
    assert np.linalg.norm(both - first) > 1e-3 * np.linalg.norm(first)


def test_swiglu_second_order_residual_converges_one_order_faster():
    # weight errors only: deterministic, so the fake-quant run is the oracle. Through smooth
    # ops (silu, the product) the relative residual of first order is O(step) and that of
    # first plus second order O(step²): 4x and 16x smaller for two more bits
    net = dag_models.swiglu_mlp()
    x = np.random.default_rng(1).standard_normal((32, 8))
    rec = es.recursion(net, second_order=True)
    r1, r2 = [], []
    for bits in (6, 8):
        report = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(bits),
                                                   biases=ep.Uniform(bits)))
        norm = np.linalg.norm(report.exact)
        r1.append(np.linalg.norm(report.exact - rec.evaluate(x, report)["down"]) / norm)
        r2.append(np.linalg.norm(report.exact - rec.evaluate(x, report, order=2)["down"]) / norm)
    assert r2[0] < 0.05 * r1[0] and r2[1] < 0.05 * r1[1], (r1, r2)
    assert 2.5 < r1[0] / r1[1] < 8, r1
    assert r2[0] / r2[1] > 10, r2


def test_latex_of_a_mul_merge_shows_the_product_rule():
    tex = es.recursion(dag_models.swiglu_mlp(), second_order=True).latex()
    assert (r"\Delta x_{\mathrm{mul}} &= \Delta x_{\mathrm{silu1}} \circ x_{\mathrm{up}} + "
            r"x_{\mathrm{silu1}} \circ \Delta x_{\mathrm{up}}") in tex
    assert (r"\Delta^{2} x_{\mathrm{mul}} &= \Delta^{2} x_{\mathrm{silu1}} \circ x_{\mathrm{up}}"
            r" + x_{\mathrm{silu1}} \circ \Delta^{2} x_{\mathrm{up}} + \Delta x_{\mathrm{silu1}}"
            r" \circ \Delta x_{\mathrm{up}}") in tex  # the cross term
    assert (r"\Delta x_{\mathrm{down}} &= W_{\mathrm{down}} \left(\Delta x_{\mathrm{mul}} + "
            r"e_{\mathrm{down.in}}\right)") in tex


def test_swiglu_unrolled_expression_reaches_the_sources():
    rec = es.recursion(dag_models.swiglu_mlp())
    expr = rec.expression()
    names = {s.name.split("[")[0] for s in expr.free_symbols}
    assert names == {"W", "x", "e", "dp", "f1"}, names
    text = str(expr)
    assert "dp[up.W]*x[input]" in text and "dp[gate.W]*x[input]" in text


def test_recursion_of_a_graph_block_inside_a_sequential():
    net = dag_models.swiglu_transformer(blocks=1)
    x = np.random.default_rng(2).standard_normal((2, 5, 8))
    _agrees_at_every_node(net, x, ep.QuantConfig(**ALL, norms=ep.Uniform(6)))


# ------------------------------------------------------------------ attention as a graph
def test_decomposed_attention_recursion_equals_engine_and_the_fused_op():
    att = dag_models.fused_attention()
    net = dag_models.decomposed_attention(att)
    x = np.random.default_rng(3).standard_normal((2, 5, 8))
    q = dict(weights=ep.Uniform(4), biases=ep.Uniform(6), activations=ep.Uniform(6))
    rec, report = _agrees_at_every_node(
        net, x, ep.QuantConfig(**q, overrides={"o": {"activations": None}}))
    fused = ep.Sequential([att])
    fused_report = ep.analyze(fused, x, ep.QuantConfig(**q))
    want = es.recursion(fused).evaluate(x, fused_report)["attn"]
    _close(rec.evaluate(x, report)["o"], want, rtol=1e-12)
    tex = rec.latex()
    # q kᵀ: the product rule with the matrix of k's columns, transposed
    assert (r"\Delta x_{\mathrm{qk}} &= X_{\mathrm{transpose2}}^{T} \Delta x_{\mathrm{transpose1}}"
            r" + \Delta X_{\mathrm{transpose2}}^{T} x_{\mathrm{transpose1}}") in tex
    assert (r"\Delta x_{\mathrm{pv}} &= X_{\mathrm{transpose3}} \Delta x_{\mathrm{softmax}} + "
            r"\Delta X_{\mathrm{transpose3}} x_{\mathrm{softmax}}") in tex
    assert r"\Delta x_{\mathrm{scale}} &= c_{\mathrm{scale}} \Delta x_{\mathrm{qk}}" in tex
    assert rf"c_{{\mathrm{{scale}}}} &= {1 / math.sqrt(4):.6g}" in tex
    assert r"J_{\mathrm{reshape1}} &= \text{the last axis of }" in tex


# ------------------------------------------------------------------ residual networks
def test_resnet_block_with_projection_shortcut():
    net = dag_models.resnet_block()
    x = np.random.default_rng(4).standard_normal((16, 6))
    rec, _ = _agrees_at_every_node(net, x, ep.QuantConfig(**ALL))
    assert (r"\Delta x_{\mathrm{join}} &= \Delta x_{\mathrm{conv2}} + \Delta x_{\mathrm{proj}}"
            in rec.latex())


def test_a_residual_written_as_a_graph_gives_the_same_recursion():
    rng = np.random.default_rng(5)
    W1, W2 = 0.5 * rng.standard_normal((6, 6)), 0.5 * rng.standard_normal((6, 6))
    seq = ep.Sequential([ep.Residual(ep.Linear(W1, name="a"), ep.Activation("tanh"),
                                     ep.Linear(W2, name="b"), name="r")])
    x_in = ep.Input()
    h = ep.Linear(W2, name="b")(ep.Activation("tanh", name="tanh1")(ep.Linear(W1, name="a")(x_in)))
    graph = ep.Graph(x_in, ep.Add(name="r")(x_in, h))
    x = rng.standard_normal((8, 6))
    cfg = ep.QuantConfig(**ALL)
    got = [es.recursion(n, second_order=True).evaluate(x, ep.analyze(n, x, cfg), order=2)
           for n in (seq, graph)]
    assert set(got[0]) == set(got[1])
    for name in got[0]:
        np.testing.assert_array_equal(got[0][name], got[1][name])
    tex = [es.recursion(n).latex() for n in (seq, graph)]
    assert tex[0] == tex[1]


# ------------------------------------------------------------------ shape ops and Concat
def _split_concat_graph(rng):
    """Slices on both axes, a GLU product, Concat on features and tokens, Scale, and a
    token-mixing Linear between two Transposes that move the feature axis."""
    x = ep.Input()
    a = ep.Linear(rng.standard_normal((6, 8)) / 3, rng.standard_normal(6) / 5, name="a")(x)
    s1, s2 = ep.Slice(0, 3, name="s1")(a), ep.Slice(3, 6, name="s2")(a)
    glu = ep.Mul(name="glu")(s1, ep.Activation("sigmoid", name="sig")(s2))
    feats = ep.Concat(name="cat")(glu, s1)
    half = ep.Scale(0.5, name="half")(feats)
    tokens = ep.Concat(axis=-2, name="cat_t")(feats, ep.Slice(0, 2, axis=-2, name="first2")(half))
    t = ep.Transpose((1, 0), name="t1")(tokens)
    mixed = ep.Linear(rng.standard_normal((3, 6)) / 2, name="mix")(t)
    back = ep.Transpose((1, 0), name="t2")(mixed)
    return ep.Graph(x, ep.Linear(rng.standard_normal((4, 6)) / 2, name="out")(back))


def test_slice_concat_scale_transpose_recursion_equals_engine():
    rng = np.random.default_rng(6)
    net = _split_concat_graph(rng)
    x = rng.standard_normal((3, 4, 8))
    rec, _ = _agrees_at_every_node(net, x, ep.QuantConfig(**ALL))
    tex = rec.latex()
    assert (r"\Delta x_{\mathrm{cat}} &= \begin{bmatrix} \Delta x_{\mathrm{glu}} \\ "
            r"\Delta x_{\mathrm{s1}} \end{bmatrix}") in tex
    assert r"\Delta x_{\mathrm{s2}} &= \left(\Delta x_{\mathrm{a}}\right)_{3:6}" in tex
    assert (r"\Delta x_{\mathrm{cat\_t}} &= J^{(1)}_{\mathrm{cat\_t}} \Delta x_{\mathrm{cat}} + "
            r"J^{(2)}_{\mathrm{cat\_t}} \Delta x_{\mathrm{first2}}") in tex
    assert r"\text{ (a relabelling of entries)}" in tex  # t1 moves the feature axis


# ------------------------------------------------------------------ registration
class _Maximum(Merge):
    """``y = max(a, b)`` elementwise: a merge errprop.symbolic has no rule for."""

    def forward(self, xs, params=None):
        return np.maximum(xs[0], xs[1])

    def jvp(self, xs, y, dxs, dparams=None):
        pick = xs[0] >= xs[1]
        out = np.zeros_like(y)
        for d, mask in zip(dxs, (pick, ~pick)):
            if d is not None:
                out = out + np.where(mask, d, 0.0)
        return out


def _max_graph(rng):
    x = ep.Input()
    a = ep.Linear(rng.standard_normal((5, 4)), name="a")(x)
    b = ep.Linear(rng.standard_normal((5, 4)), name="b")(x)
    return ep.Graph(x, _Maximum(name="mx")(a, b))


def test_an_unregistered_merge_is_refused_naming_the_node_and_how_to_register():
    net = _max_graph(np.random.default_rng(7))
    with pytest.raises(TypeError, match=r"_Maximum \(node 'mx'\).*register_recursion\(_Maximum\)"):
        es.recursion(net)
    with pytest.raises(TypeError, match=r"_Maximum.*register_forward\(_Maximum\)"):
        es.symbolic_forward(_Maximum())


def test_a_registered_rule_makes_the_merge_work():
    class _Max2(_Maximum):
        pass

    @es.register_recursion(_Max2)
    def _rule(b, name, op, inputs):
        # Δy = m ⊙ Δa + (1 − m) ⊙ Δb with the mask as an opaque Jacobian per input
        size = b.size[inputs[0]]
        terms = [b.sym(f"J[{name}.{k}]", f"M^{{{k}}}", size, size, ("mjac", name, k))
                 * b.delta(i) for k, i in enumerate(inputs)]
        return size, terms, []

    rng = np.random.default_rng(8)
    x_in = ep.Input()
    a = ep.Linear(rng.standard_normal((5, 4)), name="a")(x_in)
    c = ep.Linear(rng.standard_normal((5, 4)), name="b")(x_in)
    net = ep.Graph(x_in, _Max2(name="mx")(a, c))
    x = rng.standard_normal((6, 4))
    report = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(5), input=ep.Uniform(6)))
    got = es.recursion(net).evaluate(x, report)
    _close(got["mx"], report.node("mx").first_order)
    assert r"\Delta x_{\mathrm{mx}} &= M^{0} \Delta x_{\mathrm{a}} + M^{1} \Delta x_{\mathrm{b}}" \
        in es.recursion(net).latex()


def test_verify_rules_checks_shape_ops_and_merges():
    cases = [c for c in es.builtin_cases(seed=0)
             if c.label.split(" ")[0] in {"Reshape", "Transpose", "Slice", "Scale", "Add",
                                          "Mul", "Concat", "MatMul"}]
    report = es.verify_rules(cases, seed=0)
    assert {r.op.split(" ")[0] for r in report} == {"Reshape", "Transpose", "Slice", "Scale",
                                                   "Add", "Mul", "Concat", "MatMul"}
    assert {r.tangent for r in report if r.op == "Add of 3"} == {"input 0", "input 1", "input 2"}
    assert all(r.vjp_error is not None for r in report)
    assert report.max_error < 1e-12


class _WrongMul(ep.Mul):
    """The product rule without its second half: ``Δ(a ⊙ b) = Δa ⊙ b`` (wrong)."""

    def jvp(self, xs, y, dxs, dparams=None):
        return np.zeros_like(y) if dxs[0] is None else dxs[0] * xs[1]


def test_a_wrong_merge_rule_is_caught_and_named():
    rng = np.random.default_rng(9)
    # the forward of Mul is found for the subclass through its class hierarchy
    case = es.SymbolicOp(_WrongMul(), [rng.standard_normal((2, 3)), rng.standard_normal((2, 3))],
                         label="WrongMul")
    with pytest.raises(AssertionError, match="WrongMul: the first-order rule .* input 1"):
        es.verify_rules([case])


# ------------------------------------------------------------------ the swiglu stream
def test_swiglu_stream_simulate_is_the_engine_exact_run():
    depth, width = 3, 32
    sim = es.simulate("swiglu", depth, width, activation="silu", sigma_w2=0.5, bits=6,
                      batch=8, seeds=(0,))
    net = es.random_network("swiglu", depth, width, activation="silu", sigma_w2=0.5, seed=0)
    x = np.random.default_rng(10_000).standard_normal((8, width))
    report = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(6, granularity="channel")))
    joins = [n for n in report.nodes if n.startswith("res")]
    assert len(joins) == depth
    np.testing.assert_allclose(sim.error, [np.mean(report.node(n).exact ** 2) for n in joins],
                               rtol=1e-12)
    np.testing.assert_allclose(sim.signal, [np.mean(report.node(n).value ** 2) for n in joins],
                               rtol=1e-12)


def test_swiglu_mean_field_matches_exact_runs_and_the_engine_statistics():
    depth, width, sw2 = 6, 256, 0.5
    pred = es.mean_field("swiglu", depth, width, activation="silu", sigma_w2=sw2, bits=8)
    sim = es.simulate("swiglu", depth, width, activation="silu", sigma_w2=sw2, bits=8,
                      batch=32, seeds=(0, 1))
    ratio = sim.relative / pred.relative
    assert np.all(np.abs(ratio - 1) < 0.05), ratio
    # the engine's first-order noise-model MSE of the same networks (two seeds)
    mse = []
    for seed in (0, 1):
        net = es.random_network("swiglu", depth, width, activation="silu", sigma_w2=sw2,
                                seed=seed)
        x = np.random.default_rng(10_000 + seed).standard_normal((32, width))
        mse.append(ep.analyze(net, x, ep.QuantConfig(
            weights=ep.Uniform(8, granularity="channel"))).mse)
    assert abs(np.mean(mse) / pred.error[-1] - 1) < 0.1, (mse, pred.error[-1])


def test_swiglu_mean_field_refuses_a_diverging_signal_and_has_no_closed_form():
    with pytest.raises(ValueError, match="power tower"):
        es.mean_field("swiglu", 12, 64, activation="silu", sigma_w2=1.0)
    with pytest.raises(ValueError, match="use mean_field"):
        es.closed_form("swiglu", "silu")


def test_accumulation_groups_the_layers_of_a_graph():
    net = dag_models.swiglu_transformer(blocks=2)
    x = np.random.default_rng(11).standard_normal((2, 5, 8))
    report = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(6)))
    acc = es.accumulation(report, by="block")
    assert set(acc.groups) == {"b0", "b1"}
    parts = [sum(c for k, c in report.contributions.items() if k.startswith(b + "."))
             for b in ("b0", "b1")]
    want = float(np.sum((parts[0] + parts[1]) ** 2)) / sum(float(np.sum(p * p)) for p in parts)
    assert acc.coherence == pytest.approx(want, rel=1e-12)
    layers = es.accumulation(report, by="layer").groups
    assert {"b0.gate", "b0.up", "b0.down", "b1.attn"} <= set(layers)

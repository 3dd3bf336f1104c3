"""The general graph: DAG construction (functional Graph, Parallel, Graph blocks), its
checks and messages, and analyze on merges, against plain NumPy, finite differences and
the fused Attention op."""

from __future__ import annotations

import math

import numpy as np
import pytest

import errprop as ep
import dag_models as m

RNG = np.random.default_rng(7)


def _silu(z):
    return z / (1.0 + np.exp(-z))


def _swiglu_numpy(net, x):
    p = {name: op.params for name, op in net.layers()}
    g = _silu(x @ p["gate"]["W"].T)
    u = x @ p["up"]["W"].T
    return (g * u) @ p["down"]["W"].T + p["down"]["b"]


# ------------------------------------------------------------------ forward
def test_functional_swiglu_forward_equals_numpy():
    net = m.swiglu_mlp()
    x = RNG.normal(size=(6, 8))
    np.testing.assert_allclose(net(x), _swiglu_numpy(net, x), rtol=1e-13, atol=1e-13)
    assert [i.name for i in net.nodes()] == ["gate", "silu1", "up", "mul", "down"]
    assert [n.inputs for n in net.dag()] == [("",), ("gate",), ("",), ("silu1", "up"),
                                             ("mul",)]


def test_parallel_in_sequential_equals_numpy_and_names():
    W1, W3 = RNG.normal(size=(5, 4)), RNG.normal(size=(5, 4))
    W2 = RNG.normal(size=(3, 5))
    net = ep.Sequential([ep.Parallel([ep.Linear(W1), ep.Activation("silu")], ep.Linear(W3),
                                     merge=ep.Mul()), ep.Linear(W2)], name="mlp")
    x = RNG.normal(size=(7, 4))
    ref = (_silu(x @ W1.T) * (x @ W3.T)) @ W2.T
    np.testing.assert_allclose(net(x), ref, rtol=1e-13)
    assert [i.name for i in net.nodes()] == ["mlp.fc1", "mlp.silu1", "mlp.fc2", "mlp.mul1",
                                             "mlp.fc3"]


def test_parallel_identity_branch_and_concat():
    W = RNG.normal(size=(3, 4))
    net = ep.Sequential([ep.Parallel([], [ep.Linear(W)], merge=ep.Concat())])
    x = RNG.normal(size=(2, 4))
    np.testing.assert_allclose(net(x), np.concatenate([x, x @ W.T], axis=-1), rtol=1e-14)
    assert net.out_features == 7


def test_graph_block_inside_sequential_is_scoped_and_fans_out():
    net = ep.Sequential([ep.Residual(m.swiglu_mlp())], name="b0")
    assert [i.name for i in net.nodes()] == ["b0.gate", "b0.silu1", "b0.up", "b0.mul",
                                             "b0.down", "b0.res1"]
    x = RNG.normal(size=(3, 8))
    inner = m.swiglu_mlp()
    np.testing.assert_allclose(net(x), x + _swiglu_numpy(inner, x), rtol=1e-13)
    # the block's input feeds gate, up and the skip: three readers of one value
    readers = [n.name for n in net.dag() if "" in n.inputs]
    assert readers == ["b0.gate", "b0.up", "b0.res1"]


def test_decomposed_attention_forward_equals_fused():
    att = m.fused_attention(d=8, heads=2, seed=3)
    dec = m.decomposed_attention(att)
    x = RNG.normal(size=(3, 5, 8))
    np.testing.assert_allclose(dec(x), att.forward(x), rtol=1e-12, atol=1e-12)


def test_inputs_of_any_rank():
    """A (batch, height, width, channels) input enters; ops act on the trailing axis."""
    W = RNG.normal(size=(4, 3))
    x = ep.Input()
    h = ep.Linear(W, name="pw")(x)
    t = ep.Transpose((2, 0, 1), name="chw")(h)
    net = ep.Graph(x, ep.Scale(0.5)(t))
    xs = RNG.normal(size=(2, 5, 6, 3))
    np.testing.assert_allclose(net(xs), 0.5 * np.transpose(xs @ W.T, (0, 3, 1, 2)),
                               rtol=1e-14)
    rep = ep.analyze(net, xs, ep.QuantConfig(weights=ep.Uniform(6)))
    dW = rep.sources["pw.W"].error
    np.testing.assert_allclose(rep.exact, 0.5 * np.transpose(xs @ dW.T, (0, 3, 1, 2)),
                               atol=1e-14)


# ------------------------------------------------------------------ construction errors
def test_construction_errors_are_clear():
    x = ep.Input()
    lin = ep.Linear(RNG.normal(size=(4, 4)))
    h = lin(x)
    with pytest.raises(ValueError, match="appears twice"):
        ep.Graph(x, ep.Add()(h, lin(h)))
    with pytest.raises(ValueError, match="duplicate layer name 'a'"):
        x2 = ep.Input()
        ep.Graph(x2, ep.Add()(ep.Linear(np.eye(4), name="a")(x2),
                              ep.Linear(np.eye(4), name="a")(x2)))
    with pytest.raises(ValueError, match="second errprop.Input"):
        ep.Graph(x, ep.Add()(ep.Linear(np.eye(4))(x), ep.Linear(np.eye(4))(ep.Input())))
    with pytest.raises(TypeError, match="takes one input, got 2"):
        ep.Linear(np.eye(4))(x, x)
    with pytest.raises(TypeError, match="input 1 is a ndarray"):
        ep.Mul()(x, np.ones(4))
    with pytest.raises(ValueError, match="MatMul"):
        ep.MatMul()(x, x, x)
    with pytest.raises(TypeError, match="outputs must be the handle of a node"):
        ep.Graph(x, x)


def test_shape_mismatch_at_a_merge_names_the_node():
    x = ep.Input()
    a = ep.Linear(RNG.normal(size=(16, 8)), name="gate")(x)
    b = ep.Linear(RNG.normal(size=(12, 8)), name="up")(x)
    with pytest.raises(ValueError, match=r"Mul 'mul1'.*16, 12"):
        ep.Graph(x, ep.Mul()(a, b))
    with pytest.raises(ValueError, match="Residual 'res1': its layers map 8 features to 4"):
        ep.Sequential([ep.Residual(ep.Linear(RNG.normal(size=(4, 8))))])


def test_graph_input_checks_name_the_first_layer():
    net = m.swiglu_mlp()
    with pytest.raises(ValueError, match="first layer 'gate' expects inputs with 8 features"):
        net(np.ones((2, 5)))
    att = m.decomposed_attention(m.fused_attention())
    with pytest.raises(ValueError, match=r"must have shape \(batch, tokens, features\) because "
                                         r"Transpose 'transpose1' needs a token axis"):
        att(np.ones((2, 8)))


# ------------------------------------------------------------------ analyze on merges
def test_swiglu_first_order_matches_finite_differences_per_weight():
    """Each weight source's first-order row is the directional derivative of the graph's
    forward along that weight error (central differences on rebuilt networks)."""
    net = m.swiglu_mlp(seed=2)
    x = RNG.normal(size=(5, 8))
    rep = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(8)))
    for layer in ("gate", "up", "down"):
        dW = rep.sources[f"{layer}.W"].error
        t = 1e-4

        def moved(s, layer=layer, dW=dW):
            g = m.swiglu_mlp(seed=2)
            g[layer].params["W"] = g[layer].params["W"] + s * dW
            return g(x)

        fd = (moved(t) - moved(-t)) / (2 * t)
        np.testing.assert_allclose(rep.contributions[f"{layer}.W"], fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("acts", [False, True])
def test_decomposed_attention_analyze_equals_fused(acts):
    att = m.fused_attention(d=8, heads=2, seed=5)
    fused, dec = ep.Sequential([att]), m.decomposed_attention(att)
    x = RNG.normal(size=(3, 5, 8))
    q = ep.Uniform(6)
    cfg = ep.QuantConfig(weights=q, biases=q, activations=q if acts else None)
    cfg_d = ep.QuantConfig(weights=q, biases=q, activations=q if acts else None,
                           overrides={"o": {"activations": None}})
    rf, rd = ep.analyze(fused, x, cfg), ep.analyze(dec, x, cfg_d)
    np.testing.assert_allclose(rd.exact, rf.exact, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rd.first_order, rf.first_order, rtol=1e-10, atol=1e-12)
    for fused_name, dec_name in m.ATTENTION_NAMES.items():
        np.testing.assert_allclose(rd.contributions[dec_name], rf.contributions[fused_name],
                                   rtol=1e-10, atol=1e-13)
    if acts:
        both = sum(rd.contributions[k] for k in ("q.in", "k.in", "v.in"))
        np.testing.assert_allclose(both, rf.contributions["attn.in"], rtol=1e-10, atol=1e-13)


def test_merge_nodes_are_reported():
    rep = ep.analyze(m.resnet_block(), RNG.normal(size=(4, 6)),
                     ep.QuantConfig(weights=ep.Uniform(8)))
    assert rep.nodes["join"].kind == "Add"
    # the join's first order is the sum of both branches' (proj adds its own source)
    np.testing.assert_allclose(rep.nodes["join"].first_order,
                               rep.nodes["conv2"].first_order + rep.nodes["proj"].first_order,
                               rtol=1e-14)
    assert set(rep.contributions) == {"conv1.W", "conv2.W", "proj.W"}


def test_swiglu_transformer_first_order_residual_halves_per_bit():
    """Weight (and bias, norm) rounding is deterministic, so first order converges to the
    exact error: the relative residual halves with each bit, as for the fused transformer."""
    x = np.random.default_rng(3).normal(size=(4, 6, 16))
    medians = []
    for net in (m.swiglu_transformer(d=16, heads=4, hidden=32, blocks=2, seed=1),
                ep.transformer(16, 4, 32, 2, seed=1)):
        res = []
        for bits in range(6, 13):
            q = ep.Uniform(bits)
            rep = ep.analyze(net, x, ep.QuantConfig(weights=q, biases=q, norms=q))
            res.append(ep.relative_residual(rep.exact, rep.first_order))
        ratios = np.array(res[:-1]) / np.array(res[1:])
        assert np.all(ratios > 1.4) and np.all(ratios < 2.9), ratios
        medians.append(float(np.median(ratios)))
    assert all(1.7 < r < 2.4 for r in medians), medians


def test_scale_by_constant_in_a_graph():
    W = RNG.normal(size=(4, 4))
    net = ep.Sequential([ep.Linear(W), ep.Scale(1 / math.sqrt(4))])
    x = RNG.normal(size=(3, 4))
    rep = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(5)))
    np.testing.assert_allclose(rep.exact, 0.5 * (x @ rep.sources["fc1.W"].error.T),
                               atol=1e-14)


def test_docs_graph_listing_is_current():
    """docs/graphs.md shows the listing its first example prints."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "graphs.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0].replace("print(mlp)", "")
    shown = re.findall(r"```\n(Sequential.*?)```", text, flags=re.S)[0]
    ns: dict = {}
    exec(code, ns)  # noqa: S102
    assert repr(ns["mlp"]).strip() == shown.strip()

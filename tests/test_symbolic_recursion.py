"""The symbolic error recursion of a graph, evaluated numerically, is the engine's result."""

import numpy as np
import pytest

import errprop as ep
import errprop.symbolic as es


def _close(a, b, rtol=1e-10):
    scale = max(float(np.max(np.abs(b))), 1e-300)
    assert float(np.max(np.abs(a - b))) <= rtol * scale, float(np.max(np.abs(a - b))) / scale


ALL = dict(weights=ep.Uniform(4), biases=ep.Uniform(6), activations=ep.Uniform(6),
           input=ep.Uniform(6))


def test_mlp_recursion_equals_first_order_at_every_node():
    net = ep.mlp([6, 12, 12, 4], "relu", seed=0)
    x = np.random.default_rng(0).standard_normal((16, 6))
    report = ep.analyze(net, x, ep.QuantConfig(**ALL))
    got = es.recursion(net).evaluate(x, report)
    for name, node in report.nodes.items():
        _close(got[name], node.first_order)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_transformer_block_recursion_equals_first_order(norm):
    net = ep.transformer(8, 2, 16, 1, norm=norm, seed=0)
    x = np.random.default_rng(1).standard_normal((2, 4, 8))
    report = ep.analyze(net, x, ep.QuantConfig(**ALL, norms=ep.Uniform(6)))
    got = es.recursion(net).evaluate(x, report)
    for name, node in report.nodes.items():
        _close(got[name], node.first_order)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_second_order_recursion_equals_engine_second_order(activation):
    net = ep.mlp([6, 12, 12, 4], activation, seed=0)
    x = np.random.default_rng(2).standard_normal((16, 6))
    report = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(4), input=ep.Uniform(5)))
    rec = es.recursion(net, second_order=True)
    got = rec.evaluate(x, report, order=2)
    for name in report.nodes:
        _close(got[name], report.second_order_nodes[name], rtol=1e-9)
    # ... and the second-order part is not negligible here
    first = rec.evaluate(x, report)["fc3"]
    assert np.linalg.norm(got["fc3"] - first) > 1e-3 * np.linalg.norm(first)


def test_second_order_of_one_linear_layer_is_the_exact_error():
    rng = np.random.default_rng(3)
    net = ep.Sequential([ep.Linear(rng.standard_normal((5, 7)), rng.standard_normal(5))])
    x = rng.standard_normal((4, 7))
    report = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(3), input=ep.Uniform(3)))
    got = es.recursion(net, second_order=True).evaluate(x, report, order=2)["fc1"]
    _close(got, report.exact, rtol=1e-12)


def test_latex_uses_the_layer_names():
    net = ep.mlp([4, 6, 3], "relu", seed=0)
    tex = es.recursion(net, second_order=True).latex()
    assert tex.startswith(r"\begin{align*}") and tex.endswith(r"\end{align*}")
    assert (r"\Delta x_{\mathrm{fc2}} &= W_{\mathrm{fc2}} \left(\Delta x_{\mathrm{relu1}} + "
            r"e_{\mathrm{fc2.in}}\right) + \Delta W_{\mathrm{fc2}} x_{\mathrm{relu1}} + "
            r"\Delta b_{\mathrm{fc2}}") in tex
    assert r"\operatorname{relu}'(x_{\mathrm{fc1}}) \circ \Delta x_{\mathrm{fc1}}" in tex
    assert r"\Delta W_{\mathrm{fc2}} \left(\Delta x_{\mathrm{relu1}} + e_{\mathrm{fc2.in}}\right)" in tex
    block = es.recursion(ep.transformer(8, 2, 16, 1, seed=0)).latex()
    assert r"\Delta x_{\mathrm{block0.res1}} &= \Delta x_{0} + \Delta x_{\mathrm{block0.attn}}" in block
    assert r"J_{\mathrm{block0.ln1}} &= " in block  # the opaque Jacobians are defined


def test_unrolled_expression_mentions_only_sources_and_graph_arrays():
    net = ep.mlp([4, 6, 3], "tanh", seed=0)
    expr = es.recursion(net).expression()
    names = {s.name.split("[")[0] for s in expr.free_symbols}
    assert names == {"W", "x", "e", "dp", "f1"}, names
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 4))
    report = ep.analyze(net, x, ep.QuantConfig(**ALL))
    assert "dp[fc2.W]*x[tanh1]" in str(expr)
    assert report.first_order.shape == (3, 3)

"""The propagation engine: contributions, superposition, whole-network finite differences,
naming, reports and clear errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import errprop as ep

ALL_SOURCES = dict(weights=ep.Uniform(6), biases=ep.Uniform(6), activations=ep.Uniform(6),
                   input=ep.Uniform(6), norms=ep.Uniform(6))


def _transformer(rng, norm="pre"):
    return ep.transformer(16, 2, 32, 2, norm=norm, seed=1), rng.standard_normal((3, 5, 16))


def _network_fd(net, x, layer, param, dp, h=1e-4):
    """d/dt net(x; p + t·dp) at t = 0 by central differences, via the float forward only."""
    op = net[layer]
    p0 = op.params[param]
    outs = []
    for t in (h, -h, h / 2, -h / 2):
        op.params[param] = p0 + t * dp
        try:
            outs.append(net(x))
        finally:
            op.params[param] = p0
    d_h = (outs[0] - outs[1]) / (2 * h)
    d_h2 = (outs[2] - outs[3]) / h
    return (4 * d_h2 - d_h) / 3


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_contributions_sum_to_first_order(norm, rng):
    net, x = _transformer(rng, norm)
    r = ep.analyze(net, x, ep.QuantConfig(**ALL_SOURCES))
    total = sum(r.contributions.values())
    np.testing.assert_allclose(total, r.first_order, rtol=1e-12, atol=1e-15)
    # every parameter of every layer is a source, plus each linear/attention input
    n_params = sum(len(op.params) for _, op in net.layers())
    n_inputs = sum(op.quantize_input for _, op in net.layers())
    assert len(r.contributions) == n_params + n_inputs + 1
    assert set(r.contributions) == set(r.sources)


def test_per_source_contribution_is_the_network_directional_derivative(rng):
    # independent of the engine: finite differences of the whole float network
    net, x = _transformer(rng)
    r = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(8), norms=ep.Uniform(8)))
    for name, src in r.sources.items():
        fd = _network_fd(net, x, src.source.layer, src.source.param, src.error)
        err = np.linalg.norm(r.contributions[name] - fd) / np.linalg.norm(fd)
        assert err < 1e-6, name


def test_superposition(rng):
    # a source's contribution does not depend on which other sources are active
    net = ep.mlp([6, 16, 16, 3], "tanh", seed=2)
    x = rng.standard_normal((10, 6))
    full = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(5), biases=ep.Uniform(5),
                                             activations=ep.Uniform(5)))
    only = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(5)))
    for name, c in only.contributions.items():
        np.testing.assert_allclose(full.contributions[name], c, rtol=1e-13, atol=1e-16)


def test_node_results_cover_every_node(rng):
    net, x = _transformer(rng)
    r = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(8)))
    assert list(r.nodes) == [n.name for n in net.nodes()]
    out = r.node("ln_f")
    np.testing.assert_array_equal(out.exact, r.exact)
    np.testing.assert_allclose(out.value, net(x), rtol=1e-13)
    # the error at a node only has rows from sources upstream of it
    attn = r.node("block0.attn")
    assert set(attn.source_rms) == {"block0.attn.Wq", "block0.attn.Wk", "block0.attn.Wv",
                                    "block0.attn.Wo"}
    np.testing.assert_allclose(r.node("block0.res1").exact, attn.exact, rtol=1e-9,
                               atol=1e-14)
    with pytest.raises(KeyError, match="did you mean 'block0.attn'"):
        r.node("block0.atn")


def test_no_sources_means_zero_error(rng):
    net = ep.mlp([4, 8, 2], seed=0)
    r = ep.analyze(net, rng.standard_normal((3, 4)), ep.QuantConfig())
    assert r.contributions == {} and not r.first_order.any() and not r.exact.any()
    assert r.residual == 0.0


def test_report_table_and_repr(rng):
    net = ep.mlp([4, 8, 2], seed=0)
    r = ep.analyze(net, rng.standard_normal((3, 4)),
                   ep.QuantConfig(weights=ep.Uniform(8), activations=ep.Uniform(8)))
    text = str(r)
    for name in ("fc1", "relu1", "fc2"):
        assert name in text
    assert "statistical" in text  # the note about activation noise
    assert "SQNR" in repr(r)


def test_sqnr_definition(rng):
    y, dy = rng.standard_normal(50), 1e-3 * rng.standard_normal(50)
    assert ep.sqnr_db(y, dy) == pytest.approx(
        20 * np.log10(np.linalg.norm(y) / np.linalg.norm(dy)))


# ---------------------------------------------------------------------- naming
def test_derived_and_explicit_names():
    net = ep.mlp([4, 8, 8, 2], "gelu", seed=0)
    assert [n for n, _ in net.layers()] == ["fc1", "gelu1", "fc2", "gelu2", "fc3"]
    t = ep.transformer(8, 2, 16, 2, seed=0)
    names = [n.name for n in t.nodes()]
    for expected in ("block0.ln1", "block0.attn", "block0.res1", "block0.mlp.fc1",
                     "block0.mlp.gelu1", "block1.res2", "ln_f"):
        assert expected in names
    assert len(names) == len(set(names))
    custom = ep.Sequential([ep.Linear(np.eye(3), name="proj"), ep.Activation("tanh"),
                            ep.Linear(np.eye(3))])
    assert [n for n, _ in custom.layers()] == ["proj", "tanh1", "fc1"]


def test_duplicate_and_reused_layers_are_errors():
    with pytest.raises(ValueError, match="duplicate layer name 'a'"):
        ep.Sequential([ep.Linear(np.eye(2), name="a"), ep.Linear(np.eye(2), name="a")])
    layer = ep.Linear(np.eye(2))
    with pytest.raises(ValueError, match="appears twice"):
        ep.Sequential([layer, layer])


# ---------------------------------------------------------------------- errors
def test_shape_mismatch_names_the_layer():
    with pytest.raises(ValueError, match="Linear 'fc2' expects inputs with 5 features.*'fc1' "
                                         "outputs 4"):
        ep.Sequential([ep.Linear(np.ones((4, 3))), ep.Linear(np.ones((2, 5)))])
    net = ep.mlp([3, 4], seed=0)
    with pytest.raises(ValueError, match=r"'fc1' expects inputs with 3 features, got input x "
                                         r"of shape \(2, 5\)"):
        net(np.ones((2, 5)))
    with pytest.raises(ValueError, match="skip connection needs equal sizes"):
        ep.Sequential([ep.Residual(ep.Linear(np.ones((4, 3))))])


@pytest.mark.parametrize("bad, match", [
    (np.array([[1.0, np.nan, 0.0]]), "1 NaN/Inf"),
    (np.array([[1.0, np.inf, 0.0]]), "NaN/Inf"),
    (np.ones(3), r"shape \(batch, features\)"),
    (np.ones((0, 3)), "empty"),
    ("abc", "numeric array"),
])
def test_bad_inputs(bad, match):
    net = ep.mlp([3, 4], seed=0)
    with pytest.raises((ValueError, TypeError), match=match):
        ep.analyze(net, bad, ep.QuantConfig(weights=ep.Uniform(8)))


def test_attention_needs_tokens():
    net = ep.transformer(8, 2, 16, 1, seed=0)
    with pytest.raises(ValueError, match=r"\(batch, tokens, features\).*attention"):
        net(np.ones((2, 8)))


@pytest.mark.parametrize("make, match", [
    (lambda: ep.Linear(np.ones((2, 3)), np.ones(3)), r"'b' must have shape \(2,\)"),
    (lambda: ep.Linear(np.array([[np.nan]])), "NaN/Inf"),
    (lambda: ep.Activation("swish"), "unknown activation 'swish'"),
    (lambda: ep.LayerNorm(np.ones(3), np.ones(4)), r"'beta' must have shape \(3,\)"),
    (lambda: ep.LayerNorm(np.ones(3), np.ones(3), eps=0.0), "eps must be a positive"),
    (lambda: ep.Attention(*[np.ones((6, 6))] * 4, heads=4), "heads must be a positive integer "
                                                            "dividing the inner width 6"),
    (lambda: ep.Softmax(axis=1), "negative integer"),
    (lambda: ep.mlp([4], seed=0), "at least an input and an output"),
    (lambda: ep.transformer(10, 3, 8, 1), r"heads \(3\) must divide d_model \(10\)"),
    (lambda: ep.Sequential(ep.Linear(np.eye(2))), "takes a list of layers"),
])
def test_bad_layers(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_config_type_is_checked(rng):
    net = ep.mlp([3, 4], seed=0)
    with pytest.raises(TypeError, match="config must be a QuantConfig"):
        ep.analyze(net, np.ones((2, 3)), {"weights": ep.Uniform(8)})


def test_overflow_is_reported_not_propagated():
    net = ep.Sequential([ep.Linear(np.full((2, 2), 1e100)), ep.Linear(np.full((2, 2), 1e100))])
    with pytest.raises(ValueError, match="node 'fc2'.*NaN/Inf"):
        ep.analyze(net, np.full((1, 2), 1e120), ep.QuantConfig(weights=ep.Uniform(8)))


# ------------------------------------------------------------------ hypothesis
@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 12), min_size=2, max_size=6),
       act=st.sampled_from(sorted(ep.ACTIVATIONS)), batch=st.integers(1, 5),
       bits=st.integers(2, 16), seed=st.integers(0, 2**16))
def test_random_mlps(widths, act, batch, bits, seed):
    net = ep.mlp(widths, act, seed=seed)
    x = np.random.default_rng(seed).standard_normal((batch, widths[0]))
    q = ep.Uniform(bits)
    r = ep.analyze(net, x, ep.QuantConfig(weights=q, biases=q, activations=q, input=q))
    np.testing.assert_allclose(sum(r.contributions.values()), r.first_order, rtol=1e-11,
                               atol=1e-14)
    assert r.exact.shape == r.first_order.shape == net(x).shape
    assert np.all(np.isfinite(r.exact))


@settings(max_examples=15, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), head_dim=st.integers(4, 6), tokens=st.integers(1, 6),
       blocks=st.integers(1, 3), norm=st.sampled_from(["pre", "post"]),
       causal=st.booleans(), seed=st.integers(0, 2**16))
def test_random_transformers(heads, head_dim, tokens, blocks, norm, causal, seed):
    # (d_model >= 4: LayerNorm over 2 features is a sign function, flat to first order)
    d = heads * head_dim
    net = ep.transformer(d, heads, 2 * d, blocks, norm=norm, causal=causal, seed=seed)
    x = np.random.default_rng(seed).standard_normal((2, tokens, d))
    r = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(8)))
    np.testing.assert_allclose(sum(r.contributions.values()), r.first_order, rtol=1e-11,
                               atol=1e-14)
    # 8-bit weight error is first order: the residual is small but not zero
    assert r.residual < 0.2

"""Bad arguments to every public op, builder and format are refused where they are given.

Python's truthiness and NumPy's casts would accept them: ``causal="no"`` is truthy,
``heads=True`` is 1, ``"1e-5"`` parses, a complex weight loses its imaginary part with only
a warning, and ``Softmax(axis=-5)`` failed with a NumPy AxisError at run time. Each case
names the argument, so the message says what to fix.
"""

import numpy as np
import pytest

import errprop as ep

E = np.eye(4)
Z = E + 1j * E  # a complex weight
X = np.ones((2, 4))


def _attn(**kw):
    return ep.Attention(E, E, E, E, **kw)


# (constructor call, error type, text the message must contain: the argument)
CASES = {
    # ---- ops
    "Linear W complex": (lambda: ep.Linear(Z), TypeError, "'W' is complex"),
    "Linear W strings": (lambda: ep.Linear([["1", "2"]]), TypeError, "'W' must be a real"),
    "Linear W ragged": (lambda: ep.Linear([[1.0, 2.0], [3.0]]), TypeError, "'W'"),
    "Linear W object": (lambda: ep.Linear(None), TypeError, "'W'"),
    "Linear b NaN": (lambda: ep.Linear(E, np.full(4, np.nan)), ValueError, "'b'.*NaN"),
    "Linear b complex": (lambda: ep.Linear(E, np.ones(4) + 0j), TypeError, "'b' is complex"),
    "Linear name": (lambda: ep.Linear(E, name=3), ValueError, "name"),
    "Activation kind int": (lambda: ep.Activation(3), TypeError, "activation"),
    "Activation kind list": (lambda: ep.Activation(["relu"]), TypeError, "activation"),
    "Activation kind typo": (lambda: ep.Activation("reul"), ValueError, "did you mean 'relu'"),
    "Softmax axis -5": (lambda: ep.Softmax(axis=-5), ValueError, "axis.*got -5"),
    "Softmax axis 0": (lambda: ep.Softmax(axis=0), ValueError, "axis.*got 0"),
    "Softmax axis str": (lambda: ep.Softmax(axis="-1"), TypeError, "axis must be an integer"),
    "Softmax axis bool": (lambda: ep.Softmax(axis=True), TypeError, "axis must be an integer"),
    "Softmax axis float": (lambda: ep.Softmax(axis=-1.0), TypeError, "axis must be an integer"),
    "LayerNorm eps str": (lambda: ep.LayerNorm(np.ones(4), np.zeros(4), eps="1e-5"),
                          TypeError, "eps must be a real number"),
    "LayerNorm eps NaN": (lambda: ep.LayerNorm(np.ones(4), np.zeros(4), eps=np.nan),
                          ValueError, "eps must be a (finite )?number"),
    "LayerNorm eps negative": (lambda: ep.LayerNorm(np.ones(4), np.zeros(4), eps=-1e-5),
                               ValueError, "eps must be a positive"),
    "LayerNorm eps bool": (lambda: ep.LayerNorm(np.ones(4), np.zeros(4), eps=True),
                           TypeError, "eps"),
    "LayerNorm gamma complex": (lambda: ep.LayerNorm(np.ones(4) + 0j, np.zeros(4)),
                                TypeError, "'gamma' is complex"),
    "LayerNorm beta shape": (lambda: ep.LayerNorm(np.ones(4), np.zeros(3)), ValueError,
                             "'beta' must have shape"),
    "RMSNorm eps str": (lambda: ep.RMSNorm(np.ones(4), eps="1e-6"), TypeError, "eps"),
    "RMSNorm eps inf": (lambda: ep.RMSNorm(np.ones(4), eps=np.inf), ValueError, "eps"),
    "RMSNorm gamma 2-D": (lambda: ep.RMSNorm(np.ones((2, 2))), ValueError, "'gamma'"),
    "L2Normalize eps str": (lambda: ep.L2Normalize(eps="0"), TypeError, "eps"),
    "L2Normalize eps 0": (lambda: ep.L2Normalize(eps=0.0), ValueError, "eps"),
    "Attention causal str": (lambda: _attn(causal="no"), TypeError, "causal must be True"),
    "Attention causal int": (lambda: _attn(causal=1), TypeError, "causal"),
    "Attention heads bool": (lambda: _attn(heads=True), TypeError, "heads must be an integer"),
    "Attention heads str": (lambda: _attn(heads="2"), TypeError, "heads"),
    "Attention heads float": (lambda: _attn(heads=2.0), TypeError, "heads"),
    "Attention heads 0": (lambda: _attn(heads=0), ValueError, "heads"),
    "Attention heads 3": (lambda: _attn(heads=3), ValueError, "heads.*dividing"),
    "Attention Wq complex": (lambda: ep.Attention(Z, E, E, E), TypeError, "'Wq' is complex"),
    "Attention Wo shape": (lambda: ep.Attention(E, E, E, np.ones((4, 3))), ValueError, "'Wo'"),
    "Attention mask str": (lambda: _attn(mask=np.array([["a", "b"]])), TypeError, "mask"),
    "Attention mask 2s": (lambda: _attn(mask=np.full((1, 2), 2)), ValueError, "mask"),
    "Embedding pad_id bool": (lambda: ep.Embedding(E, pad_id=True), TypeError, "pad_id"),
    "Embedding pad_id str": (lambda: ep.Embedding(E, pad_id="0"), TypeError, "pad_id"),
    "Embedding pad_id range": (lambda: ep.Embedding(E, pad_id=4), ValueError, "pad_id"),
    "Embedding word complex": (lambda: ep.Embedding(Z), TypeError, "'word' is complex"),
    "Embedding position cols": (lambda: ep.Embedding(E, np.ones((3, 2))), ValueError,
                                "'position'"),
    "MeanPool mask 1-D": (lambda: ep.MeanPool(mask=np.ones(3, bool)), ValueError, "mask"),
    "MeanPool mask complex": (lambda: ep.MeanPool(mask=np.ones((1, 3)) + 0j), TypeError,
                              "mask"),
    # ---- graphs
    "Sequential softmax rank": (lambda: ep.Sequential([ep.Linear(E), ep.MeanPool(),
                                                       ep.Softmax(axis=-3)]),
                                ValueError, "Softmax 'softmax1' needs inputs with at least 3"),
    # ---- builders
    "mlp widths int": (lambda: ep.mlp(5), TypeError, "widths"),
    "mlp widths str": (lambda: ep.mlp("34"), TypeError, "widths"),
    "mlp width bool": (lambda: ep.mlp([3, True]), TypeError, r"widths\[1\]"),
    "mlp width float": (lambda: ep.mlp([3, 4.0]), TypeError, r"widths\[1\]"),
    "mlp width negative": (lambda: ep.mlp([3, -4]), ValueError, r"widths\[1\]"),
    "mlp bias str": (lambda: ep.mlp([3, 4], bias="no"), TypeError, "bias"),
    "mlp activation": (lambda: ep.mlp([3, 4], "swish"), ValueError, "activation 'swish'"),
    "mlp seed negative": (lambda: ep.mlp([3, 4], seed=-1), ValueError, "seed"),
    "mlp seed str": (lambda: ep.mlp([3, 4], seed="abc"), ValueError, "seed"),
    "mlp seed None": (lambda: ep.mlp([3, 4], seed=None), ValueError, "seed"),
    "transformer causal str": (lambda: ep.transformer(8, 2, 16, 1, causal="no"), TypeError,
                               "causal"),
    "transformer heads bool": (lambda: ep.transformer(8, True, 16, 1), TypeError, "heads"),
    "transformer blocks 0": (lambda: ep.transformer(8, 2, 16, 0), ValueError, "blocks"),
    "transformer d_ff str": (lambda: ep.transformer(8, 2, "16", 1), TypeError, "d_ff"),
    "transformer norm": (lambda: ep.transformer(8, 2, 16, 1, norm="mid"), ValueError, "norm"),
    "transformer_block d_model": (lambda: ep.transformer_block(8.0, 2, 16), TypeError,
                                  "d_model"),
    "transformer_block activation": (lambda: ep.transformer_block(8, 2, 16, activation=1),
                                     TypeError, "activation"),
    # ---- formats and quantizers
    "FloatFormat name": (lambda: ep.FloatFormat("fp8"), ValueError, "name.*'fp16'"),
    "FloatFormat name list": (lambda: ep.FloatFormat(["fp16"]), ValueError, "name"),
    "FloatFormat quantize complex": (lambda: ep.FloatFormat("fp16").fit(X).quantize(X + 1j),
                                     TypeError, "complex"),
    "MXFormat name": (lambda: ep.MXFormat("mxfp9"), ValueError, "name.*'mxfp8_e4m3'"),
    "MXFormat block bool": (lambda: ep.MXFormat("mxint8", block=True), TypeError, "block"),
    "MXFormat block 0": (lambda: ep.MXFormat("mxint8", block=0), ValueError, "block"),
    "MXFormat fit complex": (lambda: ep.MXFormat("mxint8").fit(X + 1j), TypeError, "complex"),
    "ShiftQuantizer bits str": (lambda: ep.ShiftQuantizer("8"), ValueError, "bits"),
    "ShiftQuantizer rounding": (lambda: ep.ShiftQuantizer(8, rounding="up"), ValueError,
                                "rounding"),
    "ShiftQuantizer shift": (lambda: ep.ShiftQuantizer(8, shift=1), ValueError, "shift"),
    "ShiftQuantizer fit str": (lambda: ep.ShiftQuantizer(8).fit(["a"]), TypeError, "real"),
    "WAGE bits bool": (lambda: ep.WAGE(bits_w=True), ValueError, "bits_w"),
    "WAGE rounding": (lambda: ep.WAGE(rounding_g="up"), ValueError, "rounding_g"),
    "gpfq W complex": (lambda: ep.gpfq(Z, X, 4), TypeError, "W is complex"),
    "gpfq X strings": (lambda: ep.gpfq(E, [["1"] * 4], 4), TypeError, "X must be a real"),
    "gpfq bits bool": (lambda: ep.gpfq(E, X, True), ValueError, "bits"),
    "gpfq scale str": (lambda: ep.gpfq(E, X, 4, scale="1"), TypeError, "scale"),
    "gpfq scale 0": (lambda: ep.gpfq(E, X, 4, scale=0.0), ValueError, "scale"),
    "gpfq granularity": (lambda: ep.gpfq(E, X, 4, granularity="row"), ValueError,
                         "granularity"),
    "gpfq step complex": (lambda: ep.gpfq(E, X, 4, step=1j), TypeError, "step"),
    "spfq seed": (lambda: ep.spfq(E, X, 4, seed=-1), ValueError, "seed"),
    "spfq rng": (lambda: ep.spfq(E, X, 4, rng="x"), TypeError, "rng"),
    "alphabet_step scale nan": (lambda: ep.alphabet_step(E, 4, scale=np.nan), ValueError,
                                "scale"),
    "gpfq_config method": (lambda: ep.gpfq_config(ep.mlp([4, 3]), X, 4, method="x"),
                           ValueError, "method"),
    "gpfq_config seed": (lambda: ep.gpfq_config(ep.mlp([4, 3]), X, 4, method="spfq",
                                                seed="1"), ValueError, "seed"),
    "gpfq_config layers": (lambda: ep.gpfq_config(ep.mlp([4, 3]), X, 4, layers=[1]),
                           TypeError, "layers"),
    "gpfq_config input complex": (lambda: ep.gpfq_config(ep.mlp([4, 3]), X + 1j, 4),
                                  TypeError, "complex"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_argument_is_refused_by_name(case):
    make, error, text = CASES[case]
    with pytest.raises(error, match=text):
        make()


@pytest.mark.parametrize("bad, error, text", [
    (X + 1j, TypeError, "input x is complex"),
    (np.array([["1", "2", "3", "4"]]), TypeError, "real numeric array"),
    ([[1.0, 2.0, 3.0, 4.0], [1.0]], TypeError, "rows differ in length"),
    (np.array([[1.0, np.nan, 0.0, 0.0]]), ValueError, "NaN/Inf"),
    (np.ones((2, 3)), ValueError, "expects inputs with 4 features"),
])
def test_bad_network_input_is_refused(bad, error, text):
    net = ep.mlp([4, 3], seed=0)
    with pytest.raises(error, match=text):
        net(bad)
    with pytest.raises(error, match=text):
        ep.analyze(net, bad, ep.QuantConfig(weights=ep.Uniform(8)))


def test_softmax_axis_needs_a_token_axis_in_the_input():
    """Softmax over tokens (axis=-2 of (batch, tokens, d)) is fine; axis=-3 of a 2-D input
    is caught when the input is checked, naming the layer."""
    net = ep.Sequential([ep.Linear(E), ep.Softmax(axis=-3)])
    with pytest.raises(ValueError, match="Softmax 'softmax1' needs a token axis"):
        net(X)
    x = np.random.default_rng(0).standard_normal((3, 2, 4))
    e = np.exp(x - x.max(axis=0))
    np.testing.assert_allclose(net(x), e / e.sum(axis=0), rtol=1e-14)


def test_valid_arguments_still_work():
    """numpy integers and bools, numpy floats and integer weights are real arguments."""
    ep.Attention(E.astype(int), E, E, E, heads=np.int64(2), causal=np.bool_(True))
    ep.LayerNorm(np.ones(4), np.zeros(4), eps=np.float32(1e-5))
    ep.Softmax(axis=np.int64(-2))
    ep.mlp([np.int64(3), 4], seed=np.uint8(3), bias=np.bool_(False))
    ep.MXFormat("mxint8", block=np.int32(16))
    ep.Embedding(E, pad_id=np.int64(0))

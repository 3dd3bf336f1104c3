"""Every op's forward, and the builders' networks, against independent references.

What is compared to what
------------------------
* ``Linear``, ``Activation`` (all kinds), ``Softmax``, ``LayerNorm``, ``RMSNorm``
  and ``Attention``: ``op.forward(x)`` against

  - a plain-NumPy implementation written here from the textbook formula
    (nothing from ``errprop`` is used to compute a reference), and
  - PyTorch (``torch.nn.functional`` / ``torch.nn`` modules) in float64
    (relative tolerance ~1e-12) and in float32 on the same float32-representable
    numbers (tolerance ~1e-5).

  Attention is checked against a per-query NumPy loop, against
  ``F.scaled_dot_product_attention`` on manually projected heads (this path
  also covers an inner width different from ``d_model`` and partial biases),
  and against ``torch.nn.MultiheadAttention(batch_first=True)`` with the
  weights copied in.
* The sample-axis convention: parameters with a leading sample axis ``S``
  passed to ``forward(x, params)`` (``x`` with the same leading axis) equal a
  Python loop that runs each sample separately with its own parameters.
* ``errprop.mlp`` and ``errprop.transformer`` (pre- and post-norm): ``net(x)``
  against a NumPy re-implementation that reads the parameters from
  ``net.layers()``, against a PyTorch re-implementation with the same weights,
  plus the node names the builders promise.

PyTorch is only reached through the ``torch`` fixture (see ``conftest.py``).
"""

import math

import numpy as np
import pytest

import errprop as ep

RTOL64 = 1e-12
RTOL32 = 2e-5

ACTIVATION_KINDS = ["relu", "gelu", "gelu_tanh", "tanh", "sigmoid", "silu", "identity"]
SHAPES = [(1, 8), (5, 8), (1, 1, 8), (2, 5, 8), (3, 7, 8)]
ATTN_SHAPES = [(1, 1, 8), (2, 5, 8), (3, 7, 8)]
DOMAINS = ["normal", "wide", "small", "offset"]


# ----------------------------------------------------------------- helpers
def assert_close(actual, expected, rtol=RTOL64):
    """Elementwise relative tolerance, with an absolute floor at ``rtol * max|expected|``."""
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual))
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-300))


def sample(rng, shape, domain="normal"):
    x = rng.standard_normal(shape)
    return {
        "normal": x,
        "wide": 4.0 * x,
        "small": 1e-3 * x,
        "offset": x + 3.0,
        "saturating": 40.0 * x,
    }[domain]


def as_f32(a):
    """Round to float32 and return as float64: numbers both libraries can hold exactly."""
    return None if a is None else np.asarray(a, dtype=np.float32).astype(np.float64)


def t(torch, a, dtype=None):
    """NumPy -> torch tensor (a copy), float64 unless told otherwise."""
    if a is None:
        return None
    return torch.tensor(np.asarray(a), dtype=dtype or torch.float64)


def n(tensor):
    """torch tensor -> float64 NumPy array."""
    return tensor.detach().double().numpy()


# --------------------------------------------------- NumPy reference math
def np_linear(x, W, b=None):
    y = np.einsum("...i,oi->...o", x, W)
    return y if b is None else y + b


def np_sigmoid(x):
    e = np.exp(-np.abs(x))  # never overflows
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


_erfc = np.frompyfunc(math.erfc, 1, 1)


def np_activation(kind, x):
    if kind == "relu":
        return np.where(x > 0, x, 0.0)
    if kind == "gelu":  # x * Phi(x), Phi(x) = erfc(-x / sqrt 2) / 2
        return 0.5 * x * _erfc(-x / math.sqrt(2.0)).astype(np.float64)
    if kind == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if kind == "tanh":
        return np.tanh(x)
    if kind == "sigmoid":
        return np_sigmoid(x)
    if kind == "silu":
        return x * np_sigmoid(x)
    if kind == "identity":
        return x.copy()
    raise AssertionError(kind)


def np_softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def np_layer_norm(x, gamma, beta, eps):
    mu = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mu) ** 2, axis=-1, keepdims=True)  # biased
    return gamma * (x - mu) / np.sqrt(var + eps) + beta


def np_rms_norm(x, gamma, eps):
    return gamma * x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps)


def np_attention(x, p, heads, causal):
    """Per-batch, per-head, per-query loop; causal attends to keys ``j <= i`` only."""
    q = np_linear(x, p["Wq"], p.get("bq"))
    k = np_linear(x, p["Wk"], p.get("bk"))
    v = np_linear(x, p["Wv"], p.get("bv"))
    B, T, inner = q.shape
    hd = inner // heads
    o = np.zeros((B, T, inner))
    for b in range(B):
        for h in range(heads):
            cols = slice(h * hd, (h + 1) * hd)
            for i in range(T):
                keys = i + 1 if causal else T
                scores = k[b, :keys, cols] @ q[b, i, cols] / math.sqrt(hd)
                o[b, i, cols] = np_softmax(scores) @ v[b, :keys, cols]
    return np_linear(o, p["Wo"], p.get("bo"))


# ------------------------------------------------- PyTorch reference math
TORCH_ACT = {
    "relu": lambda F, x: F.relu(x),
    "gelu": lambda F, x: F.gelu(x, approximate="none"),
    "gelu_tanh": lambda F, x: F.gelu(x, approximate="tanh"),
    "tanh": lambda F, x: F.tanh(x),
    "sigmoid": lambda F, x: F.sigmoid(x),
    "silu": lambda F, x: F.silu(x),
    "identity": lambda F, x: x,
}


def torch_act_module(torch, kind):
    nn = torch.nn
    return {"relu": nn.ReLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
            "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "silu": nn.SiLU(),
            "identity": nn.Identity()}[kind]


def torch_sdpa_attention(torch, x, p, heads, causal):
    """Project with F.linear, split heads, F.scaled_dot_product_attention, merge, project."""
    F = torch.nn.functional
    B, T, _ = x.shape
    q, k, v = (F.linear(x, p["W" + c], p.get("b" + c)) for c in "qkv")
    inner = q.shape[-1]
    split = lambda a: a.reshape(B, T, heads, inner // heads).transpose(1, 2)  # noqa: E731
    o = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=causal)
    return F.linear(o.transpose(1, 2).reshape(B, T, inner), p["Wo"], p.get("bo"))


def torch_mha_attention(torch, x, p, heads, causal):
    """torch.nn.MultiheadAttention(batch_first=True) with the weights copied in."""
    d = x.shape[-1]
    bias = "bq" in p
    mha = torch.nn.MultiheadAttention(d, heads, bias=bias, batch_first=True,
                                      dtype=x.dtype).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([p["Wq"], p["Wk"], p["Wv"]]))
        mha.out_proj.weight.copy_(p["Wo"])
        if bias:
            mha.in_proj_bias.copy_(torch.cat([p["bq"], p["bk"], p["bv"]]))
            mha.out_proj.bias.copy_(p["bo"])
        T = x.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1) if causal else None
        y, _ = mha(x, x, x, need_weights=False, attn_mask=mask)
    return y


# --------------------------------------------------------------- op makers
def linear_params(rng, n_in, n_out, bias=True):
    W = rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)
    return W, (rng.standard_normal(n_out) if bias else None)


BIAS_SETS = {"all": ("bq", "bk", "bv", "bo"), "none": (), "partial": ("bq", "bo")}


def attention_params(rng, d, inner, biases="all"):
    p = {"Wq": rng.standard_normal((inner, d)) / np.sqrt(d),
         "Wk": rng.standard_normal((inner, d)) / np.sqrt(d),
         "Wv": rng.standard_normal((inner, d)) / np.sqrt(d),
         "Wo": rng.standard_normal((d, inner)) / np.sqrt(inner)}
    for key in BIAS_SETS[biases]:
        p[key] = 0.3 * rng.standard_normal(d if key == "bo" else inner)
    return p


def make_attention(p, heads, causal):
    return ep.Attention(p["Wq"], p["Wk"], p["Wv"], p["Wo"], p.get("bq"), p.get("bk"),
                        p.get("bv"), p.get("bo"), heads=heads, causal=causal)


def torch_params(torch, p, dtype=None):
    return {k: t(torch, v, dtype) for k, v in p.items()}


# ================================================================== Linear
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n_out", [1, 5, 16])
def test_linear_matches_numpy_and_torch(n_out, shape, bias, rng, torch):
    W, b = linear_params(rng, shape[-1], n_out, bias)
    x = sample(rng, shape)
    y = ep.Linear(W, b).forward(x)
    assert y.shape == (*shape[:-1], n_out)
    assert_close(y, np_linear(x, W, b))
    F = torch.nn.functional
    assert_close(y, n(F.linear(t(torch, x), t(torch, W), t(torch, b))))


@pytest.mark.parametrize("shape", [(5, 8), (2, 5, 8)], ids=str)
def test_linear_float32_inputs_match_torch_float32(shape, rng, torch):
    W, b = (as_f32(a) for a in linear_params(rng, shape[-1], 6))
    x = as_f32(sample(rng, shape))
    y = ep.Linear(W, b).forward(x)
    ref = torch.nn.functional.linear(*(t(torch, a, torch.float32) for a in (x, W, b)))
    assert_close(y, n(ref), rtol=RTOL32)


# ============================================================= Activations
@pytest.mark.parametrize("domain", DOMAINS + ["saturating"])
@pytest.mark.parametrize("shape", [(5, 8), (2, 5, 8)], ids=str)
@pytest.mark.parametrize("kind", ACTIVATION_KINDS)
def test_activation_matches_numpy_and_torch(kind, shape, domain, rng, torch):
    x = sample(rng, shape, domain)
    y = ep.Activation(kind).forward(x)
    assert y.shape == x.shape
    assert_close(y, np_activation(kind, x))
    xt = t(torch, x)
    assert_close(y, n(TORCH_ACT[kind](torch.nn.functional, xt)))
    assert_close(y, n(torch_act_module(torch, kind)(xt)))


@pytest.mark.parametrize("kind", ACTIVATION_KINDS)
def test_activation_special_points(kind, torch):
    x = np.array([[0.0, -0.0, 1e-300, -1e-300, 1.0, -1.0, 30.0, -30.0, 700.0, -700.0]])
    y = ep.Activation(kind).forward(x)
    assert_close(y, np_activation(kind, x))
    assert_close(y, n(TORCH_ACT[kind](torch.nn.functional, t(torch, x))))


@pytest.mark.parametrize("kind", ACTIVATION_KINDS)
def test_activation_float32_inputs_match_torch_float32(kind, rng, torch):
    x = as_f32(sample(rng, (4, 6, 8), "wide"))
    y = ep.Activation(kind).forward(x)
    ref = TORCH_ACT[kind](torch.nn.functional, t(torch, x, torch.float32))
    assert_close(y, n(ref), rtol=RTOL32)


# ================================================================= Softmax
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0, 1e4, 1e6])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_softmax_matches_numpy_and_torch(shape, scale, rng, torch):
    x = scale * rng.standard_normal(shape)
    y = ep.Softmax().forward(x)
    assert np.all(np.isfinite(y))
    assert_close(np.sum(y, axis=-1), np.ones(shape[:-1]))
    assert_close(y, np_softmax(x))
    assert_close(y, n(torch.softmax(t(torch, x), dim=-1)))


@pytest.mark.parametrize("axis", [-1, -2])
def test_softmax_other_axis_matches_torch(axis, rng, torch):
    x = 5.0 * rng.standard_normal((2, 5, 8))
    y = ep.Softmax(axis=axis).forward(x)
    assert_close(y, np_softmax(x, axis=axis))
    assert_close(y, n(torch.softmax(t(torch, x), dim=axis)))


def test_softmax_huge_logits_with_ties_and_offsets(torch):
    x = np.array([[1e4, 1e4, -1e4, 0.0],
                  [1e300, 1e300, -1e300, 1e300],
                  [-5e4, -5e4 + 1.0, -5e4 + 2.0, -5e4 + 3.0]])
    y = ep.Softmax().forward(x)
    assert np.all(np.isfinite(y))
    assert_close(y[0], [0.5, 0.5, 0.0, 0.0])
    assert_close(y[1], [1 / 3, 1 / 3, 0.0, 1 / 3])
    assert_close(y, np_softmax(x))
    assert_close(y, n(torch.softmax(t(torch, x), dim=-1)))


def test_softmax_float32_inputs_match_torch_float32(rng, torch):
    x = as_f32(1e3 * rng.standard_normal((3, 4, 8)))
    y = ep.Softmax().forward(x)
    assert_close(y, n(torch.softmax(t(torch, x, torch.float32), dim=-1)), rtol=RTOL32)


# ========================================================= LayerNorm / RMSNorm
@pytest.mark.parametrize("eps", [1e-12, 1e-5, 1e-2, 1.0])
@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_matches_numpy_and_torch(shape, domain, eps, rng, torch):
    d = shape[-1]
    gamma, beta = 1.0 + 0.5 * rng.standard_normal(d), rng.standard_normal(d)
    x = sample(rng, shape, domain)
    y = ep.LayerNorm(gamma, beta, eps=eps).forward(x)
    assert_close(y, np_layer_norm(x, gamma, beta, eps))
    F = torch.nn.functional
    assert_close(y, n(F.layer_norm(t(torch, x), (d,), t(torch, gamma), t(torch, beta), eps)))


def test_layer_norm_default_eps_is_torchs(rng, torch):
    d = 8
    gamma, beta = 1.0 + 0.5 * rng.standard_normal(d), rng.standard_normal(d)
    x = 1e-3 * rng.standard_normal((4, d))  # small variance: eps matters
    mod = torch.nn.LayerNorm(d, dtype=torch.float64)
    with torch.no_grad():
        mod.weight.copy_(t(torch, gamma))
        mod.bias.copy_(t(torch, beta))
        ref = mod(t(torch, x))
    assert_close(ep.LayerNorm(gamma, beta).forward(x), n(ref))


def test_layer_norm_constant_rows_give_beta(torch):
    gamma, beta = np.linspace(0.5, 2.0, 6), np.linspace(-1.0, 1.0, 6)
    x = np.array([[3.0] * 6, [0.0] * 6])
    y = ep.LayerNorm(gamma, beta).forward(x)
    assert_close(y, np.broadcast_to(beta, x.shape))
    F = torch.nn.functional
    assert_close(y, n(F.layer_norm(t(torch, x), (6,), t(torch, gamma), t(torch, beta), 1e-5)))


def test_layer_norm_float32_inputs_match_torch_float32(rng, torch):
    d = 8
    gamma, beta = as_f32(1.0 + 0.5 * rng.standard_normal(d)), as_f32(rng.standard_normal(d))
    x = as_f32(sample(rng, (3, 5, d), "offset"))
    y = ep.LayerNorm(gamma, beta).forward(x)
    f32 = lambda a: t(torch, a, torch.float32)  # noqa: E731
    ref = torch.nn.functional.layer_norm(f32(x), (d,), f32(gamma), f32(beta), 1e-5)
    assert_close(y, n(ref), rtol=RTOL32)


@pytest.mark.parametrize("eps", [1e-12, 1e-6, 1e-2, 1.0])
@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_numpy_and_torch(shape, domain, eps, rng, torch):
    d = shape[-1]
    gamma = 1.0 + 0.5 * rng.standard_normal(d)
    x = sample(rng, shape, domain)
    y = ep.RMSNorm(gamma, eps=eps).forward(x)
    assert_close(y, np_rms_norm(x, gamma, eps))
    F = torch.nn.functional
    if hasattr(F, "rms_norm"):
        assert_close(y, n(F.rms_norm(t(torch, x), (d,), t(torch, gamma), eps=eps)))
    xt = t(torch, x)  # the formula spelled out in torch, always available
    ref = t(torch, gamma) * xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + eps)
    assert_close(y, n(ref))


def test_rms_norm_default_eps(rng):
    gamma = 1.0 + 0.5 * rng.standard_normal(8)
    x = 1e-3 * rng.standard_normal((4, 8))
    assert_close(ep.RMSNorm(gamma).forward(x), np_rms_norm(x, gamma, 1e-6))


# =============================================================== Attention
@pytest.mark.parametrize("domain", ["normal", "wide"])
@pytest.mark.parametrize("biases", list(BIAS_SETS))
@pytest.mark.parametrize("inner", [8, 4, 16])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=str)
def test_attention_matches_numpy_and_sdpa(shape, heads, causal, inner, biases, domain,
                                          rng, torch):
    p = attention_params(rng, shape[-1], inner, biases)
    x = sample(rng, shape, domain)
    y = make_attention(p, heads, causal).forward(x)
    assert y.shape == shape
    assert_close(y, np_attention(x, p, heads, causal))
    ref = torch_sdpa_attention(torch, t(torch, x), torch_params(torch, p), heads, causal)
    assert_close(y, n(ref))


@pytest.mark.parametrize("biases", ["all", "none"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=str)
def test_attention_matches_torch_multihead_attention(shape, heads, causal, biases, rng, torch):
    d = shape[-1]
    p = attention_params(rng, d, d, biases)
    x = sample(rng, shape)
    y = make_attention(p, heads, causal).forward(x)
    ref = torch_mha_attention(torch, t(torch, x), torch_params(torch, p), heads, causal)
    assert_close(y, n(ref))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_attention_float32_inputs_match_torch_float32(heads, causal, rng, torch):
    p = {k: as_f32(v) for k, v in attention_params(rng, 8, 8, "all").items()}
    x = as_f32(sample(rng, (2, 6, 8)))
    y = make_attention(p, heads, causal).forward(x)
    p32 = torch_params(torch, p, torch.float32)
    x32 = t(torch, x, torch.float32)
    assert_close(y, n(torch_sdpa_attention(torch, x32, p32, heads, causal)), rtol=RTOL32)
    assert_close(y, n(torch_mha_attention(torch, x32, p32, heads, causal)), rtol=RTOL32)


def test_attention_single_token_causal_is_value_projection(rng):
    """One token (or the first token under a causal mask) attends only to itself."""
    p = attention_params(rng, 8, 8, "all")
    x = rng.standard_normal((3, 1, 8))
    y = make_attention(p, 2, True).forward(x)
    v = np_linear(x, p["Wv"], p["bv"])
    assert_close(y, np_linear(v, p["Wo"], p["bo"]))


def test_attention_causal_output_ignores_future_tokens(rng):
    p = attention_params(rng, 8, 8, "all")
    op = make_attention(p, 2, True)
    x = rng.standard_normal((2, 6, 8))
    x2 = x.copy()
    x2[:, 4:] += 10.0 * rng.standard_normal((2, 2, 8))
    assert_close(op.forward(x)[:, :4], op.forward(x2)[:, :4])


# ======================================================= sample-axis convention
S = 3


def _loop(op_factory, x, sampled, shared):
    """Reference: each sample run on its own, with its own slice of the sampled params."""
    return np.stack([op_factory({**shared, **{k: v[s] for k, v in sampled.items()}})
                     .forward(x[s]) for s in range(len(x))])


@pytest.mark.parametrize("which", ["all", "W", "b"])
@pytest.mark.parametrize("shape", [(S, 4, 8), (S, 2, 5, 8)], ids=str)
def test_linear_sampled_params_equal_per_sample_loop(shape, which, rng):
    W = rng.standard_normal((S, 6, 8)) / np.sqrt(8)
    b = rng.standard_normal((S, 6))
    base_W, base_b = linear_params(rng, 8, 6)
    op = ep.Linear(base_W, base_b)
    x = sample(rng, shape)
    sampled = {"all": {"W": W, "b": b}, "W": {"W": W}, "b": {"b": b}}[which]
    y = op.forward(x, sampled)
    assert y.shape == (*shape[:-1], 6)
    full_W = sampled.get("W", np.broadcast_to(base_W, W.shape))
    full_b = sampled.get("b", np.broadcast_to(base_b, b.shape))
    assert_close(y, np.stack([np_linear(x[s], full_W[s], full_b[s]) for s in range(S)]))
    shared = {"W": base_W, "b": base_b}
    assert_close(y, _loop(lambda q: ep.Linear(q["W"], q["b"]), x, sampled, shared))


@pytest.mark.parametrize("which", ["all", "weights", "Wo_bk"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_attention_sampled_params_equal_per_sample_loop(heads, causal, which, rng):
    d, inner = 8, (12 if heads != 1 else 4)  # inner != d_model
    base = attention_params(rng, d, inner, "all")
    draws = [attention_params(rng, d, inner, "all") for _ in range(S)]
    keys = {"all": list(base), "weights": ["Wq", "Wk", "Wv", "Wo"], "Wo_bk": ["Wo", "bk"]}
    sampled = {k: np.stack([dr[k] for dr in draws]) for k in keys[which]}
    op = make_attention(base, heads, causal)
    x = sample(rng, (S, 2, 5, d))
    y = op.forward(x, sampled)
    assert y.shape == x.shape
    per_sample = [{**base, **{k: v[s] for k, v in sampled.items()}} for s in range(S)]
    assert_close(y, np.stack([np_attention(x[s], per_sample[s], heads, causal)
                              for s in range(S)]))
    assert_close(y, _loop(lambda q: make_attention(q, heads, causal), x, sampled, base))


@pytest.mark.parametrize("which", ["all", "gamma", "beta"])
@pytest.mark.parametrize("shape", [(S, 4, 8), (S, 2, 5, 8)], ids=str)
def test_layer_norm_sampled_params_equal_per_sample_loop(shape, which, rng):
    gamma, beta = 1.0 + 0.3 * rng.standard_normal(8), rng.standard_normal(8)
    G, B = 1.0 + 0.3 * rng.standard_normal((S, 8)), rng.standard_normal((S, 8))
    sampled = {"all": {"gamma": G, "beta": B}, "gamma": {"gamma": G}, "beta": {"beta": B}}[which]
    x = sample(rng, shape, "offset")
    y = ep.LayerNorm(gamma, beta, eps=1e-5).forward(x, sampled)
    g = sampled.get("gamma", np.broadcast_to(gamma, G.shape))
    b = sampled.get("beta", np.broadcast_to(beta, B.shape))
    assert_close(y, np.stack([np_layer_norm(x[s], g[s], b[s], 1e-5) for s in range(S)]))
    shared = {"gamma": gamma, "beta": beta}
    assert_close(y, _loop(lambda q: ep.LayerNorm(q["gamma"], q["beta"]), x, sampled, shared))


@pytest.mark.parametrize("shape", [(S, 4, 8), (S, 2, 5, 8)], ids=str)
def test_rms_norm_sampled_gamma_equals_per_sample_loop(shape, rng):
    G = 1.0 + 0.3 * rng.standard_normal((S, 8))
    x = sample(rng, shape)
    y = ep.RMSNorm(np.ones(8), eps=1e-6).forward(x, {"gamma": G})
    assert_close(y, np.stack([np_rms_norm(x[s], G[s], 1e-6) for s in range(S)]))


# ================================================================ builders
def np_run_mlp(net, x):
    for _, op in net.layers():
        if isinstance(op, ep.Linear):
            x = np_linear(x, op.params["W"], op.params.get("b"))
        else:
            x = np_activation(op.kind, x)
    return x


@pytest.mark.parametrize("shape", [(6, 5), (2, 4, 5)], ids=str)
@pytest.mark.parametrize("activation", ACTIVATION_KINDS)
def test_mlp_matches_numpy_and_torch(activation, shape, rng, torch):
    widths = [5, 16, 12, 3]
    net = ep.mlp(widths, activation, seed=7)
    names = [nd.name for nd in net.nodes()]
    assert names == ["fc1", f"{activation}1", "fc2", f"{activation}2", "fc3"]
    x = sample(rng, shape)
    y = net(x)
    assert y.shape == (*shape[:-1], 3)
    assert_close(y, np_run_mlp(net, x))

    modules = []
    for _, op in net.layers():
        if isinstance(op, ep.Linear):
            W, b = op.params["W"], op.params["b"]
            lin = torch.nn.Linear(W.shape[1], W.shape[0], dtype=torch.float64)
            with torch.no_grad():
                lin.weight.copy_(t(torch, W))
                lin.bias.copy_(t(torch, b))
            modules.append(lin)
        else:
            modules.append(torch_act_module(torch, op.kind))
    with torch.no_grad():
        ref = torch.nn.Sequential(*modules)(t(torch, x))
    assert_close(y, n(ref))


def test_mlp_without_bias_and_seed_reproducible(rng):
    net = ep.mlp([4, 8, 2], "tanh", seed=3, bias=False)
    assert all("b" not in op.params for _, op in net.layers())
    x = rng.standard_normal((5, 4))
    assert_close(net(x), np_run_mlp(net, x))
    assert np.array_equal(net(x), ep.mlp([4, 8, 2], "tanh", seed=3, bias=False)(x))


def test_mlp_float32_input_is_cast_to_float64(rng, torch):
    net = ep.mlp([5, 16, 3], "gelu", seed=1)
    x32 = rng.standard_normal((4, 5)).astype(np.float32)
    y = net(x32)
    assert y.dtype == np.float64
    assert np.array_equal(y, net(x32.astype(np.float64)))


def _block_names(i, norm):
    b = f"block{i}."
    mlp = [b + "mlp.fc1", b + "mlp.gelu1", b + "mlp.fc2"]
    if norm == "pre":
        return [b + "ln1", b + "attn", b + "res1", b + "ln2", *mlp, b + "res2"]
    return [b + "attn", b + "res1", b + "ln1", *mlp, b + "res2", b + "ln2"]


def np_run_transformer(net, x, blocks, norm):
    P = {name: op for name, op in net.layers()}

    def ln(name, h):
        op = P[name]
        return np_layer_norm(h, op.params["gamma"], op.params["beta"], op.eps)

    def attn(name, h):
        op = P[name]
        return np_attention(h, op.params, op.heads, op.causal)

    def mlp(scope, h):
        fc1, act, fc2 = P[scope + "fc1"], P[scope + "gelu1"], P[scope + "fc2"]
        h = np_linear(h, fc1.params["W"], fc1.params["b"])
        h = np_activation(act.kind, h)
        return np_linear(h, fc2.params["W"], fc2.params["b"])

    for i in range(blocks):
        b = f"block{i}."
        if norm == "pre":
            x = x + attn(b + "attn", ln(b + "ln1", x))
            x = x + mlp(b + "mlp.", ln(b + "ln2", x))
        else:
            x = ln(b + "ln1", x + attn(b + "attn", x))
            x = ln(b + "ln2", x + mlp(b + "mlp.", x))
    return ln("ln_f", x) if norm == "pre" else x


def torch_run_transformer(torch, net, x, blocks, norm, dtype):
    F = torch.nn.functional
    P = {name: {k: t(torch, v, dtype) for k, v in op.params.items()}
         for name, op in net.layers()}
    ops = dict(net.layers())

    def ln(name, h):
        return F.layer_norm(h, (h.shape[-1],), P[name]["gamma"], P[name]["beta"],
                            ops[name].eps)

    def attn(name, h):
        return torch_sdpa_attention(torch, h, P[name], ops[name].heads, ops[name].causal)

    def mlp(scope, h):
        h = F.linear(h, P[scope + "fc1"]["W"], P[scope + "fc1"]["b"])
        h = F.gelu(h)  # the builders' default activation, erf form
        return F.linear(h, P[scope + "fc2"]["W"], P[scope + "fc2"]["b"])

    for i in range(blocks):
        b = f"block{i}."
        if norm == "pre":
            x = x + attn(b + "attn", ln(b + "ln1", x))
            x = x + mlp(b + "mlp.", ln(b + "ln2", x))
        else:
            x = ln(b + "ln1", x + attn(b + "attn", x))
            x = ln(b + "ln2", x + mlp(b + "mlp.", x))
    return ln("ln_f", x) if norm == "pre" else x


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_transformer_matches_numpy_and_torch(norm, heads, causal, rng, torch):
    d_model, d_ff, blocks = 8, 16, 2
    net = ep.transformer(d_model, heads, d_ff, blocks, norm=norm, causal=causal, seed=11)
    names = [nd.name for nd in net.nodes()]
    expected = [nm for i in range(blocks) for nm in _block_names(i, norm)]
    assert names == expected + (["ln_f"] if norm == "pre" else [])
    for name, op in net.layers():
        if isinstance(op, ep.Attention):
            assert (op.heads, op.causal) == (heads, causal), name

    x = sample(rng, (2, 5, d_model))
    y = net(x)
    assert y.shape == x.shape
    assert_close(y, np_run_transformer(net, x, blocks, norm))
    with torch.no_grad():
        ref = torch_run_transformer(torch, net, t(torch, x), blocks, norm, torch.float64)
    assert_close(y, n(ref))


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_transformer_float32_input_matches_torch_float32(norm, rng, torch):
    net = ep.transformer(8, 2, 16, 2, norm=norm, seed=5)
    x32 = rng.standard_normal((2, 5, 8)).astype(np.float32)
    y = net(x32)
    assert y.dtype == np.float64
    assert np.array_equal(y, net(x32.astype(np.float64)))
    with torch.no_grad():
        ref = torch_run_transformer(torch, net, torch.tensor(x32), 2, norm, torch.float32)
    assert_close(y, n(ref), rtol=1e-4)


def test_transformer_single_block_post_norm_and_node_lookup(rng):
    """blocks=1 post-norm (no ln_f) matches NumPy; scoped names resolve to the right nodes."""
    net = ep.transformer(8, 2, 16, 1, norm="post", seed=2)
    x = rng.standard_normal((3, 4, 8))
    assert_close(net(x), np_run_transformer(net, x, 1, "post"))
    assert net["block0.attn"] is dict(net.layers())["block0.attn"]
    assert isinstance(net["block0.res1"], ep.Residual)

"""Small general-graph networks shared by the tests (seeded, float64).

* :func:`swiglu_mlp` — ``down(silu(gate x) ⊙ up x)``, a functional :class:`errprop.Graph`.
* :func:`decomposed_attention` — a fused :class:`errprop.Attention` written out as
  ``Linear``/``Reshape``/``Transpose``/``MatMul``/``Scale``/``Softmax`` nodes, with the same
  weights; :data:`ATTENTION_NAMES` maps the fused op's sources to the decomposed ones.
* :func:`resnet_block` — ``relu(f(x) + P x)`` with a projection shortcut ``P``
  (a ``Parallel`` with an ``Add`` merge inside a ``Sequential``).
* :func:`swiglu_transformer` — pre-norm decoder blocks: ``x + attn(rms(x))``, then
  ``x + swiglu(rms(x))``.
"""

from __future__ import annotations

import math

import numpy as np

import errprop as ep


def _w(rng, n_out, n_in, gain=1.0):
    return rng.normal(0.0, math.sqrt(gain / n_in), size=(n_out, n_in))


def swiglu_mlp(d=8, hidden=16, *, seed=0, name=None):
    rng = np.random.default_rng(seed)
    x = ep.Input()
    g = ep.Activation("silu")(ep.Linear(_w(rng, hidden, d), name="gate")(x))
    u = ep.Linear(_w(rng, hidden, d), name="up")(x)
    h = ep.Mul(name="mul")(g, u)
    out = ep.Linear(_w(rng, d, hidden), rng.normal(0, 0.1, d), name="down")(h)
    return ep.Graph(x, out, name=name)


def fused_attention(d=8, heads=2, *, seed=0, causal=False, name="attn"):
    rng = np.random.default_rng(seed)
    Wq, Wk, Wv, Wo = (_w(rng, d, d) for _ in range(4))
    bq, bk, bv, bo = (rng.normal(0, 0.1, d) for _ in range(4))
    return ep.Attention(Wq, Wk, Wv, Wo, bq, bk, bv, bo, heads=heads, causal=causal,
                        name=name)


#: fused Attention source -> decomposed graph source
ATTENTION_NAMES = {"attn.Wq": "q.W", "attn.Wk": "k.W", "attn.Wv": "v.W", "attn.Wo": "o.W",
                   "attn.bq": "q.b", "attn.bk": "k.b", "attn.bv": "v.b", "attn.bo": "o.b"}


def decomposed_attention(att: ep.Attention) -> ep.Graph:
    """The graph of ``att`` (no mask): q/k/v projections, heads split by Reshape and
    Transpose, ``softmax(q kᵀ / √d_h) v``, heads merged, output projection."""
    if att.causal or att.mask is not None:
        raise ValueError("decomposed_attention: masks are not decomposed here")
    p, H, dh = att.params, att.heads, att.head_dim
    x = ep.Input()

    def heads(t):
        return ep.Transpose((1, 0, 2))(ep.Reshape((H, dh))(t))

    q = heads(ep.Linear(p["Wq"], p.get("bq"), name="q")(x))
    k = heads(ep.Linear(p["Wk"], p.get("bk"), name="k")(x))
    v = heads(ep.Linear(p["Wv"], p.get("bv"), name="v")(x))
    scores = ep.Scale(1.0 / math.sqrt(dh), name="scale")(ep.MatMul(transpose_b=True,
                                                                    name="qk")(q, k))
    probs = ep.Softmax(axis=-1, name="softmax")(scores)
    o = ep.MatMul(name="pv")(probs, v)
    merged = ep.Reshape((H * dh,), axes=2, name="merge")(ep.Transpose((1, 0, 2))(o))
    return ep.Graph(x, ep.Linear(p["Wo"], p.get("bo"), name="o")(merged))


def resnet_block(d_in=6, d_out=8, *, seed=0):
    rng = np.random.default_rng(seed)
    body = [ep.Linear(_w(rng, d_out, d_in, 2.0), rng.normal(0, 0.1, d_out), name="conv1"),
            ep.Activation("relu"),
            ep.Linear(_w(rng, d_out, d_out, 2.0), rng.normal(0, 0.1, d_out), name="conv2")]
    shortcut = ep.Linear(_w(rng, d_out, d_in), name="proj")
    return ep.Sequential([ep.Parallel(body, [shortcut], merge=ep.Add(name="join")),
                          ep.Activation("relu", name="out")])


def swiglu_transformer(d=8, heads=2, hidden=16, blocks=2, *, seed=0):
    """``blocks`` pre-norm decoder blocks named ``b0, b1, ...`` (``b0.attn``, ``b0.gate``)."""
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(blocks):
        att = fused_attention(d, heads, seed=int(rng.integers(1 << 30)), causal=True)
        mlp = swiglu_mlp(d, hidden, seed=int(rng.integers(1 << 30)))
        layers.append(ep.Sequential([
            ep.Residual(ep.RMSNorm(rng.normal(1.0, 0.1, d), name="rms1"), att),
            ep.Residual(ep.RMSNorm(rng.normal(1.0, 0.1, d), name="rms2"), mlp)], name=f"b{i}"))
    return ep.Sequential(layers)

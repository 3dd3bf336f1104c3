"""Symbolic statements of every built-in op's forward, written from the math.

Each function ``forward(tape, x, params)`` takes object arrays of sympy symbols shaped
like the numeric input and parameters and returns the output, with the textbook formula
and nothing of the numeric implementation (no max-subtraction, no ``eps`` clamp in
``L2Normalize``): those change no derivative at the points checked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import sympy as sp

from .._activation import Activation, Softmax
from .._attention import Attention
from .._embedding import Embedding
from .._linear import Linear
from .._norm import L2Normalize, LayerNorm, RMSNorm
from .._op import Op
from .._pool import MeanPool
from ._tape import Array, SymbolicForward, Tape, elementwise

_C = sp.sqrt(2 / sp.pi)

#: name -> the activation as a sympy function of one symbol. One line per activation,
#: like ``errprop.ACTIVATIONS``; ``verify_rules`` needs an entry for every table entry.
SYMBOLIC_ACTIVATIONS: dict[str, Callable[[sp.Expr], sp.Expr]] = {
    "relu": lambda x: sp.Piecewise((x, x > 0), (0, True)),
    "gelu": lambda x: x * (1 + sp.erf(x / sp.sqrt(2))) / 2,
    "gelu_tanh": lambda x: x * (1 + sp.tanh(_C * (x + sp.Rational(44715, 10 ** 6) * x ** 3))) / 2,
    "tanh": sp.tanh,
    "sigmoid": lambda x: 1 / (1 + sp.exp(-x)),
    "silu": lambda x: x / (1 + sp.exp(-x)),
    "identity": lambda x: x,
}


def _sum_last(a: Array) -> Array:
    return a.sum(axis=-1, keepdims=True)


def linear(tape: Tape, x: Array, p: Mapping[str, Array]) -> Array:
    """``y = x Wᵀ + b``."""
    y = x @ p["W"].T
    return y + p["b"] if "b" in p else y


def activation(kind: str) -> SymbolicForward:
    """``y = f(x)`` elementwise, ``f`` from :data:`SYMBOLIC_ACTIVATIONS`."""
    try:
        f = SYMBOLIC_ACTIVATIONS[kind]
    except KeyError:
        raise KeyError(f"no symbolic form for activation {kind!r}: add one line to "
                       f"errprop.symbolic.SYMBOLIC_ACTIVATIONS") from None
    return lambda tape, x, p: elementwise(f, x)


def softmax(tape: Tape, x: Array, p: Mapping[str, Array]) -> Array:
    """``y_i = exp(x_i) / Σ_k exp(x_k)`` over the last axis."""
    e = elementwise(sp.exp, x)
    return e / _sum_last(e)


def layer_norm(eps: float) -> SymbolicForward:
    """``y = γ (x − μ) / sqrt(mean((x − μ)²) + ε) + β`` over the last axis."""
    def forward(tape: Tape, x: Array, p: Mapping[str, Array]) -> Array:
        d = x.shape[-1]
        xc = x - _sum_last(x) / d
        sigma = elementwise(sp.sqrt, _sum_last(xc * xc) / d + sp.Float(eps))
        return p["gamma"] * xc / sigma + p["beta"]
    return forward


def rms_norm(eps: float) -> SymbolicForward:
    """``y = γ x / sqrt(mean(x²) + ε)``."""
    def forward(tape: Tape, x: Array, p: Mapping[str, Array]) -> Array:
        r = elementwise(sp.sqrt, _sum_last(x * x) / x.shape[-1] + sp.Float(eps))
        return p["gamma"] * x / r
    return forward


def l2_normalize(tape: Tape, x: Array, p: Mapping[str, Array]) -> Array:
    """``y = x / ‖x‖``."""
    return x / elementwise(sp.sqrt, _sum_last(x * x))


def mean_pool(mask: Array | None) -> SymbolicForward:
    """``y[n] = Σ_i m[n,i] x[n,i] / Σ_i m[n,i]`` (all ones without a mask)."""
    def forward(tape: Tape, x: Array, p: Mapping[str, Array]) -> Array:
        m = np.ones(x.shape[:-1], dtype=int) if mask is None else mask.astype(int)
        w = np.array([[sp.Rational(int(v), int(row.sum())) for v in row] for row in m],
                     dtype=object)
        return (w[..., None] * x).sum(axis=-2)
    return forward


def attention(heads: int, causal: bool, mask: Array | None) -> SymbolicForward:
    """Multi-head self-attention on ``x: (batch, T, d)``, every stage a named intermediate::

        q = x Wqᵀ + bq,  k = x Wkᵀ + bk,  v = x Wvᵀ + bv
        S_ij = q_i·k_j / sqrt(head_dim),  A_ij = exp(S_ij) / Σ_{j' visible} exp(S_ij')
        o_i = Σ_j A_ij v_j,  y = o Woᵀ + bo
    """
    def forward(tape: Tape, x: Array, p: Mapping[str, Array]) -> Array:
        B, T, _ = x.shape
        inner = p["Wq"].shape[0]
        dh = inner // heads

        def affine(w: str, b: str, inp: Array) -> Array:
            out = inp @ p[w].T
            return out + p[b] if b in p else out

        q = tape.let("q", affine("Wq", "bq", x))
        k = tape.let("k", affine("Wk", "bk", x))
        v = tape.let("v", affine("Wv", "bv", x))
        o = np.empty((B, T, inner), dtype=object)
        for n in range(B):
            for h in range(heads):
                cols = slice(h * dh, (h + 1) * dh)
                S = tape.let("S", q[n][:, cols] @ k[n][:, cols].T / sp.sqrt(dh))
                visible = np.ones((T, T), dtype=bool)
                if causal:
                    visible &= ~np.triu(np.ones((T, T), dtype=bool), k=1)
                if mask is not None:
                    visible &= mask[n][None, :]
                E = np.where(visible, elementwise(sp.exp, S), 0)
                A = tape.let("A", E / E.sum(axis=1, keepdims=True))
                o[n][:, cols] = A @ v[n][:, cols]
        o = tape.let("o", o)
        return affine("Wo", "bo", o)
    return forward


def embedding(ids: Array) -> SymbolicForward:
    """``y[n, i] = word[t[n, i]] + position[i] + token_type[0]`` (the ids are fixed)."""
    def forward(tape: Tape, x: None, p: Mapping[str, Array]) -> Array:
        y = p["word"][ids]
        T = ids.shape[-1]
        if "position" in p:
            y = y + p["position"][:T]
        if "token_type" in p:
            y = y + p["token_type"][0]
        return y
    return forward


def symbolic_forward(op: Op, x: Array | None = None) -> SymbolicForward:
    """The symbolic forward of a built-in op (``x``: the token ids for an Embedding)."""
    if isinstance(op, Linear):
        return linear
    if isinstance(op, Activation):
        return activation(op.kind)
    if isinstance(op, Softmax):
        if op.axis != -1:
            raise ValueError("symbolic Softmax: only axis=-1 is stated symbolically")
        return softmax
    if isinstance(op, LayerNorm):
        return layer_norm(op.eps)
    if isinstance(op, RMSNorm):
        return rms_norm(op.eps)
    if isinstance(op, L2Normalize):
        return l2_normalize
    if isinstance(op, MeanPool):
        return mean_pool(op.mask)
    if isinstance(op, Attention):
        return attention(op.heads, op.causal, op.mask)
    if isinstance(op, Embedding):
        if x is None:
            raise ValueError("symbolic Embedding: pass the token ids")
        return embedding(np.asarray(x).astype(int))
    raise TypeError(f"no built-in symbolic forward for {type(op).__name__}; pass "
                    f"SymbolicOp(op, x, forward) with a forward written in sympy")

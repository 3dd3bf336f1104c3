"""Symbolic statements of every built-in op's forward, written from the math.

Each function ``forward(tape, x, params)`` takes object arrays of sympy symbols shaped
like the numeric input and parameters and returns the output, with the textbook formula
and nothing of the numeric implementation (no max-subtraction, no ``eps`` clamp in
``L2Normalize``): those change no derivative at the points checked. A merge's forward
takes the list of its inputs, ``forward(tape, xs, params)``.

The forwards are registered per op type in :data:`FORWARDS` (``@register_forward(MyOp)``
on a factory ``make(op, x) -> forward``); :func:`symbolic_forward` looks them up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import sympy as sp

from .._activation import Activation, Softmax
from .._attention import Attention
from .._embedding import Embedding
from .._linear import Linear
from .._merge import Add, Concat, MatMul, Merge, Mul
from .._norm import L2Normalize, LayerNorm, RMSNorm
from .._op import Op
from .._pool import MeanPool
from .._shape_ops import Reshape, Scale, Slice, Transpose
from ._registry import Registry
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




# ------------------------------------------------------------------ shape ops and merges
def reshape(op: Reshape) -> SymbolicForward:
    """The last ``axes`` axes laid out again as ``shape`` (row-major order kept)."""
    return lambda tape, x, p: x.reshape(*x.shape[:x.ndim - op.axes], *op.shape)


def transpose(op: Transpose) -> SymbolicForward:
    """``y[..., i_perm] = x[..., i]`` over the last ``len(perm)`` axes."""
    def forward(tape: Tape, x: Array, p: Mapping[str, Array]) -> Array:
        head = tuple(range(x.ndim - len(op.perm)))
        return np.transpose(x, head + tuple(x.ndim - len(op.perm) + i for i in op.perm))
    return forward


def slice_(op: Slice) -> SymbolicForward:
    """``y = x[..., start:stop]`` along ``axis``."""
    return lambda tape, x, p: np.take(x, np.arange(op.start, op.stop), axis=op.axis)


def scale(op: Scale) -> SymbolicForward:
    """``y = c x``."""
    c = sp.Float(op.factor)
    return lambda tape, x, p: elementwise(lambda e: c * e, x)


def add(tape: Tape, xs: Sequence[Array], p: Mapping[str, Array]) -> Array:
    """``y = x₁ + x₂ + ...``."""
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def mul(tape: Tape, xs: Sequence[Array], p: Mapping[str, Array]) -> Array:
    """``y = a ⊙ b``."""
    return xs[0] * xs[1]


def concat(op: Concat) -> SymbolicForward:
    """The inputs side by side along ``axis``."""
    return lambda tape, xs, p: np.concatenate(list(xs), axis=op.axis)


def matmul(op: MatMul) -> SymbolicForward:
    """``y_ij = Σ_k a_ik b_kj`` (``b_jk`` with ``transpose_b``) over the last two axes."""
    def forward(tape: Tape, xs: Sequence[Array], p: Mapping[str, Array]) -> Array:
        a, b = xs
        return np.matmul(a, np.swapaxes(b, -1, -2) if op.transpose_b else b)
    return forward


# ------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class ForwardRule:
    """How to state an op's forward in sympy: ``make(op, x)`` returns the forward (``x``:
    the numeric input, needed when it is token ids); ``away_from_zero``: draw test inputs
    away from a kink at 0 (ReLU)."""

    make: Callable[[Op | Merge, Array | None], SymbolicForward]
    away_from_zero: bool = False


#: op class -> :class:`ForwardRule`; extend with :func:`register_forward`.
FORWARDS: Registry[ForwardRule] = Registry(
    "symbolic forward",
    "errprop.symbolic.register_forward({kind})(make), make(op, x) returning a forward "
    "written in sympy (or pass SymbolicOp(op, x, forward))")


def register_forward(*classes: type, away_from_zero: bool = False):
    """Decorator registering ``make(op, x) -> forward(tape, x, params)`` as the symbolic
    forward of ``classes`` (and their subclasses)."""
    def add_rule(make):
        FORWARDS.register(*classes)(ForwardRule(make, away_from_zero))
        return make
    return add_rule


def _embedding(op: Embedding, x: Array | None) -> SymbolicForward:
    if x is None:
        raise ValueError(f"symbolic {type(op).__name__}: pass the token ids")
    return embedding(np.asarray(x).astype(int))


def _softmax(op: Softmax, x: Array | None) -> SymbolicForward:
    if op.axis != -1:
        raise ValueError("symbolic Softmax: only axis=-1 is stated symbolically")
    return softmax


register_forward(Linear)(lambda op, x: linear)
register_forward(Activation, away_from_zero=True)(lambda op, x: activation(op.kind))
register_forward(Softmax)(_softmax)
register_forward(LayerNorm)(lambda op, x: layer_norm(op.eps))
register_forward(RMSNorm)(lambda op, x: rms_norm(op.eps))
register_forward(L2Normalize)(lambda op, x: l2_normalize)
register_forward(MeanPool)(lambda op, x: mean_pool(op.mask))
register_forward(Attention)(lambda op, x: attention(op.heads, op.causal, op.mask))
register_forward(Embedding)(_embedding)
register_forward(Reshape)(lambda op, x: reshape(op))
register_forward(Transpose)(lambda op, x: transpose(op))
register_forward(Slice)(lambda op, x: slice_(op))
register_forward(Scale)(lambda op, x: scale(op))
register_forward(Add)(lambda op, x: add)
register_forward(Mul)(lambda op, x: mul)
register_forward(Concat)(lambda op, x: concat(op))
register_forward(MatMul)(lambda op, x: matmul(op))


def symbolic_forward(op: Op | Merge, x: Array | None = None) -> SymbolicForward:
    """The registered symbolic forward of ``op`` (``x``: the token ids for an Embedding).

    Raises
    ------
    TypeError
        For an op type without one, naming it and how to register one.
    """
    return FORWARDS.lookup(op).make(op, x)

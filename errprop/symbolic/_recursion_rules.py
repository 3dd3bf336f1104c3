"""The symbolic rule of each op type in the error recursion, registered per op class.

A rule ``rule(b, name, op, inputs) -> (size, first, second)`` receives the recursion's
builder ``b`` (symbols named after the graph: ``b.value(p)`` is ``x_p``, ``b.delta(p, k)``
is ``Δ^k x_p``), the node's name, its op and the names of its input nodes; it returns the
output's feature size (an int or a sympy size symbol) and the terms of ``Δx`` and
``Δ²x`` at the node. Register one for your op with ``@RECURSION.register(MyOp)``
(exported as :func:`errprop.symbolic.register_recursion`); every one-input op without
its own falls back to the opaque rule of ``errprop.Op`` (``J_l`` evaluated by the op's
``jvp``/``jvp2``), while a merge needs one.

Column convention: a node's value is a column vector of its last axis (one per token and
leading index); ``W v`` is the engine's ``v Wᵀ``. A matrix product of two activations
``a @ b`` acts on the columns of ``a`` with the matrix ``X_b`` whose columns are those of
``b``: ``Δ(X_b a) = X_b Δa + ΔX_b a``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sympy as sp
from sympy.matrices.expressions import MatrixExpr

from .._activation import Activation, Softmax
from .._attention import Attention
from .._linear import Linear
from .._merge import Add, Concat, MatMul, Mul
from .._norm import L2Normalize, LayerNorm, RMSNorm
from .._op import Op
from .._pool import MeanPool
from .._shape_ops import Reshape, Scale, Slice, Transpose
from ._matexpr import Apply, Curvature, Half, Rows, Stack
from ._registry import Registry

Terms = tuple[Any, list[MatrixExpr], list[MatrixExpr]]
Rule = Callable[[Any, str, Any, list[str]], Terms]

#: op class -> its rule in the error recursion (module docstring).
RECURSION: Registry[Rule] = Registry(
    "symbolic rule of the error recursion",
    "@errprop.symbolic.register_recursion({kind}) on a function rule(b, name, op, inputs) "
    "-> (size, first-order terms, second-order terms); see errprop/symbolic/"
    "_recursion_rules.py")


def register_recursion(*classes: type) -> Callable[[Rule], Rule]:
    """Decorator registering ``rule(b, name, op, inputs) -> (size, first, second)`` as the
    error-recursion rule of ``classes`` (see :mod:`errprop.symbolic._recursion_rules`)."""
    return RECURSION.register(*classes)


def tex(name: str) -> str:
    return r"\mathrm{" + name.replace("_", r"\_") + "}"


def value_tex(node: str) -> str:
    return "x_{0}" if node == "input" else f"x_{{{tex(node)}}}"


# ------------------------------------------------------------------ one-input ops
@register_recursion(Linear)
def _linear(b, name: str, op: Linear, inputs: list[str]) -> Terms:
    """``Δx_l = W_l (Δx_p + e_{l.in}) + ΔW_l x_p + Δb_l``; ``Δ²x_l = W_l Δ²x_p + ΔW_l (Δx_p
    + e_{l.in})``."""
    (p,) = inputs
    n_in, n_out = b.size[p], b.out_size(op, name, p)
    dx_in = b.quantized_delta(name, op, p)
    W = b.sym(f"W[{name}]", f"W_{{{tex(name)}}}", n_out, n_in, ("param", name, "W"))
    dW = b.param_delta(name, "W", (n_out, n_in))
    first = [W * dx_in, dW * b.value(p)]
    if "b" in op.params:
        first.append(b.param_delta(name, "b", (n_out,)))
    return n_out, first, [W * b.delta(p, 2), dW * dx_in]


@register_recursion(Activation)
def _activation(b, name: str, op: Activation, inputs: list[str]) -> Terms:
    """``Δx_l = f'(x_p) ⊙ Δx_p``; ``Δ²x_l = f'(x_p) ⊙ Δ²x_p + ½ f''(x_p) ⊙ Δx_p^{∘2}``."""
    (p,) = inputs
    n_in = b.size[p]
    kind = op.kind.replace("_", r"\_")
    fname = rf"\operatorname{{{kind}}}"
    arg = b.latex(b.value(p))
    d1 = b.sym(f"f1[{name}]", rf"{fname}'({arg})", n_in, 1, ("d1", name, op.kind))
    second = []
    if b.second:
        d2 = b.sym(f"f2[{name}]", rf"{fname}''({arg})", n_in, 1, ("d2", name, op.kind))
        second = [sp.HadamardProduct(d1, b.delta(p, 2)),
                  Half(sp.HadamardProduct(d2, sp.HadamardPower(b.delta(p), 2)))]
    return b.out_size(op, name, p), [sp.HadamardProduct(d1, b.delta(p))], second


def opaque(definition: Callable[[Op, str, str], str]) -> Rule:
    """The rule of an op written through opaque Jacobian symbols:
    ``Δx_l = J_l (Δx_p + e_{l.in}) + Σ_θ J_l^θ[Δθ]``, ``Δ²x_l = J_l Δ²x_p + ½ D²f_l[...]``;
    ``definition(op, name, x)`` is the LaTeX of what ``J_l`` stands for (``x``: the input's
    symbol)."""
    def rule(b, name: str, op: Op, inputs: list[str]) -> Terms:
        (p,) = inputs
        n_in, n_out = b.size[p], b.out_size(op, name, p)
        dx_in = b.quantized_delta(name, op, p)
        J = b.sym(f"J[{name}]", f"J_{{{tex(name)}}}", n_out, n_in, ("jac", name, None))
        first = [] if op.integer_input else [J * dx_in]
        dps = []
        for key, p_arr in op.params.items():
            Jp = b.sym(f"J[{name}.{key}]", rf"J^{{{b.param_tex(key)}}}_{{{tex(name)}}}",
                       n_out, 1, ("jac", name, key))
            dp = b.param_delta(name, key, p_arr.shape)
            dps.append(dp)
            first.append(Apply(Jp, dp))
        b.define(f"J_{{{tex(name)}}}", definition(op, name, value_tex(p)))
        second = []
        if b.second:
            D = b.sym(f"D[{name}]", rf"D^{{2}} f_{{{tex(name)}}}", n_out, 1,
                      ("curv", name, tuple(op.params)))
            second = [] if op.integer_input else [J * b.delta(p, 2)]
            second.append(Curvature(D, *([] if op.integer_input else [dx_in]), *dps))
        return n_out, first, second
    return rule


def linear_map(definition: Callable[[Op, str, str], str]) -> Rule:
    """The rule of a parameter-free linear op (a relabelling of entries): ``Δx_l = J_l
    Δx_p``, ``Δ²x_l = J_l Δ²x_p`` with ``J_l`` the op itself."""
    def rule(b, name: str, op: Op, inputs: list[str]) -> Terms:
        (p,) = inputs
        n_in, n_out = b.size[p], b.out_size(op, name, p)
        J = b.sym(f"J[{name}]", f"J_{{{tex(name)}}}", n_out, n_in, ("jac", name, None))
        b.define(f"J_{{{tex(name)}}}", definition(op, name, value_tex(p)))
        return n_out, [J * b.quantized_delta(name, op, p)], [J * b.delta(p, 2)]
    return rule


def _generic(op: Op, name: str, x: str) -> str:
    kind = type(op).__name__
    return rf"\partial f_{{{tex(name)}}}/\partial x \text{{ ({kind}, evaluated by its rule)}}"


register_recursion(Op)(opaque(_generic))
register_recursion(LayerNorm)(opaque(lambda op, name, x: (
    rf"\tfrac{{1}}{{\sigma({x})}}\operatorname{{diag}}(\gamma_{{{tex(name)}}})"
    rf"\left(I - \tfrac{{1}}{{d}}\mathbf{{1}}\mathbf{{1}}^\top - \tfrac{{1}}{{d}}"
    rf"\hat{{x}}\hat{{x}}^\top\right),\ \hat{{x}} = \tfrac{{{x} - \mu({x})}}"
    rf"{{\sigma({x})}}")))
register_recursion(RMSNorm)(opaque(lambda op, name, x: (
    rf"\tfrac{{1}}{{r({x})}}\operatorname{{diag}}(\gamma_{{{tex(name)}}})"
    rf"\left(I - \tfrac{{1}}{{d}}\hat{{x}}\hat{{x}}^\top\right),\ \hat{{x}} = "
    rf"{x}/r({x})")))
register_recursion(L2Normalize)(opaque(lambda op, name, x: (
    rf"\tfrac{{1}}{{\lVert {x}\rVert}}\left(I - y y^\top\right),\ y = {x}/\lVert {x}\rVert")))
register_recursion(Softmax)(opaque(lambda op, name, x: (
    r"\operatorname{diag}(y) - y y^\top,\ y = \operatorname{softmax}(" + x + ")")))
register_recursion(Attention)(opaque(lambda op, name, x: (
    r"\partial\,\mathrm{attn}/\partial X:\ \Delta S = (\Delta Q K^\top + Q \Delta "
    r"K^\top)/\sqrt{d_h},\ \Delta A = A \odot (\Delta S - (A \odot \Delta S)"
    r"\mathbf{1}\mathbf{1}^\top),\ \Delta O = \Delta A\, V + A\, \Delta V")))
register_recursion(MeanPool)(opaque(lambda op, name, x: r"\text{the mean over tokens}"))

register_recursion(Reshape)(linear_map(lambda op, name, x: (
    (r"\text{the last axis of }" if op.axes == 1 else rf"\text{{the last {op.axes} axes of }}")
    + rf" {x} \text{{ laid out as }} {op.shape}\text{{ (a relabelling of entries)}}")))
register_recursion(Transpose)(linear_map(lambda op, name, x: (
    rf"\text{{the last {len(op.perm)} axes of }} {x} \text{{ permuted by }} {op.perm}"
    + (r"\text{ (columns reordered, each unchanged)}"
       if op.perm[-1] == len(op.perm) - 1 else r"\text{ (a relabelling of entries)}"))))


@register_recursion(Slice)
def _slice(b, name: str, op: Slice, inputs: list[str]) -> Terms:
    """On the features: ``Δx_l = (Δx_p)_{start:stop}``; on an earlier axis, the columns
    kept: ``Δx_l = J_l Δx_p``."""
    (p,) = inputs
    if op.axis != -1:
        return linear_map(lambda op, name, x: (
            rf"\text{{positions {op.start}:{op.stop} of axis {op.axis} of }} {x}"
            r"\text{ (columns kept, each unchanged)}"))(b, name, op, inputs)
    return (op.stop - op.start, [Rows(b.delta(p), op.start, op.stop)],
            [Rows(b.delta(p, 2), op.start, op.stop)])


@register_recursion(Scale)
def _scale(b, name: str, op: Scale, inputs: list[str]) -> Terms:
    """``Δx_l = c_l Δx_p``, ``Δ²x_l = c_l Δ²x_p``."""
    (p,) = inputs
    c = b.scalar(name, op.factor)
    return b.size[p], [c * b.delta(p)], [c * b.delta(p, 2)]


# ------------------------------------------------------------------ merges
def _common_size(b, inputs: list[str]):
    sizes = [b.size[i] for i in inputs]
    known = [s for s in sizes if isinstance(s, int)]
    return known[0] if known else sizes[0]


@register_recursion(Add)
def _add(b, name: str, op: Add, inputs: list[str]) -> Terms:
    """``Δx_l = Σᵢ Δx_i`` (a residual join: ``Δx_skip + Δx_branch``)."""
    return (_common_size(b, inputs), [b.delta(i) for i in inputs],
            [b.delta(i, 2) for i in inputs])


@register_recursion(Mul)
def _mul(b, name: str, op: Mul, inputs: list[str]) -> Terms:
    """The product rule ``Δ(a ⊙ b) = Δa ⊙ b + a ⊙ Δb``; second order ``Δ²a ⊙ b + a ⊙ Δ²b
    + Δa ⊙ Δb``."""
    p, q = inputs
    H = sp.HadamardProduct
    first = [H(b.delta(p), b.value(q)), H(b.value(p), b.delta(q))]
    second = [H(b.delta(p, 2), b.value(q)), H(b.value(p), b.delta(q, 2)),
              H(b.delta(p), b.delta(q))]
    return _common_size(b, inputs), first, second


@register_recursion(Concat)
def _concat(b, name: str, op: Concat, inputs: list[str]) -> Terms:
    """On the features: ``Δx_l = [Δx_1; Δx_2; ...]``. On an earlier axis the columns of
    the inputs follow each other: ``Δx_l = Σᵢ J_l^{(i)} Δx_i`` (``J_l^{(i)}`` places
    input ``i``'s columns)."""
    if op.axis == -1:
        sizes = [b.size[i] for i in inputs]
        size = sum(sizes) if all(isinstance(s, int) for s in sizes) else b.size_symbol(name)
        return (size, [Stack(*(b.delta(i) for i in inputs))],
                [Stack(*(b.delta(i, 2) for i in inputs))])
    size = _common_size(b, inputs)
    first, second = [], []
    for k, i in enumerate(inputs):
        J = b.sym(f"J[{name}.{k}]", f"J^{{({k + 1})}}_{{{tex(name)}}}", size, b.size[i],
                  ("mjac", name, k))
        first.append(J * b.delta(i))
        second.append(J * b.delta(i, 2))
    b.define(f"J^{{(i)}}_{{{tex(name)}}}", rf"\text{{places the columns of input }} i"
             rf"\text{{ at its offset along axis {op.axis}}}")
    return size, first, second


@register_recursion(MatMul)
def _matmul(b, name: str, op: MatMul, inputs: list[str]) -> Terms:
    """``y = a @ b`` acts on each column of ``a`` with ``X_b`` (``X_bᵀ`` with
    ``transpose_b``): ``Δx_l = X_b Δx_a + ΔX_b x_a``, second order ``X_b Δ²x_a + Δ²X_b x_a
    + ΔX_b Δx_a`` (the cross term)."""
    p, q = inputs
    n_a = b.size[p]
    if op.transpose_b:
        rows, cols = n_a, b.size_symbol(name)
        size = cols
    else:
        rows, cols = b.size[q], n_a
        size = rows

    def factor(order: int) -> MatrixExpr:
        X = b.matrix(q, order, rows, cols)
        return sp.Transpose(X) if op.transpose_b else X

    b.define(f"X_{{{tex(q)}}}", rf"\text{{the columns of }} {value_tex(q)}"
             r"\text{ side by side (one matrix per leading index)}")
    first = [factor(0) * b.delta(p), factor(1) * b.value(p)]
    second = [factor(0) * b.delta(p, 2), factor(2) * b.value(p), factor(1) * b.delta(p)]
    return size, first, second

"""The error recursion of a concrete graph, as sympy matrix expressions named by its layers.

For each node ``l`` with input node ``p`` (column convention: a token is a column
vector; biases add to every column)::

    Linear      Δx_l = W_l (Δx_p + e_{l.in}) + ΔW_l x_p + Δb_l
    Activation  Δx_l = f'(x_p) ⊙ Δx_p
    Residual    Δx_r = Δx_skip + Δx_branch
    other ops   Δx_l = J_l[Δx_p + e_{l.in}] + Σ_θ J_l^θ[Δθ]   (opaque Jacobian symbols)

With ``second_order=True`` a second equation per node carries the second-order part
``Δ²x`` (so the error is ``Δx + Δ²x`` up to third order)::

    Linear      Δ²x_l = W_l Δ²x_p + ΔW_l (Δx_p + e_{l.in})
    Activation  Δ²x_l = f'(x_p) ⊙ Δ²x_p + ½ f''(x_p) ⊙ Δx_p^{∘2}
    other ops   Δ²x_l = J_l[Δ²x_p] + ½ D²f_l[(Δx_p + e_{l.in}, Δθ)]²

:meth:`Recursion.evaluate` substitutes the graph's arrays and a report's source errors:
Linear layers by their matrices, activations by ``f'`` and ``f''`` that sympy derives from
:data:`SYMBOLIC_ACTIVATIONS`, opaque Jacobians by the op's rule (``jvp``, ``jvp2``; checked
against sympy by :func:`verify_rules`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import sympy as sp
from sympy import Basic, MatrixSymbol
from sympy.matrices.expressions import MatrixExpr

from .._activation import Activation
from .._graph import Sequential, check_input, walk
from .._linear import Linear
from .._op import Array, Op
from .._report import Report
from ._forwards import SYMBOLIC_ACTIVATIONS

_GREEK = {"gamma": r"\gamma", "beta": r"\beta"}
_NAMES = {"LayerNorm": "LayerNorm", "RMSNorm": "RMSNorm"}


class Apply(MatrixExpr):
    """An opaque linear map applied to an argument: ``J[v]`` (a column vector)."""

    def __new__(cls, J: MatrixSymbol, arg: MatrixExpr) -> Apply:
        return Basic.__new__(cls, J, arg)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.args[0].shape[0], 1)

    def _latex(self, printer) -> str:
        return rf"{printer._print(self.args[0])}\left[{printer._print(self.args[1])}\right]"


class Curvature(MatrixExpr):
    """``½ D²f_l[(a, Δθ…), (a, Δθ…)]``: the second-order Taylor term of an opaque op."""

    def __new__(cls, D: MatrixSymbol, *args: MatrixExpr) -> Curvature:
        return Basic.__new__(cls, D, *args)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.args[0].shape[0], 1)

    def _latex(self, printer) -> str:
        inner = ", ".join(printer._print(a) for a in self.args[1:])
        return (rf"\tfrac{{1}}{{2}}\,{printer._print(self.args[0])}\left[({inner})^{{\otimes 2}}"
                r"\right]")


class Half(MatrixExpr):
    """``½ A`` printed as ``\tfrac{1}{2} A``."""

    def __new__(cls, arg: MatrixExpr) -> Half:
        return Basic.__new__(cls, arg)

    @property
    def shape(self) -> tuple[int, int]:
        return self.args[0].shape

    def _latex(self, printer) -> str:
        return rf"\tfrac{{1}}{{2}}\, {printer._print(self.args[0])}"


def _tex(name: str) -> str:
    return r"\mathrm{" + name.replace("_", r"\_") + "}"


@dataclass
class Equation:
    """``lhs = Σ terms`` for one node; ``order`` 1 (Δx) or 2 (Δ²x)."""

    node: str
    order: int
    lhs: MatrixSymbol
    terms: list[MatrixExpr]

    @property
    def rhs(self) -> MatrixExpr:
        return sp.MatAdd(*self.terms) if len(self.terms) > 1 else self.terms[0]


@dataclass
class Recursion:
    """The error recursion of a graph (see the module docstring).

    Attributes
    ----------
    equations : one :class:`Equation` per node (and per order), in execution order.
    definitions : LaTeX lines defining the opaque symbols (``J_{ln1} = ...``).
    output : the output node's name.
    second_order : whether the ``Δ²x`` equations are included.
    """

    net: Sequential
    equations: list[Equation]
    definitions: dict[str, str]
    output: str
    second_order: bool
    names: dict[Basic, str] = field(repr=False)
    bindings: dict[Basic, tuple] = field(repr=False)

    # ------------------------------------------------------------------ printing
    def latex(self, *, definitions: bool = True, environment: str = "align*") -> str:
        """A LaTeX snippet: one aligned line per equation, then the opaque symbols."""
        lines = []
        for eq in self.equations:
            rhs = " + ".join(sp.latex(t, symbol_names=self.names) for t in eq.terms)
            lines.append(f"{sp.latex(eq.lhs, symbol_names=self.names)} &= {rhs}")
        if definitions:
            lines += [rf"{k} &= {v}" for k, v in self.definitions.items()]
        body = " \\\\\n".join(lines)
        return f"\\begin{{{environment}}}\n{body}\n\\end{{{environment}}}"

    def __str__(self) -> str:
        return "\n".join(f"{eq.lhs} = {' + '.join(map(str, eq.terms))}" for eq in self.equations)

    def expression(self, node: str | None = None, order: int = 1) -> MatrixExpr:
        """The error at ``node`` (default the output) unrolled down to the sources: every
        ``Δx`` substituted by its equation (first order; ``order=2`` adds ``Δ²x``)."""
        node = self.output if node is None else node
        subs: dict[Basic, MatrixExpr] = {}
        for eq in self.equations:
            subs[eq.lhs] = eq.rhs.xreplace(subs)
        first = subs[self._delta(node, 1)]
        if order == 1:
            return first
        return first + subs[self._delta(node, 2)]

    def _delta(self, node: str, order: int) -> MatrixSymbol:
        for eq in self.equations:
            if eq.node == node and eq.order == order:
                return eq.lhs
        raise KeyError(f"no equation of order {order} for node {node!r}")

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, x: object, report: Report, *, order: int = 1) -> dict[str, Array]:
        """The recursion evaluated at the graph's arrays and ``report``'s source errors.

        Returns node -> error array in the engine's layout (``(batch, ..., features)``):
        the first-order error (``order=1``, compare with ``report.node(n).first_order``)
        or first plus second order (``order=2``, compare with
        ``report.second_order_nodes[n]``; needs ``second_order=True``).
        """
        if order == 2 and not self.second_order:
            raise ValueError("this recursion has no second-order equations: build it with "
                             "recursion(net, second_order=True)")
        x = check_input(self.net, x)
        values = _forward_values(self.net, x)
        ev = _Evaluator(self.bindings, values, report, dict(self.net.layers()))
        out: dict[str, Array] = {}
        for eq in self.equations:
            if eq.order <= order:
                ev.delta[eq.lhs] = ev.total(eq.terms, like=values.nodes[eq.node])
        for eq in self.equations:
            if eq.order > order:
                continue
            if eq.order == 1:
                out[eq.node] = ev.delta[eq.lhs]
            elif order == 2:
                out[eq.node] = out[eq.node] + ev.delta[eq.lhs]
        return out


# ---------------------------------------------------------------------- building
class _Builder:
    """Interpreter over the graph that writes one equation per node (and per order)."""

    def __init__(self, net: Sequential, second_order: bool) -> None:
        self.net, self.second = net, second_order
        self.names: dict[Basic, str] = {}
        self.bindings: dict[Basic, tuple] = {}
        self.equations: list[Equation] = []
        self.definitions: dict[str, str] = {}
        self.size: dict[str, int] = {}

    def sym(self, key: str, tex: str, rows: int, cols: int, binding: tuple) -> MatrixSymbol:
        s = MatrixSymbol(key, rows, cols)
        self.names[s] = tex
        self.bindings[s] = binding
        return s

    def value(self, node: str) -> MatrixSymbol:
        tex = "x_{0}" if node == "input" else f"x_{{{_tex(node)}}}"
        return self.sym(f"x[{node}]", tex, self.size[node], 1, ("value", node))

    def delta(self, node: str, order: int = 1) -> MatrixSymbol:
        base = "x_{0}" if node == "input" else f"x_{{{_tex(node)}}}"
        tex = (r"\Delta " if order == 1 else r"\Delta^{2} ") + base
        return self.sym(f"d{order}[{node}]", tex, self.size[node], 1, ("delta", order, node))

    def param_delta(self, layer: str, key: str, shape: tuple[int, ...]) -> MatrixSymbol:
        rows, cols = (shape[0], 1) if len(shape) == 1 else shape
        if key.startswith("W") and len(key) == 2:
            tex = rf"\Delta W^{{{key[1]}}}_{{{_tex(layer)}}}"
        elif key.startswith("b") and len(key) == 2:
            tex = rf"\Delta b^{{{key[1]}}}_{{{_tex(layer)}}}"
        else:
            tex = rf"\Delta {_GREEK.get(key, key)}_{{{_tex(layer)}}}"
        return self.sym(f"dp[{layer}.{key}]", tex, rows, cols, ("source", f"{layer}.{key}"))

    def input_error(self, layer: str, n: int) -> MatrixSymbol:
        return self.sym(f"e[{layer}.in]", rf"e_{{{_tex(layer + '.in')}}}", n, 1,
                        ("source", f"{layer}.in"))

    def start(self, x_features: int) -> str:
        self.size["input"] = x_features
        e0 = self.sym("e[input]", "e_{0}", x_features, 1, ("source", "input"))
        self.equations.append(Equation("input", 1, self.delta("input"), [e0]))
        if self.second:
            zero = sp.ZeroMatrix(x_features, 1)
            self.equations.append(Equation("input", 2, self.delta("input", 2), [zero]))
        return "input"

    def leaf(self, name: str, op: Op, p: str) -> str:
        n_in = self.size[p]
        n_out = op.out_features(n_in) or n_in
        self.size[name] = n_out
        dx_in: MatrixExpr = self.delta(p)
        if op.quantize_input:
            dx_in = dx_in + self.input_error(name, n_in)
        first, second = [], []
        if isinstance(op, Linear):
            W = self.sym(f"W[{name}]", f"W_{{{_tex(name)}}}", n_out, n_in, ("param", name, "W"))
            dW = self.param_delta(name, "W", (n_out, n_in))
            first = [W * dx_in, dW * self.value(p)]
            if "b" in op.params:
                first.append(self.param_delta(name, "b", (n_out,)))
            second = [W * self.delta(p, 2), dW * dx_in]
        elif isinstance(op, Activation):
            kind = op.kind.replace("_", r"\_")
            fname = rf"\operatorname{{{kind}}}"
            arg = sp.latex(self.value(p), symbol_names=self.names)
            d1 = self.sym(f"f1[{name}]", rf"{fname}'({arg})", n_in, 1, ("d1", name, op.kind))
            first = [sp.HadamardProduct(d1, self.delta(p))]
            if self.second:
                d2 = self.sym(f"f2[{name}]", rf"{fname}''({arg})", n_in, 1,
                              ("d2", name, op.kind))
                second = [sp.HadamardProduct(d1, self.delta(p, 2)),
                          Half(sp.HadamardProduct(d2, sp.HadamardPower(self.delta(p), 2)))]
        else:
            J = self.sym(f"J[{name}]", f"J_{{{_tex(name)}}}", n_out, n_in, ("jac", name, None))
            first = [] if op.integer_input else [J * dx_in]
            dps = []
            for key, p_arr in op.params.items():
                Jp = self.sym(f"J[{name}.{key}]", rf"J^{{{self._param_tex(key)}}}_{{{_tex(name)}}}",
                              n_out, 1, ("jac", name, key))
                dp = self.param_delta(name, key, p_arr.shape)
                dps.append(dp)
                first.append(Apply(Jp, dp))
            self.definitions.setdefault(f"J_{{{_tex(name)}}}", _definition(op, name, p))
            if self.second:
                D = self.sym(f"D[{name}]", rf"D^{{2}} f_{{{_tex(name)}}}", n_out, 1,
                             ("curv", name, tuple(op.params)))
                second = [] if op.integer_input else [J * self.delta(p, 2)]
                second.append(Curvature(D, *([] if op.integer_input else [dx_in]), *dps))
        self.equations.append(Equation(name, 1, self.delta(name), first))
        if self.second:
            self.equations.append(Equation(name, 2, self.delta(name, 2), second))
        return name

    @staticmethod
    def _param_tex(key: str) -> str:
        return _GREEK.get(key, key if len(key) <= 2 else rf"\mathrm{{{key}}}")

    def residual(self, name: str, skip: str, branch: str) -> str:
        self.size[name] = self.size[skip]
        self.equations.append(Equation(name, 1, self.delta(name),
                                       [self.delta(skip), self.delta(branch)]))
        if self.second:
            self.equations.append(Equation(name, 2, self.delta(name, 2),
                                           [self.delta(skip, 2), self.delta(branch, 2)]))
        return name


def _definition(op: Op, name: str, p: str) -> str:
    """LaTeX definition of an opaque op's Jacobian (what the symbol stands for)."""
    x = "x_{0}" if p == "input" else f"x_{{{_tex(p)}}}"
    kind = type(op).__name__
    if kind == "LayerNorm":
        return (rf"\tfrac{{1}}{{\sigma({x})}}\operatorname{{diag}}(\gamma_{{{_tex(name)}}})"
                rf"\left(I - \tfrac{{1}}{{d}}\mathbf{{1}}\mathbf{{1}}^\top - \tfrac{{1}}{{d}}"
                rf"\hat{{x}}\hat{{x}}^\top\right),\ \hat{{x}} = \tfrac{{{x} - \mu({x})}}"
                rf"{{\sigma({x})}}")
    if kind == "RMSNorm":
        return (rf"\tfrac{{1}}{{r({x})}}\operatorname{{diag}}(\gamma_{{{_tex(name)}}})"
                rf"\left(I - \tfrac{{1}}{{d}}\hat{{x}}\hat{{x}}^\top\right),\ \hat{{x}} = "
                rf"{x}/r({x})")
    if kind == "L2Normalize":
        return rf"\tfrac{{1}}{{\lVert {x}\rVert}}\left(I - y y^\top\right),\ y = {x}/\lVert {x}\rVert"
    if kind == "Softmax":
        return r"\operatorname{diag}(y) - y y^\top,\ y = \operatorname{softmax}(" + x + ")"
    if kind == "Attention":
        return (r"\partial\,\mathrm{attn}/\partial X:\ \Delta S = (\Delta Q K^\top + Q \Delta "
                r"K^\top)/\sqrt{d_h},\ \Delta A = A \odot (\Delta S - (A \odot \Delta S)"
                r"\mathbf{1}\mathbf{1}^\top),\ \Delta O = \Delta A\, V + A\, \Delta V")
    if kind == "MeanPool":
        return r"\text{the mean over tokens}"
    return rf"\partial f_{{{_tex(name)}}}/\partial x \text{{ ({kind}, evaluated by its rule)}}"


def recursion(net: Sequential, second_order: bool = False) -> Recursion:
    """The error recursion of ``net`` as sympy expressions named after its layers.

    Parameters
    ----------
    net : Sequential
    second_order : also write the second-order equations ``Δ²x`` (cross terms
        ``ΔW·Δx``, curvature ``½ f'' Δx²``, opaque ``½ D²f`` of the other ops).

    Returns
    -------
    Recursion
        ``.equations`` (sympy), ``.latex()``, ``.expression(node)`` (unrolled to the
        sources), ``.evaluate(x, report)`` (numeric; equals the engine's first order and,
        with ``order=2``, its ``second_order``).

    Notes
    -----
    Every possible source has a symbol (``e_0`` the network input, ``e_{l.in}`` the
    quantized input of a Linear/Attention layer, ``ΔW_l``, ``Δb_l``, ``Δγ_l``, ...);
    sources a report does not quantize evaluate to zero.
    """
    if not isinstance(net, Sequential):
        raise TypeError(f"recursion: expected an errprop Sequential, got {type(net).__name__}")
    builder = _Builder(net, second_order)
    first_op = net.layers()[0][1]
    features = net.in_features or first_op.out_features(None) or 1
    if first_op.integer_input:
        features = 1
    state = builder.start(features)
    out = walk(net, state, builder)
    return Recursion(net, builder.equations, builder.definitions, out, second_order,
                     builder.names, builder.bindings)


# ---------------------------------------------------------------------- evaluation
class _Values:
    def __init__(self) -> None:
        self.nodes: dict[str, Array] = {}
        self.inputs: dict[str, Array] = {}

    def leaf(self, name, op, s):
        x, _ = s
        y = op.forward(x)
        self.inputs[name] = x
        self.nodes[name] = y
        return y, name

    def residual(self, name, skip, branch):
        y = skip[0] + branch[0]
        self.nodes[name] = y
        return y, name


def _forward_values(net: Sequential, x: Array) -> _Values:
    values = _Values()
    values.nodes["input"] = x
    walk(net, (x, "input"), values)
    return values


@dataclass
class _Derivatives:
    """``f'`` and ``f''`` of each activation, derived by sympy and lambdified."""

    cache: dict[tuple[str, int], Callable] = field(default_factory=dict)

    def __call__(self, kind: str, order: int) -> Callable[[Array], Array]:
        if (kind, order) not in self.cache:
            z = sp.Symbol("z", real=True)
            expr = sp.diff(SYMBOLIC_ACTIVATIONS[kind](z), z, order)
            f = sp.lambdify(z, expr, modules=["numpy", "scipy"])
            self.cache[kind, order] = lambda a, f=f: np.broadcast_to(f(a), a.shape) * 1.0
        return self.cache[kind, order]


_DERIVATIVES = _Derivatives()


class _Evaluator:
    def __init__(self, bindings: Mapping[Basic, tuple], values: _Values, report: Report,
                 ops: Mapping[str, Op]) -> None:
        self.bindings, self.values, self.report, self.ops = bindings, values, report, ops
        self.delta: dict[Basic, Array | None] = {}

    def total(self, terms: list[MatrixExpr], like: Array) -> Array:
        acc = np.zeros_like(like)
        for t in terms:
            v = self.eval(t)
            if v is not None:
                acc = acc + v
        return acc

    def source(self, name: str) -> Array | None:
        src = self.report.sources.get(name)
        return None if src is None else src.error

    def eval(self, e: Basic) -> Array | None:  # None: exactly zero
        if isinstance(e, sp.ZeroMatrix):
            return None
        if isinstance(e, MatrixSymbol):
            return self.symbol(e)
        if isinstance(e, sp.MatAdd):
            parts = [v for v in map(self.eval, e.args) if v is not None]
            return sum(parts[1:], parts[0]) if parts else None
        if isinstance(e, sp.MatMul):
            coeff, mats = e.as_coeff_matrices()
            acc = self.eval(mats[-1])
            for m in reversed(mats[:-1]):
                if acc is None:
                    return None
                binding = self.bindings.get(m)
                if binding is not None and binding[0] == "jac":  # an opaque Jacobian J_l v
                    op, x, y = self._op_at(binding[1])
                    acc = op.jvp(x, y, acc, {})
                    continue
                M = self.eval(m)
                if M is None:
                    return None
                acc = acc @ M.T  # column convention W v  ==  row layout v Wᵀ
            return None if acc is None else float(coeff) * acc
        if isinstance(e, sp.HadamardProduct):
            acc = 1.0
            for a in e.args:
                v = self.eval(a)
                if v is None:
                    return None
                acc = acc * v
            return acc
        if isinstance(e, sp.HadamardPower):
            v = self.eval(e.base)
            return None if v is None else v ** int(e.exp)
        if isinstance(e, Half):
            v = self.eval(e.args[0])
            return None if v is None else 0.5 * v
        if isinstance(e, Apply):
            return self.apply(e)
        if isinstance(e, Curvature):
            return self.curvature(e)
        raise TypeError(f"cannot evaluate {type(e).__name__}: {e}")

    def symbol(self, s: MatrixSymbol) -> Array | None:
        b = self.bindings[s]
        if b[0] == "value":
            return self.values.nodes[b[1]]
        if b[0] == "delta":
            return self.delta[s]
        if b[0] == "source":
            return self.source(b[1])
        if b[0] == "param":
            return self.ops[b[1]].params[b[2]]
        if b[0] in ("d1", "d2"):
            return _DERIVATIVES(b[2], 1 if b[0] == "d1" else 2)(self.values.inputs[b[1]])
        if b[0] == "jac":
            raise TypeError(f"the opaque Jacobian {s} is only evaluated applied to a vector")
        raise KeyError(b)

    def _op_at(self, layer: str) -> tuple[Op, Array, Array]:
        return self.ops[layer], self.values.inputs[layer], self.values.nodes[layer]

    def apply(self, e: Apply) -> Array | None:
        J, arg = e.args
        _, layer, key = self.bindings[J]
        op, x, y = self._op_at(layer)
        v = self.eval(arg)
        if v is None:
            return None
        return op.jvp(x, y, v, {}) if key is None else op.jvp(x, y, None, {key: v})

    def curvature(self, e: Curvature) -> Array | None:
        D, *args = e.args
        _, layer, keys = self.bindings[D]
        op, x, y = self._op_at(layer)
        a = None
        dps = {}
        for arg in args:
            v = self.eval(arg)
            binding = self.bindings.get(arg)
            if binding is not None and binding[0] == "source" and binding[1].rsplit(".", 1)[-1] \
                    in keys and binding[1].rsplit(".", 1)[0] == layer:
                if v is not None:
                    dps[binding[1].rsplit(".", 1)[-1]] = v
            elif v is not None:
                a = v
        if a is None and not dps:
            return None
        return op.jvp2(x, y, a, None, dps)

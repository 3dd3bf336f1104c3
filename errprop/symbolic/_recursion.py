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

from dataclasses import dataclass, field

import sympy as sp
from sympy import Basic, MatrixSymbol
from sympy.matrices.expressions import MatrixExpr

from .._activation import Activation
from .._graph import Sequential, check_input, walk
from .._linear import Linear
from .._op import Array, Op
from .._report import Report
from ._evaluate import Evaluator, forward_values
from ._matexpr import Apply, Curvature, Half

_GREEK = {"gamma": r"\gamma", "beta": r"\beta"}


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
        values = forward_values(self.net, x)
        ev = Evaluator(self.bindings, values, report, dict(self.net.layers()))
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

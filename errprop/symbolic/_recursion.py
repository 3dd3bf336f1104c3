"""The error recursion of a concrete graph, as sympy matrix expressions named by its layers.

For each node ``l`` with input node ``p`` (column convention: a token is a column
vector; biases add to every column)::

    Linear      Δx_l = W_l (Δx_p + e_{l.in}) + ΔW_l x_p + Δb_l
    Activation  Δx_l = f'(x_p) ⊙ Δx_p
    Add         Δx_l = Σᵢ Δx_i                 (a residual join: Δx_skip + Δx_branch)
    Mul         Δx_l = Δx_a ⊙ x_b + x_a ⊙ Δx_b
    MatMul      Δx_l = X_b Δx_a + ΔX_b x_a     (X_b: the columns of x_b side by side)
    Concat      Δx_l = [Δx_1; Δx_2; ...]
    Scale       Δx_l = c_l Δx_p;   Slice  Δx_l = (Δx_p)_{start:stop}
    Reshape, Transpose (and Slice, Concat on an earlier axis)
                Δx_l = J_l Δx_p                (J_l: the relabelling of entries itself)
    other ops   Δx_l = J_l[Δx_p + e_{l.in}] + Σ_θ J_l^θ[Δθ]   (opaque Jacobian symbols)

Ops that move entries between columns (attention, reshapes, a matrix product) are
linear maps on the whole tensor, not one matrix per column: ``J_l`` and ``X_b`` stand
for them, and the evaluation applies them as the engine does.

Each op type's rule is registered in :data:`~errprop.symbolic._recursion_rules.RECURSION`
(:func:`errprop.symbolic.register_recursion`); the builder never looks at an op's type.

With ``second_order=True`` a second equation per node carries the second-order part
``Δ²x`` (so the error is ``Δx + Δ²x`` up to third order)::

    Linear      Δ²x_l = W_l Δ²x_p + ΔW_l (Δx_p + e_{l.in})
    Activation  Δ²x_l = f'(x_p) ⊙ Δ²x_p + ½ f''(x_p) ⊙ Δx_p^{∘2}
    Mul         Δ²x_l = Δ²x_a ⊙ x_b + x_a ⊙ Δ²x_b + Δx_a ⊙ Δx_b
    MatMul      Δ²x_l = X_b Δ²x_a + Δ²X_b x_a + ΔX_b Δx_a
    linear ops  the first-order rule applied to Δ²x
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

from .._merge import Merge
from .._network import INPUT, Network, check_input, walk
from .._op import Array, Op
from .._report import Report
from ._evaluate import Evaluator, forward_values
from ._recursion_rules import RECURSION, tex, value_tex

_GREEK = {"gamma": r"\gamma", "beta": r"\beta"}
#: a feature size no op asks for: ``out_features(_PROBE) == _PROBE`` keeps the size
_PROBE = 2 ** 40 + 7


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

    net: Network
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
        ev = Evaluator(self.bindings, values, report, {n.name: n.op for n in self.net.dag()})
        out: dict[str, Array] = {}
        for eq in self.equations:
            if eq.order <= order:
                ev.set_delta(eq.lhs, eq.order, eq.node,
                             ev.total(eq.terms, like=values.nodes[eq.node]))
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
    """Interpreter over the graph that writes one equation per node (and per order); the
    terms come from the op type's registered rule, the symbols from the methods below."""

    def __init__(self, net: Network, second_order: bool) -> None:
        self.net, self.second = net, second_order
        self.names: dict[Basic, str] = {}
        self.bindings: dict[Basic, tuple] = {}
        self.equations: list[Equation] = []
        self.definitions: dict[str, str] = {}
        self.size: dict[str, object] = {}  # node -> feature size (int or a sympy symbol)

    # ---------------------------------------------------------------- symbols
    def sym(self, key: str, tex: str, rows, cols, binding: tuple) -> MatrixSymbol:
        s = MatrixSymbol(key, rows, cols)
        self.names[s] = tex
        self.bindings[s] = binding
        return s

    def value(self, node: str) -> MatrixSymbol:
        """``x_node``."""
        return self.sym(f"x[{node}]", value_tex(node), self.size[node], 1, ("value", node))

    def delta(self, node: str, order: int = 1) -> MatrixSymbol:
        """``Δx_node`` (``order=2``: ``Δ²x_node``)."""
        tex_ = (r"\Delta " if order == 1 else r"\Delta^{2} ") + value_tex(node)
        return self.sym(f"d{order}[{node}]", tex_, self.size[node], 1, ("delta", order, node))

    def matrix(self, node: str, order: int, rows, cols) -> MatrixSymbol:
        """``X_node`` (order 0), ``ΔX_node``, ``Δ²X_node``: the columns of ``x_node`` (of its
        error) side by side, a ``rows × cols`` matrix per leading index."""
        base = "X_{0}" if node == "input" else f"X_{{{tex(node)}}}"
        tex_ = ("", r"\Delta ", r"\Delta^{2} ")[order] + base
        return self.sym(f"X{order}[{node}]", tex_, rows, cols, ("matrix", order, node))

    def param_delta(self, layer: str, key: str, shape: tuple) -> MatrixSymbol:
        rows, cols = (shape[0], 1) if len(shape) == 1 else shape
        if key.startswith("W") and len(key) == 2:
            tex_ = rf"\Delta W^{{{key[1]}}}_{{{tex(layer)}}}"
        elif key.startswith("b") and len(key) == 2:
            tex_ = rf"\Delta b^{{{key[1]}}}_{{{tex(layer)}}}"
        else:
            tex_ = rf"\Delta {_GREEK.get(key, key)}_{{{tex(layer)}}}"
        return self.sym(f"dp[{layer}.{key}]", tex_, rows, cols, ("source", f"{layer}.{key}"))

    def input_error(self, layer: str, n) -> MatrixSymbol:
        return self.sym(f"e[{layer}.in]", rf"e_{{{tex(layer + '.in')}}}", n, 1,
                        ("source", f"{layer}.in"))

    def quantized_delta(self, name: str, op: Op, p: str) -> MatrixExpr:
        """``Δx_p + e_{name.in}`` when the op quantizes its input, else ``Δx_p``."""
        dx: MatrixExpr = self.delta(p)
        return dx + self.input_error(name, self.size[p]) if op.quantize_input else dx

    def scalar(self, name: str, value: float) -> sp.Symbol:
        """A named constant ``c_name`` (defined in the LaTeX output)."""
        c = sp.Symbol(f"c[{name}]")
        self.names[c] = f"c_{{{tex(name)}}}"
        self.bindings[c] = ("scalar", float(value))
        self.define(f"c_{{{tex(name)}}}", f"{value:.6g}")
        return c

    def size_symbol(self, name: str) -> sp.Symbol:
        """A feature size the graph does not fix (a number of tokens)."""
        return sp.Symbol(f"n[{name}]", integer=True, positive=True)

    def out_size(self, op: Op, name: str, p: str):
        """The feature size of ``op``'s output at node ``name`` from its input's (a fresh
        size symbol when the op does not fix it)."""
        n_in = self.size[p]
        if isinstance(n_in, int):
            out = op.out_features(n_in)
        else:
            out = op.out_features(_PROBE)
            out = n_in if out == _PROBE else out
        return self.size_symbol(name) if out is None else out

    def latex(self, e: Basic) -> str:
        return sp.latex(e, symbol_names=self.names)

    def define(self, lhs: str, rhs: str) -> None:
        self.definitions.setdefault(lhs, rhs)

    @staticmethod
    def param_tex(key: str) -> str:
        return _GREEK.get(key, key if len(key) <= 2 else rf"\mathrm{{{key}}}")

    # ---------------------------------------------------------------- the walk
    def start(self, x_features: int) -> str:
        self.size["input"] = x_features
        e0 = self.sym("e[input]", "e_{0}", x_features, 1, ("source", "input"))
        self.equations.append(Equation("input", 1, self.delta("input"), [e0]))
        if self.second:
            zero = sp.ZeroMatrix(x_features, 1)
            self.equations.append(Equation("input", 2, self.delta("input", 2), [zero]))
        return "input"

    def leaf(self, name: str, op: Op, p: str) -> str:
        return self._node(name, op, [p])

    def merge(self, name: str, op: Merge, inputs: list[str]) -> str:
        return self._node(name, op, list(inputs))

    def _node(self, name: str, op: Op | Merge, inputs: list[str]) -> str:
        rule = RECURSION.lookup(op, name)
        size, first, second = rule(self, name, op, inputs)
        self.size[name] = size
        self.equations.append(Equation(name, 1, self.delta(name), first))
        if self.second:
            self.equations.append(Equation(name, 2, self.delta(name, 2), second))
        return name


def recursion(net: Network, second_order: bool = False) -> Recursion:
    """The error recursion of ``net`` as sympy expressions named after its layers.

    Parameters
    ----------
    net : an errprop network (``Sequential`` or ``Graph``; merges included).
    second_order : also write the second-order equations ``Δ²x`` (cross terms
        ``ΔW·Δx`` and ``Δa ⊙ Δb``, curvature ``½ f'' Δx²``, opaque ``½ D²f`` of the other
        ops).

    Returns
    -------
    Recursion
        ``.equations`` (sympy), ``.latex()``, ``.expression(node)`` (unrolled to the
        sources), ``.evaluate(x, report)`` (numeric; equals the engine's first order and,
        with ``order=2``, its ``second_order``).

    Raises
    ------
    TypeError
        For a node whose op type has no registered rule (a merge of your own), naming
        the node, the op type and :func:`errprop.symbolic.register_recursion`.

    Notes
    -----
    Every possible source has a symbol (``e_0`` the network input, ``e_{l.in}`` the
    quantized input of a Linear/Attention layer, ``ΔW_l``, ``Δb_l``, ``Δγ_l``, ...);
    sources a report does not quantize evaluate to zero. The ``ΔX_b`` of a matrix
    product stays a symbol in :meth:`Recursion.expression` (a matrix of columns of
    ``Δx_b``).
    """
    if not isinstance(net, Network):
        raise TypeError(f"recursion: expected an errprop Sequential or Graph, got "
                        f"{type(net).__name__}")
    builder = _Builder(net, second_order)
    readers = [n.op for n in net.dag() if INPUT in n.inputs]
    first_op = readers[0]
    features = net.in_features or (first_op.out_features(None) if isinstance(first_op, Op)
                                   else None) or 1
    if any(isinstance(op, Op) and op.integer_input for op in readers):
        features = 1
    state = builder.start(features)
    out = walk(net, state, builder)
    return Recursion(net, builder.equations, builder.definitions, out, second_order,
                     builder.names, builder.bindings)

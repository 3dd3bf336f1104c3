"""Numeric evaluation of an error recursion: the graph's arrays and a report's errors.

Arrays are in the engine's row layout (``(batch, ..., features)``); a matrix symbol in
the column convention acts as ``v @ Mᵀ`` on the last two axes (``M`` may carry leading
axes: the ``X_b`` of a matrix product, one matrix per batch element and head).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import sympy as sp
from sympy import Basic, MatrixSymbol
from sympy.matrices.expressions import MatrixExpr

from .._merge import Merge
from .._network import Network, walk
from .._op import Array, Op
from .._report import Report
from ._forwards import SYMBOLIC_ACTIVATIONS
from ._matexpr import Apply, Curvature, Half, Rows, Stack


class Values:
    """The float forward of every node: its output (``nodes``) and its input (``inputs``;
    the list of inputs for a merge)."""

    def __init__(self) -> None:
        self.nodes: dict[str, Array] = {}
        self.inputs: dict[str, Array | list[Array]] = {}

    def leaf(self, name, op, s):
        x, _ = s
        y = op.forward(x)
        self.inputs[name] = x
        self.nodes[name] = y
        return y, name

    def merge(self, name, op, states):
        xs = [x for x, _ in states]
        y = op.forward(xs)
        self.inputs[name] = xs
        self.nodes[name] = y
        return y, name


def _cols(a: Array) -> Array:
    """Row layout ``(..., columns, features)`` -> the column convention's matrix."""
    return np.swapaxes(a, -1, -2)


def forward_values(net: Network, x: Array) -> Values:
    values = Values()
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


class Evaluator:
    def __init__(self, bindings: Mapping[Basic, tuple], values: Values, report: Report,
                 ops: Mapping[str, Op | Merge]) -> None:
        self.bindings, self.values, self.report, self.ops = bindings, values, report, ops
        self.delta: dict[Basic, Array | None] = {}
        self.node_delta: dict[tuple[int, str], Array] = {}
        self.scalars = {s: sp.Float(b[1]) for s, b in bindings.items() if b[0] == "scalar"}

    def set_delta(self, lhs: Basic, order: int, node: str, value: Array) -> None:
        self.delta[lhs] = value
        self.node_delta[order, node] = value

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
                if binding is not None and binding[0] in ("jac", "mjac"):  # opaque J_l v
                    acc = self.linear_map(binding, acc)
                    continue
                M = self.eval(m)
                if M is None:
                    return None
                acc = acc @ np.swapaxes(M, -1, -2)  # column convention M v == row layout v Mᵀ
            if acc is None:
                return None
            return float(coeff.xreplace(self.scalars) if self.scalars else coeff) * acc
        if isinstance(e, sp.Transpose):
            v = self.eval(e.arg)
            return None if v is None else np.swapaxes(v, -1, -2)
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
        if isinstance(e, Stack):
            return self.stack(e)
        if isinstance(e, Rows):
            v = self.eval(e.args[0])
            return None if v is None else v[..., int(e.args[1]):int(e.args[2])]
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
        if b[0] == "matrix":
            order, node = b[1], b[2]
            v = self.values.nodes[node] if order == 0 else self.node_delta[order, node]
            return _cols(v)
        if b[0] in ("jac", "mjac"):
            raise TypeError(f"the opaque Jacobian {s} is only evaluated applied to a vector")
        raise KeyError(b)

    def _op_at(self, layer: str) -> tuple[Op, Array, Array]:
        return self.ops[layer], self.values.inputs[layer], self.values.nodes[layer]

    def linear_map(self, binding: tuple, v: Array) -> Array:
        """An opaque Jacobian applied to ``v``: ``("jac", layer, None)`` a one-input op's,
        ``("mjac", node, i)`` a merge's for its input ``i``."""
        op, x, y = self._op_at(binding[1])
        if binding[0] == "jac":
            return op.jvp(x, y, v, {})
        dxs: list[Array | None] = [None] * len(x)
        dxs[binding[2]] = v
        return op.jvp(x, y, dxs, {})

    def stack(self, e: Stack) -> Array | None:
        parts = [self.eval(a) for a in e.args]
        if all(p is None for p in parts):
            return None
        like = next(p for p in parts if p is not None)
        filled = [np.zeros((*like.shape[:-1], self._rows(a))) if p is None else p
                  for a, p in zip(e.args, parts)]
        return np.concatenate(filled, axis=-1)

    def _rows(self, a: Basic) -> int:
        rows = a.shape[0]
        if not rows.is_Integer:
            raise TypeError(f"cannot size a zero block of unknown size {rows} in {a}")
        return int(rows)

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

"""A symbolic forward, and its directional derivative derived by sympy.

A symbolic forward is an ordinary Python function on NumPy *object* arrays of sympy
expressions (``x @ W.T + b`` works as written). Long compositions (attention) name their
intermediates with :meth:`Tape.let`: each intermediate becomes a fresh symbol defined by
a small expression of earlier symbols, so sympy differentiates small expressions and the
chain rule through the named intermediates is exact (forward accumulation). Without
``let`` the whole output is one expression per element and sympy differentiates it as is.

:func:`directional_derivative` turns the program into straight-line Python code (one line
per definition for its value and one for its tangent, every partial derivative written by
``sympy.diff``), runs it at a numeric point and returns the output and its tangent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

Array = np.ndarray
SymbolicForward = Callable[["Tape", Array, Mapping[str, Array]], Array]


def symbols(name: str, shape: tuple[int, ...]) -> Array:
    """An object array of real sympy symbols ``name_i_j...`` of the given shape."""
    flat = [sp.Symbol(f"{name}_" + "_".join(map(str, idx)) if idx else name, real=True)
            for idx in np.ndindex(*shape)]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(shape)


def elementwise(f: Callable[[sp.Expr], sp.Expr], a: Array) -> Array:
    """Apply a scalar sympy function to every entry of an object array."""
    out = np.empty(a.shape, dtype=object)
    for idx in np.ndindex(*a.shape):
        out[idx] = f(a[idx])
    return out


@dataclass
class Tape:
    """The named intermediates of a symbolic forward: ``symbol -> defining expression``."""

    definitions: list[tuple[sp.Symbol, sp.Expr]] = field(default_factory=list)
    _count: int = 0

    def let(self, name: str, value: Array) -> Array:
        """Name every entry of ``value`` by a fresh symbol; returns the symbol array."""
        self._count += 1
        syms = symbols(f"t{self._count}{name}", np.shape(value))
        for idx in np.ndindex(*np.shape(value)):
            self.definitions.append((syms[idx], sp.sympify(value[idx])))
        return syms


class _Printer(PythonCodePrinter):
    # plain floats: the generated code runs in float64 like the numeric rules
    def _print_Symbol(self, expr):  # noqa: N802 (sympy's naming)
        return expr.name


class SymbolicProgram:
    """A symbolic forward traced once on symbols shaped like ``x`` and the parameters,
    ready to be differentiated along any tangent and evaluated at any numeric point.

    Value code and every ``sympy.diff`` partial are generated once and reused across
    tangents and points; the code for one set of active tangents is compiled once.
    """

    def __init__(self, forward: SymbolicForward, x_shape: tuple[int, ...] | None,
                 param_shapes: Mapping[str, tuple[int, ...]]) -> None:
        tape = Tape()
        self.x = None if x_shape is None else symbols("x", x_shape)
        self.params = {k: symbols(f"p{k}", s) for k, s in param_shapes.items()}
        out = np.asarray(forward(tape, self.x, self.params), dtype=object)
        self.shape = out.shape
        outputs = [sp.sympify(e) for e in out.ravel()]
        self.program = tape.definitions + [(sp.Symbol(f"out_{i}", real=True), e)
                                           for i, e in enumerate(outputs)]
        self._printer = _Printer({"fully_qualified_modules": True, "order": "none"})
        self._value: dict[sp.Symbol, str] = {}
        self._partial: dict[tuple[sp.Symbol, sp.Symbol], str | None] = {}
        self._compiled: dict[frozenset[str], object] = {}

    def _inputs(self) -> list[tuple[str, Array]]:
        return ([] if self.x is None else [("x", self.x)]) + list(self.params.items())

    def _partial_code(self, sym: sp.Symbol, expr: sp.Expr, f: sp.Symbol) -> str | None:
        key = (sym, f)
        if key not in self._partial:
            dexpr = sp.diff(expr, f)
            self._partial[key] = None if dexpr == 0 else self._printer.doprint(dexpr)
        return self._partial[key]

    def _code(self, targets: frozenset[str]):
        if targets in self._compiled:
            return self._compiled[targets]
        active = {s for name, arr in self._inputs() if name in targets for s in arr.ravel()}
        lines = []
        for sym, expr in self.program:
            if sym not in self._value:
                self._value[sym] = self._printer.doprint(expr)
            lines.append(f"{sym.name} = {self._value[sym]}")
            terms = []
            for f in expr.free_symbols & active:
                code = self._partial_code(sym, expr, f)
                if code is not None:
                    terms.append(f"({code}) * d_{f.name}")
            lines.append(f"d_{sym.name} = " + (" + ".join(terms) if terms else "0.0"))
            if terms:
                active.add(sym)
        compiled = compile("\n".join(lines), "<sympy derivative>", "exec")
        self._compiled[targets] = compiled
        return compiled

    def derivative(self, x: Array | None, params: Mapping[str, Array], dx: Array | None,
                   dparams: Mapping[str, Array]) -> tuple[Array, Array]:
        """Output and its derivative along ``(dx, dparams)`` at ``(x, params)``."""
        tangents = {"x": dx, **dparams}
        targets = frozenset(k for k, v in tangents.items() if v is not None)
        scope: dict[str, object] = {"math": math}
        for name, arr in self._inputs():
            num = x if name == "x" else params[name]
            tan = tangents.get(name)
            for idx in np.ndindex(*arr.shape):
                scope[arr[idx].name] = float(num[idx])
                scope[f"d_{arr[idx].name}"] = 0.0 if tan is None else float(tan[idx])
        exec(self._code(targets), scope)  # noqa: S102 (code generated from sympy above)
        n = int(np.prod(self.shape))
        y = np.array([float(scope[f"out_{i}"]) for i in range(n)]).reshape(self.shape)
        dy = np.array([float(scope[f"d_out_{i}"]) for i in range(n)]).reshape(self.shape)
        return y, dy


def directional_derivative(forward: SymbolicForward, x: Array | None,
                           params: Mapping[str, Array], dx: Array | None,
                           dparams: Mapping[str, Array]) -> tuple[Array, Array]:
    """Output and its derivative along ``(dx, dparams)`` at ``(x, params)``, by sympy.

    ``x`` may be ``None`` for an op whose input is not a value (token ids are bound
    inside ``forward``). Every partial derivative comes from ``sympy.diff`` of the
    definitions of ``forward``; they are evaluated in float64.
    """
    program = SymbolicProgram(forward, None if x is None else np.shape(x),
                              {k: np.shape(v) for k, v in params.items()})
    return program.derivative(x, params, dx, dparams)

"""Merge ops: nodes with several inputs — ``Add``, ``Mul``, ``Concat``, ``MatMul``.

A merge op is the several-input form of :class:`errprop.Op`: ``forward(xs)`` takes the
list of its input values, ``jvp(xs, y, dxs, dparams)`` the list of their tangents
(``None`` for an input whose tangent is exactly zero; the others with the same leading
direction axes). The rule is linear in ``dxs``, so a pass may hand it one input's
tangent at a time and sum the results by source key (:func:`errprop._rows.add_keyed`).

Rules of the other passes (the input index ``i`` runs over the inputs):

* ``vjp(xs, y, g)`` -> ``[gᵢ]``: each input's cotangent ``Jᵢᵀ g``,
* ``jvp2(xs, y, a_s, b_s)``: ``Σᵢ Jᵢ bᵢ + ½ D²f[a, a]`` (for ``Mul`` the cross term
  ``Δa ⊙ Δb``),
* ``abs_jvp(xs, y, rs)``, ``norm_jvp(xs, y, rs)``: interval and norm bounds.

Inputs share the batch axis 0 and any leading sample axes; merges act on the trailing
axes only, so Monte Carlo's extra sample axis passes through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from ._checks import check_bool, check_int
from ._handle import is_symbolic, node
from ._op import Array, check_local_name
from ._registrars import _lead_of, bilinear, frobenius, max_abs, structural


class Merge:
    """A node with several inputs and no parameters (see the module docstring)."""

    prefix: ClassVar[str] = "merge"
    #: the number of inputs (None: any number from 2)
    arity: ClassVar[int | None] = 2
    quantize_input: ClassVar[bool] = False
    ndim_change: ClassVar[int] = 0
    integer_matmul: ClassVar[bool] = False
    commutes_with_requantization: ClassVar[bool] = False

    def __init__(self, name: str | None = None) -> None:
        check_local_name(name)
        self.name = name
        self.params: dict[str, Array] = {}
        self.param_kinds: dict[str, str] = {}

    # ------------------------------------------------------------------ facts
    def check_arity(self, n: int, where: str) -> None:
        if (self.arity is None and n < 2) or (self.arity is not None and n != self.arity):
            need = "at least 2" if self.arity is None else str(self.arity)
            raise ValueError(f"{type(self).__name__} {where!r} takes {need} inputs, got {n}")

    def out_features(self, features: Sequence[int | None], where: str) -> int | None:
        """The output's feature size (last axis) from the inputs' (None: unknown); raises a
        ValueError naming the node when they cannot be merged."""
        known = {f for f in features if f is not None}
        if len(known) > 1:
            raise ValueError(f"{type(self).__name__} {where!r}: its inputs have "
                             f"{_listed(features)} features; they must be equal")
        return known.pop() if known else None

    def macs(self, shapes: Sequence[tuple[int, ...]]) -> int:
        """Multiply-adds of one forward on inputs of these shapes (bit-ops cost)."""
        return 0

    # ------------------------------------------------------------------ rules
    def forward(self, xs: Sequence[Array], params: Mapping[str, Array] | None = None) -> Array:
        raise NotImplementedError

    def jvp(self, xs: Sequence[Array], y: Array, dxs: Sequence[Array | None],
            dparams: Mapping[str, Array] | None = None) -> Array:
        raise NotImplementedError

    def vjp(self, xs: Sequence[Array], y: Array, g: Array) -> list[Array]:
        raise NotImplementedError(f"{type(self).__name__} has no vjp rule")

    def jvp2(self, xs, y, a_s, b_s, dparams=None) -> Array:
        raise NotImplementedError(f"{type(self).__name__} has no second-order rule (jvp2)")

    def abs_jvp(self, xs, y, rs, rparams=None) -> Array:
        raise NotImplementedError(f"{type(self).__name__} has no interval rule (abs_jvp)")

    def norm_jvp(self, xs, y, rs, rparams=None) -> Array:
        raise NotImplementedError(f"{type(self).__name__} has no norm rule (norm_jvp)")

    def diagnose(self, xs, y, dxs) -> dict[str, float]:
        return {}

    # ------------------------------------------------------------------ misc
    def config(self) -> dict[str, object]:
        return {}

    def describe(self) -> str:
        return type(self).__name__

    @property
    def kind(self) -> str:
        """The node kind reports show (the class name)."""
        return type(self).__name__

    def num_params(self) -> int:
        return 0

    def __call__(self, *inputs):
        if is_symbolic(inputs):
            self.check_arity(len(inputs), self.name or type(self).__name__)
            return node(self, inputs)
        return self.forward([np.asarray(v, dtype=float) for v in inputs])

    def __repr__(self) -> str:
        label = f"{self.name!r}, " if self.name else ""
        return f"{type(self).__name__}({label}{self.describe()})"


def _listed(features: Sequence[int | None]) -> str:
    return ", ".join("?" if f is None else str(f) for f in features)


def _check_same(xs: Sequence[Array], op: Merge) -> None:
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise ValueError(f"{op!r}: inputs of shapes {[x.shape for x in xs]} cannot be "
                         f"merged; they must have equal shapes")


@structural
class Add(Merge):
    """``y = x₁ + x₂ + ...`` (any number of inputs of equal shapes): a shortcut join."""

    prefix = "add"
    arity = None

    def describe(self):
        return "sum"

    def forward(self, xs, params=None):
        _check_same(xs, self)
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out

    def jvp(self, xs, y, dxs, dparams=None):
        live = [d for d in dxs if d is not None]
        if not live:
            return np.zeros((*_lead_of(dxs, xs), *y.shape))
        out = live[0]
        for d in live[1:]:
            out = out + d
        return out

    def vjp(self, xs, y, g):
        return [g for _ in xs]


@structural
class Concat(Merge):
    """Concatenation along ``axis`` (negative: counted from the end, so leading sample
    axes pass through)."""

    prefix = "concat"
    arity = None
    norm_combine = "rss"

    def __init__(self, axis: int = -1, *, name: str | None = None) -> None:
        super().__init__(name)
        axis = check_int(axis, "Concat", "axis")
        if axis >= 0:
            raise ValueError(f"Concat: axis must be negative (counted from the last axis, "
                             f"so a leading sample or batch axis does not move it), got {axis}")
        self.axis = axis

    def out_features(self, features, where):
        if self.axis != -1:
            return super().out_features(features, where)
        return None if any(f is None for f in features) else int(sum(features))

    def forward(self, xs, params=None):
        return np.concatenate(xs, axis=self.axis)

    def jvp(self, xs, y, dxs, dparams=None):
        lead = _lead_of(dxs, xs)
        parts = [np.zeros((*lead, *x.shape)) if d is None else d for x, d in zip(xs, dxs)]
        return np.concatenate(parts, axis=self.axis)

    def vjp(self, xs, y, g):
        cuts = np.cumsum([x.shape[self.axis] for x in xs])[:-1]
        return list(np.split(g, cuts, axis=self.axis))

    def config(self):
        return {"axis": self.axis}

    def describe(self):
        return f"axis {self.axis}"


@bilinear
class Mul(Merge):
    """Elementwise product of two activations, ``y = a ⊙ b`` (a gated MLP's
    ``silu(W₁x) ⊙ W₃x``). Second order adds the cross term ``Δa ⊙ Δb``."""

    prefix = "mul"

    def describe(self):
        return "elementwise product"

    def product(self, a, b):
        return a * b

    def forward(self, xs, params=None):
        _check_same(xs, self)
        return xs[0] * xs[1]

    def vjp(self, xs, y, g):
        return [g * xs[1], g * xs[0]]

    def factor_norm(self, v):
        return max_abs(v)

    def macs(self, shapes):
        return int(np.prod(shapes[0]))


@bilinear
class MatMul(Merge):
    """Matrix product of two activations over their last two axes, ``y = a @ b`` (or
    ``a @ bᵀ`` with ``transpose_b``), leading axes broadcast: attention's ``QKᵀ`` and
    ``A V`` written as nodes."""

    prefix = "matmul"

    def __init__(self, *, transpose_b: bool = False, name: str | None = None) -> None:
        super().__init__(name)
        self.transpose_b = check_bool(transpose_b, "MatMul", "transpose_b")

    def _b(self, b: Array) -> Array:
        return np.swapaxes(b, -1, -2) if self.transpose_b else b

    def product(self, a, b):
        return np.matmul(a, self._b(b))

    def forward(self, xs, params=None):
        a, b = xs
        if a.ndim != b.ndim or a.ndim < 3:
            raise ValueError(f"{self!r}: inputs of shapes {a.shape} and {b.shape}: both must "
                             f"have the same number of axes, at least 3 (batch first, then "
                             f"any broadcast axes, then the two matrix axes)")
        bb = self._b(b)
        if a.ndim < 2 or bb.ndim < 2 or a.shape[-1] != bb.shape[-2]:
            raise ValueError(f"{self!r}: cannot multiply inputs of shapes {a.shape} and "
                             f"{b.shape}{' (transposed)' if self.transpose_b else ''}: the "
                             f"inner sizes differ")
        return np.matmul(a, bb)

    def vjp(self, xs, y, g):
        a, b = xs
        ga = np.matmul(g, np.swapaxes(self._b(b), -1, -2))
        gb = np.matmul(np.swapaxes(a, -1, -2), g)
        ga = _unbroadcast(ga, a.shape)
        gb = _unbroadcast(np.swapaxes(gb, -1, -2) if self.transpose_b else gb, b.shape)
        return [ga, gb]

    def factor_norm(self, v):
        return frobenius(v)

    def out_features(self, features, where):
        return features[1] if not self.transpose_b else None

    def macs(self, shapes):
        a, b = shapes
        n = b[-2] if self.transpose_b else b[-1]
        return int(np.prod(a) * n)

    def config(self):
        return {"transpose_b": self.transpose_b}

    def describe(self):
        return "a @ bᵀ" if self.transpose_b else "a @ b"


def _unbroadcast(g: Array, shape: tuple[int, ...]) -> Array:
    """Sum a cotangent ``(K, *broadcast shape)`` back to ``(K, *shape)``."""
    extra = g.ndim - 1 - len(shape)
    if extra > 0:
        g = g.sum(axis=tuple(range(1, 1 + extra)))
    axes = tuple(i + 1 for i, n in enumerate(shape) if n == 1 and g.shape[i + 1] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g

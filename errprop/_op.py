"""The abstract op: an exact forward and its first-order rule, side by side.

Every layer of an errprop graph is an :class:`Op`. An op declares

* its parameters (``params``: name -> float64 array) and what kind of error
  source each one is (``param_kinds``: ``"weight"``, ``"bias"`` or ``"norm"``),
* ``forward(x, params)``: the exact float computation,
* ``jvp(x, y, dx, dparams)``: the first-order rule, i.e. the directional
  derivative ``dy = J_x(x)·dx + Σ_p J_p(x)·dp`` evaluated at ``x`` with the
  forward output ``y`` already at hand.

Tangents may carry leading *direction* axes: ``dx`` has shape
``(K, *x.shape)`` (one slice per error source) and the rule returns
``(K, *y.shape)``. A missing entry in ``dparams`` means an exactly zero
tangent; ``dx=None`` likewise. The analysis passes (exact, first order, Monte
Carlo) are interpreters that only call these two methods.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Callable, Collection, Mapping
from typing import ClassVar

import numpy as np

from ._handle import is_symbolic, node
from ._checks import real_array

Array = np.ndarray
Rule = Callable[[Array | None, Mapping[str, Array]], Array]

PARAM_KINDS = ("weight", "bias", "norm", "embedding")


def as_param(value: object, *, layer: str, param: str, shape: tuple[int, ...] | None = None,
             ndim: int | None = None) -> Array:
    """Convert a user parameter to a finite float64 array (a copy), or raise a clear error:
    strings, complex numbers, objects and ragged lists are refused, not cast."""
    try:
        arr = np.array(real_array(value, layer, f"parameter '{param}'"))
    except ValueError as exc:  # a ragged nested list
        raise TypeError(f"{layer}: parameter '{param}' must be a numeric array, got a "
                        f"{type(value).__name__} whose rows differ in length") from exc
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{layer}: parameter '{param}' must have {ndim} dimension(s), "
                         f"got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{layer}: parameter '{param}' must have shape {shape}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{layer}: parameter '{param}' contains {bad} NaN/Inf value(s)")
    return arr


def check_local_name(name: str | None) -> None:
    """A node's own name: a non-empty string that is not a path or a glob."""
    if name is not None and (not isinstance(name, str) or not name or "." in name
                             or any(c in name for c in "*?[]")):
        raise ValueError(f"layer name must be a non-empty string without '.', '*', '?', '[' "
                         f"or ']', got {name!r}")


class Op(ABC):
    """One layer: parameters, exact forward, first-order rule.

    Subclasses set ``prefix`` (used to derive a readable name when none is
    given) and ``quantize_input`` (whether activation quantization applies to
    this layer's input, as for Linear and Attention).
    """

    prefix: ClassVar[str] = "op"
    quantize_input: ClassVar[bool] = False
    #: the op takes a padding mask ``(batch, tokens)`` (attention, pooling, embedding)
    maskable: ClassVar[bool] = False
    #: axes the op adds to its input (Embedding: +1) or removes (pooling: -1)
    ndim_change: ClassVar[int] = 0
    #: the input holds integer ids (an embedding lookup): it cannot be quantized
    integer_input: ClassVar[bool] = False
    #: the op is one matrix product plus bias ``x Wᵀ + b`` (params ``W``, ``b``) that an
    #: integer kernel accumulates (Linear): hardware-gap sources apply to it
    integer_matmul: ClassVar[bool] = False
    #: ``op(Q(u)) = Q(op(u))`` for a symmetric integer grid ``Q`` (ReLU, identity, shape
    #: ops): a requantization before the op is the one after it
    commutes_with_requantization: ClassVar[bool] = False

    def macs(self, shape: tuple[int, ...]) -> int:
        """Multiply-adds of one forward on an input of ``shape`` that involve the op's
        weights (the bit-ops cost of ``allocate_bits(cost="bitops")``); 0 by default."""
        return 0

    def __init__(self, name: str | None = None) -> None:
        check_local_name(name)
        self.name = name
        self.params: dict[str, Array] = {}
        self.param_kinds: dict[str, str] = {}

    # ------------------------------------------------------------------ shape
    @property
    def in_features(self) -> int | None:
        """Feature size expected on the last input axis, or None if any size works."""
        return None

    def out_features(self, in_features: int | None) -> int | None:
        """Feature size of the output given that of the input."""
        return in_features

    min_ndim: ClassVar[int] = 2
    #: the most axes the op's input may have (None: any number; batch first)
    max_ndim: ClassVar[int | None] = None
    #: Why an input needs ``min_ndim`` axes, for the error message (default: a token axis).
    ndim_because: ClassVar[str | None] = None

    # ------------------------------------------------------------------ math
    @abstractmethod
    def forward(self, x: Array, params: Mapping[str, Array] | None = None) -> Array:
        """Exact forward. ``params`` overrides ``self.params`` (e.g. quantized ones)."""

    @abstractmethod
    def jvp(self, x: Array, y: Array, dx: Array | None,
            dparams: Mapping[str, Array]) -> Array:
        """First-order rule at ``x`` (with ``y = forward(x)``).

        ``dx``: ``None`` or shape ``(*lead, *x.shape)``; ``dparams``: name ->
        tangent of that parameter, of the parameter's shape or with one leading
        direction axis ``(P, *param.shape)`` (random probes; then ``lead = (P,)``
        and ``dx``, if given, has the same leading axis). Returns
        ``(*lead, *y.shape)`` (``lead`` empty when nothing carries one).
        """

    def vjp(self, x: Array, y: Array, g: Array,
            params: Collection[str] = ()) -> tuple[Array, dict[str, Array]]:
        """Transposed first-order rule (reverse mode), for output statistics and bounds.

        ``g``: cotangents of shape ``(K, *y.shape)``. Returns ``gx = Jₓᵀ g`` of shape
        ``(K, *x.shape)`` and, for each name in ``params``, the *per-sample* parameter
        cotangent of shape ``(K, batch, *param.shape)``: summed over token axes but not
        over the batch axis (axis 0 of ``x``), because every batch element sees the
        same parameter error and its output statistics are needed one by one.
        """
        raise NotImplementedError(f"{type(self).__name__} has no vjp rule; output statistics "
                                  f"and exact bounds need one (see docs/adding-an-op.md)")

    def jvp2(self, x: Array, y: Array, a: Array | None, b: Array | None,
             dparams: Mapping[str, Array]) -> Array:
        """Second-order Taylor coefficient of the output.

        With the input ``x + a + b`` (``a`` first order, ``b`` second order) and
        parameters ``p + dp``, the output is ``y + a_out + b_out + O(3)`` where
        ``a_out = jvp(x, y, a, dp)`` and::

            b_out = Jₓ b + ½ D²f[(a, dp), (a, dp)]

        This default differentiates the op's own first-order rule numerically
        along ``(a, dp)`` (central differences with one Richardson step, relative
        accuracy ~1e-7, the step shrunk until two estimates agree); ops with a
        simple closed form override it.
        """
        out = self.jvp(x, y, b, {}) if b is not None else np.zeros_like(y)
        if a is None and not dparams:
            return out
        scale = rms(x) or 1.0
        size = rms(a) if a is not None else 0.0
        for key, dp in dparams.items():
            size = max(size, rms(dp) * scale / (rms(self.params[key]) or 1.0))
        if size == 0.0:
            return out
        h = 1e-3 * scale / size

        def rule_at(t: float) -> Array:
            moved = copy.copy(self)
            moved.params = {k: v + t * dparams[k] if k in dparams else v
                            for k, v in self.params.items()}
            xt = x if a is None else x + t * a
            return moved.jvp(xt, moved.forward(xt), a, dparams)

        def central(step: float) -> Array:
            return (rule_at(step) - rule_at(-step)) / (2.0 * step)

        def richardson(step: float) -> Array:
            return (4.0 * central(step / 2) - central(step)) / 3.0

        # shrink the step until two estimates agree (strongly curved ops need small steps)
        best = richardson(h)
        for _ in range(4):
            h /= 4.0
            finer = richardson(h)
            settled = np.linalg.norm(finer - best) <= 1e-7 * (np.linalg.norm(finer) + 1e-300)
            best = finer
            if settled:
                break
        return out + 0.5 * best

    def abs_jvp(self, x: Array, y: Array, r: Array | None,
                rparams: Mapping[str, Array]) -> Array:
        """Interval rule: an elementwise bound on ``|Δy|`` at first order.

        Given ``|Δx| ≤ r`` elementwise (``None``: ``Δx = 0``) and ``|Δp| ≤ rparams[p]``,
        return ``R ≥ 0`` with ``|jvp(x, y, Δx, Δp)| ≤ R`` for *every* such pattern —
        the Jacobian taken in absolute value, ``|J| r``, stage by stage.
        """
        raise NotImplementedError(f"{type(self).__name__} has no interval rule (abs_jvp); "
                                  f"per-node worst-case bounds need one")

    def norm_jvp(self, x: Array, y: Array, r: Array | None,
                 rparams: Mapping[str, Array]) -> Array:
        """Norm rule: a bound on ``‖Δy_n‖`` (Frobenius over each batch element's tokens and
        features) from operator norms, as in the papers' error-propagation bounds.

        ``r``: ``(batch,)`` bounds on ``‖Δx_n‖`` (``None``: no input error); ``rparams``:
        per parameter its error box (``|Δp| ≤ rparams[p]``); the op turns it into the
        norm it needs (``‖ΔW‖₂ ≤ ‖box‖_F`` for a weight). Returns ``(batch,)``.
        """
        raise NotImplementedError(f"{type(self).__name__} has no norm rule (norm_jvp)")

    def diagnose(self, x: Array, y: Array, dx: Array) -> dict[str, float]:
        """Where this op's first-order rule may be unreliable, given the input error ``dx``.

        Returns named fractions in [0, 1] (e.g. ``"near_kink"``, ``"saturated"``,
        ``"flat_norm"``); empty when the op has no such regime.
        """
        return {}

    def __call__(self, *x: object) -> object:
        """``op(handle)``: a node of a functional :class:`errprop.Graph`; ``op(array)``:
        the float forward."""
        if is_symbolic(x):
            return node(self, x, arity=1)
        if len(x) != 1:
            raise TypeError(f"{self!r} takes one input, got {len(x)}")
        return self.forward(np.asarray(x[0], dtype=float))

    def linearize(self, x: Array) -> tuple[Array, Rule]:
        """Forward output and the first-order rule closed over any intermediates."""
        y = self.forward(x)
        return y, lambda dx, dparams: self.jvp(x, y, dx, dparams)

    # ------------------------------------------------------------------ misc
    def config(self) -> dict[str, object]:
        """Constructor arguments besides the parameters and the name (JSON values or
        arrays): ``type(op)(**op.params, **op.config(), name=op.name)`` rebuilds the op."""
        return {}

    def with_mask(self, mask: Array | None) -> Op:
        """A copy of this op with the padding mask ``(batch, tokens)`` (maskable ops)."""
        if not self.maskable:
            raise TypeError(f"{type(self).__name__} takes no padding mask")
        out = copy.copy(self)
        out.mask = None if mask is None else check_mask(mask, repr(self))
        return out

    def batch_slice(self, rows: slice) -> Op:
        """This op restricted to the batch rows ``rows`` (ops tied to a batch by a mask)."""
        return self

    def _p(self, params: Mapping[str, Array] | None, key: str) -> Array | None:
        if params is None:
            return self.params.get(key)
        return params.get(key, self.params.get(key))

    def describe(self) -> str:
        """Short human-readable description (used in reports)."""
        return type(self).__name__

    def num_params(self) -> int:
        return int(sum(p.size for p in self.params.values()))

    def __repr__(self) -> str:
        label = f"{self.name!r}, " if self.name else ""
        return f"{type(self).__name__}({label}{self.describe()})"


def rms(a: Array) -> float:
    """``sqrt(mean(a²))`` without overflow or underflow (on ``a / max|a|``): inputs near
    ``1e300`` have a finite size and a finite difference step."""
    m = float(np.max(np.abs(a))) if np.size(a) else 0.0
    if m == 0.0 or not math.isfinite(m):
        return m
    return m * float(np.sqrt(np.mean(np.square(a / m))))


def check_mask(mask: object, layer: str) -> Array:
    """A padding mask: boolean ``(batch, tokens)``, ``True`` for real tokens, at least one
    real token per row."""
    arr = np.asarray(mask)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{layer}: padding mask must hold booleans or 0/1 (1 = real token), "
                        f"got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{layer}: padding mask must have shape (batch, tokens), "
                         f"got {arr.shape}")
    if arr.dtype != bool:
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError(f"{layer}: padding mask must hold booleans or 0/1 "
                             f"(1 = real token)")
        arr = arr.astype(bool)
    empty = np.flatnonzero(~arr.any(axis=1))
    if empty.size:
        raise ValueError(f"{layer}: padding mask rows {empty.tolist()} mask every token")
    return arr


def check_mask_batch(mask: Array, x: Array, layer: str) -> None:
    """The mask's ``(batch, tokens)`` must match the axes ``-3, -2`` of ``x``."""
    if x.ndim < 3 or x.shape[-3:-1] != mask.shape:
        raise ValueError(f"{layer}: its padding mask was made for (batch, tokens) = "
                         f"{mask.shape}, but the input has shape {x.shape}; apply "
                         f"errprop.mask_padding(net, mask) with this batch's mask")


def lead_shape(dx: Array | None, x: Array) -> tuple[int, ...]:
    """Leading direction axes of a tangent relative to its primal."""
    if dx is None:
        return ()
    return dx.shape[: dx.ndim - x.ndim]



def param_tangent(dp: Array, base_ndim: int, y_ndim: int) -> Array:
    """A parameter tangent, with an optional leading direction axis, shaped to
    broadcast against an output tangent ``(P, *y.shape)``."""
    return dp if dp.ndim == base_ndim else align_sampled(dp, base_ndim, y_ndim + 1)


@dataclass(frozen=True)
class Outer:
    """A per-sample weight cotangent kept factored: ``G[k, n] = Σ_tokens g[k, n] ⊗ x[n]``.

    ``g``: ``(K, B, ..., a)``, ``x``: ``(B, ..., b)``. Without a token axis ``G`` is
    rank one per sample, and every reduction the statistics need
    (``Σ v G²``, ``Σ a |G|``, ...) costs one forward pass instead of ``K`` of them.
    """

    g: Array
    x: Array

    def materialize(self) -> Array:
        """The dense cotangent ``(K, B, a, b)``."""
        return np.einsum("kn...a,n...b->knab", self.g, self.x, optimize=True)


def per_sample_outer(g: Array, x: Array) -> Outer:
    """``Σ_tokens g ⊗ x`` per batch element, kept factored (see :class:`Outer`)."""
    return Outer(g, x)


def sample_norm(a: Array) -> Array:
    """Frobenius norm of each batch element (axis 0): ``(batch,)``."""
    return np.sqrt(np.sum(a.reshape(a.shape[0], -1) ** 2, axis=1))


def sample_max(a: Array) -> Array:
    """Largest entry of each batch element (axis 0): ``(batch,)``."""
    return np.max(a.reshape(a.shape[0], -1), axis=1)


def per_sample_sum(g: Array, x_ndim: int) -> Array:
    """Sum a cotangent ``(K, B, ..., f)`` over its token axes -> ``(K, B, f)``."""
    return g.sum(axis=tuple(range(2, x_ndim))) if x_ndim > 2 else g


def align_sampled(p: Array, base_ndim: int, x_ndim: int) -> Array:
    """Broadcast a parameter that may carry a leading sample axis against ``x``.

    ``p`` has ``base_ndim`` axes, or one more (a leading sample axis ``S`` that
    pairs with the first axis of ``x``); the latter is reshaped to
    ``(S, 1, ..., 1, *p.shape[1:])`` so it lines up with ``x: (S, ..., features)``.
    """
    if p.ndim == base_ndim:
        return p
    return p.reshape(p.shape[0], *([1] * (x_ndim - 1 - base_ndim)), *p.shape[1:])

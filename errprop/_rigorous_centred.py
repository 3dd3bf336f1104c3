"""The centred form of the rigorous bound: first order plus a rigorous remainder.

With ``J_l`` the Jacobians at the float point, the exact error of node ``l`` is
``Δ_l = J_l Δ_{l−1} + J_θ Δθ_l + ρ_l``, which *defines* the local remainder ``ρ_l``.
Unrolled, ``Δ_L = (first-order map of the source errors) + Σ_l J_{L←l} ρ_l``, so

    |Δ_L| ≤ (first-order worst case) + Σ_l |J_L|···|J_{l+1}| |ρ_l|,

where ``|ρ_l|`` is bounded from the rigorous input box of node ``l``. The first term is
the first-order worst case (exact at the output, the interval bound elsewhere); the
remainder is small wherever first order holds (units away from their kink contribute
exactly 0), so this form is far tighter than plain interval arithmetic there, and the
rigorous bound takes the smaller of the two. An activation quantizer's rounding of the
*moved* value, ``ε = Q(v) − v``, splits into a first-order error within the source's
box and a remainder ``max(|ε|max − max_abs, 0)``.

Local remainder bounds, one per op type (:data:`REMAINDERS`); an op without one gets the
generic ``ρ ∈ Δy_box − (J mid(Δx) ± |J| rad(Δx))``, sound and loose. A merge's remainder
is the inputs' remainders through ``|J|`` plus its own (:data:`MERGE_REMAINDERS`): none
for ``Add`` and ``Concat``, the product of the input errors ``P(|Δa|, |Δb|)`` for a
bilinear ``Mul``/``MatMul`` (``Δy = P(Δa, b) + P(a, Δb) + P(Δa, Δb)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from ._activation import ACTIVATIONS, Activation
from ._embedding import Embedding
from ._linear import Linear
from ._merge import Add, Concat, MatMul, Merge, Mul
from ._network import _Join
from ._op import Array, Op
from ._pool import MeanPool
from ._quant import UniformGrid
from ._shape_ops import Reshape, Scale, Slice, Transpose
from ._rigorous_box import Box, rounding_slack

_EPS = float(np.finfo(np.float64).eps)

#: op type -> ``remainder(op, x, y, dbox, pboxes, out)``: a bound on ``|ρ|`` elementwise,
#: for the input error ``Δx ∈ dbox`` (a :class:`Box` of errors, not values), parameter
#: errors within ``pboxes`` and the op's rigorous output box ``out``.
Remainder = Callable[[Op, Array, Array, Box, Mapping[str, Array], Box], Array]
REMAINDERS: dict[type, Remainder] = {}


def _curvature(kind: str) -> float:
    t = np.linspace(-60.0, 60.0, 1200001)
    fn = ACTIVATIONS[kind]
    return float(np.max(np.abs(fn.d2(t, fn.f(t)))))


#: activation kind -> ``sup |f''|`` (closed forms; gelu_tanh on a dense grid, +1%);
#: ``None``: piecewise linear (the remainder is evaluated exactly at the ends and the kink)
CURVATURE: dict[str, float | None] = {
    "relu": None, "identity": None,
    "tanh": 4.0 / (3.0 * math.sqrt(3.0)),  # at tanh x = ±1/sqrt(3)
    "sigmoid": 1.0 / (6.0 * math.sqrt(3.0)),
    "gelu": math.sqrt(2.0 / math.pi),  # φ(x)(2 − x²) peaks at x = 0
    "silu": 0.5,  # σ(1−σ)(2 + x(1−2σ)) ≤ ¼·2, as x(1−2σ) ≤ 0
    "gelu_tanh": 1.01 * _curvature("gelu_tanh"),
}


def _magnitude(box: Box) -> Array:
    return np.maximum(np.abs(box.lo), np.abs(box.hi))


def _remainder(kind: type) -> Callable[[Remainder], Remainder]:
    def register(rule: Remainder) -> Remainder:
        REMAINDERS[kind] = rule
        return rule
    return register


@_remainder(Linear)
def _linear(op, x, y, dbox, pboxes, out):
    # (W + ΔW)(x + Δx) + b + Δb − y − (W Δx + ΔW x + Δb) = ΔW Δx
    d = _magnitude(dbox)
    aW, ab = pboxes.get("W"), pboxes.get("b")
    W = np.abs(op.params["W"]) if aW is None else np.abs(op.params["W"]) + aW
    magnitude = (np.abs(x) + d) @ W.T + np.abs(op.params.get("b", 0.0)) + (0.0 if ab is None else ab)
    rem = rounding_slack(W.shape[-1], magnitude)
    return rem if aW is None else rem + d @ aW.T


@_remainder(Activation)
def _activation(op, x, y, dbox, pboxes, out):
    curvature = CURVATURE.get(op.kind, math.inf)
    slack = 8 * _EPS * _magnitude(out) + 4 * np.finfo(float).tiny
    if curvature is not None:
        return 0.5 * curvature * _magnitude(dbox) ** 2 + slack
    # piecewise linear: ρ(δ) = f(x+δ) − f(x) − f'(x)δ is linear between the ends and the
    # kink, so its extremes are there
    slope = op.fn.d1(x, y)

    def rho(delta):
        return np.abs(op.fn.f(x + delta) - y - slope * delta)

    rem = np.maximum(rho(dbox.lo), rho(dbox.hi))
    kink = op.fn.kink
    if kink is not None:
        inside = (x + dbox.lo <= kink) & (kink <= x + dbox.hi)
        rem = np.where(inside, np.maximum(rem, rho(kink - x)), rem)
    return rem * (1 + 4 * _EPS) + slack


def _linear_map(op, x, y, dbox, pboxes, out):
    # exactly linear in the input and the parameters jointly: no remainder but roundoff
    return rounding_slack(x.shape[-2] if x.ndim > 2 else 3, _magnitude(out))


def _selection(op, x, y, dbox, pboxes, out):
    # every output element is one input element: the error moves with it, exactly
    return np.zeros_like(y)


def _scaling(op, x, y, dbox, pboxes, out):
    # c·(x + Δx) − c·x − c·Δx: only the rounding of the two products
    return rounding_slack(1, np.maximum(_magnitude(out), np.abs(y)))


REMAINDERS[MeanPool] = _linear_map
REMAINDERS[Embedding] = _linear_map
REMAINDERS[Reshape] = REMAINDERS[Transpose] = REMAINDERS[Slice] = _selection
REMAINDERS[Scale] = _scaling


def generic_remainder(op: Op, x: Array, y: Array, dbox: Box, pboxes: Mapping[str, Array],
                      out: Box) -> Array:
    """``ρ = Δy − J Δx − J_θ Δθ ∈ (out − y) − (J c ± (|J| r + |J_θ| a))`` for ``Δx = c ± r``."""
    centre = op.jvp(x, y, dbox.mid, {})
    spread = op.abs_jvp(x, y, dbox.rad, pboxes)
    with np.errstate(invalid="ignore"):
        rem = np.maximum(out.hi - y - centre + spread, centre + spread - (out.lo - y))
    return np.where(np.isnan(rem), np.inf, rem) * (1 + 8 * _EPS)


def local_remainder(op: Op, x: Array, y: Array, dbox: Box, pboxes: Mapping[str, Array],
                    out: Box) -> Array:
    return REMAINDERS.get(type(op), generic_remainder)(op, x, y, dbox, pboxes, out)


# ------------------------------------------------------------------ merges
#: merge type -> ``remainder(op, xs, y, boxes, out)``: a bound on the merge's own ``|ρ|``
#: from its inputs' rigorous boxes and its output box, or None for exactly zero; a merge
#: without one gets the generic bound (as an op does)
MergeRemainder = Callable[[Merge, list[Array], Array, list[Box], Box], Array | None]
MERGE_REMAINDERS: dict[type, MergeRemainder] = {}


def _exactly_linear(op, xs, y, boxes, out):
    # a sum (as the residual join always had it: the addition's own rounding is left to
    # the first-order slack) or a concatenation (exact)
    return None


MERGE_REMAINDERS[Add] = MERGE_REMAINDERS[_Join] = MERGE_REMAINDERS[Concat] = _exactly_linear


def _bilinear(op, xs, y, boxes, out):
    # P(a + Δa, b + Δb) − P(a, b) − P(Δa, b) − P(a, Δb) = P(Δa, Δb), and P has 0/1
    # coefficients, so |P(Δa, Δb)| ≤ P(|Δa|, |Δb|); plus the rounding of both products
    # (terms: the products summed into one output element)
    (a, b), (box_a, box_b) = xs, boxes
    da = _magnitude(Box(box_a.lo - a, box_a.hi - a))
    db = _magnitude(Box(box_b.lo - b, box_b.hi - b))
    size = op.product(np.maximum(_magnitude(box_a), np.abs(a)),
                      np.maximum(_magnitude(box_b), np.abs(b)))
    terms = int(np.max(op.product(np.ones_like(a[:1]), np.ones_like(b[:1]))))
    return op.product(da, db) * (1 + 8 * _EPS) + rounding_slack(terms, size)


MERGE_REMAINDERS[Mul] = MERGE_REMAINDERS[MatMul] = _bilinear


def generic_merge_remainder(op: Merge, xs: list[Array], y: Array, boxes: list[Box],
                            out: Box) -> Array:
    """:func:`generic_remainder` of a merge: ``ρ ∈ (out − y) − (J c ± |J| r)`` for the
    inputs' errors ``Δxᵢ = cᵢ ± rᵢ``."""
    dboxes = [Box(b.lo - x, b.hi - x) for b, x in zip(boxes, xs)]
    centre = op.jvp(xs, y, [d.mid for d in dboxes], {})
    spread = op.abs_jvp(xs, y, [d.rad for d in dboxes])
    with np.errstate(invalid="ignore"):
        rem = np.maximum(out.hi - y - centre + spread, centre + spread - (out.lo - y))
    return np.where(np.isnan(rem), np.inf, rem) * (1 + 8 * _EPS)


def merge_remainder(op: Merge, xs: list[Array], y: Array, boxes: list[Box],
                    out: Box) -> Array | None:
    return MERGE_REMAINDERS.get(type(op), generic_merge_remainder)(op, xs, y, boxes, out)


# ------------------------------------------------------------------ activation quantizers
def _uniform_error(grid: UniformGrid, box: Box) -> Array:
    s = np.broadcast_to(grid.scale, box.lo.shape)
    rounding = 0.5 * s if grid.rounding == "nearest" else s
    if grid.arithmetic == "torch":
        rounding = rounding + 2.0 ** -20 * _magnitude(box)
    outside = np.maximum(np.maximum(grid.lo - box.lo, box.hi - grid.hi), 0.0)
    return np.maximum(rounding, outside) * (1 + 4 * _EPS)


#: grid type -> bound on ``|Q(v) − v|`` over ``v ∈ box`` (grids without one: the centred form
#: is skipped for the network, the interval bound stands)
QUANTIZER_ERRORS: dict[type, Callable[[object, Box], Array]] = {UniformGrid: _uniform_error}


def quantizer_remainder(grid: object, box: Box, first_order_box: Array) -> Array | None:
    """``max(|Q(v) − v|max − max_abs, 0)`` over the moved values ``v ∈ box``, or None."""
    error = QUANTIZER_ERRORS.get(type(grid))
    if error is None:
        return None
    return np.maximum(error(grid, box) - first_order_box, 0.0)

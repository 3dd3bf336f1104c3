"""Rigorous bound mode: interval arithmetic over the real nonlinear network.

The first-order worst case (``Report.worst_case``) is the exact maximum of the
*linearized* error over the sources' boxes; the real network can exceed it (a ReLU unit
whose pre-activation interval straddles 0 switches inside the box, softmax and norms
curve). This pass instead carries, through every node, an interval ``[lo, hi]`` that
surely contains the value the quantized network computes, for every pattern of errors
in the boxes: each parameter within ``|Δp| ≤ max_abs`` of its float value, the network
input within its box, and every activation quantizer applied to the value that actually
reaches it (moved by upstream error), rounded to either neighbouring grid point (so
nearest, floor and stochastic rounding are all covered) and clipped to the grid's range.
The bound at a node is ``max(hi − y, y − lo)`` for the float value ``y``: never below the
true maximum ``|Δy|`` over the box, remainder included (tests/test_rigorous.py checks it
against vertex enumeration and random points of the box).

One rule per op type, in :data:`RULES` (``type -> rule(op, where, box, pboxes)``), and per
merge type in :data:`MERGE_RULES` (``type -> rule(op, where, boxes)``: ``Add`` and
``Concat`` exactly, ``Mul`` as the hull of the corner products, ``MatMul`` as Rump's
midpoint-radius product); a node without one is refused by name before the pass runs.
Interval arithmetic ignores the correlations that the first order keeps (``|W₂||W₁|``
instead of ``|W₂W₁|``; ``a ⊙ b`` with ``a`` and ``b`` computed from the same input as
if they were independent), so the rigorous bound is looser: the price of a guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
from scipy import optimize

from ._activation import ACTIVATIONS, Activation, Softmax
from ._attention import Attention
from ._config import Source
from ._embedding import Embedding
from ._float import FloatGrid
from ._graph import Sequential, walk
from ._linear import Linear
from ._merge import Add, Concat, MatMul, Merge, Mul
from ._network import _Join
from ._norm import L2Normalize, LayerNorm, RMSNorm
from ._op import Array, Op
from ._passes import has_rule, layer_sources, sources_by_layer
from ._pool import MeanPool
from ._shape_ops import Reshape, Scale, Slice, Transpose
from ._fixed import FixedGrid
from ._quant import UniformGrid
from ._report import SourceResult
from ._rigorous_centred import local_remainder, merge_remainder, quantizer_remainder
from ._rigorous_box import (Box, affine_box, matmul_box, mul_box, param_box, ratio_box,
                            rounding_slack, scale_box, softmax_box, square_box, sum_others)

def _matmul(x: Array, W: Array) -> Array:
    return x @ W.T


Rule = Callable[[Op, str, Box, Mapping[str, Array]], Box]

#: op type -> its interval rule ``rule(op, where, box, pboxes) -> Box``; ``where`` names the
#: node for messages, ``pboxes`` maps a parameter to its error box ``|Δp| ≤ pboxes[p]``.
RULES: dict[type, Rule] = {}


def rigorous_rule(kind: type) -> Callable[[Rule], Rule]:
    """Register the interval rule of an op type."""
    def register(rule: Rule) -> Rule:
        RULES[kind] = rule
        return rule
    return register


MergeRule = Callable[[Merge, str, list[Box]], Box]

#: merge type -> its interval rule ``rule(op, where, boxes) -> Box`` (one box per input)
MERGE_RULES: dict[type, MergeRule] = {}


def rigorous_merge_rule(*kinds: type) -> Callable[[MergeRule], MergeRule]:
    """Register the interval rule of merge types."""
    def register(rule: MergeRule) -> MergeRule:
        for kind in kinds:
            MERGE_RULES[kind] = rule
        return rule
    return register


class RigorousBoundUnavailable(ValueError):
    """The rigorous mode has no sound rule for an op or a quantizer of the network."""


# ------------------------------------------------------------------ activations
def _critical_point(kind: str, bracket: tuple[float, float]) -> float:
    d1 = ACTIVATIONS[kind].d1
    return float(optimize.brentq(lambda t: float(d1(np.array(t), None)), *bracket,
                                 xtol=1e-15, rtol=4 * np.finfo(float).eps))


#: activation kind -> the points where it turns (its monotone pieces lie between them).
#: Monotone activations have none; GELU and SiLU have one minimum each (their derivative
#: changes sign once: tests/test_rigorous.py checks every kind on a dense grid).
CRITICAL_POINTS: dict[str, tuple[float, ...]] = {
    "relu": (), "tanh": (), "sigmoid": (), "identity": (),
    "gelu": (_critical_point("gelu", (-1.5, -0.3)),),
    "gelu_tanh": (_critical_point("gelu_tanh", (-1.5, -0.3)),),
    "silu": (_critical_point("silu", (-2.0, -0.5)),),
}


@rigorous_rule(Activation)
def _activation(op: Activation, where: str, box: Box, pboxes: Mapping[str, Array]) -> Box:
    if op.kind not in CRITICAL_POINTS:
        raise RigorousBoundUnavailable(
            f"rigorous bounds are not available for Activation {where!r}: the turning points "
            f"of {op.kind!r} are not declared in errprop._rigorous.CRITICAL_POINTS")
    f = op.fn.f
    a, b = f(box.lo), f(box.hi)
    low, high = np.minimum(a, b), np.maximum(a, b)
    for c in CRITICAL_POINTS[op.kind]:
        # the numerical turning point is within 1e-15 of the true one, where f is flat:
        # its value is off by ~1e-30, far inside the outward rounding below
        inside = (box.lo <= c) & (c <= box.hi)
        fc = float(f(np.array(c)))
        low = np.where(inside, np.minimum(low, fc), low)
        high = np.where(inside, np.maximum(high, fc), high)
    return Box(low, high).outward(8.0).widen(4 * np.finfo(float).tiny)


@rigorous_rule(Softmax)
def _softmax(op: Softmax, where: str, box: Box, pboxes: Mapping[str, Array]) -> Box:
    return softmax_box(box, op.axis)


# ------------------------------------------------------------------ linear maps
@rigorous_rule(Linear)
def _linear(op: Linear, where: str, box: Box, pboxes: Mapping[str, Array]) -> Box:
    return affine_box(box, op.params["W"], pboxes.get("W"), op.params.get("b"), pboxes.get("b"),
                      _matmul)


@rigorous_rule(MeanPool)
def _mean_pool(op: MeanPool, where: str, box: Box, pboxes: Mapping[str, Array]) -> Box:
    # nonnegative weights: the map is monotone, its range is the image of the two ends
    lo, hi = op.forward(box.lo), op.forward(box.hi)
    slack = rounding_slack(box.lo.shape[-2], op.forward(np.maximum(np.abs(box.lo),
                                                                   np.abs(box.hi))))
    return Box(lo, hi).widen(slack)


@rigorous_rule(Embedding)
def _embedding(op: Embedding, where: str, box: Box, pboxes: Mapping[str, Array]) -> Box:
    # the ids carry no error; the lookup is linear in the tables with coefficients 1
    y = op.forward(box.lo)
    r = op.abs_jvp(box.lo, y, None, pboxes)
    slack = rounding_slack(3, np.abs(y) + r)
    return Box.around(y, r + slack)


# ------------------------------------------------------------------ normalization
def _gamma_beta(xhat: Box, op: Op, pboxes: Mapping[str, Array]) -> Box:
    out = mul_box(param_box(op.params["gamma"], pboxes.get("gamma")), xhat)
    if "beta" in op.params:
        out = out + param_box(op.params["beta"], pboxes.get("beta"))
    return out


def _normalized(u: Box, d: int, eps: float, limit: float) -> Box:
    """``u_i / sqrt(mean_k u_k² + eps)`` with ``R = Σ_{k≠i} u_k² / d + eps`` relaxed to a box."""
    rest = sum_others(square_box(u))
    rest = Box(rest.lo / d + eps, rest.hi / d + eps).outward(4.0)
    return ratio_box(u, rest, lambda t, R: np.sqrt(t * t / d + R), limit)


@rigorous_rule(LayerNorm)
def _layer_norm(op: LayerNorm, where: str, box: Box, pboxes: Mapping[str, Array]) -> Box:
    d = box.lo.shape[-1]
    # x_i − mean(x) = (1 − 1/d) x_i − (1/d) Σ_{k≠i} x_k: the exact range of the centring
    others = sum_others(box)
    centred = Box((1 - 1 / d) * box.lo - others.hi / d,
                  (1 - 1 / d) * box.hi - others.lo / d).outward(4.0)
    # |x̂_i| ≤ sqrt(d − 1) for any row (the centred row's largest share of its norm)
    xhat = _normalized(centred, d, op.eps, math.sqrt(max(d - 1, 1)))
    return _gamma_beta(xhat, op, pboxes)


@rigorous_rule(RMSNorm)
def _rms_norm(op: RMSNorm, where: str, box: Box, pboxes: Mapping[str, Array]) -> Box:
    d = box.lo.shape[-1]
    return _gamma_beta(_normalized(box, d, op.eps, math.sqrt(d)), op, pboxes)


@rigorous_rule(L2Normalize)
def _l2_normalize(op: L2Normalize, where: str, box: Box, pboxes: Mapping[str, Array]) -> Box:
    rest = sum_others(square_box(box))
    return ratio_box(box, rest, lambda t, R: np.maximum(np.sqrt(t * t + R), op.eps), 1.0)


# ------------------------------------------------------------------ attention
@rigorous_rule(Attention)
def _attention(op: Attention, where: str, box: Box, pboxes: Mapping[str, Array]) -> Box:
    P = op.params

    def project(inp: Box, w: str, b: str) -> Box:
        return affine_box(inp, P[w], pboxes.get(w), P.get(b), pboxes.get(b), _matmul)

    def split(t: Box) -> Box:
        return Box(op._split(t.lo), op._split(t.hi))

    q, k, v = (split(project(box, w, b)) for w, b in (("Wq", "bq"), ("Wk", "bk"), ("Wv", "bv")))
    kt = Box(np.swapaxes(k.lo, -1, -2), np.swapaxes(k.hi, -1, -2))
    S = scale_box(matmul_box(q, kt), 1.0 / math.sqrt(op.head_dim))
    mask = op._mask(box.lo)
    if mask is not None:
        S = Box(np.where(mask, -np.inf, S.lo), np.where(mask, -np.inf, S.hi))
    A = softmax_box(S)
    o = matmul_box(A, v)
    merged = Box(op._merge(o.lo), op._merge(o.hi))
    return project(merged, "Wo", "bo")


# ------------------------------------------------------------------ shape ops
@rigorous_rule(Reshape)
@rigorous_rule(Transpose)
@rigorous_rule(Slice)
def _selection(op: Op, where: str, box: Box, pboxes: Mapping[str, Array]) -> Box:
    # every output element is one input element: the ends move with it, exactly
    return Box(op.forward(box.lo), op.forward(box.hi))


@rigorous_rule(Scale)
def _scale(op: Scale, where: str, box: Box, pboxes: Mapping[str, Array]) -> Box:
    c = op.factor
    return scale_box(box, c) if c >= 0 else scale_box(Box(-box.hi, -box.lo), -c)


# ------------------------------------------------------------------ merges
@rigorous_merge_rule(Add, _Join)
def _add_boxes(op: Merge, where: str, boxes: list[Box]) -> Box:
    out = boxes[0]
    for box in boxes[1:]:
        out = out + box
    return out


@rigorous_merge_rule(Concat)
def _concat(op: Concat, where: str, boxes: list[Box]) -> Box:
    return Box(op.forward([b.lo for b in boxes]), op.forward([b.hi for b in boxes]))


@rigorous_merge_rule(Mul)
def _mul(op: Mul, where: str, boxes: list[Box]) -> Box:
    return mul_box(*boxes)


@rigorous_merge_rule(MatMul)
def _matmul_merge(op: MatMul, where: str, boxes: list[Box]) -> Box:
    a, b = boxes
    if op.transpose_b:
        b = Box(np.swapaxes(b.lo, -1, -2), np.swapaxes(b.hi, -1, -2))
    return matmul_box(a, b)


# ------------------------------------------------------------------ activation quantizers
def _uniform_enclosure(grid: UniformGrid, box: Box) -> Box:
    # Q(v) for v ∈ [lo, hi] lies between the grid point at or below lo and the one at or
    # above hi (clipped): evaluated by the grid's own arithmetic with floor rounding, the
    # ceiling as the floor of the mirrored grid, -floor(-x); both are monotone in v
    below = replace(grid, rounding="floor")
    mirror = replace(grid, zero_point=-np.asarray(grid.zero_point), qmin=-grid.qmax,
                     qmax=-grid.qmin, rounding="floor")
    return Box(below.quantize(box.lo), -mirror.quantize(-box.hi))


def _float_enclosure(grid: FloatGrid, box: Box) -> Box:
    if grid.rounding != "nearest":
        raise RigorousBoundUnavailable(f"rounding {grid.rounding!r} of a float format")
    return Box(grid.quantize(box.lo), grid.quantize(box.hi))  # nearest rounding is monotone


def _fixed_enclosure(grid: FixedGrid, box: Box) -> Box:
    return Box.point(grid.quantize(box.lo))


#: grid type -> enclosure of ``grid.quantize(v)`` over ``v ∈ box`` (activation sources)
QUANTIZER_ENCLOSURES: dict[type, Callable[[object, Box], Box]] = {
    UniformGrid: _uniform_enclosure, FloatGrid: _float_enclosure, FixedGrid: _fixed_enclosure,
}

#: op type -> the location of its kink (where its derivative jumps), if it has one
KINKS: dict[type, Callable[[Op], float | None]] = {Activation: lambda op: op.fn.kink}


# ------------------------------------------------------------------ the pass
@dataclass(frozen=True)
class RigorousResult:
    """Per node: ``bounds`` (``|Δ| ≤ bound`` elementwise, over the whole box), ``boxes``
    (the interval enclosures ``[lo, hi]`` of the quantized network's values),
    ``remainders`` (the centred form's remainder bound, or None where it is unavailable)
    and, for ops with a kink, ``reaches_kink``: the fraction of units whose input interval
    contains it."""

    bounds: dict[str, Array]
    boxes: dict[str, Box]
    remainders: dict[str, Array | None]
    reaches_kink: dict[str, float]

    def output_bound(self, output: str, worst_case: Array | None) -> Array:
        """The bound at ``output``, tightened with the exact first-order ``worst_case``
        (``Σ|J|a``, from reverse mode) in the centred form when both are available."""
        bound, rem = self.bounds[output], self.remainders[output]
        if worst_case is None or rem is None:
            return bound
        return np.minimum(bound, _FIRST_ORDER_SLACK * worst_case + rem)


#: relative allowance for the float64 rounding of a first-order bound (sums of |J| a)
_FIRST_ORDER_SLACK = 1.0 + 1e-9


@dataclass(frozen=True)
class _State:
    y: Array  # the float value
    box: Box  # interval enclosure of the quantized network's value
    fo: Array | None  # first-order interval bound (None: no error yet)
    rem: Array | None  # centred-form remainder bound (None: unavailable)


class _Rigorous:
    def __init__(self, by_layer: Mapping[str, list[Source]],
                 sources: Mapping[str, SourceResult]) -> None:
        self.by_layer, self.sources = by_layer, sources
        self.result = RigorousResult({}, {}, {}, {})

    def _record(self, name: str, s: _State) -> _State:
        with np.errstate(invalid="ignore"):
            bound = np.maximum(s.box.hi - s.y, s.y - s.box.lo)
        # a NaN end (inf − inf after an overflow) only says the box is unbounded there
        bound = np.where(np.isnan(bound), np.inf, np.maximum(bound, 0.0))
        if s.rem is not None:
            fo = 0.0 if s.fo is None else _FIRST_ORDER_SLACK * s.fo
            bound = np.minimum(bound, fo + s.rem)
        self.result.bounds[name] = bound
        self.result.boxes[name] = s.box
        self.result.remainders[name] = s.rem
        return s

    def _quantize(self, inputs: list[SourceResult], s: _State) -> tuple[Box, Array | None,
                                                                       Array | None]:
        """The layer's input quantizers applied to the moved values: box, fo, rem."""
        box, fo, rem = s.box, s.fo, s.rem
        for result in inputs:
            enclose = QUANTIZER_ENCLOSURES.get(type(result.grid))
            if enclose is None:
                raise RigorousBoundUnavailable(
                    f"rigorous bounds are not available for source {result.name!r}: no "
                    f"enclosure of a moved value is known for its {type(result.grid).__name__} "
                    f"(errprop._rigorous.QUANTIZER_ENCLOSURES)")
            a = result.model.max_abs
            if rem is not None:
                extra = quantizer_remainder(result.grid, box, a)
                rem = None if extra is None else rem + extra
            fo = a if fo is None else fo + a
            try:
                box = enclose(result.grid, box)
            except RigorousBoundUnavailable as exc:
                raise RigorousBoundUnavailable(f"rigorous bounds are not available for source "
                                               f"{result.name!r}: {exc}") from None
        return box, fo, rem

    def leaf(self, name: str, op: Op, s: _State) -> _State:
        rule = RULES[type(op)]  # every node's rules are checked before the pass
        inputs, pboxes = layer_sources(self.by_layer.get(name, []), self.sources)
        box, fo, rem = self._quantize(inputs, s)
        kink = KINKS.get(type(op), lambda _: None)(op)
        if kink is not None:
            reach = (box.lo <= kink) & (kink <= box.hi) & (box.lo < box.hi)
            self.result.reaches_kink[name] = float(np.mean(reach))
        x = s.y
        y = op.forward(x)
        out = rule(op, name, box, pboxes)
        fo_out = op.abs_jvp(x, y, fo, pboxes) if fo is not None or pboxes else None
        if rem is not None:
            dbox = Box(box.lo - x, box.hi - x)
            rem = op.abs_jvp(x, y, rem, {}) + local_remainder(op, x, y, dbox, pboxes, out)
        return self._record(name, _State(y, out, fo_out, rem))

    def merge(self, name: str, op: Merge, states: list[_State]) -> _State:
        xs = [s.y for s in states]
        y = op.forward(xs)
        boxes = [s.box for s in states]
        out = MERGE_RULES[type(op)](op, name, boxes)
        fos = [s.fo for s in states]
        fo = None if all(f is None for f in fos) else op.abs_jvp(xs, y, fos)
        rems = [s.rem for s in states]
        rem = None
        if all(r is not None for r in rems):
            # Δy = J Δx + ρ: the inputs' remainders go through |J|, plus the merge's own
            rem = op.abs_jvp(xs, y, rems)
            local = merge_remainder(op, xs, y, boxes, out)
            rem = rem if local is None else rem + local
        return self._record(name, _State(y, out, fo, rem))


def _check_rules(net: Sequential) -> None:
    """Refuse before any work a node without an interval rule or an ``abs_jvp``."""
    for node in net.dag():
        op, kind = node.op, type(node.op).__name__
        merge = not isinstance(op, Op)
        if (MERGE_RULES if merge else RULES).get(type(op)) is None:
            table = "MERGE_RULES" if merge else "RULES"
            raise RigorousBoundUnavailable(
                f"rigorous bounds are not available for {kind} {node.name!r}: no interval "
                f"rule is registered for {kind}{' merges' if merge else ''} "
                f"(errprop._rigorous.{table})")
        if not has_rule(op, "abs_jvp"):
            raise RigorousBoundUnavailable(f"rigorous bounds need abs_jvp, which {kind} "
                                           f"{node.name!r} does not have")


def rigorous_pass(net: Sequential, x: Array, sources: Mapping[str, SourceResult]) -> RigorousResult:
    """Rigorous elementwise bounds at every node of ``net`` on the float input ``x`` for the
    analysed ``sources`` (name -> :class:`SourceResult`, as in ``Report.sources``): the
    smaller of the interval enclosure and the centred form at every node."""
    _check_rules(net)
    x = np.asarray(x, dtype=np.float64)
    box, fo = Box.point(x), None
    if "input" in sources:
        fo = sources["input"].model.max_abs
        box = Box.around(x, fo).outward(2.0)
    interp = _Rigorous(sources_by_layer(sources), sources)
    with np.errstate(over="ignore", invalid="ignore"):
        walk(net, _State(x, box, fo, np.zeros_like(x)), interp)
    return interp.result

"""Every numeric first-order rule against the sympy derivative of its symbolic forward.

:func:`verify_rules` takes small random instances of ops (all built-ins by default), and
for the input and every parameter compares

* ``op.jvp`` along a random tangent with the sympy directional derivative of the symbolic
  forward (:mod:`errprop.symbolic._tape`), and
* the transposed rule ``op.vjp`` (where the op has one) by the dot-product test
  ``<g, J d> = <Jᵀ g, d>`` with ``J d`` from sympy,

at ``points`` random points (the op's own parameters, then freshly drawn ones; for a
merge, which has no parameters, freshly drawn inputs). A mismatch raises
``AssertionError`` naming the op and the tangent.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .._activation import ACTIVATIONS, Activation, Softmax
from .._attention import Attention
from .._embedding import Embedding
from .._linear import Linear
from .._merge import Add, Concat, MatMul, Merge, Mul
from .._norm import L2Normalize, LayerNorm, RMSNorm
from .._op import Op, Outer
from .._pool import MeanPool
from .._shape_ops import Reshape, Scale, Slice, Transpose
from ._forwards import FORWARDS, symbolic_forward
from ._tape import Array, SymbolicForward, SymbolicProgram


@dataclass(frozen=True)
class SymbolicOp:
    """An op, a small input, and the op's forward stated in sympy.

    ``forward(tape, x, params)`` receives object arrays of sympy symbols shaped like ``x``
    and each parameter and returns the output (see :mod:`errprop.symbolic._forwards` for
    the built-ins). ``forward=None`` looks the registered one up. ``label`` names the
    case in the report. For a merge, ``x`` is the list of its inputs and the forward
    receives the list of their symbol arrays.
    """

    op: Op | Merge
    x: Array | list[Array]
    forward: SymbolicForward | None = None
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or repr(self.op)

    def symbolic(self) -> SymbolicForward:
        return self.forward or symbolic_forward(self.op, self.x)


@dataclass(frozen=True)
class RuleCheck:
    """One op x tangent: the largest relative errors over the points tried."""

    op: str
    tangent: str
    jvp_error: float
    vjp_error: float | None  # None: the op has no transposed rule for this tangent
    points: int
    seconds: float


@dataclass(frozen=True)
class RuleReport:
    """All checks run by :func:`verify_rules`."""

    rows: tuple[RuleCheck, ...]
    rtol: float

    @property
    def max_error(self) -> float:
        return max([r.jvp_error for r in self.rows]
                   + [r.vjp_error for r in self.rows if r.vjp_error is not None])

    def table(self) -> str:
        head = ("op", "tangent", "jvp vs sympy", "vjp vs sympy", "points")
        body = [(r.op, r.tangent, f"{r.jvp_error:.1e}",
                 "-" if r.vjp_error is None else f"{r.vjp_error:.1e}", str(r.points))
                for r in self.rows]
        widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in (head, *body)]
        lines.insert(1, "  ".join("-" * w for w in widths))
        seconds = sum(r.seconds for r in self.rows)
        lines.append(f"{len(self.rows)} rules checked against sympy derivatives in "
                     f"{seconds:.1f} s; largest relative error {self.max_error:.1e} "
                     f"(tolerance {self.rtol:g})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


# ------------------------------------------------------------------------ instances
def _away_from_zero(rng: np.random.Generator, shape: tuple[int, ...]) -> Array:
    z = rng.standard_normal(shape)
    return np.sign(z) * (0.2 + np.abs(z))


def builtin_cases(seed: int = 0) -> list[SymbolicOp]:
    """Small random instances of every built-in op, seeded.

    Linear (3 -> 4, with and without bias), every entry of ``errprop.ACTIVATIONS``,
    Softmax over 5, LayerNorm / RMSNorm / L2Normalize over 5, MeanPool (with and without a
    padding mask), Embedding, and Attention with ``T = 3`` tokens, ``d = 4``, one and two
    heads (head_dim 4 and 2), causal, and with a key padding mask; the shape ops (Reshape
    splitting and merging axes, Transpose keeping and moving the last axis, Slice on the
    last and an earlier axis, Scale) and the merges (Add of three, Mul, Concat on two
    axes, MatMul with and without ``transpose_b``).
    """
    rng = np.random.default_rng(seed)
    n = rng.standard_normal
    cases = [SymbolicOp(Linear(n((4, 3)), n(4)), n((2, 3)), label="Linear 3->4"),
             SymbolicOp(Linear(n((4, 3))), n((2, 2, 3)), label="Linear 3->4, no bias, tokens")]
    for kind in ACTIVATIONS:
        cases.append(SymbolicOp(Activation(kind), _away_from_zero(rng, (2, 4)),
                                label=f"Activation {kind}"))
    cases += [
        SymbolicOp(Softmax(), 2.0 * n((2, 5)), label="Softmax n=5"),
        SymbolicOp(LayerNorm(1.0 + 0.3 * n(5), 0.3 * n(5)), n((2, 5)), label="LayerNorm d=5"),
        SymbolicOp(RMSNorm(1.0 + 0.3 * n(5)), n((2, 5)), label="RMSNorm d=5"),
        SymbolicOp(L2Normalize(), n((2, 5)), label="L2Normalize d=5"),
        SymbolicOp(MeanPool(), n((2, 3, 4)), label="MeanPool T=3"),
        SymbolicOp(MeanPool(mask=np.array([[1, 1, 0], [1, 1, 1]], bool)), n((2, 3, 4)),
                   label="MeanPool T=3, padding mask"),
        SymbolicOp(Embedding(n((6, 4)), n((5, 4)), n((2, 4))),
                   np.array([[1, 4, 2], [0, 5, 3]], float), label="Embedding vocab=6, d=4"),
    ]
    d, T = 4, 3
    for heads, causal, mask in ((1, False, None), (2, False, None), (2, True, None),
                                (2, False, np.array([[1, 1, 1], [1, 1, 0]], bool))):
        W = [n((d, d)) / np.sqrt(d) for _ in range(4)]
        b = [0.3 * n(d) for _ in range(4)]
        op = Attention(*W, *b, heads=heads, causal=causal, mask=mask)
        label = (f"Attention T={T}, d={d}, heads={heads}" + (", causal" if causal else "")
                 + (", padding mask" if mask is not None else ""))
        cases.append(SymbolicOp(op, n((2, T, d)), label=label))
    cases += [
        SymbolicOp(Reshape((2, 3)), n((2, 6)), label="Reshape 6 -> (2, 3)"),
        SymbolicOp(Reshape((6,), axes=2), n((2, 2, 3)), label="Reshape (2, 3) -> 6"),
        SymbolicOp(Transpose((1, 0, 2)), n((2, 3, 2, 4)), label="Transpose (1, 0, 2)"),
        SymbolicOp(Transpose((1, 0)), n((2, 3, 4)), label="Transpose (1, 0)"),
        SymbolicOp(Slice(1, 4), n((2, 5)), label="Slice 1:4"),
        SymbolicOp(Slice(0, 2, axis=-2), n((2, 3, 4)), label="Slice 0:2 axis -2"),
        SymbolicOp(Scale(-0.7), n((2, 4)), label="Scale -0.7"),
        SymbolicOp(Add(), [n((2, 4)) for _ in range(3)], label="Add of 3"),
        SymbolicOp(Mul(), [n((2, 4)), n((2, 4))], label="Mul"),
        SymbolicOp(Concat(), [n((2, 3)), n((2, 2))], label="Concat axis -1"),
        SymbolicOp(Concat(axis=-2), [n((2, 2, 3)), n((2, 1, 3))], label="Concat axis -2"),
        SymbolicOp(MatMul(), [n((2, 3, 4)), n((2, 4, 2))], label="MatMul"),
        SymbolicOp(MatMul(transpose_b=True), [n((2, 3, 4)), n((2, 2, 4))],
                   label="MatMul transpose_b"),
    ]
    return cases


def _fresh_params(op: Op, rng: np.random.Generator) -> Op:
    """A copy of ``op`` with newly drawn parameters of the same shapes and scales."""
    moved = copy.copy(op)
    moved.params = {}
    for key, p in op.params.items():
        scale = float(np.sqrt(np.mean(p * p))) or 1.0
        centre = 1.0 if key == "gamma" else 0.0
        moved.params[key] = centre + scale * rng.standard_normal(p.shape) * (
            0.3 if key == "gamma" else 1.0)
    return moved


# ------------------------------------------------------------------------ checking
def _rel(got: Array, want: Array, floor: float) -> float:
    return float(np.linalg.norm(np.ravel(got - want)) / max(np.linalg.norm(np.ravel(want)),
                                                             floor))


def _vjp_error(op: Op, x: Array, y: Array, target: str | None, d: Array, Jd: Array,
               rng: np.random.Generator, floor: float) -> float | None:
    """``|<g, J d> − <Jᵀ g, d>|`` relative to ``‖g‖ ‖J d‖``, or None without a vjp."""
    g = rng.standard_normal(y.shape)
    try:
        gx, gp = op.vjp(x, y, g[None], () if target is None else (target,))
    except NotImplementedError:
        return None
    if target is None:
        back = gx[0]
    else:
        ct = gp[target]
        ct = ct.materialize() if isinstance(ct, Outer) else ct
        back = ct[0].sum(axis=0)  # per-sample cotangents summed over the batch
    lhs, rhs = float(np.sum(g * Jd)), float(np.sum(back * d))
    scale = max(float(np.linalg.norm(g)) * float(np.linalg.norm(Jd)), floor)
    return abs(lhs - rhs) / scale


def check_case(case: SymbolicOp, *, points: int = 2, seed: int = 0,
               rtol: float = 1e-9) -> list[RuleCheck]:
    """Check one op (input and every parameter) at ``points`` random points; raise on a
    mismatch, naming the op and the tangent."""
    if isinstance(case.op, Merge):
        return _check_merge(case, points=points, seed=seed, rtol=rtol)
    forward = case.symbolic()
    op0 = case.op
    x = np.asarray(case.x, dtype=np.float64)
    targets: list[str | None] = [*([] if op0.integer_input else [None]), *op0.params]
    rng = np.random.default_rng(seed)
    program = SymbolicProgram(forward, None if op0.integer_input else x.shape,
                              {k: v.shape for k, v in op0.params.items()})
    rows = []
    for target in targets:
        label = "input" if target is None else f"param {target!r}"
        worst, worst_vjp, start = 0.0, None, time.perf_counter()
        for point in range(points):
            op = op0 if point == 0 else _fresh_params(op0, rng)
            y = op.forward(x)
            shape = x.shape if target is None else op.params[target].shape
            d = rng.standard_normal(shape)
            dx, dp = (d, {}) if target is None else (None, {target: d})
            y_sym, Jd = program.derivative(None if op.integer_input else x, op.params, dx, dp)
            # an exactly-zero derivative (key biases cancel in the softmax) is only zero up to
            # rounding on both sides: an absolute floor of ~1e-14 of the scale absorbs it
            floor = 1e-5 * max(float(np.linalg.norm(y)), 1.0) * float(np.linalg.norm(d))
            if _rel(y_sym, y, 1e-300) > 1e-9:
                raise AssertionError(f"{case.name}: the symbolic forward disagrees with "
                                     f"op.forward (relative error {_rel(y_sym, y, 1e-300):.2e}); "
                                     f"the statement of the forward is wrong")
            got = op.jvp(x, y, dx, dp)
            err = _rel(got, Jd, floor)
            if not err <= rtol:
                raise AssertionError(
                    f"{case.name}: the first-order rule (jvp) for the {label} disagrees with "
                    f"the sympy derivative of the forward: relative error {err:.3e} "
                    f"(tolerance {rtol:g}) at point {point}")
            worst = max(worst, err)
            verr = _vjp_error(op, x, y, target, d, Jd, rng, floor)
            if verr is not None:
                if not verr <= rtol:
                    raise AssertionError(
                        f"{case.name}: the transposed rule (vjp) for the {label} disagrees "
                        f"with the sympy derivative: relative error {verr:.3e} at point {point}")
                worst_vjp = verr if worst_vjp is None else max(worst_vjp, verr)
        rows.append(RuleCheck(case.name, label, worst, worst_vjp, points,
                              time.perf_counter() - start))
    return rows


def _check_merge(case: SymbolicOp, *, points: int, seed: int, rtol: float) -> list[RuleCheck]:
    """The merge form of :func:`check_case`: one tangent per input, fresh inputs per point."""
    forward, op = case.symbolic(), case.op
    xs0 = [np.asarray(x, dtype=np.float64) for x in case.x]
    names = [f"x{i}" for i in range(len(xs0))]
    program = SymbolicProgram(lambda tape, _, p: forward(tape, [p[k] for k in names], {}),
                              None, {k: x.shape for k, x in zip(names, xs0)})
    rng = np.random.default_rng(seed)
    rows = []
    for i, key in enumerate(names):
        worst, worst_vjp, start = 0.0, 0.0, time.perf_counter()
        for point in range(points):
            xs = xs0 if point == 0 else [rng.standard_normal(x.shape) for x in xs0]
            y = op.forward(xs)
            d = rng.standard_normal(xs[i].shape)
            y_sym, Jd = program.derivative(None, dict(zip(names, xs)), None, {key: d})
            if _rel(y_sym, y, 1e-300) > 1e-9:
                raise AssertionError(f"{case.name}: the symbolic forward disagrees with "
                                     f"op.forward (relative error {_rel(y_sym, y, 1e-300):.2e})")
            floor = 1e-5 * max(float(np.linalg.norm(y)), 1.0) * float(np.linalg.norm(d))
            dxs: list[Array | None] = [None] * len(xs)
            dxs[i] = d
            err = _rel(op.jvp(xs, y, dxs), Jd, floor)
            g = rng.standard_normal(y.shape)
            back = op.vjp(xs, y, g[None])[i][0]
            verr = abs(float(np.sum(g * Jd)) - float(np.sum(back * d))) / max(
                float(np.linalg.norm(g)) * float(np.linalg.norm(Jd)), floor)
            for what, e in (("first-order rule (jvp)", err), ("transposed rule (vjp)", verr)):
                if not e <= rtol:
                    raise AssertionError(f"{case.name}: the {what} for input {i} disagrees "
                                         f"with the sympy derivative of the forward: relative "
                                         f"error {e:.3e} (tolerance {rtol:g}) at point {point}")
            worst, worst_vjp = max(worst, err), max(worst_vjp, verr)
        rows.append(RuleCheck(case.name, f"input {i}", worst, worst_vjp, points,
                              time.perf_counter() - start))
    return rows


def verify_rules(ops: Iterable[SymbolicOp | Op] | None = None, seed: int = 0, *,
                 points: int = 2, rtol: float = 1e-9, verbose: bool = False) -> RuleReport:
    """Check every numeric first-order rule against the sympy derivative of its forward.

    Parameters
    ----------
    ops : ``None`` for every built-in op (:func:`builtin_cases`); otherwise
        :class:`SymbolicOp` entries (your op, a small input, its forward in sympy) or bare
        built-in ops (a random input is drawn for them).
    seed : seeds the instances, the points and the tangents.
    points : random points per op (the op's parameters, then fresh draws).
    rtol : tolerated relative error; both sides are exact up to float64 rounding.
    verbose : print the report.

    Returns
    -------
    RuleReport
        One row per op and tangent (``input``, ``param 'W'``, ...) with the largest
        relative error of ``jvp`` and of ``vjp``.

    Raises
    ------
    AssertionError
        On the first mismatch, naming the op and the tangent.
    """
    rng = np.random.default_rng(seed)
    if ops is None:
        cases = builtin_cases(seed)
    else:
        cases = [c if isinstance(c, SymbolicOp) else _case_for(c, rng) for c in ops]
    rows: list[RuleCheck] = []
    for i, case in enumerate(cases):
        rows += check_case(case, points=points, seed=seed + 1000 * i, rtol=rtol)
    report = RuleReport(tuple(rows), rtol)
    if verbose:
        print(report)
    return report


def _case_for(op: Op, rng: np.random.Generator) -> SymbolicOp:
    if isinstance(op, Merge):
        raise TypeError(f"verify_rules: pass a {type(op).__name__} merge as "
                        f"SymbolicOp(op, [x1, x2, ...]) with inputs it can merge")
    if not isinstance(op, Op):
        raise TypeError(f"verify_rules: expected SymbolicOp or an errprop op, got "
                        f"{type(op).__name__}")
    if op.integer_input:
        raise TypeError(f"verify_rules: pass a {type(op).__name__} as SymbolicOp(op, ids)")
    d = op.in_features or 4
    shape = (2, 3, d) if op.min_ndim >= 3 else (2, d)
    rule = FORWARDS.find(op)
    kink = rule is not None and rule.away_from_zero
    x = _away_from_zero(rng, shape) if kink else rng.standard_normal(shape)
    return SymbolicOp(op, x)


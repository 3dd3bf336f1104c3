"""Tools for people who add ops: check a first-order rule against finite differences.

>>> from errprop.testing import check_rule
>>> check_rule(errprop.Activation("tanh"), x)      # raises AssertionError on a wrong rule

``check_rule`` verifies, for the input and for every parameter of an op,

1. the rule against a central finite difference of ``forward`` (with one
   Richardson step, so the difference itself is accurate to ~1e-10);
2. linearity: ``rule(a·d1 + d2) = a·rule(d1) + rule(d2)``;
3. leading direction axes: a stack of tangents ``(K, *x.shape)`` — or of a
   parameter, ``(K, *param.shape)`` — gives the stack of the individual results
   (the propagation engine and the random-probe estimator rely on it);
4. that ``linearize(x)`` returns ``forward(x)`` and the same rule as ``jvp``;
5. the transposed rule ``vjp`` by the dot-product test against ``jvp``, with
   parameter cotangents checked per batch element;
6. the second-order rule ``jvp2`` against a second difference of ``forward``;
7. the interval rule ``abs_jvp`` bounds ``|jvp|`` for random and sign-aligned
   tangents inside its box, and the norm rule ``norm_jvp`` bounds ``‖jvp‖`` per batch
   element.

For a several-input :class:`errprop.extend.Merge`, ``x`` is the list of its inputs and
the same rules are checked per input ``i`` and for all inputs moved together (stacked
``(K, *xᵢ.shape)`` tangents with ``None`` for the others, as the passes call ``jvp``);
``jvp2`` along random ``(aᵢ, bᵢ)``, so cross terms (``Δa ⊙ Δb`` for ``Mul``) count; the
bounds also with ``None`` boxes. Norm convention (the passes'): ``rsᵢ`` is ``Δxᵢ``'s
Frobenius norm per batch element, ``(xᵢ.shape[0],)`` (size 1 for an input broadcast
along the batch axis), and ``norm_jvp`` bounds ``Δy``'s, shape ``(y.shape[0],)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ._merge import Merge
from ._op import Array, Op, Outer, sample_norm

__all__ = ["check_rule", "finite_difference"]


def _rms(a: Array) -> float:
    return float(np.sqrt(np.mean(np.square(a))))


def finite_difference(op: Op, x: Array, dx: Array | None = None,
                      dparams: Mapping[str, Array] | None = None, *, h: float = 1e-3) -> Array:
    """Directional derivative of ``op.forward`` at ``(x, op.params)`` along ``(dx, dparams)``.

    Central differences at steps ``h`` and ``h/2`` combined by Richardson
    extrapolation, ``(4·D(h/2) − D(h)) / 3``: error O(h⁴). For a merge op ``x`` and
    ``dx`` are lists over its inputs (``None`` in ``dx``: that input stays put).
    """
    dparams = dict(dparams or {})

    def at(t: float) -> Array:
        if isinstance(op, Merge):       # x, dx: lists over the inputs (None: not moved)
            return op.forward([xi if d is None else xi + t * d for xi, d in zip(x, dx)])
        xt = x if dx is None else x + t * dx
        params = {k: op.params[k] + t * v for k, v in dparams.items()}
        return op.forward(xt, params)

    def central(step: float) -> Array:
        return (at(step) - at(-step)) / (2.0 * step)

    return (4.0 * central(h / 2) - central(h)) / 3.0


def _rel(a: Array, b: Array, scale: float) -> float:
    return float(np.linalg.norm(np.ravel(a - b)) / max(np.linalg.norm(np.ravel(b)), scale))


def _close(a: Array, b: Array, rtol: float, atol: float) -> bool:
    return bool(np.linalg.norm(np.ravel(a - b)) <= rtol * np.linalg.norm(np.ravel(b)) + atol)


def check_rule(op: Op, x: object, *, rtol: float = 1e-6, seed: int = 0, h: float = 1e-3,
               directions: int = 2, check_vjp: bool = True, check_jvp2: bool = True,
               check_abs: bool = True, check_norm: bool = True) -> None:
    """Check ``op``'s first-order rule at ``x``; raise ``AssertionError`` naming what is wrong.

    Parameters
    ----------
    op : the op to check (an ``Op``, or a several-input ``Merge``).
    x : an input on which ``op`` is smooth (keep ReLU inputs away from 0 by more than
        ``h`` times the direction's size); for a ``Merge``, the list of its inputs.
    rtol : tolerated relative error ``‖rule − fd‖ / ‖fd‖``.
    seed : seed of the random directions.
    h : largest finite-difference step along a direction of unit RMS (``h/4`` and
        ``h/16`` are tried too before the rule is declared wrong).
    directions : random directions tried per tangent.
    check_vjp : also check the transposed rule ``vjp`` against ``jvp`` by the
        dot-product test ``<g, J d> = <Jᵀ g, d>``, per batch element for parameters.
    check_jvp2 : also check the second-order rule ``jvp2`` against the second
        difference of ``forward`` along a random ``(a, b, dparams)`` (relative error
        < 1e-5, since the default ``jvp2`` is itself a numerical derivative).
    check_abs : also check the interval rule ``abs_jvp``: it must bound ``|jvp|`` for
        random and sign-aligned tangents inside the box it is given.
    check_norm : also check the norm rule ``norm_jvp``: it must bound ``‖jvp‖`` per
        batch element for random tangents with the given input norms and parameter boxes.
    """
    if isinstance(op, Merge):
        return _check_merge(op, _merge_inputs(op, x), rtol, seed, h, directions, check_vjp,
                            check_jvp2, check_abs, check_norm)
    if isinstance(x, (list, tuple)) and any(isinstance(v, np.ndarray) for v in x):
        raise TypeError(f"check_rule: {op!r} is a one-input op: pass its input as one array, "
                        f"not a list of {len(x)} arrays (a list is for a several-input Merge)")
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    y = op.forward(x)
    y_lin, rule = op.linearize(x)
    if not np.allclose(y_lin, y, rtol=1e-12, atol=1e-12 * max(_rms(y), 1.0)):
        raise AssertionError(f"{op!r}: linearize(x) returns an output that differs from "
                             f"forward(x)")
    # finite differences cannot resolve below ~eps/h: a rule that is exactly zero (a key
    # bias shifts every score of a row equally) passes within this absolute tolerance
    atol = 1e-9 * max(_rms(y), 1.0) * np.sqrt(y.size)
    floor = 1e-12 * max(_rms(y), 1.0) * np.sqrt(y.size)
    # an integer-id input (Embedding) is an index, not a value: it has no tangent
    targets: list[str | None] = [*([] if op.integer_input else [None]), *op.params]
    for target in targets:
        label = "the input" if target is None else f"parameter {target!r}"
        shape = x.shape if target is None else op.params[target].shape

        def tangent(d: Array) -> tuple[Array | None, dict[str, Array]]:
            return (d, {}) if target is None else (None, {target: d})

        dirs = [rng.standard_normal(shape) for _ in range(max(directions, 2))]
        outs = []
        for d in dirs:
            dx, dp = tangent(d)
            got = op.jvp(x, y, dx, dp)
            if got.shape != y.shape:
                raise AssertionError(f"{op!r}: the rule for {label} returns shape {got.shape}, "
                                     f"expected the output shape {y.shape}")
            # strongly curved ops (saturated softmax) need a smaller step: the difference
            # converges to the true derivative, so a wrong rule fails at every step
            for step in (h, h / 4, h / 16):
                want = finite_difference(op, x, dx, dp, h=step)
                if _close(got, want, rtol, atol):
                    break
            err = _rel(got, want, floor)
            if not _close(got, want, rtol, atol):
                raise AssertionError(f"{op!r}: the first-order rule for {label} disagrees with "
                                     f"finite differences: relative error {err:.3g} > {rtol:g}")
            via_linearize = rule(*tangent(d))
            if not _close(via_linearize, got, 1e-10, floor):
                raise AssertionError(f"{op!r}: linearize(x)'s rule and jvp disagree for {label}")
            outs.append(got)
        combo = op.jvp(x, y, *tangent(2.5 * dirs[0] + dirs[1]))
        if not _close(combo, 2.5 * outs[0] + outs[1], 1e-10, floor):
            raise AssertionError(f"{op!r}: the rule for {label} is not linear in the tangent")
        if check_vjp:
            _check_vjp(op, x, y, target, dirs[0], outs[0], rng, floor)
        if target is not None:
            stacked = op.jvp(x, y, None, {target: np.stack(dirs)})
            if stacked.shape != (len(dirs), *y.shape) or \
                    not _close(stacked, np.stack(outs), 1e-10, floor):
                raise AssertionError(f"{op!r}: the rule does not handle a leading direction "
                                     f"axis on the tangent of {label}: shape "
                                     f"{(len(dirs), *shape)} gave {stacked.shape}, expected "
                                     f"the stack of single-direction results")
            dxs = np.stack([rng.standard_normal(x.shape) for _ in dirs])
            both = op.jvp(x, y, dxs, {target: np.stack(dirs)})
            want = op.jvp(x, y, dxs, {}) + stacked
            if not _close(both, want, 1e-10, floor):
                raise AssertionError(f"{op!r}: with stacked tangents of the input and of "
                                     f"{label} together, the rule is not the sum of the two")
        if target is None:
            stacked = op.jvp(x, y, np.stack(dirs), {})
            if stacked.shape != (len(dirs), *y.shape) or \
                    not _close(stacked, np.stack(outs), 1e-10, floor):
                raise AssertionError(f"{op!r}: the rule does not handle a leading direction "
                                     f"axis on the input tangent: dx of shape "
                                     f"{(len(dirs), *x.shape)} gave {stacked.shape}, expected "
                                     f"the stack of single-direction results")
    if check_jvp2:
        _check_jvp2(op, x, y, rng, h)
    if check_abs:
        _check_abs(op, x, y, rng)
    if check_norm:
        _check_norm(op, x, y, rng)


def _check_vjp(op: Op, x: Array, y: Array, target: str | None, d: Array, jd: Array,
               rng: np.random.Generator, floor: float) -> None:
    """``<g, J d> = <Jᵀ g, d>``; parameter cotangents per batch element."""
    label = "the input" if target is None else f"parameter {target!r}"
    g = rng.standard_normal((2, *y.shape))
    try:
        gx, gparams = op.vjp(x, y, g, () if target is None else (target,))
    except NotImplementedError as exc:
        raise AssertionError(f"{exc}; pass check_vjp=False to check only the forward rule") \
            from None
    if target is None:
        if gx.shape != (2, *x.shape):
            raise AssertionError(f"{op!r}: vjp returns an input cotangent of shape {gx.shape}, "
                                 f"expected {(2, *x.shape)}")
        lhs = g.reshape(2, -1) @ jd.ravel()
        rhs = gx.reshape(2, -1) @ d.ravel()
    else:
        gp = gparams.get(target)
        if isinstance(gp, Outer):
            gp = gp.materialize()
        want_shape = (2, x.shape[0], *op.params[target].shape)
        if gp is None or gp.shape != want_shape:
            raise AssertionError(f"{op!r}: vjp must return the per-sample cotangent of {label} "
                                 f"with shape {want_shape}, got "
                                 f"{None if gp is None else gp.shape}")
        # batch element n's output depends on the shared parameter through its own path only
        B = x.shape[0]
        lhs = np.sum(g.reshape(2, B, -1) * jd.reshape(B, -1), axis=-1)
        rhs = gp.reshape(2, B, -1) @ d.ravel()
    if not _close(rhs, lhs, 1e-9, floor):
        raise AssertionError(f"{op!r}: vjp is not the transpose of jvp for {label}: "
                             f"<g, J d> = {np.ravel(lhs)[:3]} but <Jᵀg, d> = {np.ravel(rhs)[:3]}")


def _check_jvp2(op: Op, x: Array, y: Array, rng: np.random.Generator, h: float) -> None:
    """``jvp2`` is the t² coefficient of ``forward(x + t a + t² b; p + t dp)``."""
    a, b = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    if op.integer_input:
        a, b = np.zeros_like(x), np.zeros_like(x)
    dps = {k: rng.standard_normal(v.shape) for k, v in op.params.items()}

    def at(t: float) -> Array:
        return op.forward(x + t * a + t * t * b, {k: v + t * dps[k] for k, v in op.params.items()})

    def coefficient(t: float) -> Array:
        return (at(t) + at(-t) - 2.0 * y) / (2.0 * t * t)

    got = op.jvp2(x, y, a, b, dps)
    atol = 1e-8 * max(_rms(y), 1.0) * np.sqrt(y.size)
    for step in (10 * h, 2.5 * h, h, h / 4):
        want = (4.0 * coefficient(step / 2) - coefficient(step)) / 3.0
        if _close(got, want, 1e-5, atol):
            return
    raise AssertionError(f"{op!r}: the second-order rule jvp2 disagrees with the second "
                         f"difference of forward: relative error {_rel(got, want, atol):.3g}")


def _check_abs(op: Op, x: Array, y: Array, rng: np.random.Generator) -> None:
    """``|jvp(Δx, Δp)| ≤ abs_jvp(r, rp)`` whenever ``|Δx| ≤ r`` and ``|Δp| ≤ rp``."""
    r = rng.uniform(0.1, 1.0, x.shape)
    rp = {k: rng.uniform(0.1, 1.0, v.shape) for k, v in op.params.items()}
    try:
        bound = op.abs_jvp(x, y, r, rp)
    except NotImplementedError as exc:
        raise AssertionError(f"{exc}; pass check_abs=False to skip it") from None
    if bound.shape != y.shape or np.any(bound < 0):
        raise AssertionError(f"{op!r}: abs_jvp must return a nonnegative array of the output "
                             f"shape {y.shape}, got shape {bound.shape}")
    slack = 1e-12 * (np.abs(bound).max() + 1e-300)
    for trial in range(64):
        u = rng.uniform(-1, 1, x.shape) if trial % 2 else np.sign(rng.standard_normal(x.shape))
        dps = {k: v * (rng.uniform(-1, 1, v.shape) if trial % 2 else
                       np.sign(rng.standard_normal(v.shape))) for k, v in rp.items()}
        dy = op.jvp(x, y, r * u, dps)
        if np.any(np.abs(dy) > bound + slack):
            raise AssertionError(f"{op!r}: the interval rule abs_jvp does not bound the "
                                 f"first-order error of an error pattern inside its box")


def _check_norm(op: Op, x: Array, y: Array, rng: np.random.Generator) -> None:
    """``‖jvp(Δx, Δp)_n‖ ≤ norm_jvp(‖Δx_n‖, box)_n`` for patterns inside the boxes."""
    rp = {k: rng.uniform(0.1, 1.0, v.shape) for k, v in op.params.items()}
    for trial in range(32):
        dx = rng.standard_normal(x.shape) * rng.uniform(0, 2, (x.shape[0],) + (1,) * (x.ndim - 1))
        r = np.sqrt(np.sum(dx.reshape(x.shape[0], -1) ** 2, axis=1))
        dps = {k: v * (rng.uniform(-1, 1, v.shape) if trial % 2 else
                       np.sign(rng.standard_normal(v.shape))) for k, v in rp.items()}
        try:
            bound = op.norm_jvp(x, y, r, rp)
        except NotImplementedError as exc:
            raise AssertionError(f"{exc}; pass check_norm=False to skip it") from None
        got = np.sqrt(np.sum(op.jvp(x, y, dx, dps).reshape(x.shape[0], -1) ** 2, axis=1))
        if bound.shape != (x.shape[0],) or np.any(got > bound * (1 + 1e-10) + 1e-300):
            raise AssertionError(f"{op!r}: the norm rule norm_jvp does not bound the norm of "
                                 f"the first-order error of a pattern inside its boxes")


# ---------------------------------------------------------------- several-input merges
def _merge_inputs(op: Merge, x: object) -> list[Array]:
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"check_rule: {op!r} is a several-input Merge: pass x as a list or "
                        f"tuple of its input arrays, got {type(x).__name__}")
    try:
        op.check_arity(len(x), op.name or "check_rule")
    except ValueError as exc:
        raise ValueError(f"check_rule: {exc}") from None
    return [np.asarray(v, dtype=np.float64) for v in x]


def _call(op: Merge, rule: str, flag: str, *args):    # a missing rule: say how to skip it
    try:
        return getattr(op, rule)(*args)
    except NotImplementedError as exc:
        raise AssertionError(f"{op!r}: {exc}; pass {flag}=False to skip it") from None


def _check_merge(op: Merge, xs: list[Array], rtol: float, seed: int, h: float,
                 directions: int, check_vjp: bool, check_jvp2: bool, check_abs: bool,
                 check_norm: bool) -> None:
    rng = np.random.default_rng(seed)
    n, y = len(xs), op.forward(xs)
    atol = 1e-9 * max(_rms(y), 1.0) * np.sqrt(y.size)
    floor = 1e-12 * max(_rms(y), 1.0) * np.sqrt(y.size)
    K = max(directions, 2)
    only = lambda i, d: [d if j == i else None for j in range(n)]  # noqa: E731

    def first_order(dxs: list[Array | None], label: str) -> Array:
        got = op.jvp(xs, y, dxs, {})
        if got.shape != y.shape:
            raise AssertionError(f"{op!r}: jvp for {label} returns shape {got.shape}, "
                                 f"expected the output shape {y.shape}")
        for step in (h, h / 4, h / 16):
            want = finite_difference(op, xs, dxs, h=step)
            if _close(got, want, rtol, atol):
                return got
        raise AssertionError(f"{op!r}: the first-order rule jvp for {label} disagrees with "
                             f"finite differences: relative error "
                             f"{_rel(got, want, floor):.3g} > {rtol:g}")

    def stacked(dirs: list[list[Array | None]], label: str) -> None:
        dxs = [None if dirs[0][j] is None else np.stack([d[j] for d in dirs])
               for j in range(n)]
        want = np.stack([op.jvp(xs, y, d, {}) for d in dirs])
        try:
            got = op.jvp(xs, y, dxs, {})
            what = f"shape {got.shape}" if got.shape != want.shape else "other values"
        except Exception as exc:    # noqa: BLE001 - reported as the rule's failure
            got, what = None, f"{type(exc).__name__}: {exc}"
        if got is None or got.shape != want.shape or not _close(got, want, 1e-10, floor):
            raise AssertionError(f"{op!r}: jvp does not handle a leading direction axis on "
                                 f"the tangents (K, *x.shape) of {label}: expected the "
                                 f"stack {want.shape} of results, got {what}")

    singles = []
    for i, x in enumerate(xs):
        label = f"input {i}"
        dirs = [rng.standard_normal(x.shape) for _ in range(K)]
        outs = [first_order(only(i, d), label) for d in dirs]
        combo = op.jvp(xs, y, only(i, 2.5 * dirs[0] + dirs[1]), {})
        if not _close(combo, 2.5 * outs[0] + outs[1], 1e-10, floor):
            raise AssertionError(f"{op!r}: jvp is not linear in the tangent of {label}")
        stacked([only(i, d) for d in dirs], label)
        if check_vjp:    # the dot-product test <g, J d> = <Jᵀ g, d>
            g = rng.standard_normal((2, *y.shape))
            gs = _call(op, "vjp", "check_vjp", xs, y, g)
            if len(gs) != n or np.shape(gs[i]) != (2, *x.shape):
                raise AssertionError(f"{op!r}: vjp must return one cotangent (K, *x.shape) "
                                     f"per input; for {label}: expected {(2, *x.shape)}")
            lhs, rhs = g.reshape(2, -1) @ outs[0].ravel(), gs[i].reshape(2, -1) @ dirs[0].ravel()
            if not _close(rhs, lhs, 1e-9, floor):
                raise AssertionError(f"{op!r}: vjp is not the transpose of jvp for {label}: "
                                     f"<g, J d> = {lhs} but <Jᵀg, d> = {rhs}")
        singles.append((dirs[0], outs[0]))
    if not _close(first_order([d for d, _ in singles], "all inputs together"),
                  sum(o for _, o in singles), 1e-10, floor):
        raise AssertionError(f"{op!r}: jvp of all inputs is not the sum of the single ones")
    stacked([[rng.standard_normal(x.shape) for x in xs] for _ in range(K)], "all inputs")
    if n > 2:    # several live inputs and one zero one, stacked
        stacked([[None if j == 0 else rng.standard_normal(x.shape) for j, x in
                  enumerate(xs)] for _ in range(K)], "inputs 1.. (input 0 None)")
    if np.shape(zero := op.jvp(xs, y, [None] * n, {})) != y.shape or np.any(zero != 0):
        raise AssertionError(f"{op!r}: jvp with every tangent None must return zeros {y.shape}")
    if check_jvp2:
        _merge_jvp2(op, xs, y, rng, h)
    if check_abs:
        _merge_abs(op, xs, y, rng, check_vjp)
    if check_norm:
        _merge_norm(op, xs, y, rng)


def _merge_jvp2(op: Merge, xs: list[Array], y: Array, rng: np.random.Generator,
                h: float) -> None:
    """``jvp2`` is the t² coefficient of ``forward([xᵢ + t aᵢ + t² bᵢ])``, cross terms
    included; then with one ``aᵢ`` and another ``bⱼ`` None."""
    n = len(xs)
    atol = 1e-8 * max(_rms(y), 1.0) * np.sqrt(y.size)
    for trial in range(n + 1):
        a_s = [None if j == trial - 1 else rng.standard_normal(x.shape) for j, x in enumerate(xs)]
        b_s = [None if trial and j == trial % n else rng.standard_normal(x.shape)
               for j, x in enumerate(xs)]

        def coefficient(t: float) -> Array:    # (f(t) + f(-t) - 2 f(0)) / (2 t²)
            f = [op.forward([x + (0 if a is None else s * a) + (0 if b is None else s * s * b)
                             for x, a, b in zip(xs, a_s, b_s)]) for s in (t, -t)]
            return (f[0] + f[1] - 2.0 * y) / (2.0 * t * t)

        got = _call(op, "jvp2", "check_jvp2", xs, y, a_s, b_s)
        for step in (10 * h, 2.5 * h, h, h / 4):
            want = (4.0 * coefficient(step / 2) - coefficient(step)) / 3.0
            if np.shape(got) == y.shape and _close(got, want, 1e-5, atol):
                break
        else:
            nones = f" (a of input {trial - 1}, b of input {trial % n} None)" if trial else ""
            raise AssertionError(f"{op!r}: the second-order rule jvp2 disagrees with the "
                                 f"second difference of forward{nones}: relative error "
                                 f"{_rel(got, want, atol):.3g}")


def _merge_abs(op: Merge, xs: list[Array], y: Array, rng: np.random.Generator,
               aligned: bool) -> None:
    """``|jvp(Δxs)| ≤ abs_jvp(rs)`` for ``|Δxᵢ| ≤ rsᵢ``: random, random-sign and (with a
    vjp) sign-aligned to rows of the Jacobian, which attain ``|J| r`` exactly."""
    for skip in (None, *range(len(xs))):
        rs = [None if j == skip else rng.uniform(0.1, 1.0, x.shape) for j, x in enumerate(xs)]
        where = "" if skip is None else f" (input {skip}'s box None)"
        bound = _call(op, "abs_jvp", "check_abs", xs, y, rs)
        if np.shape(bound) != y.shape or np.any(bound < 0):
            raise AssertionError(f"{op!r}: abs_jvp must return a nonnegative array of the "
                                 f"output shape {y.shape}, got shape {np.shape(bound)}{where}")
        slack = 1e-12 * (np.abs(bound).max() + 1e-300)
        dys = [op.jvp(xs, y, [None if r is None else r * (rng.uniform(-1, 1, r.shape) if t % 2
                                else np.sign(rng.standard_normal(r.shape))) for r in rs], {})
               for t in range(32)]
        if aligned:    # rows of J: cotangents of one-hot outputs
            g = np.zeros((8, y.size))
            g[np.arange(8), rng.integers(0, y.size, 8)] = 1.0
            gs = _call(op, "vjp", "check_vjp", xs, y, g.reshape(8, *y.shape))
            dys.append(op.jvp(xs, y, [None if r is None else r * np.sign(gi)
                                      for r, gi in zip(rs, gs)], {}))
        for dy in dys:
            if (excess := float(np.max(np.abs(dy) - bound))) > slack:
                raise AssertionError(f"{op!r}: the interval rule abs_jvp does not bound the "
                                     f"first-order error of an error pattern inside its "
                                     f"boxes{where}: |jvp| exceeds it by {excess:.3g}")


def _merge_norm(op: Merge, xs: list[Array], y: Array, rng: np.random.Generator) -> None:
    """``sample_norm(jvp(Δxs)) ≤ norm_jvp([sample_norm(Δxᵢ)])`` per batch element."""
    for skip in (None, *range(len(xs))):
        where = "" if skip is None else f" (input {skip}'s norm None)"
        for trial in range(16):
            dxs = [None if j == skip else rng.standard_normal(x.shape) *
                   rng.uniform(0, 2, (x.shape[0],) + (1,) * (x.ndim - 1))
                   for j, x in enumerate(xs)]
            rs = [None if d is None else sample_norm(d) for d in dxs]
            bound = _call(op, "norm_jvp", "check_norm", xs, y, rs)
            if np.shape(bound) != (y.shape[0],):
                raise AssertionError(f"{op!r}: norm_jvp must return shape {(y.shape[0],)} "
                                     f"(one norm per batch element), got {np.shape(bound)}")
            ratio = np.max(sample_norm(op.jvp(xs, y, dxs, {})) / (bound * (1 + 1e-10) + 1e-300))
            if ratio > 1:
                raise AssertionError(f"{op!r}: the norm rule norm_jvp does not bound the norm of "
                                     f"the first-order error per batch element{where}: "
                                     f"‖jvp‖ / bound = {ratio:.3g}")

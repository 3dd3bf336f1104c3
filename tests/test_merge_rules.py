"""check_rule on several-input merges and on the shape ops, and the checker rejecting
deliberately broken merges (each rule in turn).

The references are independent of the rules checked: finite and second differences of
the op's own forward, the dot-product test, and random / sign-aligned error patterns
inside the boxes given to the bounds.
"""

import numpy as np
import pytest

import errprop as ep
from errprop._registrars import frobenius, max_abs
from errprop._shape_ops import Reshape, Scale, Slice, Transpose
from errprop.extend import bilinear, structural, structural_unary
from errprop.testing import check_rule, finite_difference


def _normal(rng, *shapes):
    return [rng.standard_normal(s) for s in shapes]


# ---------------------------------------------------------------- the built-in merges
@pytest.mark.parametrize("op, shapes", [
    (ep.Add(), [(3, 5, 4), (3, 5, 4)]),
    (ep.Add(), [(3, 5, 4), (3, 5, 4), (3, 5, 4)]),
    (ep.Add(), [(2, 6)] * 4),
    (ep.Concat(), [(3, 5, 4), (3, 5, 2)]),
    (ep.Concat(), [(3, 4), (3, 1), (3, 6)]),
    (ep.Concat(axis=-2), [(2, 3, 4), (2, 1, 4)]),
    (ep.Mul(), [(3, 7), (3, 7)]),
    (ep.Mul(), [(2, 5, 4), (2, 5, 4)]),
    (ep.MatMul(), [(3, 4, 5), (3, 5, 2)]),
    (ep.MatMul(), [(2, 3, 4, 5), (2, 3, 5, 4)]),               # (B,H,T,d) @ (B,H,d,T)
    (ep.MatMul(transpose_b=True), [(2, 3, 4, 5), (2, 3, 4, 5)]),  # Q Kᵀ
    (ep.MatMul(transpose_b=True), [(2, 3, 4, 5), (2, 3, 6, 5)]),
    (ep.MatMul(), [(2, 3, 4, 5), (1, 3, 5, 4)]),               # b broadcast over the batch
    (ep.MatMul(), [(2, 1, 4, 5), (2, 3, 5, 4)]),               # a broadcast over heads
], ids=lambda v: repr(v) if isinstance(v, ep.Merge) else None)
def test_builtin_merges_pass(op, shapes, rng):
    check_rule(op, _normal(rng, *shapes))


@pytest.mark.parametrize("op, shape", [
    (Reshape((2, 3)), (3, 4, 6)),
    (Reshape((12,), axes=2), (3, 4, 3, 4)),
    (Reshape((-1, 2)), (2, 8)),
    (Transpose((1, 0, 2)), (2, 5, 3, 4)),
    (Transpose((1, 0)), (3, 4, 5)),
    (Slice(1, 4), (3, 6)),
    (Slice(0, 2, axis=-2), (3, 4, 5)),
    (Scale(-0.7), (3, 5)),
    (Scale(0.125), (2, 3, 4)),
])
def test_shape_ops_pass(op, shape, rng):
    check_rule(op, rng.standard_normal(shape))


def test_merge_finite_difference_moves_the_given_inputs_only(rng):
    # d/dt (a + t da) ⊙ b = da ⊙ b, written out in NumPy
    a, b, da = _normal(rng, (3, 4), (3, 4), (3, 4))
    fd = finite_difference(ep.Mul(), [a, b], [da, None])
    np.testing.assert_allclose(fd, da * b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- bad arguments
def test_merge_needs_a_list_of_inputs(rng):
    x = rng.standard_normal((3, 4))
    with pytest.raises(TypeError, match=r"Mul.*several-input Merge.*list or tuple"):
        check_rule(ep.Mul(), x)
    with pytest.raises(ValueError, match=r"check_rule: Mul .*takes 2 inputs, got 3"):
        check_rule(ep.Mul(), [x, x, x])
    with pytest.raises(ValueError, match=r"Add .*takes at least 2 inputs, got 1"):
        check_rule(ep.Add(), [x])
    with pytest.raises(TypeError, match=r"Scale.*one-input op.*not a list of 2 arrays"):
        check_rule(Scale(2.0), [x, x])


# ---------------------------------------------------------------- broken merges
class _MulDropsTerm(ep.Mul):
    """jvp forgets ``a ⊙ Δb``."""

    def jvp(self, xs, y, dxs, dparams=None):
        return np.zeros_like(y) if dxs[0] is None else dxs[0] * xs[1]


class _MulNoCross(ep.Mul):
    """jvp2 without the cross term ``Δa ⊙ Δb``."""

    def jvp2(self, xs, y, a_s, b_s, dparams=None):
        return self.jvp(xs, y, b_s, {})


class _MatMulNoCross(ep.MatMul):
    """jvp2 without the cross term ``ΔA ΔB``."""

    def jvp2(self, xs, y, a_s, b_s, dparams=None):
        return self.jvp(xs, y, b_s, {})


class _MulAbsTooSmall(ep.Mul):
    """The larger of the two terms instead of their sum: right unless both align."""

    def abs_jvp(self, xs, y, rs, rparams=None):
        (a, b), (ra, rb) = xs, rs
        return np.maximum(ra * np.abs(b), np.abs(a) * rb)


class _MulAbsDropsNoneBox(ep.Mul):
    """Right with two boxes, zero when one of them is None (forgets the other term)."""

    def abs_jvp(self, xs, y, rs, rparams=None):
        if rs[0] is None or rs[1] is None:
            return np.zeros_like(y)
        return super().abs_jvp(xs, y, rs)


class _MulWrongVjp(ep.Mul):
    """The cotangents of the two inputs swapped."""

    def vjp(self, xs, y, g):
        return [g * xs[0], g * xs[1]]


class _MulNormTooSmall(ep.Mul):
    """The mean |b| instead of the largest one as the factor's operator norm."""

    def factor_norm(self, v):
        return np.mean(np.abs(v).reshape(len(v), -1), axis=1)


class _MatMulFixedAxes(ep.MatMul):
    """A product written for exactly (B, H, T, d) inputs: no leading direction axis."""

    def product(self, a, b):
        return np.einsum("bhij,bhjk->bhik", a, b)

    def forward(self, xs, params=None):
        return self.product(*xs)


@pytest.mark.parametrize("op, shapes, match", [
    (_MulDropsTerm(), [(3, 6), (3, 6)], "first-order rule jvp for input 1 disagrees"),
    (_MulNoCross(), [(3, 6), (3, 6)], "second-order rule jvp2 disagrees"),
    (_MatMulNoCross(), [(2, 3, 4, 5), (2, 3, 5, 4)], "second-order rule jvp2 disagrees"),
    (_MulAbsTooSmall(), [(3, 6), (3, 6)], "interval rule abs_jvp does not bound"),
    (_MulAbsDropsNoneBox(), [(3, 6), (3, 6)], r"abs_jvp does not bound.*input 0's box None"),
    (_MulWrongVjp(), [(3, 6), (3, 6)], "vjp is not the transpose of jvp for input 0"),
    (_MulNormTooSmall(), [(3, 6), (3, 6)], "norm rule norm_jvp does not bound"),
    (_MatMulFixedAxes(), [(2, 3, 4, 5), (2, 3, 5, 4)], "leading direction axis.*input 0"),
], ids=lambda v: type(v).__name__.strip("_") if isinstance(v, ep.Merge) else None)
def test_checker_rejects_a_broken_merge(op, shapes, match, rng):
    xs = _normal(rng, *shapes)
    with pytest.raises(AssertionError, match=match) as info:
        check_rule(op, xs)
    assert type(op).__name__ in str(info.value)    # the message names the op
    # the same rule of the unbroken parent passes at the same point
    check_rule(type(op).__mro__[1](**op.config()), xs)


def test_each_broken_rule_can_be_skipped(rng):
    # a check that is switched off does not fail: the option reaches the merge checks
    xs = _normal(rng, (3, 6), (3, 6))
    check_rule(_MulNoCross(), xs, check_jvp2=False)
    check_rule(_MulAbsTooSmall(), xs, check_abs=False)
    check_rule(_MulWrongVjp(), xs, check_vjp=False)
    check_rule(_MulNormTooSmall(), xs, check_norm=False)


def test_a_missing_rule_says_how_to_skip_it(rng):
    class _Gate(ep.Merge):
        def forward(self, xs, params=None):
            return xs[0] * xs[1]

        def jvp(self, xs, y, dxs, dparams=None):
            out = np.zeros_like(y)
            if dxs[0] is not None:
                out = out + dxs[0] * xs[1]
            if dxs[1] is not None:
                out = out + xs[0] * dxs[1]
            return out

    xs = _normal(rng, (3, 6), (3, 6))
    with pytest.raises(AssertionError, match="no vjp rule.*check_vjp=False"):
        check_rule(_Gate(), xs)
    with pytest.raises(AssertionError, match=r"no second-order rule \(jvp2\).*check_jvp2=False"):
        check_rule(_Gate(), xs, check_vjp=False)
    check_rule(_Gate(), xs, check_vjp=False, check_jvp2=False, check_abs=False,
               check_norm=False)


# ---------------------------------------------------------------- registrar-derived rules
@bilinear
class _Outer(ep.Merge):
    """``y[..., i, j] = a[..., i] b[..., j]``, declared by its product and factor norm only."""

    def product(self, a, b):
        return a[..., :, None] * b[..., None, :]

    def factor_norm(self, v):          # ‖Δa ⊗ b‖_F = ‖Δa‖ ‖b‖_F exactly
        return frobenius(v)


class _OuterWithVjp(_Outer):
    def vjp(self, xs, y, g):
        a, b = xs
        return [np.sum(g * b[..., None, :], axis=-1), np.sum(g * a[..., :, None], axis=-2)]


@bilinear
class _OuterMaxNorm(_Outer):
    """The elementwise factor norm for an outer product: too small (‖b‖_F > max|b|)."""

    def factor_norm(self, v):
        return max_abs(v)


@structural
class _SwapConcat(ep.Merge):
    """``[b, a]`` along the last axis; every output is one input's element."""

    norm_combine = "rss"

    def forward(self, xs, params=None):
        return np.concatenate(xs[::-1], axis=-1)

    def jvp(self, xs, y, dxs, dparams=None):
        lead = next((d.shape[:d.ndim - x.ndim] for d, x in zip(dxs, xs) if d is not None), ())
        parts = [np.zeros((*lead, *x.shape)) if d is None else d for x, d in zip(xs, dxs)]
        return np.concatenate(parts[::-1], axis=-1)

    def vjp(self, xs, y, g):
        nb = xs[1].shape[-1]
        return [g[..., nb:], g[..., :nb]]


@structural
class _AddClaimsRss(ep.Add):
    """A sum declared as if each output were one input's element: ``‖Δa + Δb‖`` can
    exceed ``sqrt(‖Δa‖² + ‖Δb‖²)``."""

    norm_combine = "rss"


@structural
class _Sub(ep.Merge):
    """``a − b`` declared structural although its Jacobian has a −1 block."""

    def forward(self, xs, params=None):
        return xs[0] - xs[1]

    def jvp(self, xs, y, dxs, dparams=None):
        out = np.zeros_like(y)
        if dxs[0] is not None:
            out = out + dxs[0]
        if dxs[1] is not None:
            out = out - dxs[1]
        return out

    def vjp(self, xs, y, g):
        return [g, -g]


@structural_unary
class _Negate(ep.Op):
    """``−x`` declared structural: its interval rule is ``−r``."""

    def forward(self, x, params=None):
        return -x

    def jvp(self, x, y, dx, dparams):
        return np.zeros_like(y) if dx is None else -dx

    def vjp(self, x, y, g, params=()):
        return -g, {}


def test_registrar_rules_are_checked(rng):
    xs = _normal(rng, (3, 4), (3, 5))
    # declared only with product + factor_norm (forward, jvp, jvp2, bounds derived)
    assert {"forward", "jvp", "jvp2", "abs_jvp", "norm_jvp"} <= set(vars(_Outer))
    check_rule(_Outer(), xs, check_vjp=False)
    check_rule(_OuterWithVjp(), xs)
    check_rule(_SwapConcat(), _normal(rng, (3, 2, 4), (3, 2, 3)))
    # a wrong declaration gives a wrong derived rule, and the checker catches it
    with pytest.raises(AssertionError, match="_OuterMaxNorm.*norm rule norm_jvp"):
        check_rule(_OuterMaxNorm(), xs, check_vjp=False)
    with pytest.raises(AssertionError, match="_AddClaimsRss.*norm rule norm_jvp"):
        check_rule(_AddClaimsRss(), _normal(rng, (3, 6), (3, 6)))
    check_rule(ep.Add(), _normal(rng, (3, 6), (3, 6)))     # the "sum" declaration passes
    with pytest.raises(AssertionError, match="_Sub.*abs_jvp must return a nonnegative"):
        check_rule(_Sub(), _normal(rng, (3, 6), (3, 6)))
    with pytest.raises(AssertionError, match="_Negate.*abs_jvp must return a nonnegative"):
        check_rule(_Negate(), rng.standard_normal((3, 6)))


def test_builtin_merges_use_the_registrars():
    # Mul's and MatMul's rules are the bilinear registrar's, Add's and Concat's the
    # structural one's: what test_builtin_merges_pass checks is the registrars' output
    for cls, rules in [(ep.Mul, ("jvp", "jvp2", "abs_jvp", "norm_jvp")),
                       (ep.MatMul, ("jvp", "jvp2", "abs_jvp", "norm_jvp")),
                       (ep.Add, ("jvp2", "abs_jvp", "norm_jvp")),
                       (ep.Concat, ("jvp2", "abs_jvp", "norm_jvp"))]:
        for rule in rules:
            owner = vars(cls)[rule].__qualname__
            assert owner.startswith(("bilinear.", "structural.")), (cls, rule, owner)
    for cls in (Reshape, Transpose, Slice):
        assert vars(cls)["abs_jvp"].__qualname__.startswith("structural_unary."), cls


# ---------------------------------------------------------------- errprop.extend
def test_extend_exports_the_merge_api():
    from errprop import _merge, _registrars, extend
    from errprop.extend import Merge, bilinear, structural, structural_unary

    assert Merge is _merge.Merge and bilinear is _registrars.bilinear
    assert structural is _registrars.structural
    assert structural_unary is _registrars.structural_unary
    assert {"Merge", "bilinear", "structural", "structural_unary", "Op"} <= set(extend.__all__)

"""Every op's first-order rule against central finite differences (via errprop.testing).

The checker compares the rule for the input and for every parameter with a
Richardson-extrapolated central difference of the op's own forward, checks
linearity and the leading direction axis the engine relies on, and must
reject wrong rules (last tests).
"""

from collections.abc import Mapping

import numpy as np
import pytest

import errprop as ep
from errprop.testing import check_rule, finite_difference

SHAPES_2D = [(1, 8), (5, 8)]
SHAPES_3D = [(1, 1, 8), (2, 5, 8), (3, 7, 8)]


def _domain(rng, shape, domain):
    x = rng.standard_normal(shape)
    if domain == "wide":
        return 4.0 * x
    if domain == "small":
        return 0.05 * x
    if domain == "offset":
        return x + 3.0
    return x


def _make(kind, rng, d=8):
    W = lambda *s: rng.standard_normal(s) / np.sqrt(s[-1])  # noqa: E731
    if kind.startswith("act:"):
        return ep.Activation(kind[4:])
    return {
        "linear": lambda: ep.Linear(W(5, d), rng.standard_normal(5)),
        "linear_nobias": lambda: ep.Linear(W(3, d)),
        "softmax": lambda: ep.Softmax(),
        "layernorm": lambda: ep.LayerNorm(1 + rng.standard_normal(d), rng.standard_normal(d)),
        "rmsnorm": lambda: ep.RMSNorm(1 + rng.standard_normal(d)),
        "l2normalize": lambda: ep.L2Normalize(),
        "meanpool": lambda: ep.MeanPool(),
        "attention": lambda: ep.Attention(W(d, d), W(d, d), W(d, d), W(d, d),
                                          *rng.standard_normal((4, d)), heads=2),
        "attention_causal": lambda: ep.Attention(W(d, d), W(d, d), W(d, d), W(d, d),
                                                 heads=4, causal=True),
        "attention_narrow": lambda: ep.Attention(W(4, d), W(4, d), W(4, d), W(d, 4),
                                                 *rng.standard_normal((3, 4)),
                                                 rng.standard_normal(d), heads=1),
    }[kind]()


ACTS = [f"act:{k}" for k in ep.ACTIVATIONS]
POINTWISE = ["linear", "linear_nobias", "softmax", "layernorm", "rmsnorm", "l2normalize",
             *ACTS]
ATTENTION = ["attention", "attention_causal", "attention_narrow", "meanpool"]


@pytest.mark.parametrize("domain", ["normal", "wide", "small", "offset"])
@pytest.mark.parametrize("shape", SHAPES_2D + SHAPES_3D)
@pytest.mark.parametrize("kind", POINTWISE)
def test_rule_matches_finite_differences(kind, shape, domain, rng):
    op = _make(kind, rng)
    x = _domain(rng, shape, domain)
    if kind == "act:relu":
        # keep away from the kink by more than the finite-difference step
        x = np.where(np.abs(x) < 0.05, 0.05 + np.abs(x), x)
    check_rule(op, x)


@pytest.mark.parametrize("domain", ["normal", "wide", "small"])
@pytest.mark.parametrize("shape", SHAPES_3D)
@pytest.mark.parametrize("kind", ATTENTION)
def test_attention_rule_matches_finite_differences(kind, shape, domain, rng):
    check_rule(_make(kind, rng), _domain(rng, shape, domain))


def _padding(rng, batch, tokens):
    """A random padding mask with at least one real token per row, real tokens first."""
    lengths = rng.integers(1, tokens + 1, batch)
    return np.arange(tokens)[None, :] < lengths[:, None]


@pytest.mark.parametrize("shape", [(2, 5, 8), (3, 7, 8)])
@pytest.mark.parametrize("kind", ["attention", "attention_causal", "meanpool"])
def test_masked_rules_match_finite_differences(kind, shape, rng):
    op = _make(kind, rng).with_mask(_padding(rng, *shape[:2]))
    check_rule(op, rng.standard_normal(shape))


@pytest.mark.parametrize("tables", [("word",), ("word", "position", "token_type")])
def test_embedding_rule_matches_finite_differences(tables, rng):
    sizes = {"word": 40, "position": 9, "token_type": 2}
    op = ep.Embedding(**{k: rng.standard_normal((sizes[k], 6)) for k in tables})
    # the ids are an index: only the tables carry tangents; no exact statistics for them
    check_rule(op, rng.integers(0, 40, (3, 7)).astype(float), check_vjp=False)


def test_layernorm_near_constant_input(rng):
    # tiny variance: the gain 1/sqrt(var + eps) is large but the rule stays exact
    op = ep.LayerNorm(np.ones(8), np.zeros(8), eps=1e-5)
    x = 1.0 + 1e-3 * rng.standard_normal((4, 8))
    check_rule(op, x, h=1e-5)


def test_relu_convention_at_zero():
    # documented convention: f'(0) = 0, as PyTorch's autograd
    op = ep.Activation("relu")
    x = np.array([[0.0, -1.0, 2.0]])
    dy = op.jvp(x, op.forward(x), np.ones_like(x), {})
    np.testing.assert_array_equal(dy, [[0.0, 0.0, 1.0]])


# ----------------------------------------------------------------- the checker itself
class _WrongTanh(ep.Op):
    """tanh whose rule forgets to square y: f' = 1 - y instead of 1 - y²."""

    prefix = "wrongtanh"

    def forward(self, x, params: Mapping | None = None):
        return np.tanh(x)

    def jvp(self, x, y, dx, dparams):
        return (1.0 - y) * dx


class _ScaleNoParamRule(ep.Op):
    """y = a ⊙ x with a parameter whose tangent the rule ignores."""

    prefix = "scale"

    def __init__(self, a):
        super().__init__()
        self.params["a"] = np.asarray(a, dtype=float)
        self.param_kinds["a"] = "norm"

    def forward(self, x, params: Mapping | None = None):
        return self._p(params, "a") * x

    def jvp(self, x, y, dx, dparams):
        return np.zeros_like(y) if dx is None else self.params["a"] * dx


class _LayerNormNoMeanTerm(ep.Op):
    """LayerNorm rule missing the x̂·mean(x̂·Δx) term: subtly wrong."""

    prefix = "badln"

    def forward(self, x, params: Mapping | None = None):
        xc = x - x.mean(-1, keepdims=True)
        return xc / np.sqrt((xc * xc).mean(-1, keepdims=True) + 1e-5)

    def jvp(self, x, y, dx, dparams):
        xc = x - x.mean(-1, keepdims=True)
        sigma = np.sqrt((xc * xc).mean(-1, keepdims=True) + 1e-5)
        return (dx - dx.mean(-1, keepdims=True)) / sigma


class _NoDirectionAxis(ep.Op):
    """Right derivative, but breaks on a stacked (K, *x.shape) tangent."""

    prefix = "flat"

    def forward(self, x, params: Mapping | None = None):
        return np.sin(x)

    def jvp(self, x, y, dx, dparams):
        return np.cos(x) * dx.reshape(x.shape) if dx.shape == x.shape else np.cos(x) * dx[0]


@pytest.mark.parametrize("op, match", [
    (_WrongTanh(), "input"),
    (_ScaleNoParamRule(np.arange(1.0, 9.0)), "parameter 'a'"),
    (_LayerNormNoMeanTerm(), "input"),
    (_NoDirectionAxis(), "direction axis"),
])
def test_checker_rejects_wrong_rules(op, match, rng):
    with pytest.raises(AssertionError, match=match):
        check_rule(op, rng.standard_normal((3, 8)), check_vjp=False)


class _LinearWrongTranspose(ep.Op):
    """Right forward rule; the reverse rule multiplies by W instead of Wᵀ (square W)."""

    def __init__(self, W):
        super().__init__()
        self.params["W"] = W
        self.param_kinds["W"] = "weight"

    def forward(self, x, params=None):
        return x @ self._p(params, "W").T

    def jvp(self, x, y, dx, dparams):
        dy = np.zeros_like(y) if dx is None else dx @ self.params["W"].T
        return dy + x @ dparams["W"].T if "W" in dparams else dy

    def vjp(self, x, y, g, params=()):
        gp = {"W": np.einsum("kna,nb->knab", g, x)} if "W" in params else {}
        return g @ self.params["W"].T, gp


class _LinearBatchSummedParam(_LinearWrongTranspose):
    """Right transpose, but the parameter cotangent is summed over the batch."""

    def vjp(self, x, y, g, params=()):
        total = np.einsum("kna,nb->kab", g, x)
        gp = {"W": np.broadcast_to(total[:, None], (*g.shape[:2], *total.shape[1:]))}
        return g @ self.params["W"], gp


@pytest.mark.parametrize("cls, match", [
    (_LinearWrongTranspose, "not the transpose of jvp for the input"),
    (_LinearBatchSummedParam, "not the transpose of jvp for parameter 'W'"),
])
def test_checker_rejects_wrong_reverse_rules(cls, match, rng):
    op = cls(rng.standard_normal((6, 6)))
    with pytest.raises(AssertionError, match=match):
        check_rule(op, rng.standard_normal((3, 6)))


def test_checker_asks_for_a_missing_reverse_rule(rng):
    with pytest.raises(AssertionError, match="no vjp rule.*check_vjp=False"):
        check_rule(_ScaleNoParamRule(np.ones(8)), rng.standard_normal((3, 8)), check_abs=False,
                   check_norm=False)


def test_finite_difference_is_accurate(rng):
    # d/dt sin(x + t d) at t=0 is cos(x) d: independent of errprop's ops
    class _Sin(ep.Op):
        def forward(self, x, params=None):
            return np.sin(x)

        def jvp(self, x, y, dx, dparams):
            return np.cos(x) * dx

    x, d = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    fd = finite_difference(_Sin(), x, d)
    np.testing.assert_allclose(fd, np.cos(x) * d, rtol=1e-10, atol=1e-12)


class _TanhNoHalf(ep.Op):
    """Right first-order rule, second-order rule missing the ½ of ½ f''(x) a²."""

    def forward(self, x, params=None):
        return np.tanh(x)

    def jvp(self, x, y, dx, dparams):
        return (1 - y * y) * dx

    def vjp(self, x, y, g, params=()):
        return (1 - y * y) * g, {}

    def jvp2(self, x, y, a, b, dparams):
        return (1 - y * y) * b - 2 * y * (1 - y * y) * a * a


def test_checker_rejects_a_wrong_second_order_rule(rng):
    with pytest.raises(AssertionError, match="second-order rule jvp2"):
        check_rule(_TanhNoHalf(), rng.standard_normal((3, 8)))


def test_default_second_order_rule_is_checked_too(rng):
    # an op that does not override jvp2 gets the numerical default, which must pass
    class _Cube(ep.Op):
        def forward(self, x, params=None):
            return x ** 3

        def jvp(self, x, y, dx, dparams):
            return 3 * x * x * dx

        def vjp(self, x, y, g, params=()):
            return 3 * x * x * g, {}

    x, a = rng.standard_normal((2, 5)), rng.standard_normal((2, 5))
    check_rule(_Cube(), x, check_abs=False, check_norm=False)
    # closed form: ½ f''(x) a² = 3 x a²
    np.testing.assert_allclose(_Cube().jvp2(x, x ** 3, a, None, {}), 3 * x * a * a, rtol=1e-7)


class _TanhAbsTooSmall(_TanhNoHalf):
    """Right rules except an interval rule that forgets the absolute value of f'."""

    def jvp2(self, x, y, a, b, dparams):
        return (1 - y * y) * b - y * (1 - y * y) * a * a

    def abs_jvp(self, x, y, r, rparams):
        return 0.5 * (1 - y * y) * r


def test_checker_rejects_a_wrong_interval_rule(rng):
    with pytest.raises(AssertionError, match="interval rule abs_jvp does not bound"):
        check_rule(_TanhAbsTooSmall(), rng.standard_normal((3, 8)))


class _TanhNormTooSmall(_TanhAbsTooSmall):
    """Right interval rule, norm rule that uses the smallest slope instead of the largest."""

    def abs_jvp(self, x, y, r, rparams):
        return (1 - y * y) * r

    def norm_jvp(self, x, y, r, rparams):
        return np.min((1 - y * y).reshape(len(x), -1), axis=1) * r


def test_checker_rejects_a_wrong_norm_rule(rng):
    with pytest.raises(AssertionError, match="norm rule norm_jvp does not bound"):
        check_rule(_TanhNormTooSmall(), rng.standard_normal((3, 8)))

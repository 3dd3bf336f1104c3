"""Every numeric first-order rule equals the sympy derivative of its symbolic forward."""

from collections.abc import Mapping

import numpy as np
import pytest
import sympy as sp

import errprop as ep
import errprop.symbolic as es
from errprop._op import Op


@pytest.fixture(scope="module")
def report():
    return es.verify_rules(seed=0)


def test_every_builtin_op_and_tangent_matches_sympy(report):
    ops = {row.op.split(" ")[0] for row in report}
    assert ops >= {"Linear", "Activation", "Softmax", "LayerNorm", "RMSNorm", "L2Normalize",
                   "MeanPool", "Embedding", "Attention"}
    kinds = {row.op.split(" ")[1] for row in report if row.op.startswith("Activation")}
    assert kinds == set(ep.ACTIVATIONS)
    attention = {row.tangent for row in report if row.op.startswith("Attention")}
    assert attention == {"input", *(f"param {k!r}" for k in
                                    ("Wq", "Wk", "Wv", "Wo", "bq", "bk", "bv", "bo"))}
    assert {row.tangent for row in report if row.op.startswith("LayerNorm")} == {
        "input", "param 'gamma'", "param 'beta'"}
    assert report.max_error < 1e-9
    assert "Attention" in report.table()


class _Square(Op):
    """``y = a ⊙ x²`` with a deliberately configurable (possibly wrong) rule."""

    def __init__(self, a, wrong: str | None = None):
        super().__init__()
        self.params["a"] = np.asarray(a, float)
        self.param_kinds["a"] = "weight"
        self.wrong = wrong

    def forward(self, x, params=None):
        return self._p(params, "a") * x * x

    def jvp(self, x, y, dx, dparams):
        a = self.params["a"]
        out = np.zeros_like(y)
        if dx is not None:
            out = out + (a * x if self.wrong == "input" else 2.0 * a * x) * dx
        if "a" in dparams:
            out = out + dparams["a"] * (x if self.wrong == "param" else x * x)
        return out


def _square_forward(tape, x, p: Mapping):
    return p["a"] * x * x


@pytest.mark.parametrize("wrong, tangent", [("input", "input"), ("param", "param 'a'")])
def test_a_wrong_rule_is_caught_and_named(wrong, tangent):
    rng = np.random.default_rng(1)
    case = es.SymbolicOp(_Square(rng.standard_normal(3), wrong=wrong), rng.standard_normal((2, 3)),
                         _square_forward, label="Square")
    with pytest.raises(AssertionError, match=f"Square.*{tangent}"):
        es.verify_rules([case])


def test_a_correct_user_op_passes():
    rng = np.random.default_rng(2)
    case = es.SymbolicOp(_Square(rng.standard_normal(3)), rng.standard_normal((2, 3)),
                         _square_forward, label="Square")
    rows = es.verify_rules([case]).rows
    assert [r.tangent for r in rows] == ["input", "param 'a'"]
    assert all(r.vjp_error is None for r in rows)  # the op has no transposed rule


def test_a_wrong_symbolic_forward_is_reported_as_such():
    rng = np.random.default_rng(3)
    case = es.SymbolicOp(_Square(rng.standard_normal(3)), rng.standard_normal((2, 3)),
                         lambda tape, x, p: p["a"] * x, label="Square")
    with pytest.raises(AssertionError, match="symbolic forward disagrees"):
        es.verify_rules([case])


def test_bare_builtin_ops_get_an_input_drawn():
    rng = np.random.default_rng(4)
    ops = [ep.LayerNorm(1 + rng.standard_normal(4) / 3, rng.standard_normal(4)),
           ep.Attention(*(rng.standard_normal((4, 4)) / 2 for _ in range(4)), heads=2)]
    report = es.verify_rules(ops, seed=1, points=1)
    assert len(report) == 3 + 5
    assert report.max_error < 1e-9


def test_symbolic_softmax_jacobian_is_the_rule_exactly():
    # the derivation itself, for n = 3: sympy's Jacobian equals diag(y) − y yᵀ symbolically
    x = sp.Matrix(sp.symbols("x0:3", real=True))
    y = x.applyfunc(sp.exp) / sum(x.applyfunc(sp.exp))
    J = y.jacobian(x)
    assert sp.simplify(J - (sp.diag(*y) - y * y.T)) == sp.zeros(3, 3)

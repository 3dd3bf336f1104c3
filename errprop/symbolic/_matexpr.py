"""Matrix expressions the error recursion needs beyond sympy's: an opaque linear map
applied to an argument, the second-order term of an opaque op, and ``½ A``."""

from __future__ import annotations

from sympy import Basic, MatrixSymbol
from sympy.matrices.expressions import MatrixExpr


class Apply(MatrixExpr):
    """An opaque linear map applied to an argument: ``J[v]`` (a column vector)."""

    def __new__(cls, J: MatrixSymbol, arg: MatrixExpr) -> Apply:
        return Basic.__new__(cls, J, arg)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.args[0].shape[0], 1)

    def _latex(self, printer) -> str:
        return rf"{printer._print(self.args[0])}\left[{printer._print(self.args[1])}\right]"


class Curvature(MatrixExpr):
    """``½ D²f_l[(a, Δθ…), (a, Δθ…)]``: the second-order Taylor term of an opaque op."""

    def __new__(cls, D: MatrixSymbol, *args: MatrixExpr) -> Curvature:
        return Basic.__new__(cls, D, *args)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.args[0].shape[0], 1)

    def _latex(self, printer) -> str:
        inner = ", ".join(printer._print(a) for a in self.args[1:])
        return (rf"\tfrac{{1}}{{2}}\,{printer._print(self.args[0])}\left[({inner})^{{\otimes 2}}"
                r"\right]")


class Half(MatrixExpr):
    """``½ A`` printed as ``\tfrac{1}{2} A``."""

    def __new__(cls, arg: MatrixExpr) -> Half:
        return Basic.__new__(cls, arg)

    @property
    def shape(self) -> tuple[int, int]:
        return self.args[0].shape

    def _latex(self, printer) -> str:
        return rf"\tfrac{{1}}{{2}}\, {printer._print(self.args[0])}"

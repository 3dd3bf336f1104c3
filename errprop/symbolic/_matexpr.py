"""Matrix expressions the error recursion needs beyond sympy's: an opaque linear map
applied to an argument, the second-order term of an opaque op, ``½ A``, stacked column
vectors (a concatenation) and a range of entries (a slice)."""

from __future__ import annotations

from sympy import Basic, Integer, MatrixSymbol
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


class Stack(MatrixExpr):
    """Column vectors stacked on top of each other, ``[a; b; ...]`` (a concatenation of
    features)."""

    def __new__(cls, *args: MatrixExpr) -> Stack:
        return Basic.__new__(cls, *args)

    @property
    def shape(self) -> tuple:
        return (sum(a.shape[0] for a in self.args), 1)

    def _latex(self, printer) -> str:
        rows = r" \\ ".join(printer._print(a) for a in self.args)
        return rf"\begin{{bmatrix}} {rows} \end{{bmatrix}}"


class Rows(MatrixExpr):
    """Entries ``start .. stop - 1`` of a column vector, printed ``(v)_{start:stop}``."""

    def __new__(cls, arg: MatrixExpr, start: int, stop: int) -> Rows:
        return Basic.__new__(cls, arg, Integer(start), Integer(stop))

    @property
    def shape(self) -> tuple:
        return (self.args[2] - self.args[1], 1)

    def _latex(self, printer) -> str:
        arg, start, stop = self.args
        return rf"\left({printer._print(arg)}\right)_{{{start}:{stop}}}"

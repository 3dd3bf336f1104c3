"""How fast first order converges to the exact error as the bit width grows."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ._analysis import analyze
from ._config import QuantConfig
from ._graph import Sequential
from ._quant import Uniform


@dataclass(frozen=True)
class ConvergenceRow:
    """One bit width: the relative residual of the error vector and of its RMS."""

    bits: int
    residual: float  # ‖exact − first_order‖ / ‖exact‖
    rms_residual: float  # |rms(first_order) − rms(exact)| / rms(exact)
    sqnr_db: float


@dataclass(frozen=True)
class Convergence:
    """Result of :func:`convergence`.

    ``factor_per_bit`` is the fitted factor by which the relative residual
    shrinks per extra bit (least squares on ``log2(residual)`` versus bits):
    about 2 when the network is smooth (residual O(step)), about √2 ≈ 1.4 through
    ReLU kinks (O(√step): units within one error of zero flip).
    """

    rows: tuple[ConvergenceRow, ...]

    @property
    def factor_per_bit(self) -> float:
        bits = np.array([r.bits for r in self.rows], dtype=float)
        res = np.array([r.residual for r in self.rows])
        if len(self.rows) < 2 or not np.all(res > 0):
            raise ValueError("factor_per_bit needs at least two bit widths with a nonzero "
                             "residual")
        return float(2.0 ** -np.polyfit(bits, np.log2(res), 1)[0])

    def markdown(self) -> str:
        lines = ["| bits | ‖exact − first order‖ / ‖exact‖ | RMS mismatch | output SQNR (dB) |",
                 "|---:|---:|---:|---:|"]
        lines += [f"| {r.bits} | {r.residual:.3g} | {r.rms_residual:.2g} | {r.sqnr_db:.1f} |"
                  for r in self.rows]
        return "\n".join(lines)


def convergence(net: Sequential, x: object, bits: Iterable[int] = range(6, 13), *,
                config: Callable[[int], QuantConfig] | None = None,
                seed: int = 0) -> Convergence:
    """Relative first-order residual versus bit width.

    Parameters
    ----------
    net, x : the network and the batch to analyse.
    bits : the bit widths.
    config : ``bits -> QuantConfig``; default weight-only, per-tensor
        ``Uniform(bits)``. Use deterministic sources (weights, biases, norms)
        to measure convergence: activation rounding is noise and does not
        converge pointwise.
    seed : passed to :func:`analyze`.
    """
    make = config or (lambda b: QuantConfig(weights=Uniform(b)))
    rows = []
    for b in bits:
        report = analyze(net, x, make(int(b)), seed=seed)
        rms_e = float(np.sqrt(np.mean(report.exact ** 2)))
        rms_f = float(np.sqrt(np.mean(report.first_order ** 2)))
        rows.append(ConvergenceRow(int(b), report.residual,
                                   abs(rms_f - rms_e) / rms_e if rms_e else 0.0,
                                   report.sqnr_db))
    return Convergence(tuple(rows))

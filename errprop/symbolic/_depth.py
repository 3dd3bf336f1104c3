"""Depth scaling: do per-layer errors add independently (variance ∝ L) or coherently (∝ L²)?

With per-layer first-order output contributions ``c_1 … c_L`` (they sum to the
first-order error), ``‖Σ c_l‖² = Σ‖c_l‖² (1 + (L − 1) ρ̄)`` where ``ρ̄`` is the
energy-weighted mean pairwise correlation ``Σ_{l≠m} <c_l, c_m> / ((L − 1) Σ‖c_l‖²)``.
Independent errors have ``ρ̄ ≈ 0`` and the error energy grows like ``L``; errors that
point the same way (identical layers, a shared bias, floor rounding) have ``ρ̄ ≈ 1`` and
it grows like ``L²``. If each layer adds the same energy ``u``, the total is
``L u (1 + (L − 1) ρ̄)``, whose local log-log slope is the predicted exponent

    α = 1 + L ρ̄ / (1 + (L − 1) ρ̄)        (1: independent, 2: coherent)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._report import Report


@dataclass(frozen=True)
class Accumulation:
    """How the per-layer contributions of a report add up at the output.

    Attributes
    ----------
    terms : number of groups (layers) with a nonzero contribution, ``L``.
    coherence : ``‖Σ c‖² / Σ ‖c‖²`` (1 independent, ``L`` perfectly coherent).
    correlation : ``ρ̄ = (coherence − 1) / (L − 1)``.
    exponent : predicted local exponent ``α`` of error energy versus depth.
    regime : ``"independent"`` (α < 1.25), ``"coherent"`` (α > 1.75) or ``"mixed"``.
    groups : group name -> its contribution's energy ``‖c_l‖²``.
    """

    terms: int
    coherence: float
    correlation: float
    exponent: float
    regime: str
    groups: dict[str, float]

    def __str__(self) -> str:
        return (f"{self.terms} layers: ‖Σc‖²/Σ‖c‖² = {self.coherence:.3g}, mean correlation "
                f"{self.correlation:.3f}, predicted exponent {self.exponent:.2f} ({self.regime})")


def _group(source: str, by: str) -> str:
    if by == "source" or source == "input":
        return source
    layer = source.rsplit(".", 1)[0]
    if by == "layer":
        return layer
    if by == "block":
        return layer.split(".", 1)[0]
    raise ValueError(f"by must be 'layer', 'block' or 'source', got {by!r}")


def accumulation(report: Report, by: str = "layer") -> Accumulation:
    """Predict the depth-scaling regime from a report's per-layer first-order contributions.

    Parameters
    ----------
    report : from :func:`errprop.analyze`.
    by : group sources per ``"layer"`` (``fc1.W`` and ``fc1.b`` together), per ``"block"``
        (first component of the name, ``block0``) or per ``"source"``.
    """
    groups: dict[str, np.ndarray] = {}
    for name, c in report.contributions.items():
        key = _group(name, by)
        groups[key] = groups[key] + c if key in groups else np.array(c, dtype=float)
    energy = {k: float(np.sum(v * v)) for k, v in groups.items()}
    live = [k for k, e in energy.items() if e > 0]
    L = len(live)
    if L < 2:
        raise ValueError(f"accumulation needs at least two {by}s with a nonzero contribution, "
                         f"got {L}")
    total = sum(groups[k] for k in live)
    parts = sum(energy[k] for k in live)
    coherence = float(np.sum(total * total)) / parts
    rho = (coherence - 1.0) / (L - 1)
    alpha = 1.0 + L * rho / max(1.0 + (L - 1) * rho, 1e-12)
    regime = "independent" if alpha < 1.25 else "coherent" if alpha > 1.75 else "mixed"
    return Accumulation(L, coherence, rho, alpha, regime, energy)


def depth_exponent(depth: np.ndarray, energy: np.ndarray) -> float:
    """Least-squares slope of ``log energy`` versus ``log depth``."""
    return float(np.polyfit(np.log(depth), np.log(energy), 1)[0])

"""Exact, first order, second order, analytic statistics and Monte Carlo, side by side.

Every row is one node. Where the analytic MSE (first order, under the noise
model) falls outside the Monte Carlo 99% interval widened by the analytic
estimate's own error bar, the row is flagged: that is where first-order theory
breaks down (low bits, saturated softmax, clipping, ReLU kinks). The notes
column says which diagnostic fired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ._report import Report

#: a node is noted when a diagnostic exceeds these fractions
_THRESHOLDS = {"near_kink": 0.01, "saturated": 0.1, "flat_norm": 0.0}
_SECOND_ORDER_NOTE = 0.1  # ‖second-order term‖ / ‖first-order term‖


@dataclass(frozen=True)
class ComparisonRow:
    """One node. RMS values are square roots of mean squares over the node's elements."""

    name: str
    kind: str
    rms_exact: float
    rms_first_order: float
    rms_second_order: float
    second_order_ratio: float  # ‖b‖ / ‖a‖: the size of the neglected terms
    rms_analytic: float  # sqrt of the first-order MSE under the noise model
    rms_analytic_se: float  # its standard error (0 where exact: at the output)
    worst_case: float  # max over elements: exact first-order worst case at the output,
    #                    the interval bound elsewhere
    rms_mc: float | None
    rms_mc_ci: tuple[float, float] | None
    disagrees: bool  # analytic outside Monte Carlo's interval
    notes: tuple[str, ...]


@dataclass(frozen=True)
class Comparison:
    """Rows of :func:`compare`, in execution order; ``.table()`` renders them."""

    rows: tuple[ComparisonRow, ...]
    probes: int
    mc_samples: int | None

    @property
    def flagged(self) -> list[str]:
        """Names of the nodes where analytic and Monte Carlo disagree."""
        return [r.name for r in self.rows if r.disagrees]

    def table(self) -> str:
        head = ["node", "kind", "rms exact", "1st order", "2nd order", "analytic ±se",
                "max worst"]
        if self.mc_samples is not None:
            head += ["Monte Carlo [99% CI]", "!"]
        head += ["notes"]
        body = []
        for r in self.rows:
            se = f" ±{r.rms_analytic_se:.1e}" if r.rms_analytic_se else " (exact)"
            row = [r.name, r.kind, f"{r.rms_exact:.3e}", f"{r.rms_first_order:.3e}",
                   f"{r.rms_second_order:.3e}", f"{r.rms_analytic:.3e}{se}",
                   f"{r.worst_case:.2e}"]
            if self.mc_samples is not None:
                lo, hi = r.rms_mc_ci or (float("nan"), float("nan"))
                row += [f"{r.rms_mc:.3e} [{lo:.2e}, {hi:.2e}]", "!" if r.disagrees else ""]
            row += ["; ".join(r.notes)]
            body.append(row)
        widths = [max(len(str(row[i])) for row in (head, *body)) for i in range(len(head))]
        text = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
                for row in (head, *body)]
        text.insert(1, "  ".join("-" * w for w in widths))
        legend = [f"analytic: first-order RMS under the noise model (random probes, "
                  f"P={self.probes}; exact at the output); max worst: largest first-order "
                  f"worst case (exact at the output, interval bound elsewhere)"]
        if self.mc_samples is not None:
            legend.append(f"Monte Carlo: {self.mc_samples} samples; '!' marks analytic outside "
                          f"the Monte Carlo interval: first order has broken down there")
        return "\n".join(text + legend)

    def __str__(self) -> str:
        return self.table()


def _rms(a: Any) -> float:
    return float(np.sqrt(np.mean(np.square(a))))


def compare(report: Report, mc: Any = None, *, probes: int = 64, seed: int = 0) -> Comparison:
    """Put every prediction of ``report`` (and a Monte Carlo result) side by side per node."""
    names = list(report.nodes)
    stats = report.node_statistics(probes=probes, seed=seed)
    second = report.second_order_nodes
    output = names[-1]
    rows = []
    for name in names:
        node = report.nodes[name]
        s2 = second[name]
        b = s2 - node.first_order
        ratio = float(np.linalg.norm(b) / np.linalg.norm(node.first_order)) \
            if np.any(node.first_order) else 0.0
        if name == output:
            mse, se, worst = report.mse, 0.0, float(np.max(report.worst_case))
        else:
            mse, se = stats[name].mse, stats[name].mse_se
            worst = float(np.max(report.interval_nodes[name]))
        rms = float(np.sqrt(mse))
        rms_se = se / (2 * rms) if rms > 0 else 0.0
        notes = [f"{key.replace('_', ' ')} {value:.0%}" for key, value in node.diagnostics.items()
                 if value > _THRESHOLDS.get(key, 0.0)]
        if ratio > _SECOND_ORDER_NOTE:
            notes.append(f"2nd-order terms {ratio:.0%} of 1st")
        rms_mc = ci = None
        disagrees = False
        if mc is not None:
            m = mc.nodes[name]
            rms_mc = float(np.sqrt(m.mse))
            lo, hi = m.mse_ci
            ci = (float(np.sqrt(max(lo, 0.0))), float(np.sqrt(hi)))
            disagrees = not (lo - 3 * se <= mse <= hi + 3 * se)
        rows.append(ComparisonRow(name, node.kind, node.rms_exact, node.rms_first_order,
                                  _rms(s2), ratio, rms, rms_se, worst, rms_mc, ci, disagrees,
                                  tuple(notes)))
    return Comparison(tuple(rows), probes, None if mc is None else int(mc.samples))

"""Exact, first order, second order, analytic statistics and Monte Carlo, side by side.

Every row is one node. Two questions decide its mark: is the analytic MSE (first
order, under the noise model) outside the Monte Carlo 99% interval widened by three
standard errors of the analytic estimate (a statistically significant difference),
and is the analytic MSE more than ``tolerance`` (default 10%) away from Monte
Carlo's (a difference that matters)? Both: ``!``, first order has broken down there
(low bits, saturated softmax, clipping, ReLU kinks). Only the first: ``~``, a
significant but small difference: first order holds to within ``tolerance``. With
enough samples any second-order effect becomes significant, so significance alone
is not a breakdown. The notes column says which diagnostic fired.

A Monte Carlo result is compared only with a report of the same network, input and
config (see :class:`errprop._mc_record.Sampled`); anything else is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._checks import check_int, check_real, check_seed
from ._montecarlo import MonteCarloResult
from ._rigorous import RigorousBoundUnavailable

if TYPE_CHECKING:
    from ._report import Report

#: a node is noted when a diagnostic exceeds these fractions
_THRESHOLDS = {"near_kink": 0.01, "saturated": 0.1, "flat_norm": 0.0}
_SECOND_ORDER_NOTE = 0.1  # ‖second-order term‖ / ‖first-order term‖
#: default effect size: a significant difference is a breakdown above this relative MSE gap
TOLERANCE = 0.1


def agreement(mse: float, se: float, mc_lo: float, mc_hi: float, mc_mse: float,
              tolerance: float = TOLERANCE) -> tuple[bool, float, bool]:
    """How an analytic MSE (standard error ``se``) agrees with a Monte Carlo MSE
    ``mc_mse`` whose 99% interval is ``[mc_lo, mc_hi]``.

    Returns ``(outside, relative, breakdown)``: ``outside`` when ``mse`` is outside
    ``[mc_lo - 3·se, mc_hi + 3·se]``; ``relative = (mse − mc_mse) / mc_mse``, signed (0
    when both are 0, inf when only Monte Carlo's is); ``breakdown = outside and
    |relative| > tolerance``. The tolerance is on the MSE, the quantity both predict
    (an RMS is off by about half as much).
    """
    outside = not (mc_lo - 3 * se <= mse <= mc_hi + 3 * se)
    if mc_mse > 0:
        relative = (mse - mc_mse) / mc_mse
    else:
        relative = 0.0 if mse == 0 else float("inf")
    return outside, relative, outside and abs(relative) > tolerance


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
    disagrees: bool  # first order has broken down: outside the interval and > tolerance
    notes: tuple[str, ...]
    relative_difference: float | None = None  # (analytic MSE − MC MSE) / MC MSE
    outside_interval: bool = False  # statistically significant, whatever its size


@dataclass(frozen=True)
class Comparison:
    """Rows of :func:`compare`, in execution order; ``.table()`` renders them."""

    rows: tuple[ComparisonRow, ...]
    probes: int
    mc_samples: int | None
    tolerance: float = TOLERANCE

    @property
    def flagged(self) -> list[str]:
        """Names of the nodes where first order has broken down (``!``): analytic outside
        Monte Carlo's interval and more than ``tolerance`` away from it."""
        return [r.name for r in self.rows if r.disagrees]

    @property
    def significant(self) -> list[str]:
        """Names of the nodes with a significant difference within ``tolerance`` (``~``)."""
        return [r.name for r in self.rows if r.outside_interval and not r.disagrees]

    def table(self) -> str:
        head = ["node", "kind", "rms exact", "1st order", "2nd order", "analytic ±se",
                "max worst (1st order)"]
        if self.mc_samples is not None:
            head += ["Monte Carlo [99% CI]", "MSE vs MC", "!"]
        head += ["notes"]
        body = []
        for r in self.rows:
            se = f" ±{r.rms_analytic_se:.1e}" if r.rms_analytic_se else " (exact)"
            row = [r.name, r.kind, f"{r.rms_exact:.3e}", f"{r.rms_first_order:.3e}",
                   f"{r.rms_second_order:.3e}", f"{r.rms_analytic:.3e}{se}",
                   f"{r.worst_case:.2e}"]
            if self.mc_samples is not None:
                lo, hi = r.rms_mc_ci or (float("nan"), float("nan"))
                rel = r.relative_difference
                row += ([f"{r.rms_mc:.3e} [{lo:.2e}, {hi:.2e}]", _signed(r), _mark(r)]
                        if rel is not None else ["(not recorded)", "", ""])
            row += ["; ".join(r.notes)]
            body.append(row)
        widths = [max(len(str(row[i])) for row in (head, *body)) for i in range(len(head))]
        text = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
                for row in (head, *body)]
        text.insert(1, "  ".join("-" * w for w in widths))
        legend = [f"analytic: first-order RMS under the noise model (random probes, "
                  f"P={self.probes}; exact at the output); max worst: largest first-order "
                  f"worst case (exact at the output, interval bound elsewhere; a guaranteed "
                  f"bound is Report.rigorous_worst_case)"]
        if self.mc_samples is not None:
            tol = f"{self.tolerance:.0%}"
            legend.append(f"Monte Carlo: {self.mc_samples} samples; MSE vs MC: (analytic − Monte "
                          f"Carlo) / Monte Carlo MSE; '!': outside the Monte Carlo interval and "
                          f"more than {tol} off: first order has broken down there; '~': "
                          f"outside the interval but within {tol}: a significant, small "
                          f"difference (first order holds to {tol} in MSE)")
        return "\n".join(text + legend)

    def __str__(self) -> str:
        return self.table()


def _mark(r: ComparisonRow) -> str:
    return "!" if r.disagrees else "~" if r.outside_interval else ""


def _signed(r: ComparisonRow) -> str:
    rel = r.relative_difference
    return "inf" if rel == float("inf") else f"{rel:+.1%}"


def _rms(a: Any) -> float:
    return float(np.sqrt(np.mean(np.square(a))))


def check_same_setup(report: Report, mc: MonteCarloResult, what: str = "compare") -> None:
    """Refuse a Monte Carlo result of another config, network or input than ``report``'s,
    with a message that says what differs."""
    if not isinstance(mc, MonteCarloResult):
        raise TypeError(f"{what}: mc must be an errprop MonteCarloResult (from monte_carlo) or "
                        f"None, got {type(mc).__name__}")
    nodes = {name: (node.kind, node.value) for name, node in report.nodes.items()}
    params = {name: src.value for name, src in report.sources.items()
              if src.source.param is not None}
    diffs = mc.sampled.differences(report.config, nodes, params)
    if diffs:
        raise ValueError(f"{what}: the Monte Carlo result was not sampled from the report's "
                         f"setup; {'; '.join(diffs)}. Run monte_carlo(net, x, report.config) "
                         f"on the net and x given to analyze")


def compare(report: Report, mc: MonteCarloResult | None = None, *, probes: int = 64,
            seed: int = 0, tolerance: float = TOLERANCE) -> Comparison:
    """Put every prediction of ``report`` (and a Monte Carlo result) side by side per node.

    ``mc`` must come from ``monte_carlo`` on the report's network, input and config
    (a ValueError says what differs). A node is flagged (``!``, "first order has
    broken down") when the analytic MSE is outside Monte Carlo's 99% interval
    (widened by 3 standard errors of the analytic estimate) *and* the analytic MSE is
    more than ``tolerance`` (relative, default 0.1) from Monte Carlo's; outside the
    interval but within ``tolerance`` it is marked ``~``. Nodes Monte Carlo did not
    record (``nodes=``) have no Monte Carlo column.
    """
    probes = check_int(probes, "compare", "probes", minimum=1)
    seed = check_seed(seed, "compare", allow_none=False)
    tolerance = check_real(tolerance, "compare", "tolerance", minimum=0.0)
    if mc is not None:
        check_same_setup(report, mc)
    names = list(report.nodes)
    stats = report.node_statistics(probes=probes, seed=seed)
    second = report.second_order_nodes
    reach: Mapping[str, float] = {}
    if any("near_kink" in node.diagnostics for node in report.nodes.values()):
        try:  # where the whole box can switch units, the first-order worst case may fail
            reach = report.box_reaches_kink
        except RigorousBoundUnavailable:
            reach = {}
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
        if reach.get(name, 0.0) > _THRESHOLDS.get("near_kink", 0.0):
            notes.append(f"box reaches kink {reach[name]:.0%}")
        rms_mc = ci = relative = None
        outside = disagrees = False
        if mc is not None and name in mc.nodes:
            m = mc.nodes[name]
            rms_mc = float(np.sqrt(m.mse))
            lo, hi = m.mse_ci
            ci = (float(np.sqrt(max(lo, 0.0))), float(np.sqrt(hi)))
            outside, relative, disagrees = agreement(mse, se, lo, hi, m.mse, tolerance)
        rows.append(ComparisonRow(name, node.kind, node.rms_exact, node.rms_first_order,
                                  _rms(s2), ratio, rms, rms_se, worst, rms_mc, ci, disagrees,
                                  tuple(notes), relative, outside))
    return Comparison(tuple(rows), probes, None if mc is None else int(mc.samples), tolerance)

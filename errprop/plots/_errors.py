"""How the error grows through the graph, and analytic against Monte Carlo."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .._compare import agreement, check_same_setup
from .._graph import unknown_name_message
from .._montecarlo import MonteCarloResult
from .._report import Report
from ._labels import axis_title, legend_above, middle_ellipsis, short_names
from ._style import BLACK, BLUE, GREEN, VERMILION, axes_for, log_ticks

if TYPE_CHECKING:
    from matplotlib.axes import Axes


@dataclass(frozen=True)
class NodeRMS:
    """RMS errors at one node, as :func:`error_growth` and :func:`parity` plot them."""

    name: str
    exact: float
    first_order: float
    analytic: float  # sqrt of the first-order MSE under the noise model
    analytic_se: float  # its standard error (0 at the output: exact statistics)
    mc: float  # NaN without Monte Carlo at this node
    mc_lo: float
    mc_hi: float

    @property
    def disagrees(self) -> bool:
        """First order has broken down here: the rule of :meth:`errprop.Report.compare`'s
        ``!`` (outside Monte Carlo's 99% interval widened by 3 standard errors, and the
        MSE more than 10% off; :func:`errprop._compare.agreement`)."""
        if not np.isfinite(self.mc):
            return False
        return agreement(self.analytic ** 2, 2 * self.analytic * self.analytic_se,
                         self.mc_lo ** 2, self.mc_hi ** 2, self.mc ** 2)[2]


def _check(report: object, mc: object, what: str, mc_required: bool) -> None:
    if not isinstance(report, Report):
        raise TypeError(f"{what}: report must be an errprop Report (from analyze), got "
                        f"{type(report).__name__}")
    if mc is None and not mc_required:
        return
    if not isinstance(mc, MonteCarloResult):
        raise TypeError(f"{what}: mc must be an errprop MonteCarloResult (from monte_carlo)"
                        f"{' or None' if not mc_required else ''}, got {type(mc).__name__}")
    check_same_setup(report, mc, what)


def node_rms(report: Report, mc: MonteCarloResult | None = None, *,
             nodes: Sequence[str] | None = None, probes: int = 64, seed: int = 0
             ) -> list[NodeRMS]:
    """Exact, first-order, analytic and Monte Carlo RMS error at each node (in execution
    order; ``nodes`` picks some). Analytic: probe estimates (``report.node_statistics``)
    except at the output, where the exact statistics ``report.mse`` are used. Monte Carlo
    RMS and its 99% interval are the square roots of ``mse`` and ``mse_ci``."""
    _check(report, mc, "node_rms", False)
    names = list(report.nodes)
    chosen = names if nodes is None else list(nodes)
    for n in chosen:
        if n not in report.nodes:
            raise ValueError(unknown_name_message("node", str(n), names))
    stats = report.node_statistics(probes=probes, seed=seed) \
        if any(n != names[-1] for n in chosen) else {}
    rows = []
    for n in chosen:
        node = report.nodes[n]
        mse, se = (report.mse, 0.0) if n == names[-1] else (stats[n].mse, stats[n].mse_se)
        rms = float(np.sqrt(max(mse, 0.0)))
        m = mc.nodes.get(n) if mc is not None else None
        mc_rms = lo = hi = float("nan")
        if m is not None:
            mc_rms = float(np.sqrt(m.mse))
            lo, hi = (float(np.sqrt(max(v, 0.0))) for v in m.mse_ci)
        rows.append(NodeRMS(n, node.rms_exact, node.rms_first_order, rms,
                            se / (2 * rms) if rms > 0 else 0.0, mc_rms, lo, hi))
    return rows


def _positive(values: Sequence[float]) -> np.ndarray:
    """A log axis cannot show 0: nodes before the first source have no error yet."""
    v = np.asarray(values, dtype=float)
    return np.where(v > 0, v, np.nan)


def error_growth(report: Report, mc: MonteCarloResult | None = None, ax: Axes | None = None,
                 *, nodes: Sequence[str] | None = None, probes: int = 64, seed: int = 0,
                 first_order: bool = True) -> Axes:
    """RMS error at every node in execution order: exact, first order, the analytic noise
    model (a band of ±3 standard errors of its estimate) and Monte Carlo with its 99%
    interval.

    Parameters
    ----------
    report : from :func:`errprop.analyze`.
    mc : from :func:`errprop.monte_carlo` on the same network, input and config, or None.
        Nodes it did not record get no Monte Carlo point.
    nodes : names of the nodes to show (default: all).
    probes, seed : for the analytic statistics of the hidden nodes
        (:meth:`Report.node_statistics`).
    first_order : also mark the first-order RMS of this particular rounding.

    Returns
    -------
    The Axes. Nodes where the analytic RMS leaves the Monte Carlo interval (first order
    has broken down there) are marked ``*`` on the x axis. Node names are shortened as in
    :func:`budget_bars`.
    """
    _check(report, mc, "error_growth", False)
    rows = node_rms(report, mc, nodes=nodes, probes=probes, seed=seed)
    with axes_for(ax, "error_growth") as ax:
        pos = np.arange(len(rows))
        analytic = np.array([r.analytic for r in rows])
        se = np.array([r.analytic_se for r in rows])
        ax.fill_between(pos, _positive(analytic - 3 * se), _positive(analytic + 3 * se),
                        color=GREEN, alpha=0.3, lw=0)
        ax.plot(pos, _positive(analytic), color=GREEN, ls="--",
                label="analytic (noise model)")
        ax.plot(pos, _positive([r.exact for r in rows]), color=BLACK, marker="o", ms=2.5,
                label="exact")
        if first_order:
            ax.plot(pos, _positive([r.first_order for r in rows]), ls="none", marker="s",
                    ms=3.5, mfc="none", mew=0.8, color=BLUE, label="first order")
        if mc is not None:
            mcv = np.array([r.mc for r in rows])
            lo = np.array([r.mc_lo for r in rows])
            hi = np.array([r.mc_hi for r in rows])
            ok = np.isfinite(mcv) & (mcv > 0)
            ax.errorbar(pos[ok], mcv[ok], yerr=[mcv[ok] - lo[ok], hi[ok] - mcv[ok]],
                        ls="none", marker="D", ms=2.5, color=VERMILION, elinewidth=0.8,
                        label="Monte Carlo, 99% CI")
        ax.set_yscale("log")
        log_ticks(ax.yaxis)
        labels, prefix = short_names([r.name for r in rows])
        ax.set_xticks(pos, [s + (" *" if r.disagrees else "") for s, r in zip(labels, rows)])
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_xlabel(axis_title("node (execution order)", prefix))
        ax.set_ylabel("RMS error (node units)")
        legend_above(ax, ncols=2)
        return ax


def parity(report: Report, mc: MonteCarloResult, ax: Axes | None = None, *,
           per: str = "node", node: str | None = None, probes: int = 64,
           seed: int = 0) -> Axes:
    """Analytic against Monte Carlo, with the line y = x.

    Parameters
    ----------
    report, mc : from :func:`errprop.analyze` and :func:`errprop.monte_carlo` on the same
        network, input and config.
    per : ``"node"``: one point per node, the RMS error (Monte Carlo with its 99% interval;
        analytic as in :func:`error_growth`); points where they disagree are vermilion.
        ``"element"``: one point per element of ``node`` (default: the output), the
        error's standard deviation (analytic: exact statistics at the output, probe
        estimates elsewhere).
    node : for ``per="element"``.
    probes, seed : for the analytic statistics of hidden nodes.

    Returns
    -------
    The Axes (log-log, equal ranges).
    """
    _check(report, mc, "parity", True)
    if per not in ("node", "element"):
        raise ValueError(f"parity: per must be 'node' or 'element', got {per!r}")
    with axes_for(ax, "parity") as ax:
        if per == "node":
            rows = [r for r in node_rms(report, mc, probes=probes, seed=seed)
                    if np.isfinite(r.mc) and r.mc > 0 and r.analytic > 0]
            x = np.array([r.mc for r in rows])
            y = np.array([r.analytic for r in rows])
            bad = np.array([r.disagrees for r in rows], dtype=bool)
            xerr = np.array([[r.mc - r.mc_lo for r in rows], [r.mc_hi - r.mc for r in rows]])
            yerr = 3 * np.array([r.analytic_se for r in rows])
            for mask, colour, label in ((~bad, BLUE, "first order holds"),
                                        (bad, VERMILION, "first order broken (! in compare)")):
                if mask.any():
                    ax.errorbar(x[mask], y[mask], xerr=xerr[:, mask], yerr=yerr[mask],
                                ls="none", marker="o", ms=3, color=colour, elinewidth=0.7,
                                label=label)
            ax.set_xlabel("Monte Carlo RMS error (node units)")
            ax.set_ylabel("analytic RMS error (node units)")
        else:
            names = list(report.nodes)
            name = names[-1] if node is None else node
            if name not in report.nodes:
                raise ValueError(unknown_name_message("node", str(name), names))
            if name not in mc.nodes:
                raise ValueError(f"parity: the Monte Carlo run did not record node {name!r}; "
                                 f"run monte_carlo(..., nodes='all') or include it")
            analytic = report.std if name == names[-1] else \
                report.node_statistics(probes=probes, seed=seed)[name].std
            x, y = np.ravel(mc.nodes[name].std), np.ravel(analytic)
            keep = (x > 0) & (y > 0)
            x, y = x[keep], y[keep]
            ax.plot(x, y, ls="none", marker="o", ms=2, alpha=0.5, mew=0, color=BLUE,
                    label=f"{middle_ellipsis(name, 28)}: {x.size} elements")
            ax.set_xlabel("Monte Carlo error std (node units)")
            ax.set_ylabel("analytic error std (node units)")
        if x.size:
            lo, hi = float(min(x.min(), y.min())) / 1.3, float(max(x.max(), y.max())) * 1.3
        else:
            lo, hi = 1e-3, 1.0
        ax.plot([lo, hi], [lo, hi], color=BLACK, lw=0.7, ls=":", label="y = x", zorder=0)
        ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi))
        log_ticks(ax.xaxis)
        log_ticks(ax.yaxis)
        ax.set_aspect("equal", adjustable="box")
        ax.legend(loc="upper left")
        return ax


def error_histogram(mc: MonteCarloResult, report: Report, ax: Axes | None = None, *,
                    element: tuple[int, ...] | None = None, bins: int = 60,
                    standardize: bool = False) -> Axes:
    """Histogram of the Monte Carlo output errors with the analytic (Gaussian) density.

    Parameters
    ----------
    mc : a :func:`errprop.monte_carlo` result that kept its samples (``quantiles`` not
        empty).
    report : :func:`errprop.analyze` on the same network, input and config; its
        first-order ``mean`` and ``std`` per output element define the Gaussians.
    element : index of one output element; default all elements pooled: the analytic
        density is then the mixture ``(1/N) Σ_i N(mean_i, std_i²)``.
    bins : histogram bins.
    standardize : plot ``(Δy_i − mean_i) / std_i`` (analytic mean and std) against N(0, 1).

    Returns
    -------
    The Axes. Elements with zero analytic std are left out.
    """
    _check(report, mc, "error_histogram", True)
    if mc.errors is None:
        raise ValueError("error_histogram: this Monte Carlo result kept no samples; run "
                         "monte_carlo with quantiles (the default) to keep them")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"error_histogram: bins must be a positive integer, got {bins!r}")
    samples = mc.errors.shape[0]
    errors = np.asarray(mc.errors, dtype=np.float64).reshape(samples, -1)
    mean, std = np.ravel(report.mean), np.ravel(report.std)
    if element is not None:
        try:
            flat = int(np.ravel_multi_index(tuple(element), report.output.shape))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"error_histogram: element must index the output of shape "
                             f"{report.output.shape}, got {element!r}") from exc
        errors, mean, std = errors[:, [flat]], mean[[flat]], std[[flat]]
    live = std > 0
    if not live.any():
        raise ValueError("error_histogram: the analytic std is zero at every chosen element")
    errors, mean, std = errors[:, live], mean[live], std[live]
    if standardize:
        errors = (errors - mean) / std
        mean, std = np.zeros(1), np.ones(1)
    with axes_for(ax, "error_histogram") as ax:
        ax.hist(errors.ravel(), bins=int(bins), density=True, color=BLUE, alpha=0.45,
                label=f"Monte Carlo ({samples} samples × {errors.shape[1]} elements)")
        lo, hi = ax.get_xlim()
        grid = np.linspace(lo, hi, 400)
        ax.plot(grid, gaussian_mixture(grid, mean, std), color=VERMILION,
                label="analytic N(0, 1)" if standardize else "analytic Gaussian"
                + (" mixture" if mean.size > 1 else ""))
        ax.set_xlim(lo, hi)
        ax.set_xlabel("standardized output error (analytic std units)" if standardize
                      else "output error (output units)")
        ax.set_ylabel("probability density" + ("" if standardize else "\n(1 / output units)"))
        ax.set_ylim(bottom=0)
        legend_above(ax, ncols=1)
        return ax


def gaussian_mixture(grid: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(1/N) Σ_i N(grid; mean_i, std_i²)``, in chunks of elements."""
    out = np.zeros_like(grid)
    for start in range(0, mean.size, 4096):
        m, s = mean[start:start + 4096], std[start:start + 4096]
        z = (grid[:, None] - m) / s
        out += np.sum(np.exp(-0.5 * z * z) / (s * np.sqrt(2 * np.pi)), axis=1)
    return out / mean.size

"""Sweeps: error against bit width, and MLP versus attention sensitivity."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._convergence import Convergence
from .._report import Report
from .._sensitivity import SensitivityResult
from .._sweep import DEFAULTS, SweepResult
from ._labels import legend_above, short_names
from ._style import BLACK, GREEN, PALETTE, axes_for, log_ticks

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: SQNR of b-bit uniform quantization grows by 20·log10(2) ≈ 6.02 dB per bit
DB_PER_BIT = 20.0 * math.log10(2.0)
_METRICS = ("sqnr", "mse")
_SETTINGS = ("bits", "depth", "logit_scale", "tokens")
_SENS_Y = ("gain", "cv", "miss", "mc_over_first_order", "residual")
_SENS_LABEL = {
    "gain": "noise gain (output / injected\nerror energy; dimensionless)",
    "cv": "CV of the gain over inputs\n(std / mean; dimensionless)",
    "miss": "first-order miss per input\n(RMS of MC / 1st − 1)",
    "mc_over_first_order": "gain, Monte Carlo / first order",
    "residual": "first-order residual\n‖exact − 1st‖ / ‖exact‖"}
_X_LABEL = {"bits": "input bits", "depth": "depth (blocks)",
            "logit_scale": "logit scale τ (factor on Wq, bq)", "tokens": "sequence length (tokens)"}


def _report_mse(report: Report) -> float:
    return report.predicted_mse()[0]


def bits_series(data: Any, metric: str = "sqnr", axis: str = "weights"
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The curves :func:`bits_sweep` draws: label -> (bits, values), values in dB for
    ``"sqnr"`` and in output units² for ``"mse"``. Labels start with ``exact``,
    ``predicted`` or ``Monte Carlo``; for a sweep, ``"<model> …:"`` comes first."""
    if metric not in _METRICS:
        raise ValueError(f"bits_sweep: metric must be 'sqnr' or 'mse', got {metric!r}")
    series: dict[str, tuple[list[float], list[float]]] = {}

    def add(label: str, b: float, v: float) -> None:
        xs, ys = series.setdefault(label, ([], []))
        xs.append(float(b))
        ys.append(float(v))

    if isinstance(data, Convergence):
        if metric == "mse":
            raise ValueError("bits_sweep: a Convergence holds SQNR only; use metric='sqnr' "
                             "or pass {bits: Report}")
        for r in data.rows:
            add("exact", r.bits, r.sqnr_db)
    elif isinstance(data, SweepResult):
        if axis not in DEFAULTS:
            raise ValueError(f"bits_sweep: axis must be a sweep axis ({', '.join(DEFAULTS)}), "
                             f"got {axis!r}")
        ok = [r for r in data.rows if r["status"] == "ok" and r[axis] is not None]
        vary = [k for k in DEFAULTS if k not in (axis, "mc_samples")
                and len({repr(r[k]) for r in ok}) > 1]
        for r in ok:
            name = " ".join([r["model"]] + [f"{k}={r[k]}" for k in vary])
            signal = r["exact_mse"] * 10 ** (r["output_sqnr_db"] / 10)  # mean(y²)
            values = {"exact": r["exact_mse"], "predicted": r["predicted_mse"],
                      "Monte Carlo": r["mc_mse"]}
            for what, mse in values.items():
                if mse is not None and np.isfinite(mse) and mse > 0:
                    add(f"{name}: {what}", r[axis],
                        mse if metric == "mse" else 10 * math.log10(signal / mse))
    else:
        pairs = list(data.items()) if isinstance(data, Mapping) else \
            list(data) if isinstance(data, Sequence) and not isinstance(data, str) else None
        if pairs is None or not pairs or not all(
                isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], Report)
                and isinstance(p[0], (int, np.integer)) for p in pairs):
            raise TypeError("bits_sweep: expected {bits: Report}, a sequence of (bits, Report) "
                            "pairs, a Convergence or a SweepResult, got "
                            f"{type(data).__name__}")
        for b, report in sorted(pairs, key=lambda p: p[0]):
            signal = float(np.mean(report.output ** 2))
            for what, mse in (("exact", report.exact_mse), ("predicted", _report_mse(report))):
                if mse > 0:
                    add(what, b, mse if metric == "mse" else 10 * math.log10(signal / mse))
    out = {}
    for label, (xs, ys) in series.items():
        x, y = np.array(xs), np.array(ys)
        bits = np.unique(x)
        # seeds: the mean in the plotted domain (dB, or log MSE)
        mean = [np.mean(y[x == b]) if metric == "sqnr" else np.exp(np.mean(np.log(y[x == b])))
                for b in bits]
        out[label] = (bits, np.array(mean))
    if not out:
        raise ValueError("bits_sweep: no finite results to plot")
    return out


def bits_sweep(data: Any, ax: Axes | None = None, *, metric: str = "sqnr",
               axis: str = "weights", reference: bool = True) -> Axes:
    """Output SQNR (or MSE) against bit width, with the 6.02 dB/bit reference line.

    Parameters
    ----------
    data : ``{bits: Report}`` or ``[(bits, Report), ...]`` (exact and predicted), a
        :class:`~errprop.Convergence` (exact SQNR) or a :class:`~errprop.SweepResult`
        (exact, predicted and Monte Carlo, one colour per model; seeds averaged; long
        model names are shortened in the middle).
    metric : ``"sqnr"`` (dB, ``20·log10(‖y‖/‖Δy‖)``) or ``"mse"`` (log scale).
    axis : the sweep axis on x (a :data:`errprop._sweep.DEFAULTS` key, e.g. ``"weights"``).
    reference : draw 6.02 dB per bit (MSE ÷ 4 per bit) through the exact points.

    Returns
    -------
    The Axes.
    """
    series = bits_series(data, metric, axis)
    groups = list(dict.fromkeys(label.rsplit(": ", 1)[0] if ": " in label else ""
                                for label in series))
    short = dict(zip(groups, short_names(groups, 32, elide_prefix=False)[0]))
    styles = {"exact": ("-", "o", "full"), "predicted": ("--", "s", "none"),
              "Monte Carlo": (":", "D", "none")}
    with axes_for(ax, "bits_sweep") as ax:
        for label, (x, y) in series.items():
            group, what = label.rsplit(": ", 1) if ": " in label else ("", label)
            colour = PALETTE[groups.index(group) % len(PALETTE)] if group else \
                {"exact": BLACK, "predicted": PALETTE[0], "Monte Carlo": PALETTE[3]}[what]
            ls, marker, fill = styles[what]
            ax.plot(x, y, ls=ls, marker=marker, fillstyle=fill, color=colour,
                    label=f"{short[group]}: {what}" if group else label)
        if reference:
            xs, ys = zip(*(v for k, v in series.items() if k.endswith("exact")))
            x, y = np.concatenate(xs), np.concatenate(ys)
            slope = DB_PER_BIT if metric == "sqnr" else -DB_PER_BIT
            db = y if metric == "sqnr" else 10 * np.log10(y)
            offset = float(np.mean(db - slope * x))
            grid = np.array([x.min(), x.max()])
            line = slope * grid + offset
            ax.plot(grid, line if metric == "sqnr" else 10 ** (line / 10), color=GREEN,
                    lw=2.5, alpha=0.4, zorder=0, label="6.02 dB/bit reference")
        if metric == "mse":
            ax.set_yscale("log")
            log_ticks(ax.yaxis)
        ax.set_xlabel(f"{axis} bits" if isinstance(data, SweepResult) else "bits")
        ax.set_ylabel("output SQNR (dB)" if metric == "sqnr" else "output MSE (output units²)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        legend_above(ax, ncols=2 if len(series) < 6 else 3)
        return ax


def sensitivity(result: SensitivityResult, ax: Axes | None = None, *, x: str = "logit_scale",
                y: str = "gain", where: Mapping[str, float] | None = None,
                spread: bool = True) -> Axes:
    """MLP versus attention: a :func:`errprop.compare_blocks` result against one setting.

    Parameters
    ----------
    result : a :class:`~errprop.SensitivityResult`.
    x : ``"logit_scale"``, ``"bits"``, ``"tokens"`` or ``"depth"``.
    y : ``"gain"`` (first order as a line with its spread over inputs, ``gain·(1 ± cv)``,
        shaded; Monte Carlo points with their 99% interval), ``"cv"`` (first order line,
        Monte Carlo points), ``"miss"``, ``"mc_over_first_order"`` or ``"residual"``.
    where : fix other settings, e.g. ``{"bits": 8}``; each remaining combination of the
        settings that vary becomes its own curve.
    spread : shade ``gain·(1 ± cv)`` for ``y="gain"``.

    Returns
    -------
    The Axes. MLP rows have no logit scale: against it they are horizontal lines.
    """
    if not isinstance(result, SensitivityResult):
        raise TypeError(f"sensitivity: expected a SensitivityResult (from compare_blocks), "
                        f"got {type(result).__name__}")
    if x not in _SETTINGS:
        raise ValueError(f"sensitivity: x must be one of {', '.join(_SETTINGS)}, got {x!r}")
    if y not in _SENS_Y:
        raise ValueError(f"sensitivity: y must be one of {', '.join(_SENS_Y)}, got {y!r}")
    where = dict(where or {})
    for k in where:
        if k not in _SETTINGS:
            raise ValueError(f"sensitivity: where keys must be among {', '.join(_SETTINGS)}, "
                             f"got {k!r}")
    rows = [r for r in result.rows if all(getattr(r, k) == v for k, v in where.items())]
    if not rows:
        raise ValueError(f"sensitivity: no rows match {where}")
    curves = sensitivity_curves(rows, x)
    with axes_for(ax, "sensitivity") as ax:
        xmin = min((float(c[0].min()) for c in curves.values() if len(c[0])), default=1.0)
        xmax = max((float(c[0].max()) for c in curves.values() if len(c[0])), default=1.0)
        for i, (label, (xs, group)) in enumerate(curves.items()):
            colour = PALETTE[i % len(PALETTE)]
            mlp = label.startswith("MLP")
            vals = np.array([getattr(r, y) for r in group])
            if mlp and x == "logit_scale":  # no logits: flat across the axis
                xs, vals = np.array([xmin, xmax]), np.repeat(vals[:1], 2)
                group = [group[0], group[0]]
            ls = "--" if mlp else "-"
            ax.plot(xs, vals, ls=ls, color=colour, label=f"{label}, first order"
                    if y in ("gain", "cv") else label)
            if y == "gain" and spread:
                cv = np.array([r.cv for r in group])
                ax.fill_between(xs, vals * (1 - cv), vals * (1 + cv), color=colour, alpha=0.15,
                                lw=0)
            mc_key = {"gain": "gain_mc", "cv": "cv_mc"}.get(y)
            if mc_key:
                mc = np.array([getattr(r, mc_key) for r in group])
                err = None
                if y == "gain":
                    err = [mc - [r.gain_mc_lo for r in group], [r.gain_mc_hi for r in group] - mc]
                ax.errorbar(xs, mc, yerr=err, ls="none", marker="s" if mlp else "o", ms=3,
                            mfc="white", color=colour, label=f"{label}, Monte Carlo")
        if x in ("logit_scale", "tokens"):
            ax.set_xscale("log")
            ticks = sorted({float(v) for c in curves.values() for v in c[0]})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        if y in ("gain", "miss"):
            ax.set_yscale("log")
            log_ticks(ax.yaxis)
        ax.set_xlabel(_X_LABEL[x])
        ax.set_ylabel(_SENS_LABEL[y])
        legend_above(ax, ncols=2)
        return ax


def sensitivity_curves(rows: Sequence[Any], x: str) -> dict[str, tuple[np.ndarray, list]]:
    """label -> (x values, rows sorted by x): one curve per block and per combination of the
    other settings that vary."""
    vary = [k for k in _SETTINGS if k != x and len({getattr(r, k) for r in rows
                                                   if not (isinstance(getattr(r, k), float)
                                                           and math.isnan(getattr(r, k)))}) > 1]
    curves: dict[str, list] = {}
    for r in rows:
        parts = ["MLP" if r.block == "mlp" else "attention"]
        for k in vary:
            v = getattr(r, k)
            if not (isinstance(v, float) and math.isnan(v)):
                parts.append(f"{'τ' if k == 'logit_scale' else k} = {v:g}")
        curves.setdefault(", ".join(parts), []).append(r)
    out = {}
    for label in sorted(curves, key=lambda s: (not s.startswith("attention"), s)):
        group = sorted(curves[label], key=lambda r: getattr(r, x))
        xs = np.array([getattr(r, x) for r in group], dtype=float)
        out[label] = (xs, group)
    return out

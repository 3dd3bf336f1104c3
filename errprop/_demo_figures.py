"""The demo's figures: error budget per layer, error growth per node, bits per layer.

Drawn with :mod:`errprop.plots` in its paper style (budget panels are
:func:`errprop.plots.budget_bars`; layer and node names go through its label helpers: the
shared prefix named once, unique short names, tick labels that neither overlap nor leave
the figure), sized by the number of layers up to :data:`MAX_WIDTH` inches wide, without
pyplot (no global state), and written whole or not at all (:func:`errprop.plots.save`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import plots
from ._compare import Comparison
from ._report import Report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BLUE, ORANGE, GREEN, VERMILION, PURPLE, SKY, YELLOW, BLACK = plots.PALETTE
GREY = "#999999"
#: width of the demo's figures: a two-column page at least, growing with the layers to this
MIN_WIDTH, MAX_WIDTH = 7.16, 10.0
MAX_HEIGHT = 12.0
DPI = 150
_ROW = 0.15  # inches per budget bar (a 7-point label and its gap)
_CHAR = 0.055  # inches per character of a 7-point tick label
_MARGIN = 0.5  # inches of a row of panels outside them


@contextmanager
def _paper() -> Iterator[None]:
    """errprop.plots' paper style for the figure drawn (and saved) inside the block."""
    import matplotlib

    with matplotlib.rc_context(plots.rcparams("double")):
        yield


def _figure(size: tuple[float, float], ncols: int = 1, nrows: int = 1,
            **kwargs: Any) -> tuple[Figure, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = float(np.clip(size[0], MIN_WIDTH, MAX_WIDTH))
    fig = Figure(figsize=(width, float(np.clip(size[1], 2.6, MAX_HEIGHT))), dpi=DPI,
                 layout="constrained")  # no pyplot: no global state
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, list(np.ravel(axes))


def _legend(fig: Figure, handles: Sequence[Any], labels: Sequence[str]) -> None:
    """One legend for every panel, at the foot of the figure, in as many columns as fit."""
    renderer = fig.canvas.get_renderer()
    room = fig.bbox.width - 12 * fig.dpi / 72
    for ncols in range(len(labels), 0, -1):
        legend = fig.legend(handles, labels, loc="outside lower center", ncols=ncols,
                            columnspacing=1.2)
        if ncols == 1 or legend.get_window_extent(renderer).width <= room:
            return
        legend.remove()


def save_png(fig: Figure, path: Path) -> None:
    """Write ``fig`` to ``path`` (PNG), whole or not at all."""
    with _paper():
        plots.save(fig, path, formats=("png",), dpi=DPI)


def _layers(report: Report) -> list[str]:
    return list(dict.fromkeys(s.source.layer or "input" for s in report.sources.values()))


def budget_figure(title: str, detail: str, reports: dict[int, Report]) -> Figure:
    """One :func:`errprop.plots.budget_bars` panel per bit width, side by side."""
    from matplotlib.patches import Patch

    first = next(iter(reports.values()))
    layers = _layers(first)
    labels, _ = plots.short_names(layers)
    label_width = _CHAR * max(len(s) for s in labels) + 0.6
    kinds = {s.kind for r in reports.values() for s in r.sources.values()}
    with _paper():
        fig, axes = _figure((label_width + 3.0 * len(reports), 2.0 + _ROW * len(layers)),
                            ncols=len(reports), sharey=True)
        fig.suptitle(f"Error budget per layer: {title}\n({detail})")
        _legend(fig, [Patch(color=c) for k, (_, c) in plots.KINDS.items() if k in kinds],
                [name for k, (name, _) in plots.KINDS.items() if k in kinds])
        for i, (ax, (bits, report)) in enumerate(zip(axes, reports.items())):
            ax.set_title(f"W{bits}A{bits}: predicted output MSE {report.mse:.3g}\n"
                         f"(exact {report.exact_mse:.3g})")
            plots.budget_bars(report, ax=ax)
            ax.get_legend().remove()  # the figure's legend serves every panel
            if i:
                ax.set_ylabel("")
    return fig


def growth_figure(title: str, detail: str, comparisons: dict[int, Comparison]) -> Figure:
    """RMS error node by node, one panel per bit width, sharing the node axis: exact,
    first order of this rounding, the analytic noise model, Monte Carlo with its 99%
    interval; nodes flagged ``!`` in report.md (first order off Monte Carlo) are ringed."""
    comps = list(comparisons.items())
    names = [r.name for r in comps[0][1].rows]
    zero = [all(c.rows[i].rms_exact == 0 and not c.rows[i].rms_mc for _, c in comps)
            for i in range(len(names))]
    short, prefix = plots.short_names(names)
    labels = [s + (" (0)" if z else "") for s, z in zip(short, zero)]
    tick_height = min(_CHAR * max(len(s) for s in labels), 1.6)  # labels upright at worst
    with _paper():
        fig, axes = _figure((1.4 + 0.12 * len(names), 1.2 + tick_height + 2.2 * len(comps)),
                            nrows=len(comps), sharex=True)
        fig.suptitle(f"Error growth through the network: {title}\n({detail})")
        pos = np.arange(len(names))
        flagged = False
        for ax, (bits, comp) in zip(axes, comps):
            flagged |= _growth_panel(ax, comp, pos)
            n = len(comp.flagged)
            ax.set_title(f"W{bits}A{bits}" + (f": first order off Monte Carlo at {n} "
                                              f"node{'s' if n > 1 else ''} (!)" if n else ""))
        handles, texts = axes[0].get_legend_handles_labels()
        if flagged:  # the rings, explained once
            handles.append(_ring(axes[0], [], []))
            texts.append(f"! first order off Monte Carlo: outside its 99% interval and "
                         f"> {comps[0][1].tolerance:.0%} away")
        _legend(fig, handles, texts)
        bottom = axes[-1]
        bottom.set_xticks(pos, labels)
        bottom.set_xlim(-0.5, len(names) - 0.5)
        bottom.set_xlabel(plots.axis_title("node (execution order)", prefix)
                          + ("; (0): no error yet" if any(zero) else ""))
        fig.supylabel("RMS error at the node (node units)", fontsize=8)
        for ax in axes:
            plots.log_ticks(ax.yaxis)
            plots.fit_labels(ax)
    return fig


def _ring(ax: Any, x: Any, y: Any) -> Any:
    (line,) = ax.plot(x, y, ls="none", marker="o", ms=9, mfc="none", mec=VERMILION,
                      mew=1.2, label="_nolegend_")
    return line


def _positive(values: Sequence[float | None]) -> np.ndarray:
    """A log axis cannot show an exact zero (nodes before the first source)."""
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    return np.where(v > 0, v, np.nan)


def _growth_panel(ax: Any, comp: Comparison, pos: np.ndarray) -> bool:
    rows = comp.rows
    mc = _positive([r.rms_mc for r in rows])
    lo, hi = (_positive([(r.rms_mc_ci or (np.nan, np.nan))[i] for r in rows]) for i in (0, 1))
    samples = f" ({comp.mc_samples} samples)" if comp.mc_samples else ""
    ax.fill_between(pos, lo, hi, color=VERMILION, alpha=0.25, lw=0,
                    label=f"Monte Carlo 99% interval{samples}")
    ax.plot(pos, mc, color=VERMILION, lw=1.2, label="Monte Carlo RMS")
    analytic = _positive([r.rms_analytic for r in rows])
    ax.plot(pos, analytic, color=GREEN, ls="--", lw=1.2, label="analytic (noise model)")
    ax.plot(pos, _positive([r.rms_first_order for r in rows]), color=BLUE, ls="none",
            marker="s", ms=4, mfc="none", mew=0.8, label="first order, this rounding")
    ax.plot(pos, _positive([r.rms_exact for r in rows]), color=BLACK, ls="none",
            marker="o", ms=2.5, label="exact (fake-quant minus float)")
    flags = np.array([r.disagrees for r in rows], dtype=bool)
    if flags.any():
        _ring(ax, pos[flags], analytic[flags])
    ax.set_yscale("log")
    ax.grid(axis="x", alpha=0.15)
    return bool(flags.any())


def _panel_widths(wanted: Sequence[float], least: float = 2.1) -> list[float]:
    """Panel widths (inches): at least ``least`` each (room for the titles), the wider
    ones narrowed alike so that all fit in :data:`MAX_WIDTH`."""
    widths = [max(least, w) for w in wanted]
    room = MAX_WIDTH - _MARGIN - least * len(widths)
    excess = sum(w - least for w in widths)
    if excess > room > 0:
        widths = [least + (w - least) * room / excess for w in widths]
    return widths


def allocation_figure(plans: dict[str, dict[str, Any]], target: float) -> Figure:
    """Bits per layer, allocated next to uniform, one panel per model (``plans``: model ->
    its allocation doc in report.json), each as wide as its layers need."""
    from matplotlib.patches import Patch

    layers = {key: list(doc["bits"]) for key, doc in plans.items()}
    widths = _panel_widths([0.16 * len(v) + 1.0 for v in layers.values()])
    top = max(max(run["bits"]) for doc in plans.values() for run in doc["runs"].values())
    with _paper():
        fig, axes = _figure((sum(widths) + _MARGIN, 4.2), ncols=len(plans),
                            gridspec_kw={"width_ratios": widths})
        fig.suptitle(f"Weight bits per layer for output SQNR ≥ {target:g} dB: the allocation "
                     f"(least Σ bits·weights)\nand the cheapest uniform width, verified on "
                     f"held-out inputs")
        styles = ((BLUE, ""), (GREY, "///"))
        _legend(fig, [Patch(facecolor=c, hatch=h, edgecolor="white") for c, h in styles],
                ["allocated", "cheapest uniform width"])
        for ax, (key, doc) in zip(axes, plans.items()):
            short, prefix = plots.short_names(layers[key])
            pos = np.arange(len(short))
            runs = list(doc["runs"].items())
            width = 0.8 / len(runs)
            for i, ((name, run), (colour, hatch)) in enumerate(zip(runs, styles)):
                ax.bar(pos + (i - (len(runs) - 1) / 2) * width, run["bits"], width,
                       color=colour, hatch=hatch, edgecolor="white", linewidth=0.3)
            ax.set_ylim(0, top + 1)
            ax.set_yticks(range(0, top + 1, 2 if top > 8 else 1))
            ax.set_ylabel("weight bits")
            title = [key]
            if "saving_vs_uniform" in doc:  # short lines: narrow panels keep them inside
                sqnr = [run["held_out_sqnr_db"] for _, run in runs]
                title = [f"{key}: {100 * doc['saving_vs_uniform']:.0f}% fewer bits",
                         f"than {runs[1][0]} bits", f"held-out SQNR {sqnr[0]:.1f} dB",
                         f"({runs[1][0]}: {sqnr[1]:.1f} dB)"]
            ax.set_title("\n".join(title), fontsize=8)
            ax.set_xticks(pos, short)
            ax.set_xlim(-0.6, len(short) - 0.4)
            ax.set_xlabel(plots.axis_title("layer", prefix))
            ax.grid(axis="x", visible=False)
        for ax in axes:
            plots.fit_labels(ax)
    return fig

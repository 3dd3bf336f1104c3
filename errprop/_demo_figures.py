"""The demo's figures: error budget per layer, error growth per node, bits per layer.

Written without pyplot (no global state) and saved whole or not at all.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._compare import Comparison
from ._files import make_readable
from ._report import Report

if TYPE_CHECKING:
    from ._demo import _Case

# Okabe-Ito, safe for the common colour-vision deficiencies
BLACK, BLUE, VERMILION, GREEN, ORANGE, SKY = ("#000000", "#0072B2", "#D55E00", "#009E73",
                                              "#E69F00", "#56B4E9")
KINDS = {"weight": ("weights (per channel)", BLUE), "bias": ("biases", SKY),
         "activation": ("activations (layer inputs)", ORANGE), "input": ("network input", GREEN),
         "norm": ("norm parameters", VERMILION), "embedding": ("embeddings", BLACK)}



def _save_png(fig: Any, path: Path) -> None:
    """Write the figure whole or not at all (temporary file, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _figure(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Any, np.ndarray]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")  # no pyplot: no global state
    FigureCanvasAgg(fig)
    return fig, np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()


def _budget_figure(case: _Case, reports: dict[int, Report], path: Path) -> None:
    fig, axes = _figure(len(reports), 1, (8.0, 1.0 + 3.0 * len(reports)))
    for ax, (bits, report) in zip(axes, reports.items()):
        rows = report.budget(by="source", exact=False).rows
        layers = list(dict.fromkeys(report.sources[r.name].source.layer or "input"
                                    for r in rows))
        bottom = np.zeros(len(layers))
        for kind, (label, colour) in KINDS.items():
            share = np.zeros(len(layers))
            for r in rows:
                s = report.sources[r.name]
                if s.kind == kind:
                    share[layers.index(s.source.layer or "input")] += 100 * r.share
            if share.any():
                ax.bar(layers, share, bottom=bottom, color=colour, label=label, width=0.7)
                bottom += share
        ax.set_ylim(0, max(bottom.max(), 1e-9) * 1.15)
        ax.set_ylabel("share of output MSE (%)")
        ax.set_title(f"W{bits}A{bits}: predicted output MSE {report.mse:.3g} "
                     f"(exact {report.exact_mse:.3g})", fontsize=10)
        ax.tick_params(axis="x", labelrotation=30)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes[-1].set_xlabel("layer (execution order)")
    fig.suptitle(f"Error budget per layer: {case.title}\n({case.detail})", fontsize=10)
    _save_png(fig, path)


def _growth_figure(case: _Case, comparisons: dict[int, Comparison], path: Path) -> None:
    n = len(next(iter(comparisons.values())).rows)
    fig, axes = _figure(len(comparisons), 1, (max(7.0, 2.5 + 0.3 * n),
                                              1.6 + 3.2 * len(comparisons)))
    for ax, (bits, comp) in zip(axes, comparisons.items()):
        rows = comp.rows
        pos = np.arange(len(rows))

        def positive(values: Any) -> np.ndarray:  # a log axis cannot show an exact zero
            v = np.array(values, dtype=float)
            return np.where(v > 0, v, np.nan)

        mc = positive([r.rms_mc for r in rows])
        lo, hi = (positive([(r.rms_mc_ci or (np.nan, np.nan))[i] for r in rows])
                  for i in (0, 1))
        ax.fill_between(pos, lo, hi, color=VERMILION, alpha=0.25, lw=0,
                        label=f"Monte Carlo 99% interval ({comp.mc_samples} samples)")
        ax.plot(pos, mc, color=VERMILION, lw=1.5, label="Monte Carlo RMS")
        ax.plot(pos, positive([r.rms_analytic for r in rows]), color=GREEN, ls="--", lw=1.5,
                label="first order, noise model (analytic RMS)")
        ax.plot(pos, positive([r.rms_first_order for r in rows]), color=BLUE, ls="none",
                marker="s", ms=5, mfc="none", label="first order, this rounding")
        ax.plot(pos, positive([r.rms_exact for r in rows]), color=BLACK, ls="none",
                marker="o", ms=3.5, label="exact (fake-quant minus float)")
        ax.set_yscale("log")
        ax.set_ylabel("RMS error at node\n(units of the node's values)")
        zero = [r.rms_exact == 0 and not r.rms_mc for r in rows]
        ax.set_title(f"W{bits}A{bits}; * = analytic outside the Monte Carlo interval"
                     + (", (0) = no error yet" if any(zero) else ""), fontsize=10)
        ax.set_xticks(pos, [r.name + (" *" if r.disagrees else "") + (" (0)" if z else "")
                            for r, z in zip(rows, zero)],
                      rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes[-1].set_xlabel("node (execution order)")
    fig.suptitle(f"Error growth through the network: {case.title}\n({case.detail})",
                 fontsize=10)
    _save_png(fig, path)


def _allocation_figure(plans: dict[str, dict[str, Any]], target: float, path: Path) -> None:
    """Bits per layer, allocated next to uniform; ``plans``: model -> its allocation doc."""
    fig, axes = _figure(1, len(plans), (3.2 + 2.6 * len(plans), 4.4))
    top = max(max(run["bits"]) for doc in plans.values() for run in doc["runs"].values())
    for ax, (key, doc) in zip(axes, plans.items()):
        layers = list(doc["bits"])
        pos = np.arange(len(layers))
        runs = list(doc["runs"].items())
        width = 0.8 / len(runs)
        sqnr = []
        for i, ((name, run), colour, hatch) in enumerate(zip(runs, (BLUE, VERMILION),
                                                             ("", "//"))):
            ax.bar(pos + (i - (len(runs) - 1) / 2) * width, run["bits"], width, color=colour,
                   hatch=hatch, edgecolor="white", label=name)
            sqnr.append(f"{name.split()[0]} {run['held_out_sqnr_db']:.1f}")
        ax.set_ylim(0, top + 3)
        ax.set_yticks(range(0, top + 1, 2))
        ax.set_ylabel("weight bits")
        title = key
        if "saving_vs_uniform" in doc:
            title += (f": {100 * doc['saving_vs_uniform']:.0f}% fewer bits\nheld-out SQNR "
                      f"{', '.join(sqnr)} dB")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(pos, layers, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_xlabel("layer")
        ax.legend(loc="upper center", ncol=2, fontsize=8, frameon=False)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Weight bits per layer for output SQNR ≥ {target:g} dB: the allocation "
                 f"(least Σ bits·weights) and the cheapest uniform width", fontsize=10)
    _save_png(fig, path)

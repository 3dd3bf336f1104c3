"""The paper style (sizes, fonts, palette) and deterministic, atomic saving."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._files import atomic_file
from ._labels import fit_labels

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Okabe & Ito (2008), distinguishable under the common colour-vision deficiencies
BLACK, ORANGE, SKY, GREEN = "#000000", "#E69F00", "#56B4E9", "#009E73"
YELLOW, BLUE, VERMILION, PURPLE = "#F0E442", "#0072B2", "#D55E00", "#CC79A7"
GREY = "#999999"
PALETTE = (BLUE, ORANGE, GREEN, VERMILION, PURPLE, SKY, YELLOW, BLACK)

#: one colour per source kind, in stacking order (error budgets)
KINDS = {"weight": ("weights", BLUE), "activation": ("activations", ORANGE),
         "bias": ("biases", SKY), "norm": ("norms", PURPLE),
         "embedding": ("embeddings", YELLOW), "input": ("input", GREEN)}

#: figure widths in inches: one column and the full page of a two-column paper (IEEE)
WIDTHS = {"single": 3.5, "double": 7.16}
HEIGHTS = {"single": 2.6, "double": 2.9}

_active = 0  # depth of nested style() contexts


def rcparams(column: str = "single", height: float | None = None) -> dict[str, Any]:
    """The paper style as an rcParams dict (for ``matplotlib.rc_context`` or ``rcParams.update``).

    Parameters
    ----------
    column : ``"single"`` (3.5 in wide) or ``"double"`` (7.16 in wide).
    height : figure height in inches (default 2.6 single, 2.9 double).
    """
    from cycler import cycler

    if column not in WIDTHS:
        raise ValueError(f"column must be 'single' or 'double', got {column!r}")
    if height is None:
        height = HEIGHTS[column]
    if isinstance(height, bool) or not isinstance(height, (int, float)) or not height > 0:
        raise ValueError(f"height must be a positive number of inches, got {height!r}")
    return {
        "figure.figsize": (WIDTHS[column], float(height)),
        "figure.dpi": 150,
        "figure.constrained_layout.use": True,
        "figure.constrained_layout.h_pad": 0.02,
        "figure.constrained_layout.w_pad": 0.02,
        "font.size": 8,
        "axes.titlesize": 9,
        "axes.labelsize": 8,
        "xtick.labelsize": 7,
        "ytick.labelsize": 7,
        "legend.fontsize": 7,
        "legend.frameon": False,
        "legend.handlelength": 1.8,
        "legend.borderaxespad": 0.3,
        "axes.prop_cycle": cycler(color=list(PALETTE)),
        "axes.linewidth": 0.6,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.linewidth": 0.4,
        "grid.alpha": 0.35,
        "lines.linewidth": 1.2,
        "lines.markersize": 4,
        "patch.linewidth": 0.5,
        "xtick.major.width": 0.6,
        "ytick.major.width": 0.6,
        "xtick.minor.width": 0.4,
        "ytick.minor.width": 0.4,
        "errorbar.capsize": 1.5,
        "pdf.fonttype": 42,  # TrueType in the PDF: editable text, accepted by IEEE/ACM
        "ps.fonttype": 42,
        "svg.fonttype": "none",
        "svg.hashsalt": "errprop",
        "savefig.dpi": 300,
    }


@contextmanager
def style(column: str = "single", height: float | None = None) -> Iterator[dict[str, Any]]:
    """Draw in the paper style inside the ``with`` block; rcParams are restored after it.

    ``with errprop.plots.style("double"): ax = errprop.plots.error_growth(report, mc)``
    makes a 7.16-inch figure. Plotting functions called without ``ax`` outside any
    ``style()`` block use ``style("single")``.
    """
    import matplotlib

    global _active
    params = rcparams(column, height)
    with matplotlib.rc_context(params):
        _active += 1
        try:
            yield params
        finally:
            _active -= 1


#: the name STYLE.md uses
paper_style = style


@contextmanager
def axes_for(ax: Any, what: str) -> Iterator[Axes]:
    """Yield ``ax`` (checked), or a new figure's Axes drawn in the paper style; after the
    block, fit its labels (:func:`fit_labels`: only a figure made here
    may grow)."""
    from matplotlib.axes import Axes

    if ax is not None:
        if not isinstance(ax, Axes):
            raise TypeError(f"{what}: ax must be a matplotlib Axes or None, "
                            f"got {type(ax).__name__}")
        yield ax
        fit_labels(ax, owned=False)
        return
    import matplotlib.pyplot as plt

    with nullcontext() if _active else style("single"):
        _, new = plt.subplots()
        yield new
        fit_labels(new, owned=True)


def log_ticks(axis: Any) -> None:
    """Readable ticks on a log axis, labelled as plain numbers (0.02, not 2×10⁻²): a few
    round numbers within a decade, 1-2-5 per decade up to 1.5 decades, 1-3 up to three,
    only the decades beyond; no minor labels."""
    from matplotlib import ticker

    lo, hi = sorted(axis.get_view_interval())
    decades = np.log10(hi / lo) if lo > 0 and hi > 0 else 10.0
    if decades < 1.0:  # within a decade: a few evenly spaced round numbers
        axis.set_major_locator(ticker.MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
    else:
        subs = (1.0, 2.0, 5.0) if decades <= 1.5 else (1.0, 3.0) if decades <= 3 else (1.0,)
        axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(ticker.FuncFormatter(_plain_or_power))
    axis.set_minor_formatter(ticker.NullFormatter())


def _plain_or_power(v: float, _: Any = None) -> str:
    if v <= 0 or 1e-3 <= v < 1e4:
        return f"{v:.3g}"
    e = int(np.floor(np.log10(v) + 1e-9))
    m = v / 10.0 ** e
    return f"$10^{{{e}}}$" if abs(m - 1) < 1e-6 else f"${m:.2g}\\times10^{{{e}}}$"


# ------------------------------------------------------------------ saving
_FORMATS = ("pdf", "png", "svg")
_METADATA = {"pdf": {"Creator": "errprop", "Producer": None, "CreationDate": None},
             "png": {"Software": None},
             "svg": {"Creator": None, "Date": None}}


def save(fig: Figure | Axes, path: str | os.PathLike, *, formats: Sequence[str] | None = None,
         dpi: float = 300) -> tuple[Path, ...]:
    """Write a figure as vector PDF and PNG, whole or not at all, byte for byte reproducibly.

    Parameters
    ----------
    fig : a Figure, or an Axes (its figure is saved).
    path : ``"figs/budget"`` writes ``figs/budget.pdf`` and ``figs/budget.png``;
        ``"figs/budget.png"`` writes only that file (unless ``formats`` says otherwise).
    formats : any of ``"pdf"``, ``"png"``, ``"svg"``.
    dpi : resolution of the PNG.

    Returns
    -------
    The paths written.

    Notes
    -----
    Each file is written to a temporary file in the target folder and renamed over the
    target (``os.replace``), so readers see the old file or the new one, never a partial
    one; the temporaries of killed writers (``.NAME.tmp<pid>-XXXXXXXX.png``) left in that
    folder are removed once their process is gone. Time stamps and version strings are left out of the metadata, so the same
    figure gives the same bytes.
    """
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    if isinstance(fig, Axes):
        fig = fig.figure
    if not isinstance(fig, Figure):
        raise TypeError(f"save: fig must be a matplotlib Figure or Axes, got "
                        f"{type(fig).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"save: path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if formats is None:
        formats = (suffix,) if suffix in _FORMATS else ("pdf", "png")
    elif isinstance(formats, str):
        formats = (formats,)
    bad = [f for f in formats if f not in _FORMATS]
    if bad or not formats:
        raise ValueError(f"save: formats must be among {', '.join(_FORMATS)}, got {formats!r}")
    stem = path.with_suffix("") if suffix in _FORMATS else path
    stem.parent.mkdir(parents=True, exist_ok=True)
    engine = fig.get_layout_engine()
    if engine is not None:
        _settle(fig)
        fig.set_layout_engine("none")  # the settled positions, for every format
    try:
        return _write_all(fig, stem, formats, dpi)
    finally:
        if engine is not None:
            fig.set_layout_engine(engine)


def _settle(fig: Figure, draws: int = 12) -> None:
    """Draw until the layout stops moving. Constrained layout refines the previous
    positions on each draw (legends above the axes move with them), so the first and
    second saves of a figure would differ in the last digits."""
    def positions() -> list[tuple[float, ...]]:
        return [tuple(ax.get_position().bounds) for ax in fig.axes]

    for _ in range(draws):
        before = positions()
        fig.draw_without_rendering()
        if positions() == before:
            return


def _write_all(fig: Figure, stem: Path, formats: Sequence[str], dpi: float
               ) -> tuple[Path, ...]:
    import matplotlib

    written = []
    for fmt in formats:
        target = stem.with_name(f"{stem.name}.{fmt}")
        with atomic_file(target, suffix=f".{fmt}") as tmp, \
                matplotlib.rc_context({"svg.hashsalt": "errprop"}):
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata=_METADATA[fmt])
        written.append(target)
    return tuple(written)


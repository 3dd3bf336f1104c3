"""Readable labels for long layer names and many layers.

Two steps. :func:`short_names` turns names into tick labels: the dotted prefix all of
them share (``model.layers.``) is elided and named once in the axis label, and names
still longer than ``max_chars`` keep their head and tail around a middle ``…``, made
longer where two would collide, so labels stay unique. :func:`fit_labels` then lays the
figure out so that no two tick labels overlap and every label lies inside the figure:

* category labels on x stay horizontal when they fit, else tilt 45°, else stand at 90°;
* a figure the plot created grows (up to :data:`MAX_SIZE`) until the labels have room
  and the axes keep at least :data:`MIN_AXES` inches;
* where it cannot grow (the caller passed ``ax``, or the cap is reached) the tick font
  shrinks down to :data:`MIN_FONT` points, and beyond that only every k-th label is shown;
* a legend above the axes loses columns (and then font size) until it fits the figure.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

ELLIPSIS = "…"
#: the smallest tick or legend font (points) a plot shrinks to before it thins labels
MIN_FONT = 5.0
#: width, height (inches) a plot may grow the figure it created to
MAX_SIZE = (10.0, 12.0)
#: the least width, height (inches) of the data area in a figure a plot created
MIN_AXES = (1.3, 1.1)
#: the largest part of a caller's figure height a legend above the axes may take
LEGEND_SHARE = 0.3
#: label pitch needed, in units of the label's line height
PITCH = 1.25
_PAD = 6.0  # points kept free at the figure's edges


def common_prefix(names: Sequence[str]) -> str:
    """The leading dotted parts every name shares, leaving each name at least one part
    (``"model.layers."`` for ``model.layers.0.mlp`` and ``model.layers.1.mlp``)."""
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    k = 0
    while all(len(p) > k + 1 for p in parts) and len({p[k] for p in parts}) == 1:
        k += 1
    return "".join(f"{p}." for p in parts[0][:k])


def middle_ellipsis(name: str, max_chars: int) -> str:
    """``name`` if it has at most ``max_chars`` characters, else its head and tail around
    ``…`` (the tail, where the op's own name sits, gets the larger part)."""
    if len(name) <= max_chars:
        return name
    keep = max(max_chars - 1, 2)
    head = keep * 2 // 5
    return name[:head] + ELLIPSIS + name[len(name) - (keep - head):]


def short_names(names: Sequence[str], max_chars: int = 24, *, elide_prefix: bool = True
                ) -> tuple[list[str], str]:
    """Unique short labels for ``names`` and the prefix elided from all of them.

    Parameters
    ----------
    names : distinct layer or node names.
    max_chars : longest label wanted; labels that would collide get longer.
    elide_prefix : drop the dotted prefix all names share (:func:`common_prefix`).

    Returns
    -------
    labels, prefix : ``prefix + name`` rebuilds every name that needed no ellipsis.
    """
    names = [str(n) for n in names]
    prefix = common_prefix(names) if elide_prefix else ""
    rest = [n[len(prefix):] for n in names]
    limit = [max_chars] * len(rest)
    while True:
        labels = [middle_ellipsis(n, k) for n, k in zip(rest, limit)]
        seen: dict[str, list[int]] = {}
        for i, label in enumerate(labels):
            seen.setdefault(label, []).append(i)
        clash = [i for group in seen.values() if len(group) > 1 for i in group
                 if limit[i] < len(rest[i])]
        if not clash:
            return labels, prefix
        for i in clash:
            limit[i] += 1


def axis_title(what: str, prefix: str) -> str:
    """``what``, or ``"layer (in model.layers)"`` when the labels drop a common prefix
    (``"node (execution order, in model.layers)"`` when ``what`` ends in parentheses)."""
    if not prefix:
        return what
    where = f"in {middle_ellipsis(prefix[:-1], 32)}"
    return f"{what[:-1]}, {where})" if what.endswith(")") else f"{what} ({where})"


# ------------------------------------------------------------------ layout
def _probe(fig: Figure) -> Any:
    """Lay the figure out and return its renderer. The layout of an intermediate state
    may not fit (that is what :func:`fit` repairs): its warning is not the caller's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="constrained_layout not applied")
        warnings.filterwarnings("ignore", message="Tight layout not applied")
        fig.draw_without_rendering()
    return fig.canvas.get_renderer()


def _categories(axis: Axis) -> list[Any]:
    """The tick labels of an axis whose ticks were placed by hand (``set_xticks(pos, names)``)."""
    from matplotlib.ticker import FixedLocator

    if not isinstance(axis.get_major_locator(), FixedLocator):
        return []
    return [t for t in axis.get_majorticklabels() if t.get_visible()]


def _size(texts: Sequence[Any], renderer: Any, dpi: float) -> tuple[float, float]:
    """Largest width and height (points) of unrotated texts."""
    w = h = 0.0
    for t in texts:
        box = t.get_window_extent(renderer)
        w, h = max(w, box.width), max(h, box.height)
    return w * 72 / dpi, h * 72 / dpi


def _upright_size(texts: Sequence[Any], renderer: Any, dpi: float, angle: float
                  ) -> tuple[float, float]:
    """:func:`_size` of x tick labels drawn at ``angle``, measured upright."""
    if not angle:
        return _size(texts, renderer, dpi)
    _rotate(texts, 0)
    size = _size(texts, renderer, dpi)
    _rotate(texts, angle)
    return size


def _rotate(texts: Sequence[Any], angle: float) -> None:
    for t in texts:
        t.set_rotation(angle)
        t.set_rotation_mode("anchor" if angle else "default")
        t.set_horizontalalignment("right" if angle else "center")
        t.set_verticalalignment("center" if angle == 90 else "top")


def _x_angle(texts: Sequence[Any], renderer: Any, fig: Figure, pitch: float) -> float:
    """0 when the labels fit side by side, 45 when tilted ones' boxes stay apart, else 90."""
    _rotate(texts, 0)
    w, h = _size(texts, renderer, fig.dpi)
    if w + 0.6 * h <= pitch:
        return 0.0
    if (w + h) * math.sqrt(0.5) + 0.4 * h <= pitch and w <= 6 * h:
        return 45.0
    return 90.0


def _pitch(ax: Axes, axis: str, n: int, renderer: Any) -> float:
    box = ax.get_window_extent(renderer)
    return (box.width if axis == "x" else box.height) * 72 / ax.figure.dpi / max(n, 1)


def fit_labels(ax: Axes, owned: bool = False) -> None:
    """Lay out the category tick labels and the legend of ``ax`` so that none overlap and
    all lie inside the figure: x labels horizontal, tilted 45° or upright, then a smaller
    font (down to 5 points), then only every k-th label (said in the axis label).

    Parameters
    ----------
    ax : Axes whose categories were placed with ``ax.set_xticks(positions, labels)`` (or
        ``set_yticks``); call it after everything else in the figure is drawn.
    owned : the caller made the figure for this Axes alone, so it may grow (up to
        10 × 12 inches) before labels shrink.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    _fit_legend(ax, owned, renderer)  # a legend too wide squeezes the axes: fit it first
    renderer = _probe(fig)
    labels = {"x": _categories(ax.xaxis), "y": _categories(ax.yaxis)}
    if labels["x"]:
        _rotate(labels["x"], _x_angle(labels["x"], renderer, fig,
                                      _pitch(ax, "x", len(labels["x"]), renderer)))
    if owned:
        _grow(ax, labels)
        renderer = _probe(fig)
        _fit_legend(ax, owned, renderer)
    for k, texts in labels.items():
        if texts:
            _shrink_or_thin(ax, k, texts, renderer)


def _grow(ax: Axes, labels: dict[str, list[Any]]) -> None:
    """Enlarge the figure so the data area keeps :data:`MIN_AXES` and the category labels
    their pitch (within :data:`MAX_SIZE`)."""
    fig = ax.figure
    renderer = _probe(fig)
    dpi = fig.dpi
    tight = fig.get_tightbbox(renderer)  # inches, every artist, also outside the figure
    box = ax.get_window_extent(renderer).transformed(fig.dpi_scale_trans.inverted())
    need = list(MIN_AXES)
    for i, k in enumerate(("x", "y")):
        texts = labels[k]
        if texts:
            angle = texts[0].get_rotation() if k == "x" else 0.0
            w, h = _upright_size(texts, renderer, dpi, angle)
            step = (w + 0.6 * h) if (k == "x" and angle == 0) else \
                (w + h) * math.sqrt(0.5) + 0.4 * h if angle == 45 else PITCH * h
            need[i] = max(need[i], len(texts) * step / 72)
    size = fig.get_size_inches()
    grown = [size[0], size[1]]
    for i, (decor, have) in enumerate(((tight.width - box.width, box.width),
                                       (tight.height - box.height, box.height))):
        if have < need[i] or tight.width > size[0] or tight.height > size[1]:
            grown[i] = max(size[i], decor + need[i] + 2 * _PAD / 72)
        grown[i] = min(grown[i], max(MAX_SIZE[i], size[i]))
    if (grown[0], grown[1]) != (size[0], size[1]):
        fig.set_size_inches(grown[0], grown[1], forward=False)


def _shrink_or_thin(ax: Axes, k: str, texts: list[Any], renderer: Any) -> None:
    """Where labels still lack room: a smaller font, then every k-th label."""
    fig = ax.figure
    angle = texts[0].get_rotation() if k == "x" else 0.0
    if k == "x" and angle == 0:
        return  # chosen because they fit
    w, h = _upright_size(texts, renderer, fig.dpi, angle)
    step = (w + h) * math.sqrt(0.5) + 0.4 * h if angle == 45 else PITCH * h
    pitch = _pitch(ax, k, len(texts), renderer)
    if step <= pitch:
        return
    font = texts[0].get_fontsize()
    small = max(MIN_FONT, font * pitch / step)
    for t in texts:
        t.set_fontsize(small)
    every = math.ceil(step * small / font / pitch)
    if every > 1:
        axis = ax.xaxis if k == "x" else ax.yaxis
        names = [t.get_text() for t in texts]
        ticks = axis.get_ticklocs()
        kw = {"rotation": angle, "ha": "right" if angle else "center",
              "rotation_mode": "anchor" if angle else "default",
              "va": "center" if angle == 90 else "top"} if k == "x" else {}
        axis.set_ticks(ticks, [n if i % every == 0 else "" for i, n in enumerate(names)],
                       fontsize=small, **kw)
        title = axis.get_label_text()
        if "labelled" not in title:
            axis.set_label_text(f"{title}; every {_ordinal(every)} labelled")


def _ordinal(k: int) -> str:
    return {2: "2nd", 3: "3rd"}.get(k, f"{k}th")


def legend_above(ax: Axes, ncols: int = 2, **kwargs: Any) -> None:
    """A legend in a band above the axes: it never covers the data. :func:`fit` may
    redraw it with fewer columns or a smaller font so that it fits the figure."""
    handles, labels = kwargs.pop("handles", None), kwargs.pop("labels", None)
    if handles is None:
        handles, auto = ax.get_legend_handles_labels()
        labels = auto if labels is None else labels
    elif labels is None:
        labels = [h.get_label() for h in handles]
    kwargs = {"loc": "lower left", "bbox_to_anchor": (0.0, 1.01), "borderaxespad": 0.0,
              "columnspacing": 1.2, **kwargs}
    legend = ax.legend(handles, labels, ncols=ncols, **kwargs)
    _ABOVE[legend] = (handles, labels, kwargs, ncols)


_ABOVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fit_legend(ax: Axes, owned: bool, renderer: Any) -> None:
    """Refit a legend made by :func:`legend_above` until it fits inside the figure: fewer
    columns when it is too wide; in a caller's figure, more columns when it would take
    more than :data:`LEGEND_SHARE` of the height; then a figure the plot made grows wider,
    a caller's gets a smaller font (down to :data:`MIN_FONT`). A legend's size does not
    depend on the layout, so it is measured without drawing the figure."""
    legend = ax.get_legend()
    if legend is None or legend not in _ABOVE:
        return
    handles, labels, kwargs, ncols = _ABOVE[legend]
    fig = ax.figure
    n = max(len(labels), 1)
    font = legend.get_texts()[0].get_fontsize() if labels else MIN_FONT
    for _ in range(16):  # each step is measured; a few suffice
        box = legend.get_window_extent(renderer)
        right = fig.bbox.width - 2 * fig.dpi / 72
        wide = box.x1 > right
        tall = not owned and box.height > LEGEND_SHARE * fig.bbox.height
        if not (wide or tall):
            return
        col_w = box.width / ncols
        row_h = box.height / math.ceil(n / ncols)
        most = max(1, min(n, int((right - box.x0) // col_w)))  # columns the width allows
        if wide and ncols > 1:
            ncols = min(ncols - 1, most)
        elif tall and ncols < most:
            rows = max(1, int(LEGEND_SHARE * fig.bbox.height // row_h))
            ncols = min(most, max(ncols + 1, math.ceil(n / rows)))
        elif wide and owned and fig.get_size_inches()[0] < MAX_SIZE[0]:
            w, h = fig.get_size_inches()
            fig.set_size_inches(min(MAX_SIZE[0], w + (box.x1 - right) / fig.dpi + 0.1), h,
                                forward=False)
            renderer = _probe(fig)
            continue
        elif font > MIN_FONT:  # as much smaller as the misfit says, at least 0.5 pt
            factor = min((right - box.x0) / box.width if wide else 1.0,
                         math.sqrt(LEGEND_SHARE * fig.bbox.height / box.height) if tall
                         else 1.0)
            font = max(MIN_FONT, min(font - 0.5, font * factor))
        else:
            return
        legend = ax.legend(handles, labels, ncols=ncols, **{**kwargs, "fontsize": font})
        _ABOVE[legend] = (handles, labels, kwargs, ncols)

"""Where the error comes from: budget bars per layer, and bits per layer."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np

from .._allocate import Allocation
from .._budget import Budget
from .._report import Report
from ._labels import axis_title, legend_above, short_names
from ._style import BLUE, GREY, KINDS, VERMILION, axes_for, log_ticks

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: the letter a Budget's ``bits`` column gives each source kind ("W8 A8")
_KIND_OF_LETTER = {"W": "weight", "b": "bias", "N": "norm", "E": "embedding",
                   "A": "activation", "I": "input"}
_VALUES = ("share", "output_mse")


def _kinds_of(bits: str) -> list[str]:
    return list(dict.fromkeys(_KIND_OF_LETTER.get(part[:1], "?") for part in bits.split()))


def _layer_of(source: str, kind: str) -> str:
    """The layer of a source named as errprop names them (``fc1.W``, ``fc1.in``, ``input``)."""
    if kind == "input":
        return "input"
    if kind == "activation":
        return re.sub(r"\.(in(\.\w+)?|acc)$", "", source)
    return source.rsplit(".", 1)[0]


def budget_table(data: Report | Budget, value: str = "share"
                 ) -> tuple[list[str], dict[str, np.ndarray]]:
    """Layers in order and, per source kind, the value of each layer (zeros where absent).

    ``value="share"`` gives percent of the predicted output MSE; ``"output_mse"`` the
    predicted output MSE itself. A layer Budget cannot be split by kind: a layer whose
    sources are of several kinds is filed under ``"mixed"``.
    """
    if value not in _VALUES:
        raise ValueError(f"budget_bars: value must be 'share' or 'output_mse', got {value!r}")
    scale = 100.0 if value == "share" else 1.0
    entries: list[tuple[str, str, float]] = []  # (layer, kind, value)
    if isinstance(data, Report):
        for row in data.budget(by="source", exact=False).rows:
            s = data.sources[row.name]
            entries.append((s.source.layer or "input", s.kind, scale * getattr(row, value)))
    elif isinstance(data, Budget):
        for row in data.rows:
            kinds = _kinds_of(row.bits)
            kind = kinds[0] if len(kinds) == 1 else "mixed"
            layer = row.name if data.by == "layer" else _layer_of(row.name, kind)
            entries.append((layer, kind, scale * getattr(row, value)))
    else:
        raise TypeError(f"budget_bars: expected an errprop Report or Budget, got "
                        f"{type(data).__name__}")
    layers = list(dict.fromkeys(layer for layer, _, _ in entries))
    stacks: dict[str, np.ndarray] = {}
    for kind in (*KINDS, "mixed", "?"):
        column = np.zeros(len(layers))
        for layer, k, v in entries:
            if k == kind:
                column[layers.index(layer)] += v
        if any(k == kind for _, k, _ in entries):
            stacks[kind] = column
    return layers, stacks


def budget_bars(data: Report | Budget, ax: Axes | None = None, *,
                value: str = "share") -> Axes:
    """Error budget: one horizontal bar per layer, stacked by source kind.

    Parameters
    ----------
    data : a :class:`~errprop.Report` (its per-source budget, grouped by layer and
        kind) or a :class:`~errprop.Budget` (``by="source"``: grouped by layer;
        ``by="layer"``: one colour per layer, ``"mixed"`` when it holds several kinds).
    value : ``"share"`` (percent of the predicted output MSE) or ``"output_mse"``.
    ax : the Axes to draw into; a new paper-style figure when None.

    Returns
    -------
    The Axes. Layers run top to bottom in execution order; a dotted prefix all layer
    names share is named once in the axis label, and long names are shortened in the
    middle (``…``), staying unique.
    """
    layers, stacks = budget_table(data, value)
    labels, prefix = short_names(layers)
    with axes_for(ax, "budget_bars") as ax:
        pos = np.arange(len(layers))
        left = np.zeros(len(layers))
        for kind, widths in stacks.items():
            label, colour = KINDS.get(kind, ("several kinds" if kind == "mixed" else kind,
                                             GREY))
            ax.barh(pos, widths, left=left, height=0.7, color=colour, label=label,
                    edgecolor="white", linewidth=0.3)
            left += widths
        ax.set_yticks(pos, labels)
        ax.set_ylim(len(layers) - 0.5, -0.5)
        ax.set_xlim(0, max(float(left.max()) if len(left) else 0.0, 1e-300) * 1.05)
        ax.set_xlabel("share of predicted output MSE (%)" if value == "share"
                      else "predicted output MSE (output units²)")
        ax.set_ylabel(axis_title("layer", prefix))
        ax.grid(axis="y", visible=False)
        legend_above(ax, ncols=min(len(stacks), 3))
        return ax


def bit_allocation(allocation: Allocation, ax: Axes | None = None) -> Axes:
    """Bits per layer from :func:`errprop.plan_bits` next to the cheapest uniform width,
    with each layer's predicted contribution to the output MSE on a second (log) axis.

    Parameters
    ----------
    allocation : an :class:`~errprop.Allocation`.
    ax : the Axes to draw into; a new paper-style figure when None.

    Returns
    -------
    The Axes of the bars (the contributions are on ``ax``'s twin, in the same figure).
    Layer names are shortened as in :func:`budget_bars`.
    """
    if not isinstance(allocation, Allocation):
        raise TypeError(f"bit_allocation: expected an errprop Allocation (from plan_bits), "
                        f"got {type(allocation).__name__}")
    layers = list(allocation.bits)
    labels, prefix = short_names(layers)
    uniform = allocation.uniform_bits
    runs = [("allocated", [allocation.bits[l] for l in layers], BLUE, "", "o")]
    if uniform is not None:
        runs.append((f"uniform {uniform} bits", [uniform] * len(layers), GREY, "///", "s"))
    with axes_for(ax, "bit_allocation") as ax:
        pos = np.arange(len(layers))
        width = 0.8 / len(runs)
        twin = ax.twinx()
        handles: list[Any] = []
        for i, (name, bits, colour, hatch, marker) in enumerate(runs):
            x = pos + (i - (len(runs) - 1) / 2) * width
            handles.append(ax.bar(x, bits, width, color=colour, hatch=hatch,
                                  edgecolor="white", linewidth=0.3, label=f"{name} bits" if not hatch else name))
            mse = [allocation.contributions[l][b] for l, b in zip(layers, bits)]
            handles += twin.plot(x, mse, ls="none", marker=marker, color=VERMILION,
                                 mfc="white" if hatch else VERMILION, mew=1.0,
                                 label=f"MSE ({name.split()[0]})")
        top = max(max(allocation.bits.values()), uniform or 0)
        ax.set_ylim(0, top + 1)
        ax.set_yticks(range(0, top + 1, 2 if top > 8 else 1))
        ax.set_ylabel("weight bits")
        ax.set_xticks(pos, labels)
        ax.set_xlabel(axis_title("layer", prefix))
        ax.grid(axis="x", visible=False)
        twin.set_yscale("log")
        log_ticks(twin.yaxis)
        twin.set_ylabel("predicted output MSE\n(output units²)", color=VERMILION)
        twin.tick_params(axis="y", colors=VERMILION, which="both")
        twin.grid(False)
        twin.spines["right"].set_visible(True)
        legend_above(ax, ncols=2, handles=handles)
        return ax

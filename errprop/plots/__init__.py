"""Paper-ready figures of errprop's results (matplotlib).

Every plotting function takes ``ax=None`` and returns the Axes it drew into; without
``ax`` it makes a new figure in the paper style (single column unless a :func:`style`
block is active). Nothing here calls ``plt.show()`` or changes rcParams outside
:func:`style`. Long layer names and many layers stay readable: a dotted prefix all names share is
named once in the axis label, long names are shortened in the middle (``…``) and stay
unique, tick labels tilt or stand up when they must, and a figure the plot made grows
(a caller's ``ax`` is never resized: its labels get a smaller font, or only every k-th
is shown). :func:`save` writes PDF and PNG atomically and reproducibly::

    import errprop.plots as epp

    with epp.style("double"):
        ax = epp.error_growth(report, mc)
    epp.save(ax, "figures/growth")        # figures/growth.pdf and figures/growth.png

=====================  =======================================================
function               figure
=====================  =======================================================
:func:`budget_bars`    error budget per layer, stacked by source kind
:func:`error_growth`   RMS error node by node: exact, analytic band, Monte Carlo
:func:`parity`         analytic against Monte Carlo (per node or per element)
:func:`bits_sweep`     output SQNR or MSE against bits, 6.02 dB/bit reference
:func:`sensitivity`    MLP versus attention (:func:`errprop.compare_blocks`)
:func:`error_histogram` Monte Carlo output errors with the analytic Gaussian
:func:`bit_allocation` bits per layer and predicted contribution, vs uniform
=====================  =======================================================

For figures of your own with layer names on an axis: :func:`short_names` (unique short
labels and the shared prefix), :func:`axis_title` (the axis label naming that prefix),
:func:`fit_labels` (tick labels that neither overlap nor leave the figure) and
:func:`log_ticks` (plain-number ticks on a log axis)::

    labels, prefix = epp.short_names(layer_names)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(epp.axis_title("layer", prefix))
    epp.fit_labels(ax)                     # after everything else is drawn
"""

from ._budgets import bit_allocation, budget_bars
from ._errors import error_growth, error_histogram, parity
from ._labels import axis_title, fit_labels, short_names
from ._style import KINDS, PALETTE, log_ticks, paper_style, rcparams, save, style
from ._sweeps import bits_sweep, sensitivity

__all__ = [
    "KINDS",
    "PALETTE",
    "axis_title",
    "bit_allocation",
    "bits_sweep",
    "budget_bars",
    "error_growth",
    "error_histogram",
    "fit_labels",
    "log_ticks",
    "paper_style",
    "parity",
    "rcparams",
    "save",
    "sensitivity",
    "short_names",
    "style",
]

"""Activation sources that are one rounding: several layers reading the same value
through equal deterministic grids.

In a graph a value may feed several quantized layers (``q``/``k``/``v`` of a decomposed
attention, ``gate``/``up`` of a gated MLP). Each layer has its own source
(``q.in``, ``k.in``, ...), and with the same recipe and round-to-nearest (or floor) their
errors are *the same* rounding of the same tensor — as in a deployed kernel that
quantizes the value once. Statistics must treat them as one random variable: their
sensitivities are added before the variance is taken. Stochastic rounding draws each
reader's rounding independently, and different grids round differently; those stay
separate sources. Monte Carlo applies the same rule (``errprop._mc_passes._Sharing``).
"""

from __future__ import annotations

from collections.abc import Mapping

from ._network import Network
from ._quant import UniformGrid, same_grid


def shared_roundings(net: Network, sources: Mapping[str, object]) -> dict[str, str]:
    """``member -> first``: each activation source that rounds the value an earlier
    layer's source rounds, through an equal deterministic grid, mapped to that earlier
    source (the group's first source in execution order carries the group's statistics).

    ``sources`` maps names to :class:`errprop.SourceResult` (``.source``, ``.grid``)."""
    by_layer: dict[str, list] = {}
    for s in sources.values():
        if s.source.kind == "activation":
            by_layer.setdefault(s.source.layer, []).append(s)
    firsts: dict[str, list] = {}  # value name -> first sources reading it
    out: dict[str, str] = {}
    for node in net.dag():
        for s in by_layer.get(node.name, ()):
            grid = s.grid
            if not isinstance(grid, UniformGrid) or grid.rounding == "stochastic":
                continue
            seen = firsts.setdefault(node.inputs[0], [])
            for first in seen:
                if same_grid(first.grid, grid):
                    out[s.name] = first.name
                    break
            else:
                seen.append(s)
    return out

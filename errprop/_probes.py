"""First-order statistics at every node, by random probes (forward mode).

The exact output statistics (:mod:`errprop._statistics`) cost one reverse sweep
per output element. At every *intermediate* node that would be one sweep per
element of the node, so errprop estimates them instead: draw ``P`` random
*probes* of all sources at once, each element's error replaced by
``σ_e · r_e`` with ``r_e = ±1`` (Rademacher), and push them through the
first-order rules in one forward pass with a leading probe axis. For each node
element ``i``, ``E_r[(Σ_e J_ie σ_e r_e)²] = Σ_e J_ie² σ_e² = Var Δx_i``, so the
mean of the squared probes is an unbiased estimate of the first-order variance;
its relative standard error is at most ``sqrt(2/P)`` per element and much smaller
for the MSE (an average over elements), which is reported with its own error bar.
The mean ``E Δx = Σ_e J_ie m_e`` rides along as one extra, exact row. A merge
node pushes its inputs' probe rows through its own ``jvp`` (linear in them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ._graph import Sequential, walk
from ._merge import Merge
from ._op import Array, Op
from ._passes import require_rules
from ._report import SourceResult
from ._shared import shared_roundings


@dataclass(frozen=True)
class NodeStatistics:
    """Estimated first-order error statistics at one node.

    Attributes
    ----------
    name : node name.
    mean : exact first-order mean of the error, per element.
    std : probe estimate of the first-order standard deviation, per element.
    mse : estimated mean over elements of ``E[Δ²] = Var + mean²``.
    mse_se : standard error of ``mse`` (from the spread over probes).
    probes : number of probes.
    """

    name: str
    mean: Array
    std: Array
    mse: float
    mse_se: float
    probes: int


def random_signs(rng: np.random.Generator, shape: tuple[int, ...]) -> Array:
    """Fair random booleans from raw random bytes: one bit per element, ~30x cheaper
    than comparing a float draw with 0.5 (probes of a whole model need billions)."""
    n = int(np.prod(shape))
    bits = np.unpackbits(np.frombuffer(rng.bytes((n + 7) // 8), dtype=np.uint8), count=n)
    return bits.view(bool).reshape(shape)


def rademacher_rows(rng: np.random.Generator, scale: Array, count: int,
                    first: Array | None = None) -> Array:
    """``count`` rows of ``±scale`` with random signs, after an optional first row:
    ``(count + (first is not None), *scale.shape)``, written in place."""
    lead = 0 if first is None else 1
    out = np.empty((lead + count, *scale.shape))
    if first is not None:
        out[0] = first
    rows = out[lead:]
    rows[...] = scale
    np.negative(rows, out=rows, where=random_signs(rng, rows.shape))
    return out


class _Probe:
    """Interpreter state: ``(x, t)`` with ``t`` of shape ``(1 + P, *x.shape)``:
    row 0 the mean tangent, rows 1..P the probes."""

    def __init__(self, forward: Mapping[str, tuple[Array, Array]],
                 by_layer: Mapping[str, list[SourceResult]], probes: int,
                 rng: np.random.Generator, shared: Mapping[str, str] | None = None) -> None:
        self.forward = forward
        self.shared = dict(shared or {})  # member source -> first source of one rounding
        self.firsts = set(self.shared.values())
        self.drawn: dict[str, Array] = {}
        self.by_layer = by_layer
        self.P = probes
        self.rng = rng
        self.nodes: dict[str, NodeStatistics] = {}

    def draw(self, src: SourceResult) -> Array:
        """Mean row and ``P`` probe rows of a source's error: ``(1 + P, *shape)``."""
        m = src.model
        return rademacher_rows(self.rng, np.sqrt(m.var), self.P, first=m.mean)

    def record(self, name: str, t: Array | None, like: Array) -> None:
        if t is None:
            zero = np.zeros_like(like)
            self.nodes[name] = NodeStatistics(name, zero, zero.copy(), 0.0, 0.0, self.P)
            return
        mean, probes = t[0], t[1:]
        per_probe = np.mean(probes.reshape(self.P, -1) ** 2, axis=1)
        self.nodes[name] = NodeStatistics(
            name, mean, np.sqrt(np.mean(probes ** 2, axis=0)),
            float(np.mean(mean ** 2) + per_probe.mean()),
            float(per_probe.std(ddof=1) / np.sqrt(self.P)) if self.P > 1 else float("inf"),
            self.P)

    def leaf(self, name: str, op: Op, state: tuple[Array, Array | None]) -> tuple:
        _, t = state
        x, y = self.forward[name]
        sources = self.by_layer.get(name, [])
        for src in sources:
            if src.source.param is None:
                first = self.shared.get(src.name)
                if first is None:  # its own rounding (kept for the layers that share it)
                    row = self.draw(src)
                    if src.name in self.firsts:
                        self.drawn[src.name] = row
                else:  # the same rounding as an earlier reader of this value
                    row = self.drawn[first]
                t = row if t is None else t + row
        _, rule = op.linearize(x)
        dy = None if t is None else rule(t, {})
        for src in sources:
            if src.source.param is not None:
                row = rule(None, {src.source.param: self.draw(src)})
                dy = row if dy is None else dy + row
        self.record(name, dy, y)
        return y, dy

    def merge(self, name: str, op: Merge, states: list[tuple]) -> tuple:
        xs, y = self.forward[name]
        ts = [t for _, t in states]
        t = None if all(t is None for t in ts) else op.jvp(xs, y, ts, {})
        self.record(name, t, y)
        return y, t


def node_statistics(net: Sequential, x: Array, forward: Mapping[str, tuple[Array, Array]],
                    sources: Mapping[str, SourceResult], *, probes: int = 64,
                    seed: int = 0) -> dict[str, NodeStatistics]:
    """Estimated first-order statistics at every node of ``net`` (see module docstring)."""
    if isinstance(probes, bool) or not isinstance(probes, (int, np.integer)) or probes < 2:
        raise ValueError(f"probes must be an integer >= 2, got {probes!r}")
    require_rules(net, "probe statistics", "jvp")
    by_layer: dict[str, list[SourceResult]] = {}
    for s in sources.values():
        if s.source.layer is not None:
            by_layer.setdefault(s.source.layer, []).append(s)
    interp = _Probe(forward, by_layer, int(probes), np.random.default_rng(seed),
                    shared_roundings(net, sources))
    t0 = interp.draw(sources["input"]) if "input" in sources else None
    walk(net, (x, t0), interp)
    return interp.nodes

"""Source × node budget matrix: an uncertainty budget per node.

**Budget matrix.** For every node ``n`` and every source (or layer) ``s``, in the style of a
metrology uncertainty budget (GUM):

* ``u(x_s)``: the standard uncertainty of the source, the RMS of the error it injects under
  its model, ``sqrt(mean_e (Var e + (E e)²))`` (summed in square over a layer's sources);
* ``V_ns``: the mean over the node's elements of ``E[Δ_n²]`` with only ``s`` active,
  ``mean_i (Σ_e J_ie² v_e + (Σ_e J_ie m_e)²)`` (first order);
* the sensitivity coefficient ``c_ns = sqrt(V_ns) / u(x_s)`` (RMS gain from the source to
  the node), the component ``u_ns = c_ns u(x_s) = sqrt(V_ns)`` and the share
  ``u_ns² / Σ_t u_nt²``.

``V_ns`` is estimated for every node at once by random probes, one set per source group,
pushed through the first-order rules in one forward pass with a leading axis
``(groups × (1 + P))``: row 0 of a group is its exact mean tangent, rows ``1..P`` replace
each error element by ``σ_e r_e`` with ``r_e = ±1`` (Rademacher), so
``E_r[(Σ_e J_ie σ_e r_e)²] = Σ_e J_ie² σ_e²``. The standard error of each estimate comes
from the spread over probes. Next to it: the *measured* part (the mean square of the source's
first-order contribution for the actual rounding, ``report.nodes[n].source_rms``) and the
worst case per source, from interval propagation with only that source's boxes (one pass
per group; interval rules are linear in the boxes, so the per-source bounds add up to the
full interval bound).

The local / propagated split of each layer's error, with noise gains, is in
:mod:`errprop._layer_split`; it shares this module's table writers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._budget import _injected_mse
from ._export import csv_text, json_text
from ._files import write_text
from ._graph import Sequential, walk
from ._merge import Merge
from ._network import float_values, forward_pairs
from ._rows import add_keyed
from ._op import Array, Op
from ._passes import bound_pass
from ._report import Report, SourceResult

_BYTES_PER_ROW = 8 * 8  # float64 times the temporaries of a rule (attention scores, ...)


# ------------------------------------------------------------------ shared table writers
def _write(path: str | os.PathLike | None, text: str) -> str:
    if path is not None:
        write_text(path, text)
    return text


def _num(v: float, spec: str = ".3g") -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else format(v, spec)


def _text(heads: Sequence[str], cells: Sequence[Sequence[str]], left: int) -> str:
    widths = [max(len(r[i]) for r in (heads, *cells)) for i in range(len(heads))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in (heads, *cells)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _markdown(heads: Sequence[str], cells: Sequence[Sequence[str]], left: int) -> str:
    align = ["---"] * left + ["---:"] * (len(heads) - left)
    return "\n".join("| " + " | ".join(r) + " |" for r in (heads, align, *cells)) + "\n"


def _latex(heads: Sequence[str], cells: Sequence[Sequence[str]], left: int,
           caption: str | None) -> str:
    def esc(s: str) -> str:
        for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("#", r"\#"),
                     ("$", r"\$"), ("%", r"\%")):
            s = s.replace(a, b)
        return s

    lines = [r"\begin{table}[t]", r"\centering"]
    if caption:
        lines.append(rf"\caption{{{esc(caption)}}}")
    lines += [r"\begin{tabular}{" + "l" * left + "r" * (len(heads) - left) + "}", r"\toprule",
              " & ".join(esc(h) for h in heads) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(c) for c in row) + r" \\" for row in cells]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def float_forward(net: Sequential, x: Array) -> dict[str, tuple[Array, Array]]:
    """Node name -> its float ``(input, output)`` (a merge: ``((inputs...), output)``), as
    :func:`errprop.analyze` records them."""
    return float_values(net, x)


# ------------------------------------------------------------------ the budget matrix
@dataclass(frozen=True, eq=False)
class BudgetMatrix:
    """Per node and per source (or layer): variance, sensitivity, component, share.

    Arrays are ``(nodes, sources)`` unless stated; see the module docstring.

    Attributes
    ----------
    nodes, sources : row and column names (``sources`` are layer names when ``by="layer"``).
    members : column name -> the source names it groups.
    by : ``"source"`` or ``"layer"``.
    uncertainty : ``(sources,)`` standard uncertainty ``u(x_s)`` of each injected error.
    variance : probe estimate of ``V_ns``, the node's mean ``E[Δ²]`` from ``s`` alone.
    variance_se : its standard error.
    total : ``(nodes,)`` estimated mean ``E[Δ²]`` with every source (includes the cross terms
        of biased sources' means, which GUM components leave out).
    measured : mean square of the actual first-order contribution (summed over a layer's
        sources).
    worst : largest interval bound on ``|Δ|`` over the node's elements from ``s`` alone (NaN
        without ``worst=True``); ``worst_sum`` the same summed over elements (for shares).
    probes : number of probes per source group.
    """

    nodes: tuple[str, ...]
    sources: tuple[str, ...]
    members: Mapping[str, tuple[str, ...]]
    by: str
    uncertainty: Array
    variance: Array
    variance_se: Array
    total: Array
    measured: Array
    worst: Array
    worst_sum: Array
    probes: int

    @property
    def component(self) -> Array:
        """``u_ns = sqrt(V_ns)``: the standard uncertainty the source leaves at the node."""
        return np.sqrt(self.variance)

    @property
    def sensitivity(self) -> Array:
        """Sensitivity coefficients ``c_ns = u_ns / u(x_s)`` (RMS gain source -> node)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.uncertainty > 0, self.component / self.uncertainty, np.nan)

    @property
    def share(self) -> Array:
        """``u_ns² / Σ_t u_nt²``; each node's row sums to 1 (0 where the node has no error)."""
        return _shares(self.variance)

    @property
    def share_se(self) -> Array:
        """Standard error of :attr:`share` (delta method; groups are probed independently)."""
        V, se = self.variance, self.variance_se
        T = V.sum(axis=1, keepdims=True)
        safe = np.where(T > 0, T, 1.0)
        dself = (safe - V) / safe ** 2
        dother = V / safe ** 2
        others = (se ** 2).sum(axis=1, keepdims=True) - se ** 2
        out = np.sqrt(dself ** 2 * se ** 2 + dother ** 2 * others)
        return np.where(T > 0, out, 0.0)

    @property
    def measured_share(self) -> Array:
        """Share of the actual first-order contributions' energy at each node."""
        return _shares(self.measured)

    @property
    def worst_share(self) -> Array:
        """Share of each source in the node's interval bound (summed over elements)."""
        return _shares(self.worst_sum)

    def _index(self, node: str | None) -> int:
        if node is None:
            return len(self.nodes) - 1
        if node not in self.nodes:
            from ._graph import unknown_name_message
            raise KeyError(unknown_name_message("node", node, list(self.nodes)))
        return self.nodes.index(node)

    def records(self, node: str | None = None) -> list[dict[str, Any]]:
        """One record per (node, source): the GUM budget entries, of every node (default)
        or of the node ``node``."""
        idx = range(len(self.nodes)) if node is None else [self._index(node)]
        c, comp, share, sse = self.sensitivity, self.component, self.share, self.share_se
        ms, ws = self.measured_share, self.worst_share
        return [{"node": self.nodes[n], "source": s, "u_source": float(self.uncertainty[j]),
                 "sensitivity": float(c[n, j]), "component": float(comp[n, j]),
                 "variance": float(self.variance[n, j]),
                 "variance_se": float(self.variance_se[n, j]), "share": float(share[n, j]),
                 "share_se": float(sse[n, j]), "measured_share": float(ms[n, j]),
                 "worst_case": float(self.worst[n, j]), "worst_share": float(ws[n, j])}
                for n in idx for j, s in enumerate(self.sources)]

    _HEADS = ("source", "u(x_s)", "c_s", "u_s", "share", "± se", "measured", "1st-order worst",
              "worst share")

    def _cells(self, node: str | None, pct: str) -> list[list[str]]:
        rows = sorted(self.records(self.nodes[self._index(node)]), key=lambda r: -r["variance"])
        return [[r["source"], _num(r["u_source"]), _num(r["sensitivity"]),
                 _num(r["component"]), f"{100 * r['share']:.1f}{pct}",
                 f"{100 * r['share_se']:.1f}{pct}", f"{100 * r['measured_share']:.1f}{pct}",
                 _num(r["worst_case"]), f"{100 * r['worst_share']:.1f}{pct}"] for r in rows]

    def table(self, node: str | None = None) -> str:
        """The uncertainty budget of one node (default: the output), largest component first."""
        n = self._index(node)
        foot = (f"node {self.nodes[n]}: combined u = sqrt(Σ u_s²) = "
                f"{math.sqrt(self.variance[n].sum()):.3g}; with mean cross terms "
                f"{math.sqrt(max(self.total[n], 0.0)):.3g}; {self.probes} probes per "
                f"{'source' if self.by == 'source' else 'layer'}")
        return _text(self._HEADS, self._cells(node, "%"), 1) + "\n" + foot

    def __str__(self) -> str:
        return self.table()

    def matrix(self, what: str = "share", format: str = "text") -> str:
        """The whole matrix, nodes × sources, of ``share``, ``measured_share``,
        ``worst_share`` (in %), ``sensitivity`` or ``component``; text or markdown."""
        if what not in ("share", "measured_share", "worst_share", "sensitivity", "component"):
            raise ValueError(f"BudgetMatrix.matrix: unknown quantity {what!r}")
        values = getattr(self, what)
        pct = what.endswith("share")
        cells = [[n, *(f"{100 * v:.1f}" if pct else _num(float(v)) for v in row)]
                 for n, row in zip(self.nodes, values)]
        heads = ["node", *self.sources]
        if format == "markdown":
            return _markdown(heads, cells, 1)
        if format != "text":
            raise ValueError(f"format must be 'text' or 'markdown', got {format!r}")
        return _text(heads, cells, 1)

    def to_markdown(self, path: str | os.PathLike | None = None, node: str | None = None) -> str:
        return _write(path, _markdown(self._HEADS, self._cells(node, "%"), 1))

    def to_latex(self, path: str | os.PathLike | None = None, node: str | None = None,
                 caption: str | None = None) -> str:
        return _write(path, _latex(self._HEADS, self._cells(node, "%"), 1, caption))

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """Every (node, source) record, long format."""
        return _write(path, csv_text(self.records()))

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        doc = {"by": self.by, "probes": self.probes, "nodes": list(self.nodes),
               "sources": list(self.sources),
               "members": {k: list(v) for k, v in self.members.items()},
               "total": self.total.tolist(), "records": self.records()}
        return _write(path, json_text(doc))


def _shares(V: Array) -> Array:
    T = V.sum(axis=1, keepdims=True)
    return np.divide(V, T, out=np.zeros_like(V), where=T > 0)


class _GroupProbes:
    """Interpreter: state ``(groups, t)``, ``t`` of shape ``(len(groups), 1 + P, *x.shape)``:
    per active group its exact mean row and ``P`` probe rows."""

    def __init__(self, forward: Mapping[str, tuple[Array, Array]],
                 by_layer: Mapping[str, list[SourceResult]], group: Mapping[str, int],
                 active: set[int], probes: int, seed: int, out: dict[str, Array]) -> None:
        self.forward, self.by_layer, self.group, self.active = forward, by_layer, group, active
        self.P, self.seed, self.out = probes, seed, out
        self.index = {name: i for i, name in enumerate(group)}

    def draw(self, src: SourceResult) -> Array:
        # one stream per source: the draws do not depend on how groups are chunked
        rng = np.random.default_rng([self.seed, self.index[src.name]])
        r = np.where(rng.random((self.P, *src.model.var.shape)) < 0.5, -1.0, 1.0)
        return np.concatenate([src.model.mean[None], np.sqrt(src.model.var) * r], axis=0)

    @staticmethod
    def add(groups: list[int], t: Array | None, g: int, rows: Array) -> tuple[list, Array]:
        if g in groups:
            t = t.copy()
            t[groups.index(g)] += rows
            return groups, t
        t = rows[None] if t is None else np.concatenate([t, rows[None]], axis=0)
        return [*groups, g], t

    def record(self, name: str, groups: list[int], t: Array | None) -> None:
        V, se, mean, _ = self.out[name]
        if t is None:
            return
        flat = t.reshape(len(groups), 1 + self.P, -1)
        for i, g in enumerate(groups):
            per_probe = np.mean(flat[i, 1:] ** 2, axis=1)
            V[g] = float(np.mean(flat[i, 0] ** 2) + per_probe.mean())
            se[g] = float(per_probe.std(ddof=1) / math.sqrt(self.P))
        mean += t[:, 0].sum(axis=0)
        self.out[name][3][0] += float(np.sum(np.mean(flat[:, 1:] ** 2, axis=(1, 2))))

    def leaf(self, name: str, op: Op, state: tuple) -> tuple:
        groups, t = state
        x, y = self.forward[name]
        mine = [s for s in self.by_layer.get(name, []) if self.group[s.name] in self.active]
        for s in mine:
            if s.source.param is None:
                groups, t = self.add(groups, t, self.group[s.name], self.draw(s))
        _, rule = op.linearize(x)
        dy = None
        if t is not None:
            dy = rule(t.reshape(-1, *x.shape), {}).reshape(len(groups), 1 + self.P, *y.shape)
        for s in mine:
            if s.source.param is not None:
                groups, dy = self.add(groups, dy, self.group[s.name],
                                      rule(None, {s.source.param: self.draw(s)}))
        self.record(name, groups, dy)
        return groups, dy

    def merge(self, name: str, op: Merge, states: list[tuple]) -> tuple:
        xs, y = self.forward[name]
        groups: list[int] = []
        t: Array | None = None
        for i, (g_in, t_in) in enumerate(states):
            if t_in is None:
                continue
            # the rule is linear in each input: push one input's rows at a time, sum by group
            dxs: list[Array | None] = [None] * len(states)
            dxs[i] = t_in.reshape(-1, *xs[i].shape)
            rows = op.jvp(xs, y, dxs, {}).reshape(len(g_in), 1 + self.P, *y.shape)
            groups, t = add_keyed(groups, t, g_in, rows)
        self.record(name, groups, t)
        return groups, t


def budget_matrix(net: Sequential, x: object, report: Report, *, by: str = "source",
                  probes: int = 64, seed: int = 0, worst: bool = True,
                  memory_limit: int = 2 ** 28) -> BudgetMatrix:
    """The source × node budget matrix of ``report`` (``analyze(net, x, config)``); the same
    as ``report.budget_matrix(...)``.

    Parameters
    ----------
    by : ``"source"`` (one column per source) or ``"layer"`` (a layer's sources together).
    probes : Rademacher probes per column (relative standard error of each variance about
        ``sqrt(2/probes)`` per element, less after averaging over a node's elements).
    seed : for the probes (one stream per source).
    worst : also run one interval pass per column for the worst-case shares (NaN when an
        op has no interval rule).
    memory_limit : bytes for the probe tangents; columns are split into several passes
        above it.
    """
    if by not in ("source", "layer"):
        raise ValueError(f"budget_matrix: by must be 'source' or 'layer', got {by!r}")
    if isinstance(probes, bool) or not isinstance(probes, (int, np.integer)) or probes < 2:
        raise ValueError(f"probes must be an integer >= 2, got {probes!r}")
    x = np.asarray(x, dtype=np.float64)
    forward = float_forward(net, x)
    srcs = report.sources
    columns: dict[str, list[str]] = {}
    for s in srcs.values():
        key = s.name if by == "source" else (s.source.layer or "input")
        columns.setdefault(key, []).append(s.name)
    names = list(columns)
    group = {s: j for j, key in enumerate(names) for s in columns[key]}
    by_layer: dict[str, list[SourceResult]] = {}
    for s in srcs.values():
        if s.source.layer is not None:
            by_layer.setdefault(s.source.layer, []).append(s)
    nodes = list(report.nodes)
    N, S, P = len(nodes), len(names), int(probes)
    out = {n: (np.zeros(S), np.zeros(S), np.zeros_like(report.nodes[n].value), np.zeros(1))
           for n in nodes}
    biggest = max(max(max(a.size for a in xs), b.size) for xs, b in forward_pairs(forward))
    per_pass = max(1, int(memory_limit // (_BYTES_PER_ROW * biggest * (1 + P))))
    for j0 in range(0, S, per_pass):
        active = set(range(j0, min(S, j0 + per_pass)))
        interp = _GroupProbes(forward, by_layer, group, active, P, seed, out)
        state: tuple = ([], None)
        if "input" in srcs and group["input"] in active:
            state = ([group["input"]], interp.draw(srcs["input"])[None])
        with np.errstate(over="ignore", invalid="ignore"):
            walk(net, state, interp)
    W, Wsum = np.full((N, S), np.nan), np.full((N, S), np.nan)
    if worst:
        for j, key in enumerate(names):
            chosen = {s: srcs[s] for s in columns[key]}
            layers: dict[str, list] = {}
            for s in chosen.values():
                if s.source.layer is not None:
                    layers.setdefault(s.source.layer, []).append(s.source)
            try:
                bounds = bound_pass(net, forward, layers, chosen, "interval")
            except NotImplementedError:  # an op without an interval rule: no worst case
                break
            for i, n in enumerate(nodes):
                W[i, j], Wsum[i, j] = float(np.max(bounds[n])), float(np.sum(bounds[n]))
    measured = np.array([[sum(report.nodes[n].source_rms.get(s, 0.0) ** 2 for s in columns[k])
                          for k in names] for n in nodes])
    u = np.array([math.sqrt(sum(_injected_mse(srcs[s]) for s in columns[k])) for k in names])
    total = np.array([float(np.mean(out[n][2] ** 2) + out[n][3][0]) for n in nodes])
    return BudgetMatrix(
        nodes=tuple(nodes), sources=tuple(names),
        members={k: tuple(v) for k, v in columns.items()}, by=by, uncertainty=u,
        variance=np.array([out[n][0] for n in nodes]).reshape(N, S),
        variance_se=np.array([out[n][1] for n in nodes]).reshape(N, S), total=total,
        measured=measured.reshape(N, S), worst=W, worst_sum=Wsum, probes=P)

"""Local / propagated split of every layer's error, and each layer's noise gain (PyTorch
numeric suite's shadow versus propagated error).

At the output of each layer ``L`` with float input ``x`` and the quantized network's input
``x̂``: *local* is ``L_q(x) − L(x)`` (only ``L``'s own sources quantized, float input),
*propagated* is ``L(x̂) − L(x)`` (``L`` in float on the quantized network's input); the
exact error ``L_q(x̂) − L(x)`` is their sum plus an interaction term. First order: local is
the contribution of ``L``'s sources at node ``L``, propagated the rest. The *noise gain* of
``L`` is ``Σ propagated² / Σ Δx²`` (energy ratio over the node's elements), measured and
first order; with a budget matrix (:mod:`errprop._budget_matrix`) also under the error
model.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from ._budget import _injected_mse
from ._budget_matrix import BudgetMatrix, _latex, _markdown, _num, _text, _write
from ._export import csv_text, json_text
from ._graph import Sequential, walk
from ._merge import Merge
from ._op import Array, Op
from ._report import Report, SourceResult


@dataclass(frozen=True)
class SplitRow:
    """One layer's error at its output, split into local and propagated parts.

    MSEs are means over the layer's output elements (``input_*``: over its input's);
    ``*_first_order`` from the first-order contributions for the actual rounding,
    ``*_model`` from a :class:`BudgetMatrix` (the error models; NaN without one), the rest
    measured by exact fake-quant runs. ``interaction_mse``: the mean square of
    ``exact − local − propagated``. ``gain*``: ``Σ propagated² / Σ Δx²`` over the elements.
    ``local_share``: ``local / (local + propagated)``, measured.
    """

    name: str
    op: str
    sources: tuple[str, ...]
    input_mse: float
    input_mse_first_order: float
    local_mse: float
    local_mse_first_order: float
    propagated_mse: float
    propagated_mse_first_order: float
    interaction_mse: float
    exact_mse: float
    local_share: float
    gain: float
    gain_first_order: float
    input_mse_model: float
    local_mse_model: float
    propagated_mse_model: float
    gain_model: float


_SPLIT = (("name", "layer"), ("op", "op"), ("input_mse", "input MSE"),
          ("local_mse", "local"), ("local_mse_first_order", "local 1st"),
          ("propagated_mse", "propagated"), ("propagated_mse_first_order", "prop. 1st"),
          ("interaction_mse", "interaction"), ("local_share", "local share"),
          ("gain", "gain"), ("gain_first_order", "gain 1st"), ("gain_model", "gain model"))


@dataclass(frozen=True)
class LayerSplit:
    """Per layer: local versus propagated error and the noise gain, with exports."""

    rows: tuple[SplitRow, ...]

    def __getitem__(self, name: str) -> SplitRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no layer named {name!r} in the split")

    def sort(self, by: str = "exact_mse", descending: bool = True) -> LayerSplit:
        """The rows sorted by a field of :class:`SplitRow` (NaN last)."""
        if by not in SplitRow.__dataclass_fields__ or by == "sources":
            raise ValueError(f"LayerSplit.sort: unknown column {by!r}")

        def key(r: SplitRow) -> Any:
            v = getattr(r, by)
            return v if isinstance(v, str) else (-math.inf if math.isnan(v) else v)

        return replace(self, rows=tuple(sorted(self.rows, key=key, reverse=descending)))

    def records(self) -> list[dict[str, Any]]:
        return [{**asdict(r), "sources": " ".join(r.sources)} for r in self.rows]

    def _cells(self, pct: str) -> list[list[str]]:
        out = []
        for r in self.rows:
            cells = []
            for field, _ in _SPLIT:
                v = getattr(r, field)
                if isinstance(v, str):
                    cells.append(v)
                elif field == "local_share":
                    cells.append("-" if math.isnan(v) else f"{100 * v:.1f}{pct}")
                else:
                    cells.append(_num(v))
            out.append(cells)
        return out

    def table(self) -> str:
        note = ("local: own sources on the float input; propagated: float layer on the "
                "quantized network's input; gain = Σ propagated² / Σ input error² "
                "(exact, first order, error model)")
        return _text([h for _, h in _SPLIT], self._cells("%"), 2) + "\n" + note

    def __str__(self) -> str:
        return self.table()

    def to_markdown(self, path: str | os.PathLike | None = None) -> str:
        return _write(path, _markdown([h for _, h in _SPLIT], self._cells("%"), 2))

    def to_latex(self, path: str | os.PathLike | None = None, caption: str | None = None) -> str:
        return _write(path, _latex([h for _, h in _SPLIT], self._cells("%"), 2, caption))

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        return _write(path, csv_text(self.records()))

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        return _write(path, json_text({"rows": self.records()}))


def _ms(a: Array | None) -> float:
    return float(np.mean(np.square(a))) if a is not None and np.size(a) else 0.0


def _ratio(num: float, num_size: int, den: float, den_size: int) -> float:
    return num * num_size / (den * den_size) if den > 0 else math.nan


class _Split:
    """Interpreter over the report's nodes: state ``(x, x̂, Δ first order, producer)``, the
    value on an edge of the graph and the name of the node that produced it."""

    def __init__(self, report: Report, model: BudgetMatrix | None) -> None:
        self.report, self.model = report, model
        self.own: dict[str, list[SourceResult]] = {}
        for s in report.sources.values():
            if s.source.layer is not None:
                self.own.setdefault(s.source.layer, []).append(s)
        self.rows: list[SplitRow] = []

    def _model(self, name: str, prev: str | None, own: list[SourceResult],
               size_in: int, size_out: int) -> tuple[float, float, float, float]:
        m = self.model
        if m is None:
            return (math.nan,) * 4
        mine = {s.name for s in own}
        local_cols = [j for j, k in enumerate(m.sources) if set(m.members[k]) <= mine]
        row = m.variance[m.nodes.index(name)]
        local = float(row[local_cols].sum())
        prop = float(row.sum()) - local
        if prev is not None:
            inp = float(m.variance[m.nodes.index(prev)].sum())
        else:
            src = self.report.sources.get("input")
            inp = _injected_mse(src) if src is not None else 0.0
        return inp, local, prop, _ratio(prop, size_out, inp, size_in)

    def leaf(self, name: str, op: Op, state: tuple) -> tuple:
        x, xq, d_in, prev = state
        node = self.report.nodes[name]
        y = node.value
        own = self.own.get(name, [])
        params = {s.source.param: s.value + s.error for s in own if s.source.param is not None}
        dparams = {s.source.param: s.error for s in own if s.source.param is not None}
        x_local, e_act = x, None
        for s in own:
            if s.source.param is None:  # the report's rounding of the float activation
                x_local, e_act = s.value + s.error, s.error
        with np.errstate(over="ignore", invalid="ignore"):
            local = op.forward(x_local, params or None) - y
            prop = op.forward(xq) - y
        local1 = op.jvp(x, y, e_act, dparams) if own else np.zeros_like(y)
        prop1 = node.first_order - local1
        inter = node.exact - local - prop
        lm, pm = _ms(local), _ms(prop)
        im, im1 = _ms(xq - x), _ms(d_in)
        model = self._model(name, prev, own, x.size, y.size)
        self.rows.append(SplitRow(
            name=name, op=type(op).__name__, sources=tuple(s.name for s in own),
            input_mse=im, input_mse_first_order=im1, local_mse=lm,
            local_mse_first_order=_ms(local1), propagated_mse=pm,
            propagated_mse_first_order=_ms(prop1), interaction_mse=_ms(inter),
            exact_mse=node.rms_exact ** 2,
            local_share=lm / (lm + pm) if lm + pm > 0 else math.nan,
            gain=_ratio(pm, y.size, im, x.size),
            gain_first_order=_ratio(_ms(prop1), y.size, im1, x.size),
            input_mse_model=model[0], local_mse_model=model[1], propagated_mse_model=model[2],
            gain_model=model[3]))
        return y, y + node.exact, node.first_order, name

    def merge(self, name: str, op: Merge, states: list[tuple]) -> tuple:
        # a merge has no sources of its own: no row; its error is the report's
        node = self.report.nodes[name]
        return node.value, node.value + node.exact, node.first_order, name


def layer_split(net: Sequential, x: object, report: Report, *,
                matrix: BudgetMatrix | None = None) -> LayerSplit:
    """Local versus propagated error at the output of every layer of ``report``
    (``analyze(net, x, config)``) and each layer's noise gain; the same as
    ``report.layer_split()``. Two float/fake-quant forwards of one layer per layer.

    Parameters
    ----------
    matrix : a :func:`budget_matrix` of the same report (``by="source"`` or ``"layer"``)
        for the columns under the error model (``*_model``, ``gain_model``).
    """
    x = np.asarray(x, dtype=np.float64)
    if matrix is not None and tuple(report.nodes) != matrix.nodes:
        raise ValueError("layer_split: the budget matrix belongs to another report")
    src = report.sources.get("input")
    e0 = src.error if src is not None else np.zeros_like(x)
    interp = _Split(report, matrix)
    walk(net, (x, x + e0, e0, None), interp)
    return LayerSplit(rows=tuple(interp.rows))

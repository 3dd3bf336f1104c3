"""Error budgets: which layer (or source) is to blame, in a table ready for a paper.

For every layer (or every source) of an analysed network, one row:

* ``injected_mse``: the mean square of the error the quantizer injects there, under its
  error model (``s²/12`` per element for round-to-nearest), averaged over the row's
  quantized elements (summed over the row's sources for a layer);
* ``output_mse``: the row's first-order contribution to the output MSE — exact reverse-mode
  statistics when the network is small enough (``method="statistics"``), otherwise the
  mean square of its first-order output error for the actual rounding
  (``method="first order"``);
* ``share`` of the total, ``gain = output_mse / injected_mse`` (output MSE per unit
  injected MSE), ``worst_case`` (largest first-order worst-case output error of the row,
  statistics method only) and ``exact_mse``: the output MSE of the exact fake-quant
  error when only this row is quantized (one fake-quant forward per row).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from ._export import csv_text, json_text
from ._files import write_text
from ._graph import Sequential, walk
from ._merge import Merge
from ._op import Array, Op
from ._report import Report, SourceResult, sqnr_db

#: one letter per source kind, for the bits column ("W8 A8")
_LETTER = {"weight": "W", "bias": "b", "norm": "N", "embedding": "E", "activation": "A",
           "input": "I"}
COLUMNS = ("name", "op", "params", "bits", "injected_mse", "output_mse", "share", "gain",
           "worst_case", "exact_mse")
_HEADS = {"name": "layer", "op": "op", "params": "params", "bits": "bits",
          "injected_mse": "injected MSE", "output_mse": "output MSE", "share": "share",
          "gain": "gain", "worst_case": "first-order worst case", "exact_mse": "exact MSE"}


@dataclass(frozen=True)
class BudgetRow:
    """One layer's (or source's) line of the budget; see the module docstring."""

    name: str
    op: str
    params: int
    bits: str
    injected_mse: float
    output_mse: float
    share: float
    gain: float
    worst_case: float
    exact_mse: float
    sources: tuple[str, ...]


@dataclass(frozen=True)
class Budget:
    """A sortable error-budget table with exports (text, CSV, JSON, Markdown, LaTeX).

    Attributes
    ----------
    rows : the rows, in the current order.
    by : ``"layer"`` or ``"source"``.
    method : how ``output_mse`` was computed (``"statistics"`` or ``"first order"``).
    total_output_mse : predicted output MSE (sum of the rows).
    exact_output_mse : MSE of the exact error with everything quantized.
    output_sqnr_db : SQNR of that exact error, ``20·log10(‖y‖/‖Δy‖)``.
    """

    rows: tuple[BudgetRow, ...]
    by: str
    method: str
    total_output_mse: float
    exact_output_mse: float
    output_sqnr_db: float

    def sort(self, by: str = "output_mse", descending: bool = True) -> Budget:
        """The budget with its rows sorted by a column (``name`` sorts alphabetically)."""
        if by not in COLUMNS:
            raise ValueError(f"Budget.sort: unknown column {by!r}; columns: {', '.join(COLUMNS)}")

        def key(r: BudgetRow) -> Any:
            v = getattr(r, by)
            return v if isinstance(v, str) else (-math.inf if math.isnan(v) else v)

        return replace(self, rows=tuple(sorted(self.rows, key=key, reverse=descending)))

    def __getitem__(self, name: str) -> BudgetRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no budget row named {name!r}")

    # ------------------------------------------------------------- exports
    def records(self) -> list[dict[str, Any]]:
        """The rows as dictionaries (``sources`` joined with spaces)."""
        return [{**asdict(r), "sources": " ".join(r.sources)} for r in self.rows]

    def _cells(self, fmt: str) -> list[list[str]]:
        def num(v: float, spec: str) -> str:
            return "-" if isinstance(v, float) and math.isnan(v) else format(v, spec)

        out = []
        for r in self.rows:
            share = f"{100 * r.share:.1f}" + ("\\%" if fmt == "latex" else "%")
            out.append([r.name, r.op, f"{r.params:,}" if fmt != "latex" else f"{r.params}",
                        r.bits, num(r.injected_mse, ".3g"), num(r.output_mse, ".3g"), share,
                        num(r.gain, ".3g"), num(r.worst_case, ".3g"),
                        num(r.exact_mse, ".3g")])
        return out

    def _heads(self) -> list[str]:
        return [("source" if self.by == "source" and c == "name" else _HEADS[c])
                for c in COLUMNS]

    def table(self) -> str:
        """A readable terminal table with the totals underneath."""
        heads, cells = self._heads(), self._cells("text")
        widths = [max(len(row[i]) for row in (heads, *cells)) for i in range(len(heads))]
        lines = ["  ".join(c.ljust(w) if i < 2 or i == 3 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths)))
                 for row in (heads, *cells)]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"total predicted output MSE {self.total_output_mse:.3g} ({self.method}); "
                     f"exact {self.exact_output_mse:.3g}; output SQNR "
                     f"{self.output_sqnr_db:.1f} dB")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_markdown(self, path: str | os.PathLike | None = None) -> str:
        heads, cells = self._heads(), self._cells("markdown")
        align = ["---", "---", "---:", "---", *["---:"] * (len(heads) - 4)]
        text = "\n".join("| " + " | ".join(row) + " |"
                         for row in (heads, align, *cells)) + "\n"
        return self._write(path, text)

    def to_latex(self, path: str | os.PathLike | None = None, caption: str | None = None) -> str:
        """A booktabs table (``\\usepackage{booktabs}``), names escaped for LaTeX."""
        def esc(s: str) -> str:
            for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"),
                         ("#", r"\#"), ("$", r"\$")):
                s = s.replace(a, b)
            return s

        heads = [esc(h) for h in self._heads()]
        cells = [[esc(c) if i in (0, 1, 3) else c for i, c in enumerate(row)]
                 for row in self._cells("latex")]
        lines = [r"\begin{table}[t]", r"\centering"]
        if caption:
            lines.append(rf"\caption{{{esc(caption)}}}")
        lines += [r"\begin{tabular}{ll r l " + "r" * (len(heads) - 4) + "}", r"\toprule",
                  " & ".join(heads) + r" \\", r"\midrule"]
        lines += [" & ".join(row) + r" \\" for row in cells]
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        return self._write(path, "\n".join(lines) + "\n")

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        records = self.records()
        return self._write(path, csv_text(records, None if records else COLUMNS))

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        doc = {"by": self.by, "method": self.method, "total_output_mse": self.total_output_mse,
               "exact_output_mse": self.exact_output_mse,
               "output_sqnr_db": self.output_sqnr_db, "rows": self.records()}
        return self._write(path, json_text(doc))  # NaN/inf (JSON has neither) as null

    @staticmethod
    def _write(path: str | os.PathLike | None, text: str) -> str:
        if path is not None:
            write_text(path, text)
        return text


# ------------------------------------------------------------------ exact subsets
class _SubsetForward:
    """Fake-quant forward with only some sources quantized (the rest stay float)."""

    def __init__(self, chosen: dict[str, SourceResult], seed: int) -> None:
        self.params: dict[str, dict[str, Array]] = {}
        self.acts: dict[str, list[SourceResult]] = {}
        for s in chosen.values():
            if s.source.param is not None:
                self.params.setdefault(s.source.layer, {})[s.source.param] = s.value + s.error
            elif s.kind == "activation":
                self.acts.setdefault(s.source.layer, []).append(s)
        self.rng = np.random.default_rng(seed)

    def leaf(self, name: str, op: Op, x: Array) -> Array:
        for s in self.acts.get(name, []):
            x = s.grid.quantize(x, rng=self.rng)
        return op.forward(x, self.params.get(name))

    def merge(self, name: str, op: Merge, xs: list[Array]) -> Array:
        return op.forward(xs)  # merges have no sources


def exact_subset(net: Sequential, x: Array, report: Report, names: Sequence[str], *,
                 seed: int = 0) -> Array:
    """The exact output error with only the sources ``names`` quantized, on the grids the
    report fitted (activation grids calibrated on the float activations)."""
    unknown = [n for n in names if n not in report.sources]
    if unknown:
        raise KeyError(f"no source named {unknown[0]!r} in this report")
    chosen = {n: report.sources[n] for n in names}
    xq = x
    if "input" in chosen:
        xq = chosen["input"].grid.quantize(x, rng=np.random.default_rng(seed))
    with np.errstate(over="ignore", invalid="ignore"):
        y = walk(net, xq, _SubsetForward(chosen, seed))
    return y - report.output


# ------------------------------------------------------------------ the budget
def _injected_mse(s: SourceResult) -> float:
    return float(np.mean(s.model.var + s.model.mean ** 2))


def _bits(sources: list[SourceResult]) -> str:
    parts = []
    for s in sources:
        q = s.source.quantizer
        bits = getattr(q, "bits", None)
        label = f"{_LETTER.get(s.kind, '?')}{bits if bits is not None else '?'}"
        if label not in parts:
            parts.append(label)
    order = "WAbNEI"
    return " ".join(sorted(parts, key=lambda label: order.find(label[0])))


def budget(net: Sequential, x: object, report: Report, *, by: str = "layer",
           exact: bool = True, seed: int = 0) -> Budget:
    """The error budget of ``report`` (which ``analyze(net, x, config)`` returned); the
    same as ``report.budget(by=...)``.

    Parameters
    ----------
    by : ``"layer"`` (one row per layer, its sources together) or ``"source"``.
    exact : also run one fake-quant forward per row for ``exact_mse`` (else NaN).
    seed : for stochastic rounding in those runs.
    """
    if by not in ("layer", "source"):
        raise ValueError(f"budget: by must be 'layer' or 'source', got {by!r}")
    x = np.asarray(x, dtype=np.float64)
    contrib, method = report.predicted_mse_contributions()
    worst = {}
    if method == "statistics":
        worst = {k: float(np.max(v)) for k, v in report.statistics.worst_contributions.items()}
    ops = dict(net.layers())
    groups: dict[str, list[SourceResult]] = {}
    for s in report.sources.values():
        key = s.name if by == "source" else (s.source.layer or "input")
        groups.setdefault(key, []).append(s)
    total = sum(contrib.values())
    rows = []
    for key, members in groups.items():
        layer = members[0].source.layer
        op = "input" if layer is None else type(ops[layer]).__name__
        params = sum(int(s.error.size) for s in members if s.source.param is not None)
        injected = sum(_injected_mse(s) for s in members)
        out_mse = sum(contrib.get(s.name, 0.0) for s in members)
        wc = sum(worst[s.name] for s in members) if worst else math.nan
        exact_mse = math.nan
        if exact:
            err = exact_subset(net, x, report, [s.name for s in members], seed=seed)
            exact_mse = float(np.mean(err ** 2))
        rows.append(BudgetRow(
            name=key, op=op, params=params, bits=_bits(members), injected_mse=injected,
            output_mse=out_mse, share=out_mse / total if total > 0 else 0.0,
            gain=out_mse / injected if injected > 0 else math.nan, worst_case=wc,
            exact_mse=exact_mse, sources=tuple(s.name for s in members)))
    return Budget(rows=tuple(rows), by=by, method=method, total_output_mse=float(total),
                  exact_output_mse=report.exact_mse,
                  output_sqnr_db=sqnr_db(report.output, report.exact))

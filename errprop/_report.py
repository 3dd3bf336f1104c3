"""Results of an analysis: per node, per source, and a readable table."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._graph import unknown_name_message
from ._op import Array
from ._quant import ErrorModel, UniformGrid

if TYPE_CHECKING:
    from ._budget import Budget
    from ._budget_matrix import BudgetMatrix
    from ._layer_split import LayerSplit
    from ._compare import Comparison
    from ._config import QuantConfig, Source
    from ._probes import NodeStatistics
    from ._statistics import OutputStatistics


def _rms(a: Array) -> float:
    return float(np.sqrt(np.mean(np.square(a)))) if np.size(a) else 0.0


def relative_residual(exact: Array, first_order: Array) -> float:
    """``‖exact − first_order‖ / ‖exact‖`` (0 when both vanish, inf when only exact does)."""
    num = float(np.linalg.norm(np.ravel(exact - first_order)))
    den = float(np.linalg.norm(np.ravel(exact)))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def sqnr_db(value: Array, error: Array) -> float:
    """``20·log10(‖y‖ / ‖Δy‖)`` in dB, the definition of PyTorch's numeric suite."""
    err = float(np.linalg.norm(np.ravel(error)))
    sig = float(np.linalg.norm(np.ravel(value)))
    if err == 0.0:
        return float("inf")
    if sig == 0.0:
        return float("-inf")
    return 20.0 * float(np.log10(sig / err))


@dataclass(frozen=True)
class NodeResult:
    """Errors at one node of the graph.

    Attributes
    ----------
    name, kind : the node's full name and op type (``"Residual"`` for a join).
    value : the float output of the node.
    exact : fake-quantized minus float output.
    first_order : the first-order prediction of ``exact``.
    source_rms : source name -> RMS of its first-order contribution here.
    diagnostics : where first order may be unreliable at this op, as fractions:
        ``near_kink`` (ReLU inputs within the realised first-order error of 0; for the
        inputs the whole error box can bring to 0 see ``Report.box_reaches_kink``),
        ``saturated`` (softmax
        rows with a probability above 0.99), ``flat_norm`` (normalization rows
        with variance below 100·eps).
    """

    name: str
    kind: str
    value: Array
    exact: Array
    first_order: Array
    source_rms: Mapping[str, float]
    diagnostics: Mapping[str, float] = field(default_factory=dict)

    @property
    def rms_exact(self) -> float:
        return _rms(self.exact)

    @property
    def rms_first_order(self) -> float:
        return _rms(self.first_order)

    @property
    def residual(self) -> float:
        """Relative first-order residual ``‖exact − first_order‖ / ‖exact‖``."""
        return relative_residual(self.exact, self.first_order)

    @property
    def sqnr_db(self) -> float:
        """``20·log10(‖y‖/‖Δy_exact‖)``."""
        return sqnr_db(self.value, self.exact)


class SourceResult:
    """One error source: what it is, the error it injected and its model.

    ``error`` is ``Q(v) − v`` for the quantized tensor ``v`` (for activation
    sources, ``v`` is the float activation); ``grid`` the fitted quantization grid;
    ``value`` the tensor ``v``; ``model`` its per-element error model,
    ``grid.error_model(v)``, computed on first use (only statistics, bounds and probes
    need it, and it costs several full-size arrays per source).
    """

    __slots__ = ("source", "error", "grid", "value", "_model")

    def __init__(self, source: Source, error: Array, grid: UniformGrid, value: Array,
                 model: ErrorModel | None = None) -> None:
        self.source, self.error, self.grid, self.value = source, error, grid, value
        self._model = model

    @property
    def model(self) -> ErrorModel:
        if self._model is None:
            self._model = self.grid.error_model(self.value)
        return self._model

    def __repr__(self) -> str:
        return f"SourceResult({self.source.name!r}, {self.source.quantizer!r})"

    @property
    def sqnr_db(self) -> float:
        """SQNR of the quantized tensor itself, ``20·log10(‖v‖/‖Q(v) − v‖)`` dB."""
        return sqnr_db(self.value, self.error)

    @property
    def max_to_rms(self) -> float:
        """``max|v| / rms(v)``: how far outliers stretch a per-tensor grid (≈ 1.7 for
        uniform, 3-5 for Gaussian-like values, tens when a few entries dominate)."""
        rms = _rms(self.value)
        return float(np.max(np.abs(self.value))) / rms if rms > 0 else float("nan")

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def kind(self) -> str:
        return self.source.kind


class Report:
    """Exact and first-order error of a quantized network, per node and per source.

    Attributes
    ----------
    output : float output of the network.
    exact : fake-quantized output minus float output.
    first_order : first-order prediction of ``exact`` (sum of ``contributions``).
    contributions : source name -> its first-order output error.
    nodes : node name -> :class:`NodeResult`, in execution order.
    sources : source name -> :class:`SourceResult`, in execution order.
    config : the QuantConfig analysed.
    """

    def __init__(self, *, output: Array, exact: Array, first_order: Array,
                 contributions: dict[str, Array], nodes: dict[str, NodeResult],
                 sources: dict[str, SourceResult], config: QuantConfig,
                 passes: Mapping[str, Callable[..., Any]] | None = None) -> None:
        self.output = output
        self.exact = exact
        self.first_order = first_order
        self.contributions = contributions
        self.nodes = nodes
        self.sources = sources
        self.config = config
        # deferred passes over the graph (statistics, probes, second order, bounds),
        # run on first use and cached by their arguments
        self._passes = dict(passes or {})
        self._cache: dict[tuple, Any] = {}

    def _run(self, name: str, *args: Any) -> Any:
        key = (name, *args)
        if key not in self._cache:
            if name not in self._passes:
                raise ValueError(f"this report carries no graph for '{name}': build it with "
                                 f"errprop.analyze()")
            self._cache[key] = self._passes[name](*args)
        return self._cache[key]

    @property
    def statistics(self) -> OutputStatistics:
        """First-order output statistics (computed on first access, then cached)."""
        return self._run("statistics")

    @property
    def norm_bound_nodes(self) -> dict[str, Array]:
        """Operator-norm bound on ``‖Δ_n‖`` (Frobenius per batch element) at every node:
        ``r_out = ‖J‖₂ r_in + ‖local error‖`` layer by layer, as in the papers' bounds
        (first order; holds for every pattern in the boxes; usually far looser than
        :attr:`worst_case`). Shape ``(batch,)`` per node. Computed on first use."""
        return self._run("norm_bound")

    @property
    def norm_bound(self) -> Array:
        """:attr:`norm_bound_nodes` at the output: ``(batch,)``."""
        return self.norm_bound_nodes[list(self.nodes)[-1]]

    @property
    def interval_nodes(self) -> dict[str, Array]:
        """Elementwise first-order worst-case bound at every node, by interval propagation
        of the linearized error (one forward pass; dominates every first-order error pattern
        in the quantizers' boxes, looser than the first-order :attr:`worst_case` at the
        output; not a certified bound of the real network: :attr:`rigorous_nodes` is).
        Computed on first use."""
        return self._run("interval")

    @property
    def second_order_nodes(self) -> dict[str, Array]:
        """Second-order prediction of the exact error at every node (computed on first use).

        Taylor mode: first order plus the cross terms ``ΔW·Δx``, the curvature terms
        ``½ f''(x) Δx²`` and the second derivatives of softmax, normalization and
        attention, for the same source errors as ``first_order``.
        """
        return self._run("second_order")

    @property
    def second_order(self) -> Array:
        """Second-order prediction of ``exact`` at the output."""
        return self.second_order_nodes[list(self.nodes)[-1]]

    @property
    def second_order_residual(self) -> float:
        """``‖exact − second_order‖ / ‖exact‖`` at the output."""
        return relative_residual(self.exact, self.second_order)

    def node_statistics(self, probes: int = 64, seed: int = 0) -> dict[str, NodeStatistics]:
        """First-order error statistics at every node, estimated with random probes.

        Per node: the exact first-order mean, the estimated standard deviation per
        element, and the estimated MSE with its standard error (see
        :mod:`errprop._probes`). Cached per ``(probes, seed)``.
        """
        return self._run("probes", probes, seed)

    def _stats(self) -> OutputStatistics:
        return self._run("statistics")

    @property
    def mean(self) -> Array:
        """First-order mean of the output error under the sources' error models."""
        return self._stats().mean

    @property
    def std(self) -> Array:
        """First-order standard deviation of each output element's error (independent sources)."""
        return self._stats().std

    @property
    def mse(self) -> float:
        """Predicted output MSE: mean over output elements of ``E[Δy²]`` (first order)."""
        return self._stats().mse

    @property
    def mse_contributions(self) -> dict[str, float]:
        """Per-source share of the predicted MSE; sums to ``mse``."""
        return self._stats().mse_contributions

    def predicted_mse(self) -> tuple[float, str]:
        """The predicted output MSE and how it was obtained: ``(mse, "statistics")`` from
        the exact first-order statistics, or, where those are refused as too large,
        ``(mean(first_order²), "first order")``: the energy of the first-order error of
        the actual rounding."""
        from ._statistics import StatisticsTooLarge  # _statistics imports this module
        try:
            return self.mse, "statistics"
        except StatisticsTooLarge:
            return float(np.mean(self.first_order ** 2)), "first order"

    def predicted_mse_contributions(self) -> tuple[dict[str, float], str]:
        """Per-source predicted output MSE, as :meth:`predicted_mse`: exact statistics
        (``"statistics"``), else the mean square of each source's first-order output error
        (``"first order"``; these omit the cross terms between sources)."""
        from ._statistics import StatisticsTooLarge
        try:
            return self.mse_contributions, "statistics"
        except StatisticsTooLarge:
            return ({k: float(np.mean(c ** 2)) for k, c in self.contributions.items()},
                    "first order")

    @property
    def worst_case(self) -> Array:
        """Elementwise first-order worst case: ``max |Δy|`` of the *linearized* error over
        every error pattern in the quantizers' boxes (exact maximum at first order, attained
        by sign-aligned errors). Not a certified bound: the real network can exceed it where
        the box reaches a kink or curvature (see :attr:`box_reaches_kink`); for a guaranteed
        one use :attr:`rigorous_worst_case`."""
        return self._stats().worst_case

    @property
    def rigorous_nodes(self) -> dict[str, Array]:
        """Rigorous elementwise bound on ``|Δ|`` at every node: interval arithmetic over the
        real nonlinear network (not its linearization), every source anywhere in its box
        (parameters and input within ``max_abs``; activation quantizers applied to the
        values that reach them). Never below the true maximum over the box; looser than
        :attr:`worst_case` where first order holds (see ``docs/theory.md``). Raises a
        ``ValueError`` naming the op or source for which no sound rule exists. Computed on
        first use."""
        return self._run("rigorous").bounds

    @property
    def rigorous_worst_case(self) -> Array:
        """:attr:`rigorous_nodes` at the output: ``|Δy| ≤ rigorous_worst_case`` for every
        error pattern in the boxes, higher-order terms included (same shape as ``output``).
        At the output the centred form uses the exact first-order :attr:`worst_case` (when
        the statistics are available) plus the rigorous remainder."""
        from ._statistics import StatisticsTooLarge  # _statistics imports this module
        try:
            worst = self.worst_case
        except (StatisticsTooLarge, NotImplementedError):
            worst = None
        return self._run("rigorous").output_bound(list(self.nodes)[-1], worst)

    @property
    def box_reaches_kink(self) -> dict[str, float]:
        """Per node with a kink (ReLU), the fraction of units whose pre-activation interval
        over the whole error box (the rigorous pass) contains the kink: there the unit may
        switch inside the box and the first-order worst case may be exceeded. Compare
        ``NodeResult.diagnostics["near_kink"]``, which tests only the realised error."""
        return self._run("rigorous").reaches_kink

    def bound(self, confidence: float = 0.99, method: str = "bernstein") -> Array:
        """Elementwise first-order bound on ``|Δy|`` holding with probability ``confidence``
        under the sources' error models (see :meth:`OutputStatistics.bound`)."""
        return self._stats().bound(confidence, method)

    @property
    def bias(self) -> Array:
        """Systematic output error per output feature: the first-order error averaged over
        the batch (and token) axes. For fixed rounding of a linear layer this is
        ``ΔW · mean(x)``, the quantity bias correction removes."""
        return self.first_order.reshape(-1, self.first_order.shape[-1]).mean(axis=0)

    @property
    def bias_contributions(self) -> dict[str, Array]:
        """Per-source share of :attr:`bias`; the shares sum to it."""
        return {k: v.reshape(-1, v.shape[-1]).mean(axis=0) for k, v in self.contributions.items()}

    @property
    def exact_bias(self) -> Array:
        """The exact error averaged over the batch (and token) axes, per output feature."""
        return self.exact.reshape(-1, self.exact.shape[-1]).mean(axis=0)

    @property
    def exact_mse(self) -> float:
        """MSE of the exact error, mean over output elements."""
        return float(np.mean(self.exact ** 2))

    def node(self, name: str) -> NodeResult:
        """The result at node ``name``."""
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(unknown_name_message("node", name, list(self.nodes))) from None

    @property
    def residual(self) -> float:
        """Relative first-order residual at the output."""
        return relative_residual(self.exact, self.first_order)

    @property
    def sqnr_db(self) -> float:
        """Output SQNR of the exact error, ``20·log10(‖y‖/‖Δy‖)`` dB."""
        return sqnr_db(self.output, self.exact)

    def compare(self, mc: Any = None, *, probes: int = 64, seed: int = 0,
                tolerance: float = 0.1) -> Comparison:
        """Exact, first and second order, analytic statistics and (optionally) a
        :func:`monte_carlo` result side by side per node. ``!`` marks where first order
        has broken down (analytic outside Monte Carlo's interval and its MSE more than
        ``tolerance`` off), ``~`` a significant difference within it (see
        :mod:`errprop._compare`)."""
        from ._compare import compare

        return compare(self, mc, probes=probes, seed=seed, tolerance=tolerance)

    def table(self) -> str:
        """Per-node table: RMS of value, exact and first-order error, residual, SQNR."""
        head = ("node", "kind", "rms(y)", "rms exact", "rms 1st-ord", "resid", "SQNR dB",
                "top source")
        rows = []
        for n in self.nodes.values():
            top = max(n.source_rms, key=n.source_rms.get) if n.source_rms else "-"
            rows.append((n.name, n.kind, f"{_rms(n.value):.3e}", f"{n.rms_exact:.3e}",
                         f"{n.rms_first_order:.3e}", _fmt(n.residual), _fmt(n.sqnr_db, ".1f"),
                         top))
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i in (0, 1, 7) else c.rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths)))
                 for row in (head, *rows)]
        lines.insert(1, "  ".join("-" * w for w in widths))
        notes = ["resid = ‖exact − first_order‖ / ‖exact‖; SQNR = 20·log10(‖y‖/‖exact‖)"]
        if any(s.kind in ("activation", "input") for s in self.sources.values()):
            notes.append("activation/input sources are noise: their first-order row is the "
                         "rounding error of the float activation, so expect statistical, not "
                         "pointwise, agreement")
        return "\n".join(lines + notes)

    def budget(self, by: str = "layer", exact: bool = True) -> Budget:
        """The error budget table (see :func:`errprop.budget`): per layer or per source,
        injected MSE, contribution to the output MSE, share, gain, worst case, and the
        exact MSE with only that row quantized. Computed on first use, then cached."""
        return self._run("budget", by, exact)

    # hook: source x node budget matrix and local/propagated split (errprop/_budget_matrix.py)
    def budget_matrix(self, by: str = "source", probes: int = 64, seed: int = 0,
                      worst: bool = True) -> BudgetMatrix:
        """The source x node uncertainty budget (:func:`errprop.budget_matrix`): per node and
        source the standard uncertainty, sensitivity coefficient, component and share, by
        probes with error bars, the measured shares and the worst-case shares. Cached."""
        return self._run("budget_matrix", by, probes, seed, worst)

    def layer_split(self, model: BudgetMatrix | None = None) -> LayerSplit:
        """Local versus propagated error per layer and its noise gain
        (:func:`errprop.layer_split`); ``model``: a :meth:`budget_matrix` for the columns
        under the error model. Cached."""
        return self._run("layer_split", model)

    def source_rows(self) -> list[dict[str, Any]]:
        """One record per source, largest output share first: name, kind, quantizer, the
        tensor's own SQNR (dB), its max/RMS ratio, its share of the output error
        (first-order contribution energy ``‖c_s‖² / Σ‖c‖²``) and the output SQNR it would
        leave alone (dB)."""
        energy = {k: float(np.sum(np.square(c))) for k, c in self.contributions.items()}
        total = sum(energy.values()) or 1.0
        rows = [{"source": s.name, "kind": s.kind, "quantizer": repr(s.source.quantizer),
                 "tensor_sqnr_db": s.sqnr_db, "max_to_rms": s.max_to_rms,
                 "output_share": energy.get(s.name, 0.0) / total,
                 "output_sqnr_db_alone": sqnr_db(self.output,
                                                 self.contributions.get(s.name, 0.0))}
                for s in self.sources.values()]
        return sorted(rows, key=lambda r: -r["output_share"])

    def node_rows(self) -> list[dict[str, Any]]:
        """One record per node: RMS of the value, of the exact and first-order error, the
        first-order residual, the SQNR (dB) and the largest source there."""
        return [{"node": n.name, "kind": n.kind, "rms_value": _rms(n.value),
                 "rms_exact": n.rms_exact, "rms_first_order": n.rms_first_order,
                 "residual": n.residual, "sqnr_db": n.sqnr_db,
                 "top_source": max(n.source_rms, key=n.source_rms.get) if n.source_rms
                 else None} for n in self.nodes.values()]

    def source_table(self) -> str:
        """:meth:`source_rows` as text, so a layer wrecked by outliers under a per-tensor
        grid stands out (low tensor SQNR, large max/RMS, large output share)."""
        head = ("source", "kind", "quantizer", "tensor SQNR dB", "max/rms", "output share",
                "output SQNR dB alone")
        rows = [(r["source"], r["kind"], r["quantizer"], _fmt(r["tensor_sqnr_db"], ".1f"),
                 _fmt(r["max_to_rms"], ".1f"), f"{100 * r['output_share']:.1f}%",
                 _fmt(r["output_sqnr_db_alone"], ".1f")) for r in self.source_rows()]
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths)))
                 for row in (head, *rows)]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (f"<Report: {len(self.nodes)} nodes, {len(self.sources)} sources, output SQNR "
                f"{self.sqnr_db:.1f} dB, first-order residual {self.residual:.3g}>")


def _fmt(v: float, spec: str = ".3g") -> str:
    return format(v, spec) if np.isfinite(v) else ("inf" if v > 0 else "-inf")

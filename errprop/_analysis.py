"""The exact (fake-quant) run and first-order error propagation, in one walk.

The interpreter carries, through every node of the graph,

* ``x``  — the float value,
* ``xq`` — the value of the fake-quantized network (the *exact* error is ``xq - x``),
* ``dx`` — the first-order error, one row per source: shape ``(K, *x.shape)``.
  Rows are keyed by source name; a source absent from the keys contributes
  exactly zero there, so zeros cost nothing.

At a leaf op the incoming rows go through the op's rule at once (one call
with a leading direction axis), and each parameter source of that op adds
one row ``rule(None, {param: ΔW})``. Residual joins add the skip rows to the
branch rows of the same source (keyed, :func:`errprop._rows.add_keyed`). The engine never
looks at an op's type.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ._checks import check_real, check_rng, check_seed
from ._config import QuantConfig, Source, seen_by_quantizer
from ._graph import Sequential, check_finite_node, check_input, walk
from ._merge import Merge
from ._op import Array, Op
from ._report import NodeResult, Report, SourceResult
from ._rows import add_keyed
from ._budget import Budget, budget
from ._passes import bound_pass, second_order_pass
from ._probes import NodeStatistics, node_statistics
from ._rigorous import rigorous_pass
from ._statistics import OutputStatistics, output_statistics


@dataclass
class _State:
    x: Array
    xq: Array
    keys: list[str]
    dx: Array | None  # (len(keys), *x.shape) or None when no source is active yet


def _stack(rows: Array | None, new: Array) -> Array:
    return new[None] if rows is None else np.concatenate([rows, new[None]], axis=0)


class _Propagate:
    """Interpreter: float forward, fake-quant forward and first-order tangents together."""

    def __init__(self, by_layer: Mapping[str, list[Source]], qparams: Mapping[str, dict],
                 dparams: Mapping[str, Array], rng: np.random.Generator,
                 fitted: Mapping[str, SourceResult] | None = None, *,
                 network_input: Array | None = None,
                 input_error: Array | None = None) -> None:
        self.by_layer = by_layer
        self.fitted = {} if fitted is None else fitted  # parameter and input sources
        self.qparams = qparams
        self.dparams = dparams
        self.rng = rng
        self.nodes: dict[str, NodeResult] = {}
        self.forward: dict[str, tuple[Array, Array]] = {}  # leaf -> float (input, output)
        self.activation_results: dict[str, SourceResult] = {}
        self.network_input = network_input
        self.input_error = input_error  # the input source's error, if quantized

    def _record(self, name: str, kind: str, s: _State,
                diagnostics: Mapping[str, float] | None = None) -> None:
        check_finite_node(name, "float output", s.x)
        check_finite_node(name, "quantized network's output", s.xq)
        first = np.zeros_like(s.x) if s.dx is None else s.dx.sum(axis=0)
        rms = {} if s.dx is None else dict(zip(
            s.keys, np.sqrt(np.mean(s.dx.reshape(len(s.keys), -1) ** 2, axis=1)).tolist()))
        self.nodes[name] = NodeResult(name, kind, s.x, s.xq - s.x, first, rms,
                                      dict(diagnostics or {}))

    def leaf(self, name: str, op: Op, s: _State) -> _State:
        x, xq, keys, dx = s.x, s.xq, list(s.keys), s.dx
        sources = self.by_layer.get(name, [])
        for src in sources:
            if src.kind == "activation":
                grid = src.quantizer.fit_in_context(
                    x, what=f"the input of {name!r}",
                    fitted=ChainMap(self.activation_results, self.fitted))
                seen = seen_by_quantizer(x, self.network_input, self.input_error)
                error = grid.quantize(seen, rng=self.rng) - seen
                self.activation_results[src.name] = SourceResult(src, error, grid, seen)
                xq = grid.quantize(xq, rng=self.rng)
                keys.append(src.name)
                dx = _stack(dx, error)
        y, rule = op.linearize(x)
        self.forward[name] = (x, y)
        diagnostics = op.diagnose(x, y, np.zeros_like(x) if dx is None else dx.sum(axis=0))
        dy = None if dx is None else rule(dx, {})
        for src in sources:
            if src.param is not None:
                keys.append(src.name)
                dy = _stack(dy, rule(None, {src.param: self.dparams[src.name]}))
        yq = op.forward(xq, self.qparams.get(name))
        out = _State(y, yq, keys, dy)
        self._record(name, type(op).__name__, out, diagnostics)
        return out

    def merge(self, name: str, op: Merge, states: list[_State]) -> _State:
        xs = [s.x for s in states]
        y = op.forward(xs)
        self.forward[name] = (tuple(xs), y)
        keys: list[str] = []
        dy: Array | None = None
        for i, s in enumerate(states):
            if s.dx is None:
                continue
            dxs: list[Array | None] = [None] * len(states)
            dxs[i] = s.dx
            keys, dy = add_keyed(keys, dy, s.keys, op.jvp(xs, y, dxs, {}))
        diagnostics = {}
        if type(op).diagnose is not Merge.diagnose:
            diagnostics = op.diagnose(xs, y, [None if s.dx is None else s.dx.sum(axis=0)
                                              for s in states])
        out = _State(y, op.forward([s.xq for s in states]), keys, dy)
        self._record(name, op.kind, out, diagnostics)
        return out


def analyze(net: Sequential, x: object, config: QuantConfig, *, seed: int | None = 0,
            rng: np.random.Generator | None = None, memory_limit: int = 2 ** 28,
            statistics_work_limit: float = 2e11) -> Report:
    """Exact and first-order quantization error of ``net`` on the batch ``x``.

    Parameters
    ----------
    net : Sequential
    x : array ``(batch, features)`` or ``(batch, tokens, features)``
    config : QuantConfig, which quantizer applies to which source.
    seed, rng : randomness for stochastic rounding (``rng`` wins if given).
    memory_limit : bytes for the reverse sweeps behind the first-order output
        statistics (``.mean``, ``.std``, ``.mse``, ``.worst_case``), which are
        computed on first access: one sweep per output element of a batch element,
        in chunks under this cap.
    statistics_work_limit : the exact output statistics refuse (with a clear error
        pointing to the probe estimator) when their estimated multiply-adds exceed this.

    Returns
    -------
    Report
        ``.exact`` (fake-quantized output minus float output), ``.first_order``,
        ``.contributions`` (source -> its first-order output error; they sum
        to ``.first_order``), ``.nodes`` (the same at every node) and
        ``.sources`` (the injected error and its model per source).

    Notes
    -----
    Weight, bias and norm-parameter errors are deterministic once the
    quantizer is fixed: first order converges to the exact error as the
    step shrinks (O(step) relative residual through smooth ops, O(√step)
    through ReLU). Activation errors are rounded from values that upstream
    error has already moved; their first-order row is the rounding error of
    the *float* activation, ``Q(x) - x``, which is a sample of the noise, not
    a prediction that converges pointwise: compare such sources statistically.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"analyze: config must be a QuantConfig, got {type(config).__name__}")
    seed = check_seed(seed, "analyze")
    memory_limit = int(check_real(memory_limit, "analyze", "memory_limit (bytes)",
                                  positive=True))
    statistics_work_limit = check_real(statistics_work_limit, "analyze",
                                       "statistics_work_limit (multiply-adds)", minimum=0.0,
                                       finite=False)
    x = check_input(net, x)
    rng = check_rng(rng, "analyze")
    if rng is None:
        rng = np.random.default_rng(seed)
    sources = config.sources(net)
    ops = dict(net.layers())
    by_layer: dict[str, list[Source]] = {}
    qparams: dict[str, dict[str, Array]] = {}
    dparams: dict[str, Array] = {}
    results: dict[str, SourceResult] = {}
    for src in sources:
        if src.layer is not None:
            by_layer.setdefault(src.layer, []).append(src)
        if src.param is None:
            continue
        p = ops[src.layer].params[src.param]
        grid = src.quantizer.fit(p, channel_axis=0, what=f"parameter {src.name!r}")
        qp = grid.quantize(p, rng=rng)
        qparams.setdefault(src.layer, {})[src.param] = qp
        dparams[src.name] = qp - p
        results[src.name] = SourceResult(src, qp - p, grid, p)

    state = _State(x, x, [], None)
    if sources and sources[0].kind == "input":
        src = sources[0]
        grid = src.quantizer.fit(x, channel_axis=-1, what="the network input")
        xq = grid.quantize(x, rng=rng)
        results[src.name] = SourceResult(src, xq - x, grid, x)
        state = _State(x, xq, [src.name], (xq - x)[None])

    interp = _Propagate(by_layer, qparams, dparams, rng, results, network_input=x,
                        input_error=results["input"].error if "input" in results else None)
    # overflow is reported per node by the interpreter, not as a NumPy warning
    with np.errstate(over="ignore", invalid="ignore"):
        out = walk(net, state, interp)
    results.update(interp.activation_results)
    contributions = {} if out.dx is None else dict(zip(out.keys, out.dx))
    ordered = {src.name: results[src.name] for src in _execution_order(sources, out.keys)}
    forward = interp.forward

    def statistics() -> OutputStatistics:
        return output_statistics(net, out.x, forward, ordered, memory_limit=memory_limit,
                                 work_limit=statistics_work_limit)

    def probes(count: int, probe_seed: int) -> dict[str, NodeStatistics]:
        return node_statistics(net, x, forward, ordered, probes=count, seed=probe_seed)

    def second_order() -> dict[str, Array]:
        return second_order_pass(net, forward, by_layer, dparams, ordered)

    def interval() -> dict[str, Array]:
        return bound_pass(net, forward, by_layer, ordered, "interval")

    def norm_bound() -> dict[str, Array]:
        return bound_pass(net, forward, by_layer, ordered, "norm")

    def error_budget(by: str, exact: bool) -> Budget:
        return budget(net, x, report, by=by, exact=exact, seed=0 if seed is None else seed)

    def rigorous() -> object:
        return rigorous_pass(net, x, ordered)

    passes = {"statistics": statistics, "probes": probes, "second_order": second_order,
              "interval": interval, "norm_bound": norm_bound, "budget": error_budget,
              "rigorous": rigorous}
    # hook: source x node budget matrix and local/propagated split (errprop/_budget_matrix.py)
    from ._budget_matrix import budget_matrix
    from ._layer_split import layer_split

    passes["budget_matrix"] = lambda by, count, probe_seed, worst: budget_matrix(
        net, x, report, by=by, probes=count, seed=probe_seed, worst=worst)
    passes["layer_split"] = lambda model: layer_split(net, x, report, matrix=model)
    report = Report(output=out.x, exact=out.xq - out.x, passes=passes,
                    first_order=np.zeros_like(out.x) if out.dx is None else out.dx.sum(axis=0),
                    contributions=contributions, nodes=interp.nodes, sources=ordered,
                    config=config)
    return report


def _execution_order(sources: list[Source], keys: list[str]) -> list[Source]:
    by_name = {s.name: s for s in sources}
    return [by_name[k] for k in keys]


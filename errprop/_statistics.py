"""First-order output statistics and the exact first-order worst case, by reverse mode.

At first order the output error is linear in the source errors,
``Δy_i = Σ_sources Σ_e J_ie · e``. For every output element ``i`` one reverse
sweep (``vjp`` through the graph) gives the row ``J_i·`` for every source at
once, and then, with each source element's error model (max ``a_e``, mean
``m_e``, variance ``v_e``, independent across elements):

* mean        ``E Δy_i  = Σ_e J_ie m_e``
* variance    ``Var Δy_i = Σ_e J_ie² v_e``
* worst case  ``max |Δy_i| over the box |e| ≤ a  = Σ_e |J_ie| a_e``, attained by the
  sign-aligned pattern ``e = a · sign(J_ie)``;
* for the high-probability bounds, ``Σ_e (J_ie w_e)²`` (Hoeffding) and
  ``max_e |J_ie| w_e`` (Bernstein), with ``w_e`` the width of the interval that
  contains ``e_e``.

A parameter error is shared by every token and every batch element. Tokens
of one sequence are summed inside the per-sample parameter cotangent
(``Σ_t g_t ⊗ x_t`` for a weight), so the correlation between tokens is exact;
batch elements are independent sweeps. Outputs are processed in chunks of
(directions × batch elements) under a memory cap. A merge node passes the cotangent to
its inputs by its own ``vjp``; where a value feeds several nodes the walk sums their
cotangents.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import special

from ._graph import Sequential, walk_backward
from ._merge import Merge
from ._network import forward_pairs
from ._shared import shared_roundings
from ._op import Array, Op, Outer
from ._passes import require_rules
from ._quant import ErrorModel
from ._report import SourceResult

class StatisticsTooLarge(ValueError):
    """Exact output statistics refused: their reverse sweeps would exceed the work limit."""


#: temporaries per live element in a sweep (cotangent, its square, the parameter cotangent)
_OVERHEAD = 4


@dataclass(frozen=True)
class OutputStatistics:
    """First-order statistics of the output error under the sources' error models.

    All arrays have the output's shape; ``*_contributions`` map source name ->
    that source's part (variances and worst cases add over sources; means add).
    """

    mean: Array
    std: Array
    worst_case: Array
    mean_contributions: dict[str, Array]
    var_contributions: dict[str, Array]
    worst_contributions: dict[str, Array]
    range_sq: Array  # Σ_e (J_ie w_e)²
    max_term: Array  # max_e |J_ie| w_e

    @property
    def mse(self) -> float:
        """Predicted output MSE: mean over elements of ``Var Δy + (E Δy)²``."""
        return float(np.mean(self.std ** 2 + self.mean ** 2))

    def bound(self, confidence: float = 0.99, method: str = "bernstein") -> Array:
        """Elementwise high-probability bound on ``|Δy|`` (first order).

        With probability at least ``confidence`` (per element, over the sources'
        random errors), ``|Δy_i| ≤ bound_i``. Never larger than ``worst_case``.

        Methods (``δ = 1 − confidence``, ``μ`` the mean, ``σ²`` the variance):

        * ``"gaussian"``: ``|μ| + z_{1−δ/2}·σ`` — the central-limit approximation,
          accurate when many comparable terms add up; not a guarantee.
        * ``"hoeffding"``: ``|μ| + sqrt(ln(2/δ)/2 · Σ_e (J_e w_e)²)`` — distribution-free
          over independent bounded terms (``w_e`` the width of each error's interval).
        * ``"bernstein"``: ``|μ| + sqrt(2σ² ln(2/δ)) + (2/3)·M·ln(2/δ)``,
          ``M = max_e |J_e| w_e`` — distribution-free, and uses the variance: tighter
          than Hoeffding when the variance is small relative to the ranges.
        """
        if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
            raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
        delta = 1.0 - float(confidence)
        log = np.log(2.0 / delta)
        if method == "gaussian":
            spread = special.ndtri(1.0 - delta / 2) * self.std
        elif method == "hoeffding":
            spread = np.sqrt(log / 2 * self.range_sq)
        elif method == "bernstein":
            spread = np.sqrt(2.0 * self.std ** 2 * log) + 2.0 / 3.0 * self.max_term * log
        else:
            raise ValueError(f"method must be 'gaussian', 'hoeffding' or 'bernstein', "
                             f"got {method!r}")
        return np.minimum(np.abs(self.mean) + spread, self.worst_case)

    @property
    def mse_contributions(self) -> dict[str, float]:
        """Per-source MSE: ``mean(Var_s + m_s · m)`` with ``m`` the total mean; sums to ``mse``."""
        return {k: float(np.mean(v + self.mean_contributions[k] * self.mean))
                for k, v in self.var_contributions.items()}


def output_statistics(net: Sequential, y: Array, forward: Mapping[str, tuple[Array, Array]],
                      sources: Mapping[str, SourceResult], *,
                      memory_limit: int = 2 ** 28,
                      work_limit: float = 2e11) -> OutputStatistics:
    """Reverse-mode first-order statistics of ``net``'s output.

    ``forward`` maps each node name to its float ``(input, output)`` (a merge's input:
    the tuple of its inputs); ``sources`` are the analysed sources with their error models.
    """
    B, out_shape = y.shape[0], y.shape[1:]
    K = int(np.prod(out_shape))
    by_layer: dict[str, list[SourceResult]] = {}
    for s in sources.values():
        if s.source.layer is not None:
            by_layer.setdefault(s.source.layer, []).append(s)
    # per (k, n): mean, var, worst, Σ (J w)², max |J| w
    acc = {name: np.zeros((5, K, B)) for name in sources}

    work = _estimated_work(net, forward, sources, K, B)
    if work > work_limit:
        raise StatisticsTooLarge(
            f"exact output statistics need one reverse sweep per output element: here "
            f"{K} outputs x {B} batch elements, about {work:.1e} multiply-adds (limit "
            f"{work_limit:.0e}). Use report.node_statistics(probes=...) for an estimate with "
            f"error bars at every node (the output included), analyze fewer inputs, or raise "
            f"analyze(..., statistics_work_limit=...)")
    require_rules(net, "exact output statistics", "vjp")
    shared = shared_roundings(net, sources)  # member -> first source of one rounding
    per_pair = max(sum(int(x.size // B) for x in xs) + int(o.size // B)
                   for xs, o in forward_pairs(forward))
    if any(x.ndim > 2 for xs, _ in forward_pairs(forward) for x in xs):
        # with a token axis the per-sample weight cotangents are dense; without one they
        # stay factored (Outer) and cost no more than the node values
        per_pair += max((s.error.size for s in sources.values() if s.source.param), default=0)
    pairs = max(1, memory_limit // (8 * _OVERHEAD * per_pair))
    b_chunk = min(B, max(1, pairs // K))
    k_chunk = min(K, max(1, pairs // b_chunk))

    for b0 in range(0, B, b_chunk):
        rows = slice(b0, min(B, b0 + b_chunk))
        nb = rows.stop - rows.start
        for k0 in range(0, K, k_chunk):
            kc = min(K, k0 + k_chunk) - k0
            g = np.zeros((kc, nb, K))
            g[np.arange(kc), :, k0 + np.arange(kc)] = 1.0
            g = g.reshape(kc, nb, *out_shape)
            pending: dict[str, Array] = {}  # first source -> its members' summed cotangents

            def leaf(name: str, op: Op, g_out: Array) -> Array:
                x, yl = forward[name]
                here = by_layer.get(name, [])
                params = [s.source.param for s in here if s.source.param is not None]
                gx, gparams = op.batch_slice(rows).vjp(x[rows], yl[rows], g_out, params)
                for s in here:
                    if s.source.param is not None:
                        _accumulate(acc[s.name], gparams[s.source.param], s, None, k0, rows)
                    elif s.name in shared:  # one rounding: add before squaring
                        first = shared[s.name]
                        pending[first] = gx if first not in pending else pending[first] + gx
                    else:
                        _accumulate(acc[s.name], gx + pending.pop(s.name) if s.name in pending
                                    else gx, s, rows, k0, rows)
                return gx

            def merge(name: str, op: Merge, g_out: Array) -> list[Array]:
                xs, yl = forward[name]
                return op.vjp([x[rows] for x in xs], yl[rows], g_out)

            g_in = walk_backward(net, g, leaf, merge)
            if "input" in sources:
                _accumulate(acc["input"], g_in, sources["input"], rows, k0, rows)

    def shaped(a: Array) -> Array:
        return np.moveaxis(a, 0, 1).reshape(B, *out_shape)

    means = {k: shaped(a[0]) for k, a in acc.items()}
    variances = {k: shaped(a[1]) for k, a in acc.items()}
    worst = {k: shaped(a[2]) for k, a in acc.items()}
    zero = np.zeros_like(y)
    max_term = zero.copy()
    for a in acc.values():
        max_term = np.maximum(max_term, shaped(a[4]))
    return OutputStatistics(mean=sum(means.values(), zero.copy()),
                            std=np.sqrt(sum(variances.values(), zero.copy())),
                            worst_case=sum(worst.values(), zero.copy()),
                            mean_contributions=means, var_contributions=variances,
                            worst_contributions=worst,
                            range_sq=sum((shaped(a[3]) for a in acc.values()), zero.copy()),
                            max_term=max_term)


def _accumulate(out: Array, J: Array, src: SourceResult, rows: slice | None, k0: int,
                batch: slice) -> None:
    """Add one source's mean / variance / worst case for a chunk of sensitivities ``J``.

    ``J``: ``(k, b, *shape)`` — for a parameter, its per-sample cotangent (the model
    is the parameter's, shared by the batch); for an activation, the cotangent at
    the layer input (the model has a batch axis, sliced by ``rows``).
    """
    model = src.model
    mean, var, max_abs, width = model.mean, model.var, model.max_abs, model.width
    if isinstance(J, Outer):
        if J.g.ndim == 3:  # no token axis: rank one per sample, reduce in factored form
            _accumulate_rank_one(out, J.g, J.x, model, k0, batch)
            return
        J = J.materialize()
    if rows is not None:
        mean, var, max_abs, width = mean[rows], var[rows], max_abs[rows], width[rows]
    k, b = J.shape[:2]
    flat = J.reshape(k, b, -1)
    target = (slice(None), slice(k0, k0 + k), batch)
    if rows is None:  # a parameter: one model shared by the batch; J is ours to overwrite
        if mean.any():
            out[(0, *target[1:])] += flat @ mean.ravel()
        np.abs(flat, out=flat)
        out[(2, *target[1:])] += flat @ max_abs.ravel()
        w = width.ravel()
        out[(4, *target[1:])] = np.maximum(out[(4, *target[1:])], (flat * w).max(axis=-1))
        np.square(flat, out=flat)
        out[(1, *target[1:])] += flat @ var.ravel()
        out[(3, *target[1:])] += flat @ (w * w)
    else:  # a layer input: J is passed on upstream, the model has a batch axis
        m, v, a, w = (t.reshape(b, -1) for t in (mean, var, max_abs, width))
        if m.any():
            out[(0, *target[1:])] += np.einsum("kbe,be->kb", flat, m)
        mag = np.abs(flat)
        out[(2, *target[1:])] += np.einsum("kbe,be->kb", mag, a)
        out[(4, *target[1:])] = np.maximum(out[(4, *target[1:])], (mag * w).max(axis=-1))
        np.square(mag, out=mag)
        out[(1, *target[1:])] += np.einsum("kbe,be->kb", mag, v)
        out[(3, *target[1:])] += np.einsum("kbe,be->kb", mag, w * w)


def _accumulate_rank_one(out: Array, g: Array, x: Array, model: ErrorModel, k0: int,
                         batch: slice) -> None:
    """``_accumulate`` for ``G[k, n] = g[k, n] ⊗ x[n]``: ``Σ_ab c_ab G_ab^p = Σ_a g_a^p (x^p cᵀ)_a``."""
    k = g.shape[0]
    at = (slice(k0, k0 + k), batch)
    ax, w = np.abs(x), model.width
    if model.mean.any():
        out[(0, *at)] += np.einsum("kba,ba->kb", g, x @ model.mean.T)
    ag = np.abs(g)
    out[(2, *at)] += np.einsum("kba,ba->kb", ag, ax @ model.max_abs.T)
    # max_ab |g_a| w_ab |x_b| = max_a |g_a| · max_b (w_ab |x_b|), over batch chunks
    mx = np.empty((x.shape[0], w.shape[0]))
    step = max(1, 2 ** 24 // max(1, w.size))
    for i in range(0, x.shape[0], step):
        mx[i:i + step] = np.max(w[None] * ax[i:i + step, None, :], axis=-1)
    out[(4, *at)] = np.maximum(out[(4, *at)], np.max(ag * mx, axis=-1))
    g2, x2 = ag * ag, ax * ax
    out[(1, *at)] += np.einsum("kba,ba->kb", g2, x2 @ model.var.T)
    out[(3, *at)] += np.einsum("kba,ba->kb", g2, x2 @ (w * w).T)


def _estimated_work(net: Sequential, forward: Mapping[str, tuple[Array, Array]],
                    sources: Mapping[str, SourceResult], K: int, B: int) -> float:
    """Multiply-adds of the sweeps: per (output, batch element) one backward pass — about
    one multiply-add per weight per token plus the node values — plus the dense weight
    cotangents ``Σ_t g_t ⊗ x_t`` where there are tokens."""
    tokens = max((int(np.prod(xs[0].shape[1:-1])) for xs, _ in forward_pairs(forward)),
                 default=1)
    nodes = sum(sum(int(x.size // B) for x in xs) + int(o.size // B)
                for xs, o in forward_pairs(forward))
    every_weight = sum(p.size for _, op in net.layers() for p in op.params.values()
                       if p.ndim == 2)
    quantized = sum(s.error.size for s in sources.values()
                    if s.source.param is not None and s.error.ndim == 2)
    backward = 4 * nodes + every_weight * tokens
    dense = quantized * tokens if tokens > 1 else 0
    return float(K) * B * (backward + dense)

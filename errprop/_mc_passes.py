"""Monte Carlo passes: the float reference, the plan (every source's sampler, and the
Linear weights sampled at the layer output), one chunk of samples through the graph,
and the statistics accumulated per node."""

from __future__ import annotations

import tracemalloc
import warnings
from dataclasses import dataclass

import numpy as np

from ._config import Source, seen_by_quantizer
from ._graph import Sequential, check_finite_node
from ._linear import Linear
from ._op import Array, Op
from ._quant import UniformGrid, same_grid
from ._sampling import _sampler, _Sampler, _Streams, _threads

#: float32 runs need quantization steps at least this fraction of the largest value
#: (about 840 float32 ulps), so float32 rounding stays far below the quantization error
_FLOAT32_MIN_STEP = 1e-4
#: two-sided 99% normal quantile
_Z99 = 2.5758293035489004
#: elements per tile of the node statistics: a chunk's float64 tile stays in cache
_TILE = 1 << 14


# ---------------------------------------------------------------- output noise
@dataclass(frozen=True, eq=False)
class _OutputNoise:
    """``X ΔWᵀ`` of a Linear layer sampled at its output (``weight_noise="output"``).

    With independent weight errors of mean ``M_aj`` and, on row ``a``, variance
    ``σ_a²`` (zero on a clipped element), the error ``Z = X ΔWᵀ`` over the ``N``
    rows of the float input ``X = U Σ Vᵀ`` (rank ``r``) has mean ``X Mᵀ`` and
    row-``a`` covariance ``σ_a² (X Xᵀ - Σ_{j clipped} x_j x_jᵀ)``. Without
    clipping, ``σ_a U Σ ξ`` with ``ξ ~ N(0, I_r)`` has exactly that covariance:
    ``r ≤ min(N, in)`` draws per row instead of ``in``. A row with one clipped
    element ``j`` (``v = V[j]``) uses ``ξ - v (v·ξ + √(1-|v|²) η)``, ``η ~ N(0, 1)``:
    the covariance becomes ``Σ (I - v vᵀ) Σ``, removing ``x_j x_jᵀ`` exactly.
    """

    key: int
    name: str
    US: Array  # (N, r)
    sigma: Array  # (out,)
    shift: Array | None  # X Mᵀ, shaped as the layer output; None when zero
    rows: Array  # the rows with one clipped element, (k,)
    V: Array  # (k, r): V[j] of each such row's clipped element
    t: Array  # (k,): √(1 - |v|²)
    out_shape: tuple[int, ...]

    def sample(self, streams: _Streams, start: int, count: int) -> Array:
        r, out, k = self.US.shape[1], self.sigma.size, self.rows.size
        draws = streams.fill(self.key, start, np.empty((count, r * out + k), self.US.dtype),
                             normal=True)
        xi = draws[:, :r * out].reshape(count, r, out)
        if k:
            part = xi[:, :, self.rows]
            proj = np.einsum("kr,srk->sk", self.V, part) + self.t * draws[:, r * out:]
            xi[:, :, self.rows] = part - self.V.T * proj[:, None, :]
        xi *= self.sigma
        z = (self.US @ xi).reshape(count, *self.out_shape)
        return z if self.shift is None else z + self.shift


def _output_noise(key: int, src: Source, X: Array, grid: UniformGrid, W: Array,
                  dtype: np.dtype) -> _OutputNoise | None:
    """The output-noise sampler, or None where the weight error is not iid per row
    (stochastic rounding, group-wise scales, more than one fixed element in a row: clipped,
    or on the grid like a row's maximum under minmax calibration)."""
    model = grid.error_model(W)
    free = model.width > 0
    if grid.rounding == "stochastic" or np.any(np.count_nonzero(~free, axis=1) > 1) \
            or not np.all(free.any(axis=1)):
        return None
    rows = np.arange(W.shape[0])
    first = np.argmax(free, axis=1)
    var, mu = model.var[rows, first], model.mean[rows, first]
    if np.any(free & ((model.var != var[:, None]) | (model.mean != mu[:, None]))):
        return None
    X2 = X.reshape(-1, X.shape[-1])
    U, sv, Vt = np.linalg.svd(X2, full_matrices=False)
    keep = sv > sv[0] * max(X2.shape) * np.finfo(np.float64).eps  # the rank of X
    clipped_rows = np.flatnonzero(~free.all(axis=1))
    V = Vt[keep].T[np.argmax(~free[clipped_rows], axis=1)]
    t = np.sqrt(np.maximum(1.0 - np.sum(V * V, axis=1), 0.0))
    out_shape = (*X.shape[:-1], W.shape[0])
    shift = None if not model.mean.any() else (X2 @ model.mean.T).reshape(out_shape)
    return _OutputNoise(key, src.name, (U[:, keep] * sv[keep]).astype(dtype),
                        np.sqrt(var).astype(dtype), None if shift is None else shift.astype(dtype),
                        clipped_rows, V.astype(dtype), t.astype(dtype), out_shape)


# ---------------------------------------------------------------- passes
class _Reference:
    """Interpreter: the float64 forward, recording every node and the layer inputs; and
    each op's working memory: the tracemalloc peak of its forward in the run's dtype
    (ops may compute some intermediates in float64 whatever their input's dtype)."""

    def __init__(self, keep_inputs: set[str], dtype: np.dtype) -> None:
        self.keep_inputs = keep_inputs
        self.dtype = dtype
        self.values: dict[str, Array] = {}
        self.inputs: dict[str, Array] = {}
        self.working: dict[str, int] = {}

    def leaf(self, name: str, op: Op, x: Array) -> Array:
        if name in self.keep_inputs:
            self.inputs[name] = x
        y = op.forward(x)
        self.values[name] = check_finite_node(name, "float output", y)
        if tracemalloc.is_tracing():  # measuring would disturb the caller's own trace
            self.working[name] = 4 * (x.nbytes + y.nbytes)
            return y
        xd = x.astype(self.dtype)
        params = {k: v.astype(self.dtype) for k, v in op.params.items()}
        tracemalloc.start()
        try:
            op.forward(xd, params)
            self.working[name] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return y

    def residual(self, name: str, skip: Array, branch: Array) -> Array:
        y = skip + branch
        self.values[name] = check_finite_node(name, "float output", y)
        return y


class _Moments:
    """Per-element mean and variance over samples, the per-sample MSE, and the kept
    samples (for quantiles) of one node.

    Sums are taken around a fixed center, the first sample's value ``y₀`` (the
    shifted-data algorithm: no cancellation when the mean error dominates its
    spread, and the same center whatever the chunking). A chunk is processed in
    tiles of ``_TILE`` elements, on the sampling threads: a tile's float64
    deviations ``d = y - y₀`` (exact for float32 ``y``) stay in cache while
    ``Σ_s d``, ``Σ_s d²``, and per sample ``Σ_j d²`` and ``Σ_j d·δ₀`` are taken,
    with ``δ₀ = y₀ - y_float`` the first sample's error, so that a sample's
    ``Σ_j (d + δ₀)²`` is its squared error. Per-sample sums add the tiles in a
    fixed order: every per-sample value is bitwise the same for any chunking.
    The first ``keep`` samples' errors are kept in the run's dtype.
    """

    def __init__(self, ref: Array, samples: int, keep: int, dtype: np.dtype) -> None:
        self.shape = ref.shape
        self.ref = ref.reshape(-1)
        self.n = 0
        self.center: Array | None = None
        self.shift: Array | None = None
        self.shift_sq = 0.0
        self.sum = np.zeros(self.ref.size)
        self.sumsq = np.zeros(self.ref.size)
        self.mse = np.empty(samples)
        self.keep = keep
        self.kept = np.empty((keep, self.ref.size), dtype) if keep else None

    def add(self, y: Array, start: int) -> None:
        """Accumulate the chunk ``y`` (``(count, *shape)``) of samples ``start, ...``."""
        count = y.shape[0]
        flat = y.reshape(count, -1)
        if self.center is None:
            self.center = flat[0].astype(np.float64)
            self.shift = self.center - self.ref
            self.shift_sq = float(np.einsum("j,j->", self.shift, self.shift))
        size = self.ref.size
        tiles = list(range(0, size, _TILE))
        sq = np.empty((len(tiles), count))
        cross = np.empty((len(tiles), count))
        kept = max(0, min(count, self.keep - start))

        def work(first: int, stop: int) -> None:
            buf = np.empty((count, min(_TILE, size)))
            for t in range(first, stop):
                a = tiles[t]
                b = min(size, a + _TILE)
                d = buf[:, :b - a]
                np.copyto(d, flat[:, a:b])
                d -= self.center[a:b]
                self.sum[a:b] += np.add.reduce(d, axis=0)
                self.sumsq[a:b] += np.einsum("ij,ij->j", d, d)
                np.einsum("ij,ij->i", d, d, out=sq[t])
                np.einsum("ij,j->i", d, self.shift[a:b], out=cross[t])
                if kept:
                    np.subtract(flat[:kept, a:b], self.ref[a:b], dtype=np.float64,
                                out=self.kept[start:start + kept, a:b])

        pool = _threads() if count * size >= 4 * _TILE else None
        if pool is None:
            work(0, len(tiles))
        else:
            half = len(tiles) // 2
            for job in [pool.submit(work, 0, half), pool.submit(work, half, len(tiles))]:
                job.result()
        total = np.add.reduce(sq, axis=0) + 2.0 * np.add.reduce(cross, axis=0) + self.shift_sq
        self.mse[start:start + count] = total / size
        self.n += count

    def finite(self, start: int, count: int) -> bool:
        return bool(np.all(np.isfinite(self.mse[start:start + count])))

    def stats(self, qs: tuple[float, ...]) -> dict[str, object]:
        """The fields of :class:`NodeStats`."""
        S = self.n
        mean = self.shift + self.sum / S
        var = np.maximum(self.sumsq - self.sum * self.sum / S, 0.0) / (S - 1)
        mse = float(np.mean(self.mse))
        half = _Z99 * float(np.std(self.mse, ddof=1)) / float(np.sqrt(S))
        quantiles = {}
        if self.kept is not None and qs:
            values = np.quantile(self.kept, qs, axis=0).astype(np.float64)
            quantiles = {q: v.reshape(self.shape) for q, v in zip(qs, values)}
        return dict(mean=mean.reshape(self.shape), std=np.sqrt(var).reshape(self.shape),
                    mse=mse, mse_ci=(max(0.0, mse - half), mse + half), mse_samples=self.mse,
                    quantiles=quantiles, quantile_samples=self.keep if quantiles else 0)


@dataclass(frozen=True, eq=False)
class _Plan:
    dtype: np.dtype
    mode: str
    params: dict[str, dict[str, Array]]  # layer -> its parameters in the run's dtype
    at_input: _Sampler | None
    activations: dict[str, list[_Sampler]]  # a layer's input sources, applied in order
    param_sources: dict[str, list[_Sampler]]
    fast: dict[str, list[_OutputNoise]]


class _Sample:
    """Interpreter: one chunk of samples through the graph, errors recorded per node."""

    def __init__(self, plan: _Plan, moments: dict[str, _Moments], streams: _Streams,
                 start: int, count: int, scratch: dict[int, Array]) -> None:
        self.plan, self.moments, self.streams = plan, moments, streams
        self.start, self.count, self.scratch = start, count, scratch

    def inject(self, src: _Sampler, x: Array, scratch: Array | None = None) -> Array:
        if self.plan.mode == "noise":
            return src.perturb(x, self.streams, self.start, self.count, scratch)
        return src.quantize(x, self.streams, self.start, self.count, scratch)

    def leaf(self, name: str, op: Op, x: Array) -> Array:
        plan = self.plan
        for src in plan.activations.get(name, ()):
            x = self.inject(src, x)
        params = dict(plan.params[name])
        for i, src in enumerate(plan.param_sources.get(name, ())):
            # sampled parameters die with the forward call: their draw buffers are
            # reused by the next layer and chunk (fresh memory costs page faults)
            scratch = self._scratch(i, self.count * src.value.size, plan.dtype)
            params[src.source.param] = self.inject(src, src.value, scratch)
        for key, value in plan.params[name].items():
            if params[key] is value and op.param_kinds.get(key) == "weight":
                # a weight shared by all samples still pairs with them one to one: one
                # GEMM per sample, whose rounding does not depend on how many samples
                # share the chunk (BLAS rounds a row differently for other row counts)
                params[key] = np.broadcast_to(value, (self.count, *value.shape))
        y = op.forward(x, params)
        for fast in plan.fast.get(name, ()):
            y = y + fast.sample(self.streams, self.start, self.count)
        # some ops compute with float64 constants; keep the chunk in the run's dtype
        y = np.asarray(y, dtype=plan.dtype)
        self._record(name, y)
        return y

    def residual(self, name: str, skip: Array, branch: Array) -> Array:
        y = skip + branch
        self._record(name, y)
        return y

    def _scratch(self, key: int, size: int, dtype: np.dtype) -> Array:
        if key not in self.scratch or self.scratch[key].size < size:
            self.scratch[key] = np.empty(size, dtype)
        return self.scratch[key]

    def _record(self, name: str, y: Array) -> None:
        moments = self.moments.get(name)
        if moments is None:  # not recorded
            return
        moments.add(y, self.start)
        if not moments.finite(self.start, self.count):
            raise ValueError(f"node {name!r}: a Monte Carlo sample (shape {y.shape}) contains "
                             f"NaN/Inf; the perturbed network overflows here")


class _Fitted:
    """A fitted source as ``Quantizer.fit_in_context`` sees it: grid, value, and (computed
    on demand, seeded per source for stochastic rounding) the error of quantizing it."""

    def __init__(self, grid, value: Array, key: int) -> None:
        self.grid, self.value, self._key = grid, value, key

    @property
    def error(self) -> Array:
        rng = np.random.default_rng(self._key)
        return self.grid.quantize(self.value, rng=rng) - self.value


def _make_plan(net: Sequential, x: Array, ref: _Reference, sources: list[Source], mode: str,
               dtype: np.dtype, weight_noise: str) -> _Plan:
    """Fit every grid exactly as ``analyze`` does and prepare its sampler."""
    ops = dict(net.layers())
    params = {name: {k: v.astype(dtype) for k, v in op.params.items()} for name, op in ops.items()}
    at_input = None
    activations: dict[str, list[_Sampler]] = {}
    fitted: dict[str, _Fitted] = {}  # what fit_in_context sees (like analyze's results)
    param_sources: dict[str, list[_Sampler]] = {}
    fast: dict[str, list[_OutputNoise]] = {}
    coarse: list[tuple[str, float]] = []
    input_error: Array | None = None
    for key, src in enumerate(sources):
        if src.kind == "input":
            value = x
            grid = src.quantizer.fit(x, channel_axis=-1, what="the network input")
        elif src.kind == "activation":
            grid = src.quantizer.fit_in_context(ref.inputs[src.layer],
                                                what=f"the input of {src.layer!r}",
                                                fitted=fitted)
            value = seen_by_quantizer(ref.inputs[src.layer], x, input_error)
        else:
            value = ops[src.layer].params[src.param]
            grid = src.quantizer.fit(value, channel_axis=0, what=f"parameter {src.name!r}")
        fitted[src.name] = _Fitted(grid, value, key)
        if src.kind == "input":  # once: the value every layer reading the input sees
            input_error = fitted[src.name].error
        peak = float(np.max(np.abs(value)))
        if peak > 0:
            coarse.append((src.name, float(np.min(grid.scale)) / peak))
        if src.kind == "input":
            at_input = _sampler(key, src, value, grid, mode, dtype)
        elif src.kind == "activation":
            if mode == "quantize" and value is not ref.inputs[src.layer] \
                    and same_grid(grid, fitted["input"].grid):
                continue  # the input's grid again: Q(Q(x)) = Q(x), even on a shifted grid
            activations.setdefault(src.layer, []).append(
                _sampler(key, src, value, grid, mode, dtype))
        else:
            op = ops[src.layer]
            noise = None
            if weight_noise == "output" and src.param == "W" and isinstance(op, Linear):
                noise = _output_noise(key, src, ref.inputs[src.layer], grid, value, dtype)
            if noise is not None:
                fast.setdefault(src.layer, []).append(noise)
            else:
                param_sources.setdefault(src.layer, []).append(
                    _sampler(key, src, value, grid, mode, dtype))
    fine = [(name, r) for name, r in coarse if r < _FLOAT32_MIN_STEP]
    if dtype == np.float32 and fine:
        names = ", ".join(f"{n!r} ({r:.1e})" for n, r in fine[:5])
        warnings.warn(f"monte_carlo: dtype=float32 is too coarse for source(s) {names}"
                      f"{' ...' if len(fine) > 5 else ''}: the quantization step is below "
                      f"{_FLOAT32_MIN_STEP:g} of the largest value, close to float32 resolution "
                      f"(1.2e-07), so float32 rounding would pollute the error; use "
                      f"dtype=numpy.float64", UserWarning, stacklevel=3)
    return _Plan(dtype, mode, params, at_input, activations, param_sources, fast)


def _bytes_per_sample(net: Sequential, ref: _Reference, plan: _Plan) -> int:
    """Estimated live bytes per sample of a chunk, at the most expensive layer."""
    item = plan.dtype.itemsize
    temps = 3 if plan.mode == "noise" else 6  # draws, shifted values, rounding temporaries
    worst = 0
    for name, _ in net.layers():
        cost = ref.working[name] + 2 * 8 * _TILE  # the op's forward; statistics tiles
        for src in plan.activations.get(name, ()):
            cost += temps * item * src.value.size
        cost += temps * item * sum(s.value.size for s in plan.param_sources.get(name, ()))
        cost += sum(item * (f.US.shape[1] + 2 * f.US.shape[0]) * f.sigma.size
                    for f in plan.fast.get(name, ()))
        worst = max(worst, cost)
    # the input of a residual stays alive across its branch
    return worst + item * max(v.size for v in ref.values.values())

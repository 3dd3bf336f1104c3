"""Monte Carlo passes: the float reference, the plan (every source's sampler, and the
weights sampled at the layer output), one chunk of samples through the graph, and the
statistics accumulated per node (:class:`errprop._mc_record._Moments`).

Every value of a chunk carries a leading sample axis; a leaf op pairs it with its sampled
parameters, a merge op (``Add``, ``Mul``, ``Concat``, ``MatMul``) acts on the trailing
axes, so ``op.forward`` serves both the float reference and the samples."""

from __future__ import annotations

import tracemalloc
import warnings
from dataclasses import dataclass

import numpy as np

from ._config import Source, seen_by_quantizer
from ._mc_record import _TILE, _Moments
from ._merge import Merge
from ._network import INPUT, Network, check_finite_node
from ._op import Array, Op
from ._quant import UniformGrid, same_grid
from ._sampling import _sampler, _Sampler, _Streams, _threads

#: float32 runs need quantization steps at least this fraction of the largest value
#: (about 840 float32 ulps), so float32 rounding stays far below the quantization error
_FLOAT32_MIN_STEP = 1e-4


# ---------------------------------------------------------------- output noise
@dataclass(frozen=True, eq=False)
class _OutputNoise:
    """``X ΔWᵀ`` of a layer (a Linear) sampled at its output (``weight_noise="output"``).

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


def may_sample_at_output(op: Op, src: Source) -> bool:
    """Whether ``src`` is a 2-D weight of ``op``, whose output error may be ``X ΔWᵀ``
    (decided on the float input by :func:`_error_is_x_dwt`)."""
    return src.param is not None and op.param_kinds.get(src.param) == "weight" \
        and np.ndim(op.params[src.param]) == 2


def _error_is_x_dwt(op: Op, param: str, X: Array, y: Array) -> bool:
    """Whether the op's first-order output error from ``ΔW`` (``W = op.params[param]``) is
    ``X ΔWᵀ`` for its input ``X``, the law :class:`_OutputNoise` samples: asked from the
    op's ``jvp`` rule at one seeded random probe (a linear map that is not ``X ΔWᵀ``
    agrees with it at a random point with probability 0)."""
    W = op.params[param]
    if X.shape[-1] != W.shape[1]:
        return False
    probe = np.random.default_rng(0).standard_normal(W.shape)
    expect = X @ probe.T
    got = op.jvp(X, y, None, {param: probe})
    tol = 1e-9 * (float(np.max(np.abs(expect))) if expect.size else 0.0)
    return bool(got.shape == expect.shape and np.max(np.abs(got - expect), initial=0.0) <= tol)


# ---------------------------------------------------------------- passes
class _Reference:
    """Interpreter: the float64 forward, recording every node and the layer inputs; and
    each op's working memory: the tracemalloc peak of its forward in the run's dtype
    (ops may compute some intermediates in float64 whatever their input's dtype)."""

    def __init__(self, keep_inputs: set[str], dtype: np.dtype, x: Array) -> None:
        self.keep_inputs = keep_inputs
        self.dtype = dtype
        self.input_size = x.size
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
        else:
            params = {k: v.astype(self.dtype) for k, v in op.params.items()}
            self.working[name] = _peak(op.forward, x.astype(self.dtype), params)
        return y

    def merge(self, name: str, op: Merge, xs: list[Array]) -> Array:
        y = op.forward(xs)
        self.values[name] = check_finite_node(name, "float output", y)
        if tracemalloc.is_tracing():
            self.working[name] = 4 * (max(x.nbytes for x in xs) + y.nbytes)
        else:
            self.working[name] = _peak(op.forward, [x.astype(self.dtype) for x in xs])
        return y


def _peak(forward, *args) -> int:
    """The tracemalloc peak of ``forward(*args)`` (its arguments not counted)."""
    tracemalloc.start()
    try:
        forward(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@dataclass(frozen=True, eq=False)
class _Plan:
    dtype: np.dtype
    mode: str
    params: dict[str, dict[str, Array]]  # layer -> its parameters in the run's dtype
    at_input: _Sampler | None
    activations: dict[str, list[_Sampler]]  # a layer's input sources, applied in order
    param_sources: dict[str, list[_Sampler]]
    fast: dict[str, list[_OutputNoise]]
    # a layer that reads the same value as an earlier one through the same deterministic
    # grids starts from that layer's input after its first j samplers: (layer, j); the
    # earlier layer keeps it for that many readers, save[layer][j]
    reuse: dict[str, tuple[str, int]]
    save: dict[str, dict[int, int]]


class _Sample:
    """Interpreter: one chunk of samples through the graph, errors recorded per node."""

    def __init__(self, plan: _Plan, moments: dict[str, _Moments], streams: _Streams,
                 start: int, count: int, scratch: dict[int, Array]) -> None:
        self.plan, self.moments, self.streams = plan, moments, streams
        self.start, self.count, self.scratch = start, count, scratch
        self.saved: dict[tuple[str, int], list] = {}  # (layer, j) -> [value, readers left]

    def inject(self, src: _Sampler, x: Array, scratch: Array | None = None) -> Array:
        if self.plan.mode == "noise":
            return src.perturb(x, self.streams, self.start, self.count, scratch)
        return src.quantize(x, self.streams, self.start, self.count, scratch)

    def leaf(self, name: str, op: Op, x: Array) -> Array:
        plan = self.plan
        reuse = plan.reuse.get(name)
        if reuse is not None:  # the same rounding of the same value: the same samples
            entry = self.saved[reuse]
            x, entry[1] = entry[0], entry[1] - 1
            if not entry[1]:
                del self.saved[reuse]
        save = plan.save.get(name)
        for j, src in enumerate(plan.activations.get(name, ()), 1):
            x = self.inject(src, x)
            if save is not None and j in save:
                self.saved[name, j] = [x, save[j]]
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

    def merge(self, name: str, op: Merge, xs: list[Array]) -> Array:
        # every input carries the chunk's sample axis first; merges act on trailing axes
        y = np.asarray(op.forward(xs), dtype=self.plan.dtype)
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
        moments.add(y, self.start, _threads)
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


class _Sharing:
    """Activation sources that round the value an earlier layer rounds (the same producer)
    through equal deterministic grids (nearest or floor): the real network rounds it alike,
    so the samples are the earlier layer's. A shared source draws nothing and takes no
    random stream (the next source's index does not advance): a fused op whose one source
    stands for several such layers draws the same numbers."""

    def __init__(self, net: Network, ops: dict[str, Op]) -> None:
        self.reads = {n.name: n.inputs[0] for n in net.dag() if n.name in ops}
        self.order = {name: i for i, name in enumerate(ops)}
        self.owned: dict[str, list[object]] = {}  # a layer with its own samplers -> grids
        self.reuse: dict[str, tuple[str, int]] = {}
        self.save: dict[str, dict[int, int]] = {}

    def add(self, layer: str, grid: object, has_own: bool) -> bool:
        """Record the next activation source of ``layer``; True when it is shared."""
        prev = self.reuse.get(layer)
        pos = prev[1] if prev else 0
        if not has_own and isinstance(grid, UniformGrid) and grid.rounding != "stochastic":
            reads, before = self.reads[layer], self.order[layer]
            owners = [prev[0]] if prev else [m for m in self.owned if self.reads[m] == reads
                                             and self.order[m] < before]
            for m in owners:
                grids = self.owned[m]
                if pos < len(grids) and same_grid(grids[pos], grid):
                    if prev:
                        self._count(m, pos, -1)
                    self._count(m, pos + 1, 1)
                    self.reuse[layer] = (m, pos + 1)
                    return True
        if prev is None:
            self.owned.setdefault(layer, []).append(grid)
        return False

    def _count(self, layer: str, j: int, step: int) -> None:
        readers = self.save.setdefault(layer, {})
        readers[j] = readers.get(j, 0) + step
        if not readers[j]:
            del readers[j]


def _make_plan(net: Network, x: Array, ref: _Reference, sources: list[Source], mode: str,
               dtype: np.dtype, weight_noise: str) -> _Plan:
    """Fit every grid exactly as ``analyze`` does and prepare its sampler."""
    ops = dict(net.layers())
    params = {name: {k: v.astype(dtype) for k, v in op.params.items()} for name, op in ops.items()}
    at_input = None
    activations: dict[str, list[_Sampler]] = {}
    fitted: dict[str, _Fitted] = {}  # what fit_in_context sees (like analyze's results)
    param_sources: dict[str, list[_Sampler]] = {}
    fast: dict[str, list[_OutputNoise]] = {}
    sharing = _Sharing(net, ops)
    coarse: list[tuple[str, float]] = []
    input_error: Array | None = None
    key = 0  # the source's random stream
    for src in sources:
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
        # quantize mode, a layer reading the quantized input through the input's grid again
        again = src.kind == "activation" and mode == "quantize" \
            and value is not ref.inputs[src.layer] and same_grid(grid, fitted["input"].grid)
        if src.kind == "activation" and not again \
                and sharing.add(src.layer, grid, src.layer in activations):
            continue  # the samples of an earlier layer: no draws, no stream
        key += 1
        if src.kind == "input":
            at_input = _sampler(key - 1, src, value, grid, mode, dtype)
        elif src.kind == "activation":
            if again:
                continue  # Q(Q(x)) = Q(x), even on a shifted grid
            activations.setdefault(src.layer, []).append(
                _sampler(key - 1, src, value, grid, mode, dtype))
        else:
            op = ops[src.layer]
            noise = None
            if weight_noise == "output" and may_sample_at_output(op, src) and _error_is_x_dwt(
                    op, src.param, ref.inputs[src.layer], ref.values[src.layer]):
                noise = _output_noise(key - 1, src, ref.inputs[src.layer], grid, value, dtype)
            if noise is not None:
                fast.setdefault(src.layer, []).append(noise)
            else:
                param_sources.setdefault(src.layer, []).append(
                    _sampler(key - 1, src, value, grid, mode, dtype))
    fine = [(name, r) for name, r in coarse if r < _FLOAT32_MIN_STEP]
    if dtype == np.float32 and fine:
        names = ", ".join(f"{n!r} ({r:.1e})" for n, r in fine[:5])
        warnings.warn(f"monte_carlo: dtype=float32 is too coarse for source(s) {names}"
                      f"{' ...' if len(fine) > 5 else ''}: the quantization step is below "
                      f"{_FLOAT32_MIN_STEP:g} of the largest value, close to float32 resolution "
                      f"(1.2e-07), so float32 rounding would pollute the error; use "
                      f"dtype=numpy.float64", UserWarning, stacklevel=3)
    return _Plan(dtype, mode, params, at_input, activations, param_sources, fast,
                 sharing.reuse, sharing.save)


def _bytes_per_sample(net: Network, ref: _Reference, plan: _Plan) -> int:
    """Estimated live bytes per sample of a chunk: the most expensive node (its forward, its
    samplers, the statistics tiles), plus the values kept for later readers: the largest
    value (a residual's input stays alive across its branch), or more where several are."""
    item = plan.dtype.itemsize
    temps = 3 if plan.mode == "noise" else 6  # draws, shifted values, rounding temporaries
    nodes = net.dag()
    last = {k: i for i, node in enumerate(nodes) for k in node.inputs}
    size = {INPUT: ref.input_size, **{name: v.size for name, v in ref.values.items()}}
    alive = {INPUT} if INPUT in last else set()
    worst = held = 0
    for i, node in enumerate(nodes):
        name = node.name
        cost = ref.working[name] + 2 * 8 * _TILE  # the op's forward; statistics tiles
        for src in plan.activations.get(name, ()):
            cost += temps * item * src.value.size
        cost += temps * item * sum(s.value.size for s in plan.param_sources.get(name, ()))
        cost += sum(item * (f.US.shape[1] + 2 * f.US.shape[0]) * f.sigma.size
                    for f in plan.fast.get(name, ()))
        worst = max(worst, cost)
        held = max(held, sum(size[k] for k in alive if k not in node.inputs))
        alive = {k for k in alive if last[k] > i} | ({name} if name in last else set())
    # inputs rounded once for several layers stay alive until their last reader
    shared = sum(ref.inputs[m].size * len(js) for m, js in plan.save.items())
    return worst + item * (max(max(v.size for v in ref.values.values()), held) + shared)

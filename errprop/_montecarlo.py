"""Monte Carlo: sample the quantization error, run the real nonlinear network.

An interpreter over the same graph and the same ``forward`` as the other
passes. Its value is a batch of samples: every array carries a leading sample
axis ``S`` (``(S, batch, features)`` or ``(S, batch, tokens, features)``), and
a sampled parameter has shape ``(S, *param.shape)``, which the ops pair with
the sample axis of their input. Samples run in chunks under a memory cap.

Two modes:

* ``"noise"``: each source's error is drawn from its error model (the same
  fitted grid as :func:`errprop.analyze`): uniform on ``[-s/2, s/2]`` for
  round-to-nearest, on ``[-s, 0]`` for floor, the exact two-point law for
  stochastic rounding; clipped elements carry their deterministic clipping error.
* ``"quantize"``: every sample really quantizes, with subtractive dither for
  nearest/floor (a randomly shifted grid) and real stochastic rounding;
  activation grids are applied to the sample's actual, already perturbed
  activation, so clipping of moved activations is included.

Randomness: sample ``i``'s draws for source ``k`` come from the stream
``SeedSequence(seed, spawn_key=(k, i // 64))``, consumed in sample order.
Chunks are processed in order, so the draws, and every result, do not
depend on ``chunk_size``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import tracemalloc
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from ._config import QuantConfig, Source
from ._graph import Sequential, check_finite_node, check_input, unknown_name_message, walk
from ._linear import Linear
from ._op import Array, Op
from ._quant import UniformGrid

_MODES = ("noise", "quantize")
_WEIGHT_NOISE = ("exact", "output")
#: samples per random stream; fixed, so the draws do not depend on the chunk size
_BLOCK = 64
#: two-sided 99% normal quantile
_Z99 = 2.5758293035489004
#: float32 runs need quantization steps at least this fraction of the largest value
#: (about 840 float32 ulps), so float32 rounding stays far below the quantization error
_FLOAT32_MIN_STEP = 1e-4


@dataclass(frozen=True, eq=False)
class NodeStats:
    """Monte Carlo statistics of the error at one node (sampled minus float value).

    Attributes
    ----------
    mean, std : arrays of the node's shape: the mean error and its standard
        deviation (``ddof=1``) over the samples, per element.
    mse : mean over the node's elements of the squared error, averaged over samples.
    mse_ci : 99% confidence interval of ``mse``, ``mse ± 2.576·sd/√S`` with ``sd``
        the standard deviation of the per-sample values (lower end clipped at 0).
    mse_samples : the per-sample values, shape ``(S,)``.
    """

    mean: Array
    std: Array
    mse: float
    mse_ci: tuple[float, float]
    mse_samples: Array


@dataclass(frozen=True, eq=False)
class MonteCarloResult:
    """The output of :func:`monte_carlo`.

    Attributes
    ----------
    mean, std, mse, mse_ci, mse_samples : the output node's :class:`NodeStats`.
    quantiles : ``q -> array`` of the output's shape, the per-element quantiles
        of the output error.
    errors : ``(samples, *output.shape)`` output errors of every sample (in the
        run's dtype), kept for the quantiles; None when ``quantiles=()``.
    nodes : node name -> :class:`NodeStats`, every node in execution order.
    output : the float output (float64).
    samples, seconds, chunk_size : sample count, wall time, samples per chunk.
    mode, dtype, seed, weight_noise : the run's settings (``seed`` is the one
        drawn when None was passed, so the run can be repeated).
    fast_sources : the Linear weight sources sampled at the layer output
        (``weight_noise="output"``); every other source used the exact mode.
    """

    mean: Array
    std: Array
    mse: float
    mse_ci: tuple[float, float]
    mse_samples: Array
    quantiles: dict[float, Array]
    errors: Array | None
    nodes: dict[str, NodeStats]
    output: Array
    samples: int
    seconds: float
    chunk_size: int
    mode: str
    dtype: str
    seed: int
    weight_noise: str
    fast_sources: tuple[str, ...]

    def node(self, name: str) -> NodeStats:
        """The statistics at node ``name``."""
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(unknown_name_message("node", name, list(self.nodes))) from None

    def __repr__(self) -> str:
        lo, hi = self.mse_ci
        return (f"<MonteCarloResult: {self.mode} mode, {self.samples} samples, output MSE "
                f"{self.mse:.4g} (99% CI {lo:.4g} .. {hi:.4g}), {self.seconds:.2f} s>")


# ---------------------------------------------------------------- random streams
class _Streams:
    """Random streams keyed by ``(seed, source, sample // _BLOCK)``, consumed in sample order.

    ``fill(key, start, out)`` writes the draws of samples ``start, start+1, ...``
    into ``out[0], out[1], ...``. A chunk that starts inside a block resumes the
    generator left by the previous chunk, so the values depend only on the
    sample index, never on how the samples were chunked.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._open: dict[int, tuple[int, int, np.random.Generator]] = {}

    def fill(self, key: int, start: int, out: Array, *, normal: bool = False) -> Array:
        i, stop = start, start + out.shape[0]
        while i < stop:
            block = i // _BLOCK
            end = min(stop, (block + 1) * _BLOCK)
            gen = self._generator(key, block, i)
            part = out[i - start:end - start]
            if normal:
                gen.standard_normal(out=part, dtype=out.dtype)
            else:
                gen.random(out=part, dtype=out.dtype)
            self._open[key] = (block, end, gen)
            i = end
        return out

    def _generator(self, key: int, block: int, i: int) -> np.random.Generator:
        open_block, next_sample, gen = self._open.get(key, (-1, -1, None))
        if open_block == block and next_sample == i and gen is not None:
            return gen
        if i != block * _BLOCK:
            raise RuntimeError("internal error: Monte Carlo samples must be drawn in order")
        seq = np.random.SeedSequence(self.seed, spawn_key=(key, block))
        return np.random.Generator(np.random.SFC64(seq))


# ---------------------------------------------------------------- one source
@dataclass(frozen=True, eq=False)
class _Sampler:
    """One error source, ready to sample: its fitted grid and precomputed error law.

    ``value`` is the float tensor the grid was fitted on (a parameter, or the
    float activation); the noise law is evaluated there. Clipped elements carry
    their deterministic clipping error: when they are the majority only the
    others draw (``active``); when they are few (minmax calibration puts the
    range's endpoint on the grid, within an ulp of clipping) a full-size draw is
    overwritten at their flat indices ``fixed``, cheaper than a scatter.
    """

    key: int
    source: Source
    value: Array
    grid: UniformGrid  # cast to the run's dtype
    active: Array | None  # bool mask of the drawing elements, when clipped ones dominate
    fixed: Array | None  # flat indices of the few clipped elements
    clip_err: Array | None  # clipping error: full shape with `active`, at `fixed` otherwise
    law: tuple[Array, ...]  # nearest: (s,); floor: (-s,); stochastic: (1 - p, (1-p)s, -ps)

    def draws(self, count: int, scratch: Array | None) -> Array:
        """A buffer for ``count`` samples' uniform draws (``scratch``'s memory if given)."""
        n = self.value.shape if self.active is None else (int(np.count_nonzero(self.active)),)
        size = count * int(np.prod(n))
        if scratch is None or scratch.size < size:
            return np.empty((count, *n), self.value.dtype)
        return scratch[:size].reshape(count, *n)

    def perturb(self, v: Array, streams: _Streams, start: int, count: int,
                scratch: Array | None = None) -> Array:
        """``v + e`` with ``e`` drawn from the error model at ``value``: ``(count, *shape)``.

        ``v`` is the float parameter, or the sample's actual activation.
        """
        u = streams.fill(self.key, start, self.draws(count, scratch))
        rounding = self.grid.rounding
        if rounding == "nearest":
            u -= 0.5
            u *= self.law[0]
        elif rounding == "floor":
            u *= self.law[0]
        else:  # rounds up (error (1-p)s) with probability p, i.e. when u >= 1 - p
            threshold, up, down = self.law
            u = np.where(u >= threshold, up, down)
        if self.active is not None:
            e = np.repeat(self.clip_err[None], count, axis=0)
            e[:, self.active] = u
            u = e
        elif self.fixed is not None:
            u.reshape(count, -1)[:, self.fixed] = self.clip_err
        u += v
        return u

    def quantize(self, v: Array, streams: _Streams, start: int, count: int,
                 scratch: Array | None = None) -> Array:
        """Really quantize ``v`` (``(count, *shape)`` or ``shape``), one random grid per sample.

        Nearest and floor use subtractive dither, ``Q(v + d) - d`` with ``d = u·s``:
        a randomly shifted grid, whose error is exactly uniform whatever ``v``
        (on ``[-s/2, s/2]``, resp. ``(-s, 0]``). The shift stays inside the
        rounding cell, ``u ~ U(-1/2, 1/2)`` for nearest and ``U(0, 1)`` for floor,
        so a value inside the range is never pushed out of it. Stochastic
        rounding is ``floor(v/s + u)``, ``u ~ U(0, 1)``: the floor grid at ``v + u·s``.
        """
        d = streams.fill(self.key, start, self.draws(count, scratch))
        grid = self.grid
        if grid.rounding == "nearest":
            d -= 0.5
        d *= grid.scale
        if grid.rounding == "stochastic":
            d += v
            return dataclasses.replace(grid, rounding="floor").quantize(d)
        q = grid.quantize(v + d)
        q -= d
        return q


def _sampler(key: int, src: Source, value: Array, grid: UniformGrid, mode: str,
             dtype: np.dtype) -> _Sampler:
    cast = UniformGrid(np.asarray(grid.scale, dtype), np.asarray(grid.zero_point, dtype),
                       grid.qmin, grid.qmax, grid.rounding)
    active = fixed = clip_err = None
    law: tuple[Array, ...] = ()
    if mode == "noise":
        model = grid.error_model(value)
        s = np.broadcast_to(grid.scale, value.shape)
        if grid.rounding == "stochastic":
            p = value / s - np.floor(value / s)  # fractional position between levels
            law = (1.0 - p, (1.0 - p) * s, -p * s)
        else:
            law = (np.asarray(grid.scale if grid.rounding == "nearest" else -grid.scale),)
        if np.count_nonzero(model.clipped) > model.clipped.size // 2:
            active = ~model.clipped
            clip_err = np.where(active, 0.0, model.mean)
            law = tuple(np.broadcast_to(a, value.shape)[active] for a in law)
        elif model.clipped.any():
            fixed = np.flatnonzero(model.clipped)
            clip_err = model.mean.ravel()[fixed]
        law = tuple(np.asarray(a, dtype) for a in law)
        clip_err = None if clip_err is None else clip_err.astype(dtype)
    return _Sampler(key, src, value.astype(dtype), cast, active, fixed, clip_err, law)


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
    (stochastic rounding, group-wise scales, more than one clipped element in a row)."""
    model = grid.error_model(W)
    free = ~model.clipped
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
    """Per-element mean and variance over samples, and the per-sample MSE, of one node.

    Sums are taken around a fixed shift, the first sample's error (the
    shifted-data algorithm: no cancellation when the mean dominates the
    spread, and the same shift whatever the chunking).
    """

    def __init__(self, shape: tuple[int, ...], samples: int) -> None:
        self.n = 0
        self.shift: Array | None = None
        self.sum = np.zeros(shape)
        self.sumsq = np.zeros(shape)
        self.mse = np.empty(samples)

    def add(self, err: Array, start: int) -> None:
        """Accumulate ``err`` (``(count, *shape)``, float64; overwritten), samples ``start...``."""
        flat = err.reshape(err.shape[0], -1)
        self.mse[start:start + err.shape[0]] = np.einsum("ij,ij->i", flat, flat) / flat.shape[1]
        if self.shift is None:
            self.shift = err[0].copy()
        err -= self.shift
        self.sum += err.sum(axis=0)
        np.square(err, out=err)
        self.sumsq += err.sum(axis=0)
        self.n += err.shape[0]

    def stats(self) -> NodeStats:
        S = self.n
        mean = self.shift + self.sum / S
        var = np.maximum(self.sumsq - self.sum * self.sum / S, 0.0) / (S - 1)
        mse = float(np.mean(self.mse))
        half = _Z99 * float(np.std(self.mse, ddof=1)) / float(np.sqrt(S))
        return NodeStats(mean, np.sqrt(var), mse, (max(0.0, mse - half), mse + half), self.mse)


@dataclass(frozen=True, eq=False)
class _Plan:
    dtype: np.dtype
    mode: str
    params: dict[str, dict[str, Array]]  # layer -> its parameters in the run's dtype
    at_input: _Sampler | None
    activations: dict[str, _Sampler]
    param_sources: dict[str, list[_Sampler]]
    fast: dict[str, list[_OutputNoise]]


class _Sample:
    """Interpreter: one chunk of samples through the graph, errors recorded per node."""

    def __init__(self, plan: _Plan, ref: _Reference, moments: dict[str, _Moments],
                 streams: _Streams, start: int, count: int, out_name: str,
                 errors: Array | None, scratch: dict[int, Array]) -> None:
        self.plan, self.ref, self.moments, self.streams = plan, ref, moments, streams
        self.start, self.count, self.out_name, self.errors = start, count, out_name, errors
        self.scratch = scratch

    def inject(self, src: _Sampler, x: Array, scratch: Array | None = None) -> Array:
        if self.plan.mode == "noise":
            return src.perturb(x, self.streams, self.start, self.count, scratch)
        return src.quantize(x, self.streams, self.start, self.count, scratch)

    def leaf(self, name: str, op: Op, x: Array) -> Array:
        plan = self.plan
        if name in plan.activations:
            x = self.inject(plan.activations[name], x)
        params = dict(plan.params[name])
        for i, src in enumerate(plan.param_sources.get(name, ())):
            # sampled parameters die with the forward call: their draw buffers are
            # reused by the next layer and chunk (fresh memory costs page faults)
            scratch = self._scratch(i, self.count * src.value.size, plan.dtype)
            params[src.source.param] = self.inject(src, src.value, scratch)
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
        ref = self.ref.values[name]
        buf = self._scratch(-1, y.size, np.dtype(np.float64))
        err = np.subtract(y, ref, out=buf[:y.size].reshape(y.shape), dtype=np.float64)
        moments = self.moments[name]
        if name == self.out_name and self.errors is not None:
            self.errors[self.start:self.start + self.count] = err
        moments.add(err, self.start)
        if not np.all(np.isfinite(moments.mse[self.start:self.start + self.count])):
            raise ValueError(f"node {name!r}: a Monte Carlo sample (shape {y.shape}) contains "
                             f"NaN/Inf; the perturbed network overflows here")


# ---------------------------------------------------------------- entry point
def monte_carlo(net: Sequential, x: object, config: QuantConfig, samples: int = 1000, *,
                seed: int | None = 0, mode: str = "noise", chunk_size: int | None = None,
                memory_limit: int = 2 ** 30, dtype: type | np.dtype | str = np.float64,
                quantiles: Sequence[float] = (0.005, 0.5, 0.995), progress: bool | None = None,
                weight_noise: str = "exact") -> MonteCarloResult:
    """Sample the quantization error of ``net`` on ``x`` and run the real network.

    Parameters
    ----------
    net : Sequential
    x : array ``(batch, features)`` or ``(batch, tokens, features)``
    config : QuantConfig; grids are fitted exactly as :func:`errprop.analyze`
        fits them (parameters per ``channel_axis=0``, activations and the input
        on the float activation, ``channel_axis=-1``).
    samples : int ≥ 2.
    seed : non-negative int, or None for fresh entropy (the seed used is in the
        result). Sample ``i`` of source ``k`` draws from the stream
        ``SeedSequence(seed, spawn_key=(k, i // 64))``, so results are the same
        for any ``chunk_size``.
    mode : ``"noise"`` (draw each error from its error model) or ``"quantize"``
        (really quantize every sample, with subtractive dither for nearest and
        floor rounding, real stochastic rounding otherwise). See Notes.
    chunk_size : samples per chunk; default: as many as keep the chunk's live
        arrays under ``memory_limit`` bytes.
    memory_limit : bytes, for a chunk's arrays and for the kept output errors.
    dtype : ``numpy.float64`` or ``numpy.float32`` (faster; warns when a
        quantization step is below ``1e-4`` of its tensor's largest value).
    quantiles : probabilities in [0, 1] for the per-element quantiles of the
        output error; ``()`` keeps no per-sample outputs.
    progress : None shows a progress line on stderr if it is a terminal and the
        run is expected to take over 2 s; True/False force it on/off.
    weight_noise : ``"exact"``, or ``"output"`` (noise mode only): a Linear
        weight whose error is iid along each row (nearest or floor rounding,
        per-tensor or per-channel scales, at most one clipped element per row)
        is sampled at the layer output as a Gaussian with the exact mean and
        covariance of ``X ΔWᵀ`` over the ``N`` = batch·tokens rows of the float
        layer input ``X``: ``min(N, in)`` draws per output row instead of
        ``in``. Other sources stay exact; ``.fast_sources`` lists the sampled ones.

    Returns
    -------
    MonteCarloResult
        Errors are the sampled minus the float64 network's values, per node.

    Notes
    -----
    Noise mode: a parameter's error is drawn around the float parameter; an
    activation's error law is evaluated at the float activation and added to
    the sample's actual (perturbed) input. Nearest: ``U[-s/2, s/2]``; floor:
    ``U[-s, 0]``; stochastic: ``(1-p)s`` with probability ``p``, else ``-ps``
    (``p`` the fractional position of the value); clipped elements: their
    deterministic clipping error. Quantize mode tests that model: a dithered
    element beyond the range carries its clipping error plus the grid shift.

    ``weight_noise="output"`` is exact in mean and covariance and near-exact in
    distribution (a sum of ``in`` independent terms, Gaussian by the CLT); it
    uses the float layer input, so it neglects the second-order ``ΔW·Δx``.
    """
    t0 = time.perf_counter()
    x = check_input(net, x)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"monte_carlo: config must be a QuantConfig, got {type(config).__name__}")
    samples = _check_int(samples, "samples", 2)
    seed = _check_seed(seed)
    run_dtype = _check_dtype(dtype)
    if mode not in _MODES:
        raise ValueError(f"monte_carlo: mode must be 'noise' or 'quantize', got {mode!r}")
    if weight_noise not in _WEIGHT_NOISE:
        raise ValueError(f"monte_carlo: weight_noise must be 'exact' or 'output', "
                         f"got {weight_noise!r}")
    if weight_noise == "output" and mode != "noise":
        raise ValueError("monte_carlo: weight_noise='output' samples the noise model, so it "
                         "needs mode='noise' (quantize mode quantizes every weight for real)")
    if chunk_size is not None:
        chunk_size = _check_int(chunk_size, "chunk_size", 1)
    memory_limit = _check_int(memory_limit, "memory_limit", 1)
    qs = _check_quantiles(quantiles)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"monte_carlo: progress must be None, True or False, got {progress!r}")

    sources = config.sources(net)
    ops = dict(net.layers())
    keep = {s.layer for s in sources if s.kind == "activation"}
    if weight_noise == "output":
        keep |= {s.layer for s in sources if s.param == "W" and isinstance(ops[s.layer], Linear)}
    ref = _Reference(keep, run_dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        y_float = walk(net, x, ref)
    plan = _make_plan(net, x, ref, sources, mode, run_dtype, weight_noise)
    out_name = net.nodes()[-1].name

    itemsize = run_dtype.itemsize
    kept = samples * y_float.size * itemsize if qs else 0
    if kept > memory_limit:
        raise ValueError(f"monte_carlo: keeping {samples} samples of the output {y_float.shape} "
                         f"for the quantiles needs {kept / 2**20:.0f} MiB, over memory_limit="
                         f"{memory_limit}; pass quantiles=(), fewer samples, or a larger "
                         f"memory_limit")
    if chunk_size is None:
        per_sample = _bytes_per_sample(net, ref, plan)
        chunk_size = max(1, (memory_limit - kept) // per_sample)
    chunk_size = min(chunk_size, samples)

    moments = {info.name: _Moments(ref.values[info.name].shape, samples)
               for info in net.nodes()}
    errors = np.empty((samples, *y_float.shape), run_dtype) if qs else None
    streams = _Streams(seed)
    x_run = x.astype(run_dtype)
    bar = _Progress(samples, progress, sys.stderr)
    scratch: dict[int, Array] = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, samples, chunk_size):
            count = min(chunk_size, samples - start)
            interp = _Sample(plan, ref, moments, streams, start, count, out_name, errors,
                             scratch)
            state = np.broadcast_to(x_run, (count, *x.shape))
            if plan.at_input is not None:
                state = interp.inject(plan.at_input, state)
            walk(net, state, interp)
            bar.update(start + count, time.perf_counter() - t0)
    bar.close()

    nodes = {name: m.stats() for name, m in moments.items()}
    out = nodes[out_name]
    quant = {} if errors is None else dict(zip(qs, np.quantile(errors, qs, axis=0)
                                                .astype(np.float64)))
    fast = tuple(f.name for layer in plan.fast.values() for f in layer)
    return MonteCarloResult(
        mean=out.mean, std=out.std, mse=out.mse, mse_ci=out.mse_ci, mse_samples=out.mse_samples,
        quantiles=quant, errors=errors, nodes=nodes, output=y_float, samples=samples,
        seconds=time.perf_counter() - t0, chunk_size=chunk_size, mode=mode,
        dtype=run_dtype.name, seed=seed, weight_noise=weight_noise, fast_sources=fast)


def _make_plan(net: Sequential, x: Array, ref: _Reference, sources: list[Source], mode: str,
               dtype: np.dtype, weight_noise: str) -> _Plan:
    """Fit every grid exactly as ``analyze`` does and prepare its sampler."""
    ops = dict(net.layers())
    params = {name: {k: v.astype(dtype) for k, v in op.params.items()} for name, op in ops.items()}
    at_input = None
    activations: dict[str, _Sampler] = {}
    param_sources: dict[str, list[_Sampler]] = {}
    fast: dict[str, list[_OutputNoise]] = {}
    coarse: list[tuple[str, float]] = []
    for key, src in enumerate(sources):
        if src.kind == "input":
            value = x
            grid = src.quantizer.fit(x, channel_axis=-1, what="the network input")
        elif src.kind == "activation":
            value = ref.inputs[src.layer]
            grid = src.quantizer.fit(value, channel_axis=-1, what=f"the input of {src.layer!r}")
        else:
            value = ops[src.layer].params[src.param]
            grid = src.quantizer.fit(value, channel_axis=0, what=f"parameter {src.name!r}")
        peak = float(np.max(np.abs(value)))
        if peak > 0:
            coarse.append((src.name, float(np.min(grid.scale)) / peak))
        if src.kind == "input":
            at_input = _sampler(key, src, value, grid, mode, dtype)
        elif src.kind == "activation":
            activations[src.layer] = _sampler(key, src, value, grid, mode, dtype)
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
        y = ref.values[name]
        cost = ref.working[name] + 3 * 8 * y.size  # the op's forward; float64 error stats
        if name in plan.activations:
            cost += temps * item * plan.activations[name].value.size
        cost += temps * item * sum(s.value.size for s in plan.param_sources.get(name, ()))
        cost += sum(item * (f.US.shape[1] + 2 * f.US.shape[0]) * f.sigma.size
                    for f in plan.fast.get(name, ()))
        worst = max(worst, cost)
    # the input of a residual stays alive across its branch
    return worst + item * max(v.size for v in ref.values.values())


class _Progress:
    """A one-line progress report on a stream; decides after the first chunk when auto."""

    def __init__(self, total: int, enabled: bool | None, stream: TextIO) -> None:
        self.total, self.enabled, self.stream = total, enabled, stream
        self.shown = False

    def update(self, done: int, elapsed: float) -> None:
        if self.enabled is None:
            expected = elapsed * self.total / done
            self.enabled = done < self.total and expected > 2.0 and _isatty(self.stream)
        if self.enabled:
            left = elapsed * (self.total - done) / done
            self.stream.write(f"\rmonte_carlo: {done}/{self.total} samples, {elapsed:.1f} s, "
                              f"~{left:.1f} s left ")
            self.stream.flush()
            self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------- validation
def _check_int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        extra = " (a standard deviation needs two samples)" if what == "samples" else ""
        raise ValueError(f"monte_carlo: {what} must be an integer ≥ {minimum}{extra}, "
                         f"got {value!r}")
    return int(value)


def _check_seed(seed: object) -> int:
    if seed is None:
        return int(np.random.SeedSequence().entropy)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"monte_carlo: seed must be a non-negative integer or None, got {seed!r}")
    return int(seed)


def _check_dtype(dtype: object) -> np.dtype:
    try:  # np.dtype(None) would be float64: a missing dtype is an error here
        dt = None if dtype is None else np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError:
        dt = None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"monte_carlo: dtype must be numpy.float32 or numpy.float64, "
                         f"got {dtype!r}")
    return dt


def _check_quantiles(quantiles: object) -> tuple[float, ...]:
    if isinstance(quantiles, np.ndarray) and quantiles.ndim == 1:
        quantiles = quantiles.tolist()
    if isinstance(quantiles, (str, bytes)) or not isinstance(quantiles, Sequence):
        raise TypeError(f"monte_carlo: quantiles must be a sequence of probabilities, "
                        f"got {quantiles!r}")
    out = []
    for q in quantiles:
        if isinstance(q, bool) or not isinstance(q, (int, float, np.number)) \
                or not 0.0 <= q <= 1.0:
            raise ValueError(f"monte_carlo: every quantile must be a number in [0, 1], got {q!r}")
        out.append(float(q))
    return tuple(out)

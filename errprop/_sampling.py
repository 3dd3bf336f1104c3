"""Monte Carlo sampling of the error sources: random streams and one sampler per source.

Randomness: sample ``i``'s draws for source ``k`` come from the stream
``SeedSequence(seed, spawn_key=(k, i // 64))``, consumed in sample order.
Chunks are processed in order, so the draws, and every result, do not
depend on ``chunk_size``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ._config import Source
from ._op import Array
from ._quant import UniformGrid

#: samples per random stream; fixed, so the draws do not depend on the chunk size
_BLOCK = 64

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

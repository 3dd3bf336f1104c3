"""Monte Carlo sampling of the error sources: random streams and one sampler per source.

Randomness. Every stream is ``SFC64(SeedSequence(seed, spawn_key=key))`` and is
consumed in sample order, one block of ``_BLOCK = 64`` samples per stream:

* noise mode, nearest and floor rounding (the uniform laws): the elements of a
  source are cut into ``_PARTS = 4`` contiguous ranges along its first axis;
  part ``p`` of sample ``i`` of source ``k`` reads raw 64-bit words from the
  stream ``spawn_key=(k, i // 64, p)``, each word giving ``64 / b`` integers of
  ``b`` bits (``b = 16`` in float32 runs, ``32`` in float64), whole words per
  sample. The parts are independent streams, so they are drawn on up to
  ``_PARTS`` threads (NumPy releases the GIL) with the same result;
* everything else (quantize mode's dither and stochastic rounding, stochastic
  rounding's law in noise mode, the Gaussians of ``weight_noise="output"``):
  floating-point draws of the run's dtype from ``spawn_key=(k, i // 64)``.

Chunks are processed in order and a chunk that ends inside a block leaves its
generators to the next one, so the draws, and every result, do not depend on
``chunk_size``.

Why ``b``-bit integers: a uniform error on ``[-s/2, s/2]`` is drawn as the
midpoint of one of ``2^b`` equal cells, ``e = s·((k + 1/2)·2^-b - 1/2)``. Its mean
is exact and its variance is ``s²/12·(1 - 4^-b)``: a relative deficit of
``2.3e-10`` at ``b = 16``, far below float32 resolution (float32's own
``Generator.random`` is a 24-bit grid whose mean is off by ``2^-25``). One raw
64-bit word gives four float32 draws, and ``c·k + base`` is three same-dtype
passes over one sample at a time (cache-resident), against one word per draw and
four passes over the chunk for ``(u - 1/2)·s + v``.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ._config import Source
from ._op import Array
from ._quant import UniformGrid

#: samples per random stream; fixed, so the draws do not depend on the chunk size
_BLOCK = 64
#: independent streams per source and block for the integer draws, drawn in parallel;
#: fixed, so the draws do not depend on the machine
_PARTS = 4
#: below this many draws per call, threads cost more than they save
_THREAD_MIN = 1 << 18
#: from this many elements per sample and part, a part is formed one sample at a time
_SAMPLE_MIN = 1 << 15

_pool: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    global _pool
    _pool = None  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _threads() -> ThreadPoolExecutor | None:
    """A shared pool of ``min(_PARTS, cpus)`` threads, or None on one CPU."""
    global _pool
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(_PARTS, cpus or 1)
    if workers < 2:
        return None
    if _pool is None:
        _pool = ThreadPoolExecutor(workers, thread_name_prefix="errprop-mc")
    return _pool


# ---------------------------------------------------------------- random streams
class _Streams:
    """Random streams keyed by ``(seed, stream, sample // _BLOCK)``, consumed in sample order.

    ``fill(key, start, out)`` writes the float draws of samples ``start,
    start+1, ...`` into ``out[0], out[1], ...``; ``words(key, part, start,
    count, n)`` returns ``(count, n)`` raw 64-bit words. A chunk that starts
    inside a block resumes the generator left by the previous chunk, so the
    values depend only on the sample index, never on how the samples were chunked.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._open: dict[tuple[int, ...], tuple[int, int, np.random.Generator]] = {}

    def fill(self, key: int, start: int, out: Array, *, normal: bool = False) -> Array:
        for i, end, gen in self._segments((key,), start, out.shape[0]):
            part = out[i - start:end - start]
            if normal:
                gen.standard_normal(out=part, dtype=out.dtype)
            else:
                gen.random(out=part, dtype=out.dtype)
        return out

    def words(self, key: int, part: int, start: int, count: int, n: int) -> Array:
        segments = list(self._segments((key, part), start, count))
        if len(segments) == 1:  # the usual case: no copy
            return segments[0][2].bit_generator.random_raw(count * n).reshape(count, n)
        out = np.empty((count, n), np.uint64)
        for i, end, gen in segments:
            out[i - start:end - start] = gen.bit_generator.random_raw((end - i) * n).reshape(-1, n)
        return out

    def _segments(self, stream: tuple[int, ...], start: int, count: int):
        """``(i, end, generator)`` per block touched by samples ``start .. start+count``."""
        i, stop = start, start + count
        while i < stop:
            block = i // _BLOCK
            end = min(stop, (block + 1) * _BLOCK)
            gen = self._generator(stream, block, i)
            self._open[stream] = (block, end, gen)
            yield i, end, gen
            i = end

    def _generator(self, stream: tuple[int, ...], block: int, i: int) -> np.random.Generator:
        open_block, next_sample, gen = self._open.get(stream, (-1, -1, None))
        if open_block == block and next_sample == i and gen is not None:
            return gen
        if i != block * _BLOCK:
            raise RuntimeError("internal error: Monte Carlo samples must be drawn in order")
        seq = np.random.SeedSequence(self.seed, spawn_key=(stream[0], block, *stream[1:]))
        return np.random.Generator(np.random.SFC64(seq))


# ---------------------------------------------------------------- uniform noise
@dataclass(frozen=True, eq=False)
class _UniformNoise:
    """``c·k + base`` for ``b``-bit integers ``k`` of the streams, one per element.

    ``c`` and ``base`` broadcast against the drawn shape (``ndim`` equal); the
    shape is cut into ``_PARTS`` ranges along its first axis, each drawn from
    its own stream and filled on its own thread when the draw is large.
    """

    key: int
    shape: tuple[int, ...]  # of one sample's draws
    c: Array  # s·2^-b
    base: Array  # the value plus the offset of the law (parameters), or the offset alone

    def fill(self, streams: _Streams, start: int, out: Array) -> Array:
        count = out.shape[0]
        bits = 8 * self.c.dtype.itemsize // 2  # 16 for float32, 32 for float64
        rows = self.shape[0]
        bounds = [rows * p // _PARTS for p in range(_PARTS + 1)]
        jobs = [(p, lo, hi) for p, (lo, hi) in enumerate(zip(bounds, bounds[1:])) if hi > lo]

        def part(p: int, lo: int, hi: int) -> None:
            n = (hi - lo) * int(np.prod(self.shape[1:], dtype=np.int64))
            words = -(-n * bits // 64)
            c, base = _rows(self.c, lo, hi, rows), _rows(self.base, lo, hi, rows)
            # a large part goes one sample at a time, so that its integers and values
            # stay in cache between the passes; the stream is read in the same order
            step = 1 if n >= _SAMPLE_MIN else count
            for j in range(0, count, step):
                raw = streams.words(self.key, p, start + j, step, words)
                k = raw.view(np.uint16 if bits == 16 else np.uint32)[:, :n]
                dst = out[j:j + step, lo:hi]
                np.copyto(dst, k.reshape(dst.shape))  # exact: b-bit integers in floats
                np.multiply(dst, c, out=dst)
                np.add(dst, base, out=dst)

        pool = _threads() if out.size >= _THREAD_MIN else None
        if pool is None:
            for job in jobs:
                part(*job)
        else:
            for future in [pool.submit(part, *job) for job in jobs]:
                future.result()
        return out


def _rows(a: Array, lo: int, hi: int, rows: int) -> Array:
    """Rows ``lo:hi`` of ``a`` along the first axis, when ``a`` varies along it."""
    return a[lo:hi] if a.shape[0] == rows and rows > 1 else a


def _uniform_noise(key: int, shape: tuple[int, ...], scale: Array, rounding: str,
                   value: Array | None, dtype: np.dtype) -> _UniformNoise:
    """Noise uniform on ``[-s/2, s/2]`` (nearest) or ``[-s, 0]`` (floor), plus ``value``."""
    bits = 8 * dtype.itemsize // 2
    s = np.asarray(scale, np.float64)
    s = s.reshape((1,) * (len(shape) - s.ndim) + s.shape)
    low = -0.5 if rounding == "nearest" else -1.0
    base = s * (2.0 ** -(bits + 1) + low)
    if value is not None:
        base = value + base
    c = s * 2.0 ** -bits
    if c.shape[-1] == 1 and shape[-1] > 1:  # one step per row: multiplying a full array
        c = np.broadcast_to(c, shape)      # is faster than broadcasting along the rows
    return _UniformNoise(key, shape, c.astype(dtype), base.astype(dtype))


# ---------------------------------------------------------------- one source
@dataclass(frozen=True, eq=False)
class _Sampler:
    """One error source, ready to sample: its fitted grid and precomputed error law.

    ``value`` is the float tensor the grid was fitted on (a parameter, or the
    float activation); the noise law is evaluated there. Clipped elements carry
    their deterministic clipping error, and values on the grid (zeros, unit gammas:
    :meth:`UniformGrid.on_grid`) none, as in the error model: when such
    fixed elements are the majority only the others draw (``active``); when they are
    few (minmax calibration puts the range's endpoint on the grid, within an ulp of
    clipping) a full-size draw is overwritten at their flat indices ``fixed``,
    cheaper than a scatter. In quantize mode an on-grid value (``still``) that the
    sample did not move gets no dither: the grid itself rounds it, so it stays exact
    (a moved one is dithered like any other value).
    """

    key: int
    source: Source
    value: Array
    grid: UniformGrid  # cast to the run's dtype
    active: Array | None  # bool mask of the drawing elements, when fixed ones dominate
    fixed: Array | None  # flat indices of the few fixed (clipped or on-grid) elements
    clip_err: Array | None  # their error: full shape with `active`, at `fixed` otherwise
    law: tuple[Array, ...]  # stochastic: (1 - p, (1-p)s, -ps); () otherwise
    uniform: _UniformNoise | None  # noise mode, nearest and floor
    still: Array | None = None  # quantize mode: flat indices of on-grid values (no dither)

    @property
    def adds_value(self) -> bool:
        """Whether ``uniform`` includes the float parameter (so ``v`` is not added)."""
        return self.source.kind not in ("activation", "input") and self.active is None

    def draws(self, count: int, scratch: Array | None) -> Array:
        """A buffer for ``count`` samples' draws (``scratch``'s memory if given)."""
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
        u = self.draws(count, scratch)
        if self.uniform is not None:
            self.uniform.fill(streams, start, u)
            if self.adds_value:
                if self.fixed is not None:
                    u.reshape(count, -1)[:, self.fixed] = self.clip_err
                return u
        else:  # stochastic: rounds up (error (1-p)s) with probability p, i.e. when u >= 1 - p
            streams.fill(self.key, start, u)
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
        if self.still is not None:
            # an on-grid value that no upstream error moved is rounded by the grid itself
            # (stochastic: floor(v/s + 1/2), to nearest), so it stays exact
            flat = d.reshape(count, -1)
            moved = np.broadcast_to(v, d.shape).reshape(count, -1)[:, self.still] \
                != self.value.ravel()[self.still]
            flat[:, self.still] = np.where(moved, flat[:, self.still],
                                           0.0 if grid.rounding == "floor" else 0.5)
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
             dtype: np.dtype) -> _Sampler | _ModelSampler:
    if not isinstance(grid, UniformGrid):
        return _model_sampler(key, src, value, grid, mode, dtype)
    # keep every setting of the grid (e.g. arithmetic="torch"), in the run's dtype
    cast = dataclasses.replace(grid, scale=np.asarray(grid.scale, dtype),
                               zero_point=np.asarray(grid.zero_point, dtype))
    active = fixed = clip_err = uniform = still = None
    law: tuple[Array, ...] = ()
    exact, _ = grid.on_grid(value)
    if mode != "noise" and exact.any():
        still = np.flatnonzero(exact)
    if mode == "noise":
        clipped, mean = _clipping(grid, value)
        exact &= ~clipped
        clipped |= exact  # fixed error: the clipping error, or none on the grid
        s = np.broadcast_to(grid.scale, value.shape)
        if np.count_nonzero(clipped) > clipped.size // 2:
            active = ~clipped
            clip_err = np.where(active, 0.0, mean)
        elif clipped.any():
            fixed = np.flatnonzero(clipped)
            clip_err = mean.ravel()[fixed]
        param = src.kind not in ("activation", "input")
        if grid.rounding == "stochastic":
            p = value / s - np.floor(value / s)  # fractional position between levels
            law = (1.0 - p, (1.0 - p) * s, -p * s)
            if active is not None:
                law = tuple(a[active] for a in law)
            law = tuple(np.asarray(a, dtype) for a in law)
        elif active is not None:
            uniform = _uniform_noise(key, (int(np.count_nonzero(active)),), s[active],
                                     grid.rounding, None, dtype)
        else:
            uniform = _uniform_noise(key, value.shape, grid.scale, grid.rounding,
                                     value if param else None, dtype)
            if param and fixed is not None:  # the clipped value itself, not its error
                clip_err = value.ravel()[fixed] + clip_err
        clip_err = None if clip_err is None else clip_err.astype(dtype)
    return _Sampler(key, src, value.astype(dtype), cast, active, fixed, clip_err, law, uniform,
                    still)


# ---------------------------------------------------------------- any other grid
@dataclass(frozen=True, eq=False)
class _ModelSampler:
    """A source whose grid is not a :class:`UniformGrid` (any object with ``quantize`` and
    ``error_model``: float formats, fixed GPFQ/SPFQ weights), with the same interface.

    Noise mode draws ``e = mean + (2u - 1)·√(3·var)``, ``u ~ U(0, 1)`` per element, with
    ``mean`` and ``var`` the grid's error model at ``value``: uniform with the model's
    mean and variance (``U[-s/2, s/2]`` for a rounding of step ``s``), and exactly
    ``mean`` where ``var = 0`` (a deterministic error: clipping, a fixed weight). When
    every ``var`` is 0 nothing is drawn. Quantize mode applies ``grid.quantize`` to the
    sample's value, without dither (the grid's own rounding, no random shift).
    """

    key: int
    source: Source
    value: Array  # in the run's dtype
    grid: object
    mean: Array | None  # noise mode: the model's mean, in the run's dtype
    half: Array | None  # noise mode: √(3·var), or None when every var is 0

    @property
    def adds_value(self) -> bool:
        return self.source.kind not in ("activation", "input")

    def draws(self, count: int, scratch: Array | None) -> Array:
        size = count * self.value.size
        if scratch is None or scratch.size < size:
            return np.empty((count, *self.value.shape), self.value.dtype)
        return scratch[:size].reshape(count, *self.value.shape)

    def perturb(self, v: Array, streams: _Streams, start: int, count: int,
                scratch: Array | None = None) -> Array:
        """``v + e`` with ``e`` drawn from the error model at ``value``: ``(count, *shape)``."""
        u = self.draws(count, scratch)
        if self.half is None:
            u[...] = self.mean
        else:
            streams.fill(self.key, start, u)
            u *= 2.0
            u -= 1.0
            u *= self.half
            u += self.mean
        u += v
        return u

    def quantize(self, v: Array, streams: _Streams, start: int, count: int,
                 scratch: Array | None = None) -> Array:
        """``grid.quantize(v)`` for every sample, ``(count, *shape)``."""
        q = np.asarray(self.grid.quantize(np.asarray(v, np.float64)), dtype=self.value.dtype)
        u = self.draws(count, scratch)
        u[...] = q
        return u


def _model_sampler(key: int, src: Source, value: Array, grid: object, mode: str,
                   dtype: np.dtype) -> _ModelSampler:
    mean = half = None
    if mode == "noise":
        model = grid.error_model(np.asarray(value, np.float64))
        mean = np.asarray(model.mean, dtype)
        if np.any(model.var > 0):
            half = np.sqrt(3.0 * np.asarray(model.var, np.float64)).astype(dtype)
    return _ModelSampler(key, src, value.astype(dtype), grid, mean, half)


def _clipping(grid: UniformGrid, value: Array) -> tuple[Array, Array]:
    """The grid's error model's ``clipped`` mask and ``mean`` (the clipping error where
    clipped), evaluated only where ``value`` lies outside ``[lo, hi]``: the model
    calls an element clipped only beyond the range (by a few ulp), and the full-size
    model costs about a dozen passes over a large weight."""
    lo = np.broadcast_to(grid.lo, value.shape)
    hi = np.broadcast_to(grid.hi, value.shape)
    outside = (value < lo) | (value > hi)
    clipped = np.zeros(value.shape, bool)
    mean = np.zeros(value.shape)
    if outside.any():
        sub = dataclasses.replace(grid, scale=np.broadcast_to(grid.scale, value.shape)[outside],
                                  zero_point=np.broadcast_to(grid.zero_point,
                                                             value.shape)[outside])
        model = sub.error_model(value[outside])
        clipped[outside] = model.clipped
        mean[outside] = np.where(model.clipped, model.mean, 0.0)
    return clipped, mean

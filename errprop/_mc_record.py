"""What a Monte Carlo run sampled, so that a comparison can refuse another setup.

:func:`errprop.monte_carlo` records the config, the network (node names, kinds and
float-value shapes, a hash of every parameter), the input (shape and hash) and a
small sketch of the float value at every node. :meth:`Sampled.differences` checks a
report's config and per-node float values against it: a report is comparable with a
Monte Carlo result only when both ran the same network on the same input under the
same config. The sketches make the check need nothing but what a :class:`Report`
already carries (its config and its nodes' float values), and tolerate float64
summation-order differences, unlike a hash of the values.

:class:`_Moments` is the other record of a run: the statistics of the samples
accumulated per node, chunk by chunk.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, fields

import numpy as np

from ._config import QuantConfig
from ._network import Network
from ._op import Array

#: the golden ratio's fractional part: ``frac(j·φ) − ½`` weights a sketch by position
_PHI = 0.6180339887498949
#: values whose sketches agree to this relative tolerance are the same float values
_SKETCH_RTOL = 1e-9
_BLOCK = 1 << 20
#: two-sided 99% normal quantile
_Z99 = 2.5758293035489004
#: elements per tile of the node statistics: a chunk's float64 tile stays in cache
_TILE = 1 << 14


def fingerprint(*arrays: Array) -> str:
    """SHA-256 (hex, first 16 digits) of the arrays' shapes and float64 values."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a, dtype=np.float64)
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def sketch(value: Array) -> tuple[float, float, float, float, float]:
    """``(c, Σu, Σ wⱼuⱼ, Σu², Σ|u|)`` of the flattened float64 value ``v = c·u``, with
    ``c`` the power of two at or above ``max|v|`` (at most ``2^1023``: ``|u| < 2``, so
    nothing overflows)
    and ``wⱼ = frac(jφ) − ½``.

    The position-weighted sum tells permuted values apart; ``Σ|u|`` sets the scale of
    the tolerance (:func:`sketches_agree`)."""
    v = np.asarray(value, dtype=np.float64).reshape(-1)
    peak = float(np.max(np.abs(v))) if v.size else 0.0
    # 2^1024 overflows: above 2^1023 the scaled values stay below 2 in magnitude
    c = math.ldexp(1.0, min(math.frexp(peak)[1], 1023)) if peak > 0 else 1.0
    total = weighted = squares = absolute = 0.0
    for a in range(0, v.size, _BLOCK):
        u = v[a:a + _BLOCK] / c  # exact: a power of two
        w = np.arange(a, a + u.size, dtype=np.float64) * _PHI % 1.0 - 0.5
        total += float(np.sum(u))
        weighted += float(u @ w)
        squares += float(u @ u)
        absolute += float(np.sum(np.abs(u)))
    return c, total, weighted, squares, absolute


def sketches_agree(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether two :func:`sketch` es are of the same values up to float64 rounding."""
    big = max(a[0], b[0])
    fa, fb = a[0] / big, b[0] / big  # powers of two ≤ 1: the sums in units of ``big``
    scale = _SKETCH_RTOL * max(a[4] * fa, b[4] * fb)
    return bool(abs(a[1] * fa - b[1] * fb) <= scale and abs(a[2] * fa - b[2] * fb) <= scale
                and abs(a[3] * fa * fa - b[3] * fb * fb)
                <= _SKETCH_RTOL * max(a[3] * fa * fa, b[3] * fb * fb))


@dataclass(frozen=True, eq=False)
class Sampled:
    """What a :func:`errprop.monte_carlo` run sampled.

    Attributes
    ----------
    config : the QuantConfig sampled.
    mode : ``"noise"`` or ``"quantize"``.
    input_shape, input_fingerprint : the network input's shape and
        :func:`fingerprint` (SHA-256 of its float64 values).
    parameters : ``"<layer>.<param>"`` -> :func:`fingerprint` of every parameter of
        the network, in execution order.
    nodes : ``(name, kind, shape)`` of every node in execution order, ``shape`` that
        of its float value.
    sketches : node name -> :func:`sketch` of its float value.
    """

    config: QuantConfig
    mode: str
    input_shape: tuple[int, ...]
    input_fingerprint: str
    parameters: Mapping[str, str]
    nodes: tuple[tuple[str, str, tuple[int, ...]], ...]
    sketches: Mapping[str, tuple[float, float, float, float, float]]

    @classmethod
    def record(cls, net: Network, x: Array, config: QuantConfig, mode: str,
               values: Mapping[str, Array]) -> Sampled:
        """The record of a run of ``net`` on ``x``; ``values``: node name -> float value."""
        params = {f"{name}.{key}": fingerprint(value) for name, op in net.layers()
                  for key, value in op.params.items()}
        nodes = tuple((i.name, i.kind, tuple(values[i.name].shape)) for i in net.nodes())
        return cls(config, mode, tuple(x.shape), fingerprint(x), params, nodes,
                   {name: sketch(values[name]) for name, _, _ in nodes})

    def differences(self, config: QuantConfig, nodes: Mapping[str, tuple[str, Array]],
                    parameters: Mapping[str, Array]) -> list[str]:
        """What differs between this run and an analysis of ``config`` whose nodes are
        ``name -> (kind, float value)`` in execution order and whose known float
        parameters are ``"<layer>.<param>" -> value``; ``[]`` when nothing does."""
        out = []
        changed = [name for name, value in parameters.items()
                   if name in self.parameters and fingerprint(value) != self.parameters[name]]
        if changed:
            out.append(f"network: parameter(s) {', '.join(map(repr, changed[:5]))}"
                       f"{' ...' if len(changed) > 5 else ''} have other values in the "
                       f"report than in the Monte Carlo run")
        theirs = [(name, kind, tuple(value.shape)) for name, (kind, value) in nodes.items()]
        ours = list(self.nodes)
        if [n[:2] for n in theirs] != [n[:2] for n in ours]:
            out.append(_network_difference(theirs, ours))
        else:
            for (name, _, shape), (_, _, mc_shape) in zip(theirs, ours):
                if shape != mc_shape:
                    out.append(f"input: node {name!r} has shape {shape} in the report and "
                               f"{mc_shape} in the Monte Carlo run (whose input is "
                               f"{self.input_shape}): they ran on inputs of different shapes")
                    break
        for f in fields(QuantConfig):
            a, b = getattr(config, f.name), getattr(self.config, f.name)
            if a != b:
                out.append(f"config: {f.name} is {a!r} in the report and {b!r} in the "
                           f"Monte Carlo run")
        if out:  # the float values are only comparable on the same graph and parameters
            return out
        names = list(nodes)
        for i, name in enumerate(names):
            if not sketches_agree(sketch(nodes[name][1]), self.sketches[name]):
                if i == 0:
                    out.append(f"input: the float values differ from the first node {name!r} "
                               f"on: another input (of the same shape {self.input_shape}), "
                               f"or other unquantized parameters of {name!r}")
                else:
                    out.append(f"network: the float values agree up to {names[i - 1]!r} and "
                               f"differ from {name!r} on: the same architecture with other "
                               f"(unquantized) parameters in {name!r}")
                break
        return out


def _network_difference(theirs: list[tuple], ours: list[tuple]) -> str:
    for i, (a, b) in enumerate(zip(theirs, ours)):
        if a[:2] != b[:2]:
            return (f"network: node {i} is {a[0]!r} ({a[1]}) in the report and {b[0]!r} "
                    f"({b[1]}) in the Monte Carlo run ({len(theirs)} and {len(ours)} nodes)")
    short, extra, who = (ours, theirs, "report") if len(theirs) > len(ours) else \
        (theirs, ours, "Monte Carlo run")
    return (f"network: the {who} has {len(extra) - len(short)} more node(s) after "
            f"{short[-1][0] if short else 'the input'!r}, from {extra[len(short)][0]!r}")


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

    def add(self, y: Array, start: int, threads: Callable[[], Executor | None]) -> None:
        """Accumulate the chunk ``y`` (``(count, *shape)``) of samples ``start, ...``;
        a large chunk's tiles go to the pool ``threads()`` (None: serially)."""
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

        pool = threads() if count * size >= 4 * _TILE else None
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

"""Monte Carlo passes: the float reference, the plan (every source's sampler), and one
chunk of samples through the graph."""

from __future__ import annotations

import tracemalloc
import warnings
from dataclasses import dataclass

import numpy as np

from ._config import Source
from ._graph import Sequential, check_finite_node
from ._linear import Linear
from ._op import Array, Op
from ._sampling import _output_noise, _OutputNoise, _sampler, _Sampler, _Streams

#: float32 runs need quantization steps at least this fraction of the largest value
#: (about 840 float32 ulps), so float32 rounding stays far below the quantization error
_FLOAT32_MIN_STEP = 1e-4

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

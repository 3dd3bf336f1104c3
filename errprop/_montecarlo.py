"""Monte Carlo: sample the quantization error, run the real nonlinear network.

An interpreter over the same graph and the same ``forward`` as the other
passes. Its value is a batch of samples: every array carries a leading sample
axis ``S`` (``(S, batch, features)`` or ``(S, batch, tokens, features)``), and
a sampled parameter has shape ``(S, *param.shape)``, which the ops pair with
the sample axis of their input; a merge (``Add``, ``Mul``, ``Concat``,
``MatMul``) acts on the trailing axes of its inputs, which share the sample
axis. Samples run in chunks under a memory cap.

Two modes:

* ``"noise"``: each source's error is drawn from its error model (the same
  fitted grid as :func:`errprop.analyze`): uniform on ``[-s/2, s/2]`` for
  round-to-nearest, on ``[-s, 0]`` for floor, the exact two-point law for
  stochastic rounding; clipped elements carry their deterministic clipping error.
* ``"quantize"``: every sample really quantizes, with subtractive dither for
  nearest/floor (a randomly shifted grid) and real stochastic rounding;
  activation grids are applied to the sample's actual, already perturbed
  activation, so clipping of moved activations is included.

Fan-out: layers that read the same value through equal grids rounding to
nearest or floor round it alike in the real network, so they share one
source's samples (an attention's q, k, v projections, a gated MLP's gate and
up); stochastic rounding rounds each independently, as :func:`errprop.analyze`'s
exact run does.

Randomness: sample ``i``'s draws for source ``k`` come from the stream
``SeedSequence(seed, spawn_key=(k, i // 64))``, consumed in sample order;
``k`` numbers the sources of ``config.sources(net)`` in order, a source
sharing an earlier layer's samples taking no number.
Chunks are processed in order, so the draws, and every result, do not
depend on ``chunk_size``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from ._checks import check_int, check_seed
from ._config import QuantConfig
from ._graph import check_input, unknown_name_message, walk
from ._network import Network
from ._mc_passes import (_bytes_per_sample, _make_plan, _Moments, _Reference, _Sample,
                         may_sample_at_output)
from ._mc_record import Sampled
from ._op import Array
from ._sampling import _Streams

_MODES = ("noise", "quantize")
_WEIGHT_NOISE = ("exact", "output")


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
    quantiles : ``q -> array`` of the node's shape, the per-element quantiles of the
        error (``numpy.quantile``, linear interpolation) over the first
        ``quantile_samples`` samples; empty when none were kept (a hidden node not in
        ``quantile_nodes=``).
    quantile_samples : how many samples the quantiles come from: all of them when
        the node's errors fit the memory budget (see :func:`monte_carlo`), else
        the first ones that fit (the same samples whatever the chunking), 0 for none.
    """

    mean: Array
    std: Array
    mse: float
    mse_ci: tuple[float, float]
    mse_samples: Array
    quantiles: dict[float, Array] = field(default_factory=dict)
    quantile_samples: int = 0


@dataclass(frozen=True, eq=False)
class MonteCarloResult:
    """The output of :func:`monte_carlo`.

    Attributes
    ----------
    mean, std, mse, mse_ci, mse_samples : the output node's :class:`NodeStats`.
    quantiles : ``q -> array`` of the output's shape, the per-element quantiles
        of the output error over every sample.
    errors : ``(samples, *output.shape)`` output errors of every sample (in the
        run's dtype), kept for the quantiles; None when ``quantiles=()``.
    nodes : node name -> :class:`NodeStats`, every recorded node (all by
        default, see ``nodes=``) in execution order; the output is always one.
    output : the float output (float64).
    samples, seconds, chunk_size : sample count, wall time, samples per chunk.
    mode, dtype, seed, weight_noise : the run's settings (``seed`` is the one
        drawn when None was passed, so the run can be repeated).
    fast_sources : the weight sources sampled at the layer output
        (``weight_noise="output"``); every other source used the exact mode.
    sampled : :class:`Sampled`, what was sampled: the config, the mode, the
        network (node names, kinds, shapes; a hash of its parameters), the input
        (shape, hash) and a sketch of every node's float value.
        :meth:`errprop.Report.compare` refuses a report of another setup.
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
    sampled: Sampled

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


# ---------------------------------------------------------------- entry point
def monte_carlo(net: Network, x: object, config: QuantConfig, samples: int = 1000, *,
                seed: int | None = 0, mode: str = "noise", chunk_size: int | None = None,
                memory_limit: int = 2 ** 30, dtype: type | np.dtype | str = np.float64,
                quantiles: Sequence[float] = (0.005, 0.5, 0.995), progress: bool | None = None,
                weight_noise: str = "exact", nodes: str | Sequence[str] = "all",
                quantile_nodes: str | Sequence[str] = ()) -> MonteCarloResult:
    """Sample the quantization error of ``net`` on ``x`` and run the real network.

    Parameters
    ----------
    net : Sequential or Graph (any network: merges, shape ops, fan-out)
    x : array ``(batch, features)`` or ``(batch, tokens, features)``
    config : QuantConfig; grids are fitted exactly as :func:`errprop.analyze`
        fits them (parameters per ``channel_axis=0``, activations and the input
        on the float activation, ``channel_axis=-1``).
    samples : int ≥ 2 (a standard deviation needs two).
    seed : non-negative int, or None for fresh entropy (the seed used is in the
        result). Sample ``i`` of source ``k`` draws from the stream
        ``SeedSequence(seed, spawn_key=(k, i // 64))`` (``k``: see the module
        docstring), so results are the same for any ``chunk_size``.
    mode : ``"noise"`` (draw each error from its error model) or ``"quantize"``
        (really quantize every sample, with subtractive dither for nearest and
        floor rounding, real stochastic rounding otherwise). See Notes.
    chunk_size : samples per chunk; default: as many as keep the chunk's live
        arrays under ``memory_limit`` bytes.
    memory_limit : int ≥ 1, bytes, for a chunk's arrays and for the errors kept for
        the quantiles: the output's (all samples; an error if they do not fit), then
        the ``quantile_nodes``' within half of what remains (see Notes). A chunk holds
        at least one sample, whatever the limit.
    dtype : ``numpy.float64`` or ``numpy.float32`` (faster; warns when a
        quantization step is below ``1e-4`` of its tensor's largest value).
    quantiles : probabilities in [0, 1] for the per-element quantiles of the
        error at the output and at the ``quantile_nodes``; ``()`` keeps no samples.
    progress : None shows a progress line on stderr if it is a terminal and the
        run is expected to take over 2 s; True/False force it on/off.
    weight_noise : ``"exact"``, or ``"output"`` (noise mode only): a 2-D
        weight ``W`` whose layer's output error is ``X ΔWᵀ`` (a ``Linear``, asked
        from the op's ``jvp`` rule) and whose error is iid along each row (nearest or floor rounding,
        per-tensor or per-channel scales, at most one clipped element per row)
        is sampled at the layer output as a Gaussian with the exact mean and
        covariance of ``X ΔWᵀ`` over the ``N`` = batch·tokens rows of the float
        layer input ``X``: ``min(N, in)`` draws per output row instead of
        ``in``. Other sources stay exact; ``.fast_sources`` lists the sampled ones.
    nodes : ``"all"`` (default), or the names of the nodes whose statistics to
        record; the output is always recorded. Each recorded node costs a few
        passes over its values per sample, so ``nodes=()`` is the fastest.
    quantile_nodes : ``()`` (default: quantiles at the output only), ``"all"`` (every
        recorded node), or names of recorded nodes that also get ``quantiles``. Exact
        quantiles keep a node's samples and sort them at the end: at every node of the
        benchmark MLP that was more than half of the run time.

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

    Quantiles are exact order statistics (``numpy.quantile``) of kept samples, not
    a streaming estimate. The output keeps every sample. The ``quantile_nodes``
    share half of ``memory_limit`` minus the output's kept bytes: when all
    their samples fit they keep all; otherwise every node keeps the first ``K``
    samples that fit (``NodeStats.quantile_samples = K``; none when ``K < 2``), so
    their quantiles are those of a ``K``-sample run, the same for any chunking.
    """
    t0 = time.perf_counter()
    x = check_input(net, x)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"monte_carlo: config must be a QuantConfig, got {type(config).__name__}")
    samples = _check_samples(samples)
    seed = check_seed(seed, "monte_carlo")
    if seed is None:
        seed = int(np.random.SeedSequence().entropy)
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
        chunk_size = check_int(chunk_size, "monte_carlo", "chunk_size", minimum=1)
    memory_limit = check_int(memory_limit, "monte_carlo", "memory_limit (bytes)", minimum=1)
    qs = _check_quantiles(quantiles)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"monte_carlo: progress must be None, True or False, got {progress!r}")
    recorded = _check_nodes(net, nodes, "nodes")
    every = isinstance(quantile_nodes, str) and quantile_nodes == "all"
    with_quantiles = recorded if every else _check_nodes(net, quantile_nodes, "quantile_nodes")
    for name in with_quantiles:
        if name not in recorded:
            raise ValueError(f"monte_carlo: quantile_nodes: node {name!r} is not recorded; "
                             f"add it to nodes= (or pass nodes='all')")

    sources = config.sources(net)
    ops = dict(net.layers())
    keep = {s.layer for s in sources if s.kind == "activation"}
    if weight_noise == "output":
        keep |= {s.layer for s in sources if s.param and may_sample_at_output(ops[s.layer], s)}
    ref = _Reference(keep, run_dtype, x)
    with np.errstate(over="ignore", invalid="ignore"):
        y_float = walk(net, x, ref)
    sampled = Sampled.record(net, x, config, mode, ref.values)
    plan = _make_plan(net, x, ref, sources, mode, run_dtype, weight_noise)
    out_name = net.nodes()[-1].name

    itemsize = run_dtype.itemsize
    kept = samples * y_float.size * itemsize if qs else 0
    if kept > memory_limit:
        raise ValueError(f"monte_carlo: keeping {samples} samples of the output {y_float.shape} "
                         f"for the quantiles needs {kept / 2**20:.0f} MiB, over memory_limit="
                         f"{memory_limit}; pass quantiles=(), fewer samples, or a larger "
                         f"memory_limit")
    hidden = [n for n in with_quantiles if n != out_name]
    per_sample = itemsize * sum(ref.values[n].size for n in hidden)
    keep = 0
    if qs and per_sample:
        keep = min(samples, (memory_limit - kept) // 2 // per_sample)
        keep = keep if keep >= 2 else 0
    kept += keep * per_sample
    if chunk_size is None:
        chunk_size = max(1, (memory_limit - kept) // _bytes_per_sample(net, ref, plan))
    chunk_size = min(chunk_size, samples)

    moments = {name: _Moments(ref.values[name], samples,
                              (samples if qs else 0) if name == out_name else
                              keep if name in hidden else 0, run_dtype)
               for name in recorded}
    streams = _Streams(seed)
    x_run = x.astype(run_dtype)
    bar = _Progress(samples, progress, sys.stderr)
    scratch: dict[int, Array] = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, samples, chunk_size):
            count = min(chunk_size, samples - start)
            interp = _Sample(plan, moments, streams, start, count, scratch)
            state = np.broadcast_to(x_run, (count, *x.shape))
            if plan.at_input is not None:
                state = interp.inject(plan.at_input, state)
            walk(net, state, interp)
            bar.update(start + count, time.perf_counter() - t0)
    bar.close()

    stats = {name: NodeStats(**m.stats(qs)) for name, m in moments.items()}
    out = stats[out_name]
    kept_out = moments[out_name].kept
    errors = None if kept_out is None else kept_out.reshape(samples, *y_float.shape)
    fast = tuple(f.name for layer in plan.fast.values() for f in layer)
    return MonteCarloResult(
        mean=out.mean, std=out.std, mse=out.mse, mse_ci=out.mse_ci, mse_samples=out.mse_samples,
        quantiles=out.quantiles, errors=errors, nodes=stats, output=y_float, samples=samples,
        seconds=time.perf_counter() - t0, chunk_size=chunk_size, mode=mode,
        dtype=run_dtype.name, seed=seed, weight_noise=weight_noise, fast_sources=fast,
        sampled=sampled)


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
def _check_samples(samples: object) -> int:
    try:
        return check_int(samples, "monte_carlo", "samples", minimum=2)
    except ValueError as e:
        raise ValueError(f"{e} (a standard deviation needs two samples)") from None


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


def _check_nodes(net: Network, nodes: object, what: str) -> list[str]:
    """The chosen node names in execution order, the output always among them."""
    names = [info.name for info in net.nodes()]
    if isinstance(nodes, str):
        if nodes != "all":
            raise ValueError(f"monte_carlo: {what} must be 'all' or a sequence of node names, "
                             f"got {nodes!r}")
        return names
    if not isinstance(nodes, Sequence):
        raise TypeError(f"monte_carlo: {what} must be 'all' or a sequence of node names, "
                        f"got {nodes!r}")
    for name in nodes:
        if name not in names:
            raise ValueError(f"monte_carlo: {what}: "
                             f"{unknown_name_message('node', str(name), names)}")
    chosen = set(nodes) | {names[-1]}
    return [n for n in names if n in chosen]

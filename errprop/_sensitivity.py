"""MLP versus attention: how much each block type amplifies a small input error.

Two stacks are built side by side at the same width ``d`` and depth ``L``, from
the same seed, and fed the same inputs ``x: (batch, tokens, d)``:

* MLP block:       ``LayerNorm -> Linear(d, 2d) -> GELU -> Linear(2d, d)``
* attention block: ``LayerNorm -> Attention(d, heads)`` (``Wq Wk Wv Wo``, ``d x d`` each)

The branch parameters match to within ``d``: ``4d² + 3d`` (MLP, ``d_ff = 2d``)
against ``4d² + 4d`` (attention); each block adds ``2d`` LayerNorm parameters
(``gamma = 1``, ``beta = 0``). Weights are initialised as :func:`errprop.transformer`
initialises them (``N(0, 1/fan_in)``; biases ``N(0, 0.1²)`` in the MLP,
``N(0, 0.02²)`` in attention). The LayerNorm in front of every block fixes the
scale of what each block sees, so the attention logits have a standard deviation
of about ``logit_scale`` at every depth: the logit scale multiplies ``Wq`` and
``bq`` (only those), so ``S = q kᵀ / sqrt(head_dim)`` becomes exactly
``logit_scale · S`` — a softmax temperature of ``1 / logit_scale``.

Noise is injected at the network input by rounding it to ``bits`` on errprop's
default grid, ``Uniform(bits)``: symmetric, per tensor, round to nearest, step
``s = max|x| / (2^(bits-1) - 1)``; independent errors of variance ``s²/12`` per element.
The *noise gain* of a stack is the output error energy per unit injected energy,

    gain = Σ E[Δy²] / Σ Var[Δx]          (sums over a sequence's elements),

so a Linear layer has gain ``‖W‖_F² / in`` under isotropic input noise. It is
computed per input sequence by first order (exact reverse-mode statistics,
``Report.std``) and by Monte Carlo of the real network (noise mode). Its
*unpredictability* is the coefficient of variation of the per-sequence gain
over all sequences of all seeds (a new model and new inputs per seed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from ._export import csv_text, json_text
from ._activation import Activation
from ._analysis import analyze
from ._attention import Attention
from ._builders import _attention, _dense
from ._config import QuantConfig
from ._graph import Sequential
from ._montecarlo import MonteCarloResult, monte_carlo
from ._norm import LayerNorm
from ._quant import Uniform
from ._report import Report

BLOCKS = ("mlp", "attention")
FORMATS = ("text", "markdown", "csv")


def sensitivity_network(block: str, d_model: int = 32, depth: int = 1, *, heads: int = 4,
                        logit_scale: float = 1.0, seed: int = 0) -> Sequential:
    """A stack of ``depth`` MLP or attention blocks, each behind a LayerNorm.

    Parameters
    ----------
    block : ``"mlp"`` (``Linear(d, 2d) -> GELU -> Linear(2d, d)``) or ``"attention"``.
    d_model : width ``d``; ``heads`` must divide it (attention).
    depth : number of blocks, named ``block0, block1, ...``.
    logit_scale : attention only: ``Wq`` and ``bq`` are multiplied by it, so the
        logits are multiplied by it exactly. Ignored for ``"mlp"``.
    seed : the weights; block ``l`` is the same whatever ``depth`` and ``logit_scale``.

    Returns
    -------
    Sequential
        On ``(batch, tokens, d)``. Parameters per block: ``4d² + 3d`` (MLP) or
        ``4d² + 4d`` (attention), plus ``2d`` for the LayerNorm.
    """
    if block not in BLOCKS:
        raise ValueError(f"block must be 'mlp' or 'attention', got {block!r}")
    d, depth = _positive(d_model, "d_model"), _positive(depth, "depth")
    heads = _positive(heads, "heads")
    if block == "attention" and d % heads:
        raise ValueError(f"heads ({heads}) must divide d_model ({d})")
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale)
            and logit_scale > 0):
        raise ValueError(f"logit_scale must be a positive number, got {logit_scale!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng([int(seed), BLOCKS.index(block)])
    blocks = []
    for i in range(depth):
        ln = LayerNorm(np.ones(d), np.zeros(d), name="ln")
        if block == "mlp":
            body = Sequential([_dense(rng, d, 2 * d, 1.0, name="fc1"), Activation("gelu"),
                               _dense(rng, 2 * d, d, 1.0, name="fc2")], name="mlp")
        else:
            base = _attention(rng, d, heads, causal=False).params
            body = Attention(base["Wq"] * logit_scale, base["Wk"], base["Wv"], base["Wo"],
                             base["bq"] * logit_scale, base["bk"], base["bv"], base["bo"],
                             heads=heads, name="attn")
        blocks.append(Sequential([ln, body], name=f"block{i}"))
    return Sequential(blocks)


def block_params(block: str, d_model: int) -> int:
    """Parameters of one block's branch (LayerNorm excluded): ``4d² + 3d`` or ``4d² + 4d``."""
    if block not in BLOCKS:
        raise ValueError(f"block must be 'mlp' or 'attention', got {block!r}")
    d = _positive(d_model, "d_model")
    return 4 * d * d + (3 * d if block == "mlp" else 4 * d)


@dataclass(frozen=True)
class SensitivityRow:
    """One block type at one setting, aggregated over seeds.

    Attributes
    ----------
    block : ``"mlp"`` or ``"attention"``.
    bits, depth, tokens : the setting; ``logit_scale`` is NaN for MLP rows.
    params : parameters per block (branch only, see :func:`block_params`).
    noise_rms : RMS of the injected input error, ``s/sqrt(12)`` (mean over seeds).
    gain : first-order gain, mean over seeds (exact reverse-mode statistics).
    gain_mc, gain_mc_lo, gain_mc_hi : Monte Carlo gain of the real network, mean over
        seeds, with a 99% interval (the seeds' intervals combined as independent).
    mc_over_first_order : ``gain_mc / gain``; far from 1 where first order breaks down.
    seeds_outside : seeds whose first-order gain lies outside their own Monte Carlo
        99% interval.
    cv, cv_mc : coefficient of variation (std / mean) of the per-sequence gain over
        every sequence of every seed, first order and Monte Carlo.
    miss : RMS over those sequences of ``gain_mc / gain − 1`` per sequence: how far first
        order misses an individual input (Monte Carlo's own noise is a floor, about
        ``0.02`` at 200 samples for the default sizes).
    residual, second_order_residual : ``‖exact − prediction‖ / ‖exact‖`` at the output
        for the deterministic input rounding, mean over seeds.
    top_prob : mean over attention rows (first block) of the largest probability:
        ``1/tokens`` is uniform attention, 1 is one-hot. NaN for MLP rows.
    logit_std : standard deviation of the logits within a row (first block), mean.
    """

    block: str
    bits: int
    depth: int
    logit_scale: float
    tokens: int
    params: int
    noise_rms: float
    gain: float
    gain_mc: float
    gain_mc_lo: float
    gain_mc_hi: float
    mc_over_first_order: float
    seeds_outside: int
    cv: float
    cv_mc: float
    miss: float
    residual: float
    second_order_residual: float
    top_prob: float
    logit_std: float


_COLUMNS = (("block", "block", "{}"), ("bits", "bits", "{}"), ("depth", "L", "{}"),
            ("logit_scale", "scale", "{:g}"), ("tokens", "T", "{}"),
            ("top_prob", "top p", "{:.2f}"), ("gain", "gain 1st", "{:.3g}"),
            ("gain_mc", "gain MC", "{:.3g}"), ("mc_over_first_order", "MC/1st", "{:.3f}"),
            ("cv", "CV 1st", "{:.3f}"), ("cv_mc", "CV MC", "{:.3f}"),
            ("miss", "miss", "{:.3f}"),
            ("residual", "resid 1st", "{:.2g}"), ("second_order_residual", "resid 2nd", "{:.2g}"))


@dataclass(frozen=True)
class SensitivityResult:
    """The rows of :func:`compare_blocks` and the settings that produced them."""

    rows: tuple[SensitivityRow, ...]
    settings: dict
    seconds: float

    def row(self, block: str, **setting: float) -> SensitivityRow:
        """The one row of ``block`` matching ``setting`` (e.g. ``logit_scale=4, tokens=16``)."""
        hits = [r for r in self.rows if r.block == block and all(
            getattr(r, k) == v for k, v in setting.items())]
        if len(hits) != 1:
            raise KeyError(f"{len(hits)} rows match block={block!r}, {setting}")
        return hits[0]

    def records(self) -> list[dict]:
        return [asdict(r) for r in self.rows]

    def table(self, format: str = "text") -> str:
        """The main columns as aligned text, a Markdown table, or CSV (all columns)."""
        if format == "csv":
            return self.to_csv()
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        head = [h for _, h, _ in _COLUMNS]
        body = [[("-" if isinstance(v, float) and math.isnan(v) else f.format(v))
                 for v, f in ((getattr(r, k), f) for k, _, f in _COLUMNS)] for r in self.rows]
        if format == "markdown":
            lines = ["| " + " | ".join(head) + " |",
                     "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(head))) + "|"]
            return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
        widths = [max(len(c) for c in col) for col in zip(head, *body)]
        fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
        return "\n".join(fmt.format(*line) for line in [head, *body])

    def to_csv(self) -> str:
        return csv_text(self.records(), [f.name for f in fields(SensitivityRow)])

    def to_json(self) -> str:
        # NaN (JSON has none) becomes null
        return json_text({"settings": self.settings, "seconds": self.seconds,
                          "rows": self.records()})

    def __str__(self) -> str:
        return self.table()


def compare_blocks(*, d_model: int = 32, heads: int = 4, bits: Iterable[int] = (8,),
                   depth: Iterable[int] = (1,), logit_scale: Iterable[float] = (0.5, 1, 2, 4, 8),
                   tokens: Iterable[int] = (16,), seeds: int | Sequence[int] = 4,
                   batch: int = 8, samples: int = 200,
                   blocks: Sequence[str] = BLOCKS) -> SensitivityResult:
    """Noise gain of MLP and attention stacks over a grid of settings.

    Every combination of ``bits x depth x tokens`` is run for the MLP, and of
    ``bits x depth x logit_scale x tokens`` for attention (the MLP has no logits).

    Parameters
    ----------
    d_model, heads : width and attention heads (``heads`` divides ``d_model``).
    bits : input rounding bits: the injected error has variance ``s²/12`` with
        ``s = max|x| / (2^(bits-1) − 1)`` (``Uniform(bits)``: symmetric, per tensor,
        round to nearest).
    depth : blocks per stack.
    logit_scale : factors on ``Wq`` and ``bq`` (logits times the factor).
    tokens : sequence lengths.
    seeds : a count ``n`` (seeds ``0..n-1``) or explicit non-negative seeds; each
        seed draws new weights, new inputs ``x ~ N(0, 1)`` and new Monte Carlo noise.
    batch : sequences per seed.
    samples : Monte Carlo samples per seed and setting (≥ 2).
    blocks : which block types to run.

    Returns
    -------
    SensitivityResult
        One :class:`SensitivityRow` per block type and setting.

    Notes
    -----
    First order: ``E[Δy_i²] = Σ_j J_ij² Var Δx_j`` (exact, by reverse mode), so the
    first-order gain of a sequence is ``Σ_i E[Δy_i²] / Σ_j Var Δx_j``. Monte Carlo:
    the same from ``mean² + var`` of the sampled output error per element. Where the
    two differ, the second-order terms (saturated softmax, GELU curvature) matter.
    """
    start = time.perf_counter()
    d, heads = _positive(d_model, "d_model"), _positive(heads, "heads")
    if "attention" in blocks and d % heads:
        raise ValueError(f"heads ({heads}) must divide d_model ({d})")
    bits = _ints(bits, "bits", 2, 16)
    depth = _ints(depth, "depth", 1, 64)
    tokens = _ints(tokens, "tokens", 1, 4096)
    scales = _floats(logit_scale, "logit_scale")
    seed_list = list(range(_positive(seeds, "seeds"))) if isinstance(seeds, (int, np.integer)) \
        else _ints(seeds, "seeds", 0, 2 ** 32 - 1)
    batch, samples = _positive(batch, "batch"), _positive(samples, "samples")
    if samples < 2:
        raise ValueError(f"samples must be at least 2, got {samples}")
    blocks = tuple(blocks)
    if not blocks or any(b not in BLOCKS for b in blocks):
        raise ValueError(f"blocks must be a non-empty subset of {BLOCKS}, got {blocks!r}")

    rows = []
    for b in bits:
        for L in depth:
            for T in tokens:
                for block in blocks:
                    for scale in (scales if block == "attention" else [math.nan]):
                        runs = [_one(block, d, heads, L, scale, T, b, s, batch, samples)
                                for s in seed_list]
                        rows.append(_aggregate(block, d, b, L, scale, T, runs))
    settings = {"d_model": d, "heads": heads, "bits": bits, "depth": depth,
                "logit_scale": scales, "tokens": tokens, "seeds": seed_list, "batch": batch,
                "samples": samples, "blocks": list(blocks)}
    return SensitivityResult(tuple(rows), settings, time.perf_counter() - start)


@dataclass(frozen=True)
class NoiseGain:
    """Noise gain of one network on one batch (see :func:`noise_gain`).

    Attributes
    ----------
    first_order, monte_carlo : ``(batch,)`` gain per batch element.
    gain, gain_mc : the batch's gain, ``Σ E[Δy²] / Σ Var Δx`` over all its elements.
    gain_mc_ci : 99% interval of ``gain_mc`` (from :attr:`MonteCarloResult.mse_ci`).
    noise_rms : RMS of the injected error, ``s/sqrt(12)``.
    residual, second_order_residual : of the exact (deterministic) input rounding, at
        the output.
    report, mc : the underlying :class:`Report` and :class:`MonteCarloResult`.
    """

    first_order: np.ndarray
    monte_carlo: np.ndarray
    gain: float
    gain_mc: float
    gain_mc_ci: tuple[float, float]
    noise_rms: float
    residual: float
    second_order_residual: float
    report: Report
    mc: MonteCarloResult


def noise_gain(net: Sequential, x: object, bits: int = 8, *, samples: int = 200,
               seed: int = 0) -> NoiseGain:
    """Output error energy per unit injected input error energy, two ways.

    The input is rounded to ``bits`` with ``Uniform(bits)`` (symmetric, per tensor, round
    to nearest, step ``s = max|x| / (2^(bits-1) − 1)``): independent errors of variance
    ``s²/12``, none for values on the grid (the largest ``|x|``, zeros). Per batch element
    ``b``,
    ``gain_b = Σ_i E[Δy_bi²] / Σ_j Var Δx_bj``: by first order (``Report.std``,
    ``Report.mean``, exact reverse mode) and by Monte Carlo of the real network
    (``samples`` draws, noise mode, ``seed``). For a Linear layer ``y = x Wᵀ + b``
    the first-order gain is ``‖W‖_F² / in`` exactly.
    """
    config = QuantConfig(input=Uniform(bits))
    report = analyze(net, x, config, seed=seed)
    B = report.output.shape[0]
    model = report.sources["input"].model
    injected = np.sum((model.var + model.mean ** 2).reshape(B, -1), axis=1)
    first = np.sum((report.std ** 2 + report.mean ** 2).reshape(B, -1), axis=1)
    mc = monte_carlo(net, x, config, samples, seed=seed, quantiles=(), nodes=())
    n = mc.samples
    measured = np.sum((mc.mean ** 2 + mc.std ** 2 * (n - 1) / n).reshape(B, -1), axis=1)
    to_gain = report.output.size / float(np.sum(injected))  # output MSE -> gain
    return NoiseGain(first / injected, measured / injected,
                     float(np.sum(first) / np.sum(injected)), mc.mse * to_gain,
                     (mc.mse_ci[0] * to_gain, mc.mse_ci[1] * to_gain),
                     float(np.sqrt(np.mean(model.var + model.mean ** 2))),
                     report.residual, report.second_order_residual, report, mc)


def _one(block: str, d: int, heads: int, depth: int, scale: float, tokens: int, bits: int,
         seed: int, batch: int, samples: int) -> tuple[NoiseGain, float, float]:
    """One seed: the gains, and the attention's top probability and logit spread."""
    net = sensitivity_network(block, d, depth, heads=heads,
                              logit_scale=1.0 if math.isnan(scale) else scale, seed=seed)
    x = np.random.default_rng([seed, tokens, 7]).standard_normal((batch, tokens, d))
    g = noise_gain(net, x, bits, samples=samples, seed=seed)
    top = spread = math.nan
    if block == "attention":
        A = net["block0.attn"]._attend(g.report.nodes["block0.ln"].value, None)[3]
        top = float(np.mean(np.max(A, axis=-1)))
        # logits within a row are log A up to a constant
        spread = float(np.mean(np.std(np.log(np.maximum(A, np.finfo(float).tiny)), axis=-1)))
    return g, top, spread


def _cv(values: np.ndarray) -> float:
    mean = float(np.mean(values))
    return float(np.std(values, ddof=1) / mean) if values.size > 1 and mean else math.nan


def _aggregate(block: str, d: int, bits: int, depth: int, scale: float, tokens: int,
               runs: list[tuple[NoiseGain, float, float]]) -> SensitivityRow:
    gains = [g for g, _, _ in runs]
    gain = float(np.mean([g.gain for g in gains]))
    gain_mc = float(np.mean([g.gain_mc for g in gains]))
    half = math.sqrt(sum(((g.gain_mc_ci[1] - g.gain_mc_ci[0]) / 2) ** 2
                         for g in gains)) / len(gains)
    outside = sum(not (g.gain_mc_ci[0] <= g.gain <= g.gain_mc_ci[1]) for g in gains)
    return SensitivityRow(
        block=block, bits=bits, depth=depth, logit_scale=scale, tokens=tokens,
        params=block_params(block, d), noise_rms=float(np.mean([g.noise_rms for g in gains])),
        gain=gain, gain_mc=gain_mc, gain_mc_lo=max(0.0, gain_mc - half), gain_mc_hi=gain_mc + half,
        mc_over_first_order=gain_mc / gain if gain else math.nan, seeds_outside=int(outside),
        cv=_cv(np.concatenate([g.first_order for g in gains])),
        cv_mc=_cv(np.concatenate([g.monte_carlo for g in gains])),
        miss=float(np.sqrt(np.mean(np.concatenate(
            [(g.monte_carlo / g.first_order - 1) ** 2 for g in gains])))),
        residual=float(np.mean([g.residual for g in gains])),
        second_order_residual=float(np.mean([g.second_order_residual for g in gains])),
        top_prob=float(np.mean([t for _, t, _ in runs])),
        logit_std=float(np.mean([s for _, _, s in runs])))


# ---------------------------------------------------------------- validation
def _positive(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _ints(values: Iterable[object], what: str, lo: int, hi: int) -> list[int]:
    values = [values] if isinstance(values, (int, np.integer)) else list(values)
    if not values:
        raise ValueError(f"{what} needs at least one value")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
            raise ValueError(f"every {what} must be an integer from {lo} to {hi}, got {v!r}")
    return [int(v) for v in values]


def _floats(values: Iterable[object], what: str) -> list[float]:
    values = [values] if isinstance(values, (int, float)) else list(values)
    if not values:
        raise ValueError(f"{what} needs at least one value")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) \
                or not math.isfinite(v) or v <= 0:
            raise ValueError(f"every {what} must be a positive finite number, got {v!r}")
    return [float(v) for v in values]

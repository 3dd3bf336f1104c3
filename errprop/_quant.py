"""Uniform quantizers and their per-element error models.

A :class:`Uniform` quantizer is a *recipe* (bits, symmetry, granularity,
rounding, clipping rule, scale rule). Fitting it to a tensor gives a
:class:`UniformGrid`: the concrete scale, zero point and integer range. The
grid quantizes (``grid.quantize(x)``) and describes its own error
(``grid.error_model(x)``) element by element.

Fitting and applying are separate on purpose: activation grids are
calibrated on the float activations and then applied to activations that
upstream error has already moved, exactly as a deployed integer kernel does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass

import numpy as np

from ._checks import check_bool, check_real
from ._op import Array

ROUNDINGS = ("nearest", "stochastic", "floor")
#: clip="mse": ratios tried, geometrically from 1 down to _MSE_SMALLEST, then between the
#: best one's neighbours (the loss is not unimodal: one outlier makes a far minimum)
_MSE_COARSE, _MSE_FINE, _MSE_SMALLEST = 30, 13, 1e-3
_MAX_STEP = float(np.sqrt(np.finfo(np.float64).max / 12))  # s²/12 must stay finite
GRANULARITIES = ("tensor", "channel", "group")
CLIPS = ("minmax", "percentile", "mse")
SCALES = ("float", "pow2")
ARITHMETICS = ("float64", "torch")
_F32 = np.float32
# torch's observers floor the scale at float32 eps (MinMaxObserver.eps)
_TORCH_MIN_SCALE = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class ErrorModel:
    """Per-element model of the quantization error ``e = Q(x) - x``.

    Attributes
    ----------
    max_abs : array, the bound ``|e| ≤ max_abs`` (exact up to float64 roundoff of
        ``Q(x) - x`` itself, a few ulp; not a model).
    mean, var : arrays, the mean and variance of ``e`` under the noise model:
        for round-to-nearest the classic uniform model ``E e = 0``,
        ``Var e = s²/12``; for stochastic rounding the exact law given the
        value (``Var e = p(1-p)s²``); for floor ``E e = -s/2``, ``Var e = s²/12``.
        Clipped elements carry their exact, deterministic clipping error
        (``mean = e``, ``var = 0``); values already on the grid (zeros, unit gammas,
        re-quantized values), which no rounding moves, have ``mean = var = 0``.
    clipped : bool array, the elements outside the representable range.
    width : array, the length of an interval that surely contains ``e`` (``s`` for
        every rounding mode; 0 where the error is deterministic: clipped elements
        and values on the grid). Hoeffding and Bernstein
        bounds use it.
    """

    max_abs: Array
    mean: Array
    var: Array
    clipped: Array
    width: Array


class Quantizer(ABC):
    """A quantization recipe: ``fit`` it to a tensor to get a grid."""

    @abstractmethod
    def fit(self, x: Array, *, channel_axis: int = 0, what: str = "tensor") -> UniformGrid:
        """Calibrate on ``x`` (the grid's scale and range come from ``x``)."""

    def fit_in_context(self, x: Array, *, what: str, fitted: Mapping[str, object]) -> UniformGrid:
        """Calibrate on a layer input ``x`` during an analysis; ``fitted`` maps the names of
        the sources fitted so far to their results. Default: ``fit(x, channel_axis=-1)``
        (hardware-gap sources use the grids of the layer that produced ``x``)."""
        return self.fit(x, channel_axis=-1, what=what)

    def quantize(self, x: object, *, channel_axis: int = 0, rng: np.random.Generator | None
                 = None) -> Array:
        """Fit to ``x`` and return ``Q(x)`` (float64, the dequantized values)."""
        arr = np.asarray(x, dtype=np.float64)
        return self.fit(arr, channel_axis=channel_axis).quantize(arr, rng=rng)


def round_levels(u: Array, rounding: str, rng: np.random.Generator | None,
                 who: str = "") -> Array:
    """``u`` (in units of the step) rounded to integers, in ``u``'s dtype: ``"nearest"``
    (half to even, as PyTorch and IEEE), ``"floor"``, or ``"stochastic"``
    (``floor(u + U[0, 1))``, which needs ``rng``)."""
    if rounding == "nearest":
        return np.rint(u)
    if rounding == "floor":
        return np.floor(u)
    if rng is None:
        raise ValueError(f"{who}stochastic rounding needs a random generator: pass rng= "
                         f"(numpy.random.Generator) or a seed to the analysis")
    return np.floor(u + rng.random(u.shape).astype(u.dtype, copy=False))


@dataclass(frozen=True, eq=False)
class UniformGrid:
    """A fitted uniform grid: ``Q(x) = s · (clip(round(x/s) + z, qmin, qmax) - z)``.

    ``scale`` and ``zero_point`` broadcast against the tensor they were fitted on.
    ``arithmetic="float64"`` (default) forms ``x / s`` in float64;
    ``arithmetic="torch"`` reproduces PyTorch's float32 fake-quant kernels bit for bit:
    ``round(float32(x) · float32(1/s))`` in float32, output ``float32((q - z) · s)``
    (returned as float64). ``s`` is then a float32 number.
    """

    scale: Array
    zero_point: Array
    qmin: int
    qmax: int
    rounding: str
    arithmetic: str = "float64"

    @property
    def lo(self) -> Array:
        """Smallest representable value (per scale group)."""
        return (self.qmin - self.zero_point) * self.scale

    @property
    def hi(self) -> Array:
        """Largest representable value (per scale group)."""
        return (self.qmax - self.zero_point) * self.scale

    def quantize(self, x: Array, *, rng: np.random.Generator | None = None) -> Array:
        """Round ``x`` onto the grid (values outside the range are clipped)."""
        if self.arithmetic == "torch":
            return self._quantize_torch(x, rng)
        q = round_levels(x / self.scale, self.rounding, rng)
        q = np.clip(q + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale

    def _quantize_torch(self, x: Array, rng: np.random.Generator | None) -> Array:
        # PyTorch (fake_quantize_per_tensor_affine / _per_channel_affine, CPU, float32):
        #   inv_scale = 1.0f / scale;  q = nearbyint(x * inv_scale) + zero_point   (float32)
        #   out = (clamp(q, quant_min, quant_max) - zero_point) * scale           (to float32)
        s = np.asarray(self.scale, dtype=_F32)
        z = np.asarray(self.zero_point, dtype=_F32)
        q = round_levels(np.asarray(x, dtype=_F32) * (_F32(1.0) / s), self.rounding, rng)
        q = np.clip(q + z, self.qmin, self.qmax)
        return ((q - z) * s).astype(np.float64)

    def on_grid(self, x: Array) -> tuple[Array, Array]:
        """Which elements of ``x`` already lie on the grid, and their (roundoff) error.

        An element is on the grid when rounding it moves it by no more than the
        arithmetic's own roundoff (``8·eps·|x|``; float32's for ``arithmetic="torch"``):
        zeros (ReLU outputs, zero biases, ``beta = 0``, an all-zero tensor with its
        placeholder scale), unit gammas on a grid through 1, values quantized before
        on the same grid. Stochastic rounding is judged by the nearest level (it
        leaves such values in place). Returns ``(mask, Q(x) - x)`` with the error of
        round-to-nearest (floor: of floor), exact zeros for exactly representable
        values.
        """
        rounding = "nearest" if self.rounding == "stochastic" else self.rounding
        grid = self if rounding == self.rounding else dataclasses.replace(self,
                                                                          rounding=rounding)
        e = grid.quantize(x) - x
        eps = np.finfo(np.float32 if self.arithmetic == "torch" else np.float64).eps
        return np.abs(e) <= 8 * eps * np.abs(x), e

    def error_model(self, x: Array) -> ErrorModel:
        """Per-element error model of quantizing ``x`` with this grid.

        Values on the grid (:meth:`on_grid`) have no error (``mean = 0``, ``var = 0``,
        ``width = 0``; ``max_abs`` is their float roundoff, ~1e-16 relative): the noise
        model never invents an error for a value the grid represents exactly.
        """
        s = np.broadcast_to(self.scale, x.shape)
        lo, hi = np.broadcast_to(self.lo, x.shape), np.broadcast_to(self.hi, x.shape)
        # a value within a few ulp of the range's end (the calibration maximum itself,
        # after qmax·(amax/qmax) rounds) is rounded, not clipped
        slack = 4 * np.finfo(np.float64).eps * np.maximum(np.abs(lo), np.abs(hi))
        clipped = (x < lo - slack) | (x > hi + slack)
        clip_err = np.clip(x, lo, hi) - x
        exact, roundoff = self.on_grid(x)
        exact &= ~clipped
        fixed = clipped | exact
        fixed_err = np.where(clipped, clip_err, 0.0)  # on the grid: mean 0, not its roundoff
        width = s
        if self.rounding == "nearest":
            max_abs, mean, var = s / 2, np.zeros_like(x), s * s / 12
        elif self.rounding == "floor":
            max_abs, mean, var = s.copy(), -s / 2, s * s / 12
        else:
            p = x / s - np.floor(x / s)
            max_abs = np.where(p > 0, np.maximum(p, 1 - p) * s, 0.0)
            mean, var = np.zeros_like(x), p * (1 - p) * s * s
            width = np.where(p > 0, s, 0.0)
        max_abs = np.where(clipped, np.abs(clip_err), np.where(exact, np.abs(roundoff),
                                                                max_abs))
        if self.arithmetic == "torch":
            # float32 arithmetic: x·(1/s) and the output are rounded to float32, so the
            # error (clipped or not) may pass its float64 value by a few float32 ulp of x
            max_abs = max_abs + 2.0 ** -20 * np.abs(x)
        return ErrorModel(max_abs=max_abs,
                          mean=np.where(fixed, fixed_err, mean),
                          var=np.where(fixed, 0.0, var), clipped=clipped,
                          width=np.where(fixed, 0.0, width))


def same_grid(a: object, b: object) -> bool:
    """Whether two fitted grids round every value alike (equal uniform grids)."""
    if not (isinstance(a, UniformGrid) and isinstance(b, UniformGrid)):
        return False
    return (a.qmin, a.qmax, a.rounding, a.arithmetic) == (b.qmin, b.qmax, b.rounding,
                                                          b.arithmetic) \
        and np.array_equal(a.scale, b.scale) and np.array_equal(a.zero_point, b.zero_point)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"Uniform: {name} must be one of {', '.join(map(repr, allowed))}, "
                         f"got {value!r}")
    return str(value)


class Uniform(Quantizer):
    """Uniform integer quantizer.

    Parameters
    ----------
    bits : int, 2..16.
    symmetric : bool, default True. Symmetric grids have zero point 0 and, by
        default, the *restricted* range ``[-(2^(b-1)-1), 2^(b-1)-1]`` with
        ``scale = max|x| / (2^(b-1)-1)``. Asymmetric grids use ``[0, 2^b-1]``,
        ``scale = (max - min) / (2^b-1)`` over a range widened to contain 0,
        and ``zero_point = round(-min/scale)``.
    granularity : ``"tensor"``, ``"channel"`` (one scale per index of the
        channel axis: output rows of a weight, features of an activation) or
        ``"group"`` (``group_size`` consecutive elements of the last axis).
    group_size : int, required for ``"group"``; must divide the last axis.
    rounding : ``"nearest"`` (half to even), ``"stochastic"`` (unbiased,
        needs a random generator), or ``"floor"``.
    clip : ``"minmax"`` (the range is the data's), ``"percentile"`` (the
        ``percentile`` of ``|x|``, or of ``x`` on both tails when asymmetric), or
        ``"mse"`` (the clipping ratio in ``[10⁻³, 1]`` of the range that minimises the
        squared quantization error, searched per scale group: 30 ratios geometrically
        from 1 to 10⁻³, then twice 13 between the best one's neighbours).
    scale : ``"float"`` or ``"pow2"`` (rounded *up* to a power of two, so the
        range never shrinks).
    restricted_range : bool, default True (symmetric only). False uses the full
        range ``[-2^(b-1), 2^(b-1)-1]`` with ``scale = max|x| / ((2^b-1)/2)``,
        PyTorch's symmetric observer rule.
    percentile : float in (0, 100], for ``clip="percentile"``.
    arithmetic : ``"float64"`` (default) or ``"torch"``.

        * ``"float64"``: the scale is a float64 number and ``round(x / scale)`` is formed in
          float64; the output is ``(q - z) · scale`` in float64. Rounding is half to even,
          as in PyTorch, but the float64 quotient can land on the other side of a rounding
          tie than PyTorch's float32 product (rarely: about one element in 10⁵–10⁶ at 8 bits).
        * ``"torch"``: reproduces PyTorch bit for bit on float32 tensors — the scale is
          computed the way ``torch.ao.quantization.MinMaxObserver.calculate_qparams`` does
          it (float32 arithmetic, floored at float32 eps, zero point
          ``qmin - round(min / scale)``) and applied the way
          ``torch.fake_quantize_per_tensor_affine`` / ``fake_quantize_per_channel_affine``
          do (``round(float32(x) · float32(1/scale))`` in float32, output rounded to
          float32). Use it with ``restricted_range=False`` for PyTorch's default symmetric
          ``qint8`` range ``[-128, 127]``; errprop's default ``restricted_range=True`` is
          an observer with ``quant_min=-127, quant_max=127``. See docs/real-models-torch.md.
          The error model widens ``max_abs`` by ``2^-20·|x|`` for the float32 roundings.

    Examples
    --------
    >>> Uniform(8, restricted_range=False, arithmetic="torch")  # torch qint8, per tensor
    Uniform(8, restricted_range=False, arithmetic='torch')
    """

    def __init__(self, bits: int, symmetric: bool = True, granularity: str = "tensor",
                 group_size: int | None = None, rounding: str = "nearest", clip: str = "minmax",
                 scale: str = "float", *, restricted_range: bool = True,
                 percentile: float = 99.99, arithmetic: str = "float64") -> None:
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) \
                or not 2 <= bits <= 16:
            raise ValueError(f"Uniform: bits must be an integer from 2 to 16, got {bits!r}")
        self.bits = int(bits)
        self.symmetric = check_bool(symmetric, "Uniform", "symmetric")
        self.granularity = _check_choice("granularity", granularity, GRANULARITIES)
        self.rounding = _check_choice("rounding", rounding, ROUNDINGS)
        self.clip = _check_choice("clip", clip, CLIPS)
        self.scale = _check_choice("scale", scale, SCALES)
        self.arithmetic = _check_choice("arithmetic", arithmetic, ARITHMETICS)
        if self.granularity == "group":
            if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) \
                    or group_size < 1:
                raise ValueError(f"Uniform: granularity='group' needs a positive integer "
                                 f"group_size, got {group_size!r}")
        elif group_size is not None:
            raise ValueError(f"Uniform: group_size is only used with granularity='group' "
                             f"(got granularity={granularity!r})")
        self.group_size = None if group_size is None else int(group_size)
        self.percentile = check_real(percentile, "Uniform", "percentile")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"Uniform: percentile must be in (0, 100], got {percentile!r}")
        self.restricted_range = check_bool(restricted_range, "Uniform", "restricted_range")
        if self.symmetric:
            half = 2 ** (self.bits - 1)
            self.qmin = -(half - 1) if self.restricted_range else -half
            self.qmax = half - 1
        else:
            self.qmin, self.qmax = 0, 2 ** self.bits - 1

    # ----------------------------------------------------------------- fitting
    def _groups(self, x: Array, channel_axis: int, what: str) -> tuple[Array, tuple[int, ...]]:
        """Return a view of ``x`` whose axes to reduce over are listed second."""
        if self.granularity == "tensor" or x.ndim == 0:
            return x, tuple(range(x.ndim))
        if self.granularity == "channel":
            ax = channel_axis % x.ndim
            return x, tuple(i for i in range(x.ndim) if i != ax)
        g = self.group_size
        if x.shape[-1] % g:
            raise ValueError(f"Uniform: group_size {g} does not divide the last axis of "
                             f"{what} (shape {x.shape})")
        xg = x.reshape(*x.shape[:-1], x.shape[-1] // g, g)
        return xg, (xg.ndim - 1,)

    def _range(self, xg: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
        if self.clip == "percentile" and self.percentile < 100:
            if self.symmetric:
                a = np.percentile(np.abs(xg), self.percentile, axis=axes, keepdims=True)
                return -a, a
            return (np.percentile(xg, 100 - self.percentile, axis=axes, keepdims=True),
                    np.percentile(xg, self.percentile, axis=axes, keepdims=True))
        if self.symmetric:
            a = np.max(np.abs(xg), axis=axes, keepdims=True)
            return -a, a
        return (np.min(xg, axis=axes, keepdims=True), np.max(xg, axis=axes, keepdims=True))

    def _grid_for(self, lo: Array, hi: Array) -> tuple[Array, Array]:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        if self.arithmetic == "torch":
            return self._grid_for_torch(lo, hi)
        if self.symmetric:
            amax = np.maximum(-lo, hi)
            denom = self.qmax if self.restricted_range else (self.qmax - self.qmin) / 2
            scale = amax / denom
        else:
            n = self.qmax - self.qmin
            with np.errstate(over="ignore"):
                width = hi - lo
            # near the float64 limit hi - lo overflows: divide first there
            scale = np.where(np.isfinite(width), width / n, hi / n - lo / n)
        # an all-zero group is represented exactly by any scale
        scale = np.where(scale > 0, scale, 1.0)
        if self.scale == "pow2":
            # round up exactly: log2 of a value one ulp above 2^k rounds to k
            mant, expo = np.frexp(scale)
            scale = np.ldexp(1.0, np.where(mant == 0.5, expo - 1, expo))
        if self.symmetric:
            zero = np.zeros_like(scale)
        else:
            zero = np.clip(np.rint(-lo / scale), self.qmin, self.qmax)
        return scale, zero

    def _grid_for_torch(self, lo: Array, hi: Array) -> tuple[Array, Array]:
        # MinMaxObserver._calculate_qparams on float32 min/max, in float32
        lo, hi = lo.astype(_F32), hi.astype(_F32)
        with np.errstate(over="ignore"):
            if self.symmetric:
                denom = self.qmax if self.restricted_range else (self.qmax - self.qmin) / 2
                scale = np.maximum(-lo, hi) / _F32(denom)
            else:
                scale = (hi - lo) / _F32(self.qmax - self.qmin)
        scale = np.maximum(scale, _F32(_TORCH_MIN_SCALE))
        if self.scale == "pow2":
            mant, expo = np.frexp(scale.astype(np.float64))
            scale = np.ldexp(1.0, np.where(mant == 0.5, expo - 1, expo)).astype(_F32)
        if self.symmetric:
            zero = np.zeros(scale.shape)
        else:
            zero = np.clip(self.qmin - np.rint(lo / scale), self.qmin, self.qmax)
        return scale.astype(np.float64), zero.astype(np.float64)

    def fit(self, x: Array, *, channel_axis: int = 0, what: str = "tensor") -> UniformGrid:
        x = np.asarray(x, dtype=np.float64)
        if x.size == 0:
            raise ValueError(f"Uniform: cannot fit a quantizer to empty {what} (shape {x.shape})")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"Uniform: {what} contains NaN/Inf; cannot fit a quantizer")
        xg, axes = self._groups(x, channel_axis, what)
        lo, hi = self._range(xg, axes)
        scale, zero = self._grid_for(lo, hi)
        if np.max(scale) > _MAX_STEP:
            raise ValueError(f"Uniform: {what} has values up to {np.max(np.abs(x)):.3g}; its "
                             f"quantization step {np.max(scale):.3g} squared overflows float64 "
                             f"(rescale the tensor)")
        if self.clip == "mse":
            scale, zero = self._mse_clip(xg, axes, lo, hi, scale, zero)
        if self.granularity == "group" and x.ndim > 0:
            scale = np.repeat(scale, self.group_size, axis=-1).reshape(x.shape)
            zero = np.repeat(zero, self.group_size, axis=-1).reshape(x.shape)
        return UniformGrid(scale, zero, self.qmin, self.qmax, self.rounding, self.arithmetic)

    def _mse_clip(self, xg: Array, axes: tuple[int, ...], lo: Array, hi: Array, scale: Array,
                  zero: Array) -> tuple[Array, Array]:
        """The clipping ratio ``r ∈ [10⁻³, 1]`` (range ``r·[lo, hi]``) of least squared
        error, per scale group: ``_MSE_COARSE`` ratios spaced geometrically (the loss is
        not unimodal: with one outlier the best range may clip it far inside), then
        twice ``_MSE_FINE`` ratios between the best one's neighbours (0.3% apart at the
        end). Low bit widths need small ratios: the 2-bit (3-level) optimum for Gaussian
        data is ``r ≈ 0.27`` of the max of 10⁶ samples (step ``1.224σ``, Max 1960)."""
        best = np.full(scale.shape, np.inf)
        chosen = np.ones(scale.shape)

        def trial(ratio: Array) -> None:
            nonlocal best, scale, zero, chosen
            s, z = self._grid_for(lo * ratio, hi * ratio)
            err = UniformGrid(s, z, self.qmin, self.qmax, "nearest",
                              self.arithmetic).quantize(xg) - xg
            mse = np.sum(err * err, axis=axes, keepdims=True)
            better = mse < best  # ties keep the earlier (larger) ratio: less clipping
            best = np.where(better, mse, best)
            scale, zero = np.where(better, s, scale), np.where(better, z, zero)
            chosen = np.where(better, ratio, chosen)

        coarse = np.geomspace(1.0, _MSE_SMALLEST, _MSE_COARSE)
        for ratio in coarse:
            trial(np.full(scale.shape, ratio))
        lo_r, hi_r = chosen / (coarse[0] / coarse[1]), np.minimum(chosen * coarse[0] / coarse[1],
                                                                  1.0)
        for _ in range(2):  # twice: between the neighbours, then the new best's neighbours
            for t in np.linspace(0.0, 1.0, _MSE_FINE):
                trial(lo_r + t * (hi_r - lo_r))
            half = (hi_r - lo_r) / (_MSE_FINE - 1)
            lo_r, hi_r = chosen - half, np.minimum(chosen + half, 1.0)
        return scale, zero

    # -------------------------------------------------------------------- misc
    def with_bits(self, bits: int) -> Uniform:
        """The same recipe at another bit width (bit sweeps and allocation)."""
        return Uniform(bits, self.symmetric, self.granularity, self.group_size, self.rounding,
                       self.clip, self.scale, restricted_range=self.restricted_range,
                       percentile=self.percentile, arithmetic=self.arithmetic)

    def __repr__(self) -> str:
        parts = [str(self.bits)]
        defaults = dict(symmetric=True, granularity="tensor", group_size=None,
                        rounding="nearest", clip="minmax", scale="float", restricted_range=True,
                        arithmetic="float64")
        for key, default in defaults.items():
            value = getattr(self, key)
            if value != default:
                parts.append(f"{key}={value!r}")
        if self.clip == "percentile":
            parts.append(f"percentile={self.percentile!r}")
        return f"Uniform({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Uniform) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))

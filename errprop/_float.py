"""Floating-point formats (fp16, bf16, fp8 E4M3/E5M2) and OCP MX block formats as quantizers.

A :class:`FloatFormat` rounds every element to the nearest value of a small binary
floating-point format (round to nearest, ties to even; subnormals included; values
beyond the largest finite number *saturate* to it). Its error is relative: the
spacing of the format at ``|x|`` is ``ulp(x) = 2^(max(⌊log2|x|⌋, emin) − M)`` for
``M`` mantissa bits, so ``|Q(x) − x| ≤ ulp(x)/2`` exactly, and the uniform model
gives ``E e = 0``, ``Var e = ulp(x)²/12``.

An :class:`MXFormat` (OCP Microscaling, v1.0) shares one power-of-two scale
``X = 2^(⌊log2 max|v|⌋ − emax_elem)`` (an E8M0 number) per block of 32 consecutive
elements of the last axis and stores ``v / X`` in a small element format (FP8, FP6,
FP4 or INT8); the error model is the element format's, times ``X``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import check_choice, check_int, real_array
from ._op import Array
from ._quant import ErrorModel, Quantizer


@dataclass(frozen=True)
class _Spec:
    """A binary float format: ``mant`` stored mantissa bits, ``emin`` the exponent of the
    smallest normal number, ``max`` the largest finite value."""

    name: str
    bits: int
    mant: int
    emin: int
    max: float


#: IEEE/OCP parameters. E4M3 is the OCP ``E4M3FN`` variant (no infinities, 448 max,
#: S.1111.111 is NaN); E5M2 is IEEE-like (57344 max, with infinities).
FORMATS = {
    "fp16": _Spec("fp16", 16, 10, -14, 65504.0),
    "bf16": _Spec("bf16", 16, 7, -126, float(np.ldexp(2.0 - 2.0 ** -7, 127))),
    "e4m3": _Spec("e4m3", 8, 3, -6, 448.0),
    "e5m2": _Spec("e5m2", 8, 2, -14, 57344.0),
    # OCP MX element formats (no infinities or NaN)
    "e3m2": _Spec("e3m2", 6, 2, -2, 28.0),
    "e2m3": _Spec("e2m3", 6, 3, 0, 7.5),
    "e2m1": _Spec("e2m1", 4, 1, 0, 6.0),
}


def _spacing(spec: _Spec, x: Array) -> Array:
    """``ulp(x) = 2^(max(⌊log2|x|⌋, emin) − mant)``: the format's spacing at ``|x|``."""
    _, e = np.frexp(np.abs(x))  # |x| = m·2^e, m in [0.5, 1): ⌊log2|x|⌋ = e − 1
    return np.ldexp(1.0, np.maximum(e - 1, spec.emin) - spec.mant)


def _round(spec: _Spec, x: Array) -> Array:
    """Round to nearest even in the format, saturating at ``±max``. Exact in float64:
    ``x / ulp`` and ``q · ulp`` are power-of-two scalings."""
    with np.errstate(invalid="ignore"):
        ulp = _spacing(spec, x)
        q = np.rint(x / ulp) * ulp  # a carry into the next binade is still exact
    return np.clip(q, -spec.max, spec.max)


def _model(spec: _Spec, x: Array, factor: Array | float = 1.0) -> ErrorModel:
    """Relative-error model of rounding ``x / factor`` in ``spec``, times ``factor``."""
    u = x / factor
    step = _spacing(spec, u) * factor
    clipped = np.abs(u) > spec.max
    clip_err = (np.clip(u, -spec.max, spec.max) - u) * factor
    # values of the format (zeros, ones, re-quantized values) are not moved at all
    fixed = clipped | (_round(spec, u) == u)
    return ErrorModel(max_abs=np.where(fixed, np.abs(clip_err), step / 2),
                      mean=np.where(fixed, clip_err, 0.0),
                      var=np.where(fixed, 0.0, step * step / 12), clipped=clipped,
                      width=np.where(fixed, 0.0, step))


def _check_finite(x: Array, owner: str, what: str) -> Array:
    x = real_array(x, owner, what)
    if x.size == 0:
        raise ValueError(f"{owner}: cannot fit a quantizer to empty {what} (shape {x.shape})")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{owner}: {what} contains NaN/Inf; cannot fit a quantizer")
    return x


# --------------------------------------------------------------------- scalar formats
@dataclass(frozen=True, eq=False)
class FloatGrid:
    """A float format applied elementwise (nothing is calibrated: the grid is the format).

    ``scale`` is the format's spacing ``ulp(x)`` at the tensor it was fitted on (the
    analogue of a uniform grid's step, elementwise); ``quantize`` works on any tensor.
    """

    spec: _Spec
    scale: Array
    rounding: str = "nearest"

    @property
    def lo(self) -> float:
        return -self.spec.max

    @property
    def hi(self) -> float:
        return self.spec.max

    def quantize(self, x: Array, *, rng: np.random.Generator | None = None) -> Array:
        """Round ``x`` to the format (ties to even; beyond ``±max``: ``±max``)."""
        return _round(self.spec, real_array(x, f"FloatFormat({self.spec.name!r})", "x"))

    def error_model(self, x: Array) -> ErrorModel:
        """Per element: ``max_abs = ulp(x)/2``, ``mean = 0``, ``var = ulp(x)²/12``
        (the uniform model at the spacing of ``|x|``); beyond ``±max`` the exact,
        deterministic saturation error; values of the format itself: no error."""
        return _model(self.spec, real_array(x, f"FloatFormat({self.spec.name!r})", "x"))


class FloatFormat(Quantizer):
    """Round to a floating-point format: ``"fp16"``, ``"bf16"``, ``"e4m3"``, ``"e5m2"``.

    Parameters
    ----------
    name : ``"fp16"`` (IEEE binary16: 10 mantissa bits, max 65504), ``"bf16"``
        (bfloat16: 7 mantissa bits, float32's range), ``"e4m3"`` (OCP FP8 E4M3FN:
        3 mantissa bits, max 448, no infinities) or ``"e5m2"`` (OCP FP8 E5M2:
        2 mantissa bits, max 57344).

    Notes
    -----
    Rounding is to nearest, ties to even, with gradual underflow (subnormals), exactly
    as ``ml_dtypes`` / NumPy ``float16`` convert float64 values — for every value whose
    conversion is finite. Values beyond the largest finite number **saturate** to
    ``±max`` (the OCP FP8 "saturating" conversion, and what FP8 training recipes do by
    clamping before the cast), where ``ml_dtypes`` returns ``inf`` (fp16, bf16, e5m2,
    from ``max + ulp/2`` on) or NaN (e4m3, from 464 on): an errprop network never
    carries inf/NaN, and saturation is what a deployed kernel does. So
    ``FloatFormat(f).quantize(x) == ml_dtypes(clip(x, -max, max))`` for every ``x``.

    Error model (per element, ``ulp(x) = 2^(max(⌊log2|x|⌋, emin) − M)``, ``M`` mantissa
    bits): ``|e| ≤ ulp(x)/2`` (exact), and under the uniform model ``E e = 0``,
    ``Var e = ulp(x)²/12``: a *relative* error, ``Var e ≈ x²·2^(−2M)/12`` up to the
    position of ``x`` in its binade. Saturated elements carry their exact error.

    Examples
    --------
    >>> FloatFormat("e4m3").quantize([0.3, 500.0])
    array([  0.3125, 448.    ])
    """

    def __init__(self, name: str) -> None:
        self.name = check_choice(name, "FloatFormat", "name", ("fp16", "bf16", "e4m3", "e5m2"))
        self.spec = FORMATS[name]
        self.bits = self.spec.bits

    @property
    def max(self) -> float:
        """The largest finite value of the format."""
        return self.spec.max

    def fit(self, x: Array, *, channel_axis: int = 0, what: str = "tensor") -> FloatGrid:
        x = _check_finite(x, f"FloatFormat({self.name!r})", what)
        return FloatGrid(self.spec, _spacing(self.spec, x))

    def __repr__(self) -> str:
        return f"FloatFormat({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FloatFormat) and other.name == self.name

    def __hash__(self) -> int:
        return hash(repr(self))


# --------------------------------------------------------------------- MX block formats
#: MX format -> (element format, emax of the element: the exponent of its largest normal).
#: INT8 elements are two's complement with an implicit scale 2^-6 (largest 127/64).
MX_FORMATS = {"mxfp8_e4m3": ("e4m3", 8), "mxfp8_e5m2": ("e5m2", 15),
              "mxfp6_e3m2": ("e3m2", 4), "mxfp6_e2m3": ("e2m3", 2),
              "mxfp4_e2m1": ("e2m1", 2), "mxint8": ("int8", 0)}
_INT8_STEP = 2.0 ** -6


def _blocks(x: Array, block: int) -> tuple[Array, int]:
    """``x`` as ``(..., n_blocks, block)``, the last axis zero-padded to a multiple."""
    n = x.shape[-1]
    pad = -n % block
    if pad:
        x = np.concatenate([x, np.zeros((*x.shape[:-1], pad))], axis=-1)
    return x.reshape(*x.shape[:-1], -1, block), n


def _shared_scale(xb: Array, emax: int) -> Array:
    """``X = 2^(⌊log2 max|v|⌋ − emax)`` per block (E8M0: exponent clamped to [-127, 127];
    an all-zero block gets ``X = 1``)."""
    amax = np.max(np.abs(xb), axis=-1, keepdims=True)
    _, e = np.frexp(amax)
    shared = np.where(amax > 0, e - 1 - emax, 0)
    return np.ldexp(1.0, np.clip(shared, -127, 127))


@dataclass(frozen=True, eq=False)
class MXGrid:
    """An MX format applied blockwise along the last axis.

    ``quantize`` computes the shared scales of the tensor it is given (as MX hardware
    does, per block at run time); ``block_scale`` and ``scale`` (the element spacing
    times the block scale) are those of the tensor the grid was fitted on, where
    ``error_model`` is meant to be evaluated.
    """

    name: str
    block: int
    block_scale: Array  # (..., n_blocks, 1) of the fitted tensor
    scale: Array  # per-element spacing at the fitted tensor
    rounding: str = "nearest"

    @property
    def element(self) -> str:
        return MX_FORMATS[self.name][0]

    def _factor(self, x: Array) -> tuple[Array, Array, int]:
        xb, n = _blocks(x, self.block)
        return xb, _shared_scale(xb, MX_FORMATS[self.name][1]), n

    def quantize(self, x: Array, *, rng: np.random.Generator | None = None) -> Array:
        """Scale each block by its ``X``, round the elements (ties to even, saturating),
        scale back."""
        x = real_array(x, f"MXFormat({self.name!r})", "x")
        xb, X, n = self._factor(x)
        u = xb / X
        if self.element == "int8":
            q = np.clip(np.rint(u / _INT8_STEP), -127, 127) * _INT8_STEP
        else:
            q = _round(FORMATS[self.element], u)
        return (q * X).reshape(*x.shape[:-1], -1)[..., :n]

    def error_model(self, x: Array) -> ErrorModel:
        """The element format's model of ``v / X``, times ``X`` (``X`` from ``x``'s blocks)."""
        x = real_array(x, f"MXFormat({self.name!r})", "x")
        xb, X, n = self._factor(x)
        if self.element == "int8":
            u = xb / X
            lim = 127 * _INT8_STEP
            clipped = np.abs(u) > lim
            clip_err = (np.clip(u, -lim, lim) - u) * X
            step = np.broadcast_to(_INT8_STEP * X, xb.shape)
            model = ErrorModel(np.where(clipped, np.abs(clip_err), step / 2),
                               np.where(clipped, clip_err, 0.0),
                               np.where(clipped, 0.0, step * step / 12), clipped,
                               np.where(clipped, 0.0, step))
        else:
            model = _model(FORMATS[self.element], xb, X)

        def cut(a: Array) -> Array:
            return np.asarray(a).reshape(*x.shape[:-1], -1)[..., :n]

        return ErrorModel(*(cut(getattr(model, f)) for f in
                            ("max_abs", "mean", "var", "clipped", "width")))


class MXFormat(Quantizer):
    """OCP Microscaling (MX v1.0) block format: one E8M0 scale per ``block`` elements.

    Parameters
    ----------
    name : ``"mxfp8_e4m3"``, ``"mxfp8_e5m2"``, ``"mxfp6_e3m2"``, ``"mxfp6_e2m3"``,
        ``"mxfp4_e2m1"`` or ``"mxint8"``.
    block : int, default 32 (the spec's block size), consecutive elements of the last
        axis (the dot-product axis of a ``Linear`` weight ``(out, in)`` and of its
        input). A last axis that is not a multiple is padded with zeros.

    Notes
    -----
    Per block (OCP MX v1.0, section 6.3): ``X = 2^(⌊log2 max_i |v_i|⌋ − emax_elem)``,
    ``emax_elem`` the exponent of the element format's largest normal number (E4M3: 8,
    E5M2: 15, E3M2: 4, E2M3: 2, E2M1: 2, INT8: 0); the exponent is clamped to E8M0's
    ``[-127, 127]``, and an all-zero block gets ``X = 1``. Then ``P_i = Q(v_i / X)``
    rounded to nearest even in the element format, saturating at its largest
    magnitude (``v/X`` can reach ``2^(emax+1)``, beyond e.g. E4M3's 448), and
    ``v̂_i = X · P_i``. INT8 elements are ``k · 2^-6`` with ``k`` in ``[-127, 127]``
    (symmetric, as the reference ``microxcaling`` library clamps; rounding half to
    even here, where that library rounds half away from zero).

    Error model: the element format's relative model of ``v/X`` (``ulp/2``, mean 0,
    ``ulp²/12``), times ``X``; INT8 has the uniform step ``X · 2^-6``.
    """

    def __init__(self, name: str, block: int = 32) -> None:
        self.name = check_choice(name, "MXFormat", "name", MX_FORMATS)
        self.block = check_int(block, "MXFormat", "block", minimum=1)
        element = MX_FORMATS[name][0]
        self.bits = 8 if element == "int8" else FORMATS[element].bits

    def fit(self, x: Array, *, channel_axis: int = 0, what: str = "tensor") -> MXGrid:
        x = _check_finite(x, f"MXFormat({self.name!r})", what)
        if x.ndim == 0:
            x = x.reshape(1)
        grid = MXGrid(self.name, self.block, np.ones(1), np.ones(1))
        _, X, _ = grid._factor(x)
        step = np.sqrt(12 * grid.error_model(x).var)  # the element spacing times X
        return MXGrid(self.name, self.block, X, step)

    def __repr__(self) -> str:
        return f"MXFormat({self.name!r}" + ("" if self.block == 32 else f", block={self.block}") + ")"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MXFormat) and repr(other) == repr(self)

    def __hash__(self) -> int:
        return hash(repr(self))

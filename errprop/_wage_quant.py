"""WAGE's shift quantizer and the four bit widths (see :mod:`errprop._wage` for the analysis).

``Q(x, k) = clip(σ(k)·round(x / σ(k)), -1 + σ(k), 1 - σ(k))`` with ``σ(k) = 2^(1-k)``, on
``x / Shift(max|x|)`` with ``Shift(x) = 2^round(log2 x)`` (Wu et al. 2018).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import check_choice, real_array
from ._op import Array
from ._quant import Quantizer, UniformGrid, round_levels

SHIFTS = ("round", "ceil")
_ROUNDINGS = ("nearest", "stochastic", "floor")


def _shift(amax: Array, mode: str) -> Array:
    """``2^round(log2 amax)`` (WAGE) or ``2^ceil(log2 amax)``; 1 where ``amax = 0``."""
    safe = np.where(amax > 0, amax, 1.0)
    lg = np.log2(safe)
    return np.exp2(np.round(lg) if mode == "round" else np.ceil(lg))


class ShiftQuantizer(Quantizer):
    """WAGE's quantizer: ``k`` bits, step ``2^(1-k)·Shift(max|x|)``, per tensor.

    Parameters
    ----------
    bits : int, 2..16.
    rounding : ``"stochastic"`` (default, as WAGE's gradients), ``"nearest"`` or ``"floor"``.
    shift : ``"round"`` (WAGE: ``Shift(x) = 2^round(log2 x)``; values above
        ``(1 - 2^(1-k))·Shift`` saturate) or ``"ceil"`` (the next power of two up: no
        value is clipped).

    Notes
    -----
    The grid is ``s·[-(2^(k-1) - 1), ..., 2^(k-1) - 1]`` with ``s = σ(k)·Shift(max|x|)``,
    ``σ(k) = 2^(1-k)``: WAGE's ``Q(x, k)`` with the clip ``±(1 - σ(k))``, applied to
    ``x / Shift(max|x|)`` and scaled back.

    References
    ----------
    S. Wu, G. Li, F. Chen, L. Shi, "Training and Inference with Integers in Deep Neural
    Networks", ICLR 2018.
    """

    def __init__(self, bits: int, rounding: str = "stochastic", shift: str = "round") -> None:
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) \
                or not 2 <= bits <= 16:
            raise ValueError(f"ShiftQuantizer: bits must be an integer from 2 to 16, "
                             f"got {bits!r}")
        check_choice(rounding, "ShiftQuantizer", "rounding", _ROUNDINGS)
        check_choice(shift, "ShiftQuantizer", "shift", SHIFTS)
        self.bits, self.rounding, self.shift = int(bits), rounding, shift
        self.qmax = 2 ** (self.bits - 1) - 1

    def step(self, amax: Array) -> Array:
        """The step ``σ(k)·Shift(amax)`` for a tensor whose largest magnitude is ``amax``."""
        return 2.0 ** (1 - self.bits) * _shift(np.asarray(amax, dtype=np.float64), self.shift)

    def fit(self, x: Array, *, channel_axis: int = 0, what: str = "tensor") -> UniformGrid:
        x = real_array(x, "ShiftQuantizer", what)
        if x.size == 0 or not np.all(np.isfinite(x)):
            raise ValueError(f"ShiftQuantizer: {what} must be finite and non-empty "
                             f"(shape {x.shape})")
        s = self.step(np.max(np.abs(x)))
        return UniformGrid(np.asarray(s), np.zeros(()), -self.qmax, self.qmax, self.rounding)

    def quantize_stack(self, x: Array, rng: np.random.Generator | None) -> Array:
        """Quantize each slice ``x[i]`` with its own per-tensor grid (Monte Carlo samples)."""
        amax = np.max(np.abs(x.reshape(x.shape[0], -1)), axis=1)
        s = self.step(amax).reshape(-1, *([1] * (x.ndim - 1)))
        q = round_levels(x / s, self.rounding, rng, who="ShiftQuantizer: ")
        return np.clip(q, -self.qmax, self.qmax) * s

    def __repr__(self) -> str:
        return f"ShiftQuantizer({self.bits}, rounding={self.rounding!r}, shift={self.shift!r})"


def _check_bits(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 2 <= value <= 16:
        raise ValueError(f"WAGE: {what} must be an integer from 2 to 16 or None (float), "
                         f"got {value!r}")
    return int(value)


@dataclass(frozen=True)
class WAGE:
    """Bit widths of WAGE's four quantizers (None: that quantity stays float).

    Parameters
    ----------
    bits_w, bits_a : weights and activations (Linear inputs) of the forward pass,
        round to nearest with a shift scale.
    bits_g, bits_e : weight gradients and back-propagated errors, rounded with
        ``rounding_g`` / ``rounding_e`` (default stochastic, unbiased).
    shift : ``"round"`` (WAGE) or ``"ceil"`` (see :class:`ShiftQuantizer`).

    The paper's reference setting is 2-8-8-8 (``bits_w=2``); the defaults are 8-8-8-8.
    """

    bits_w: int | None = 8
    bits_a: int | None = 8
    bits_g: int | None = 8
    bits_e: int | None = 8
    rounding_g: str = "stochastic"
    rounding_e: str = "stochastic"
    shift: str = "round"

    def __post_init__(self) -> None:
        for key in ("bits_w", "bits_a", "bits_g", "bits_e"):
            _check_bits(getattr(self, key), key)
        for key in ("rounding_g", "rounding_e"):
            check_choice(getattr(self, key), "WAGE", key, _ROUNDINGS)
        check_choice(self.shift, "WAGE", "shift", SHIFTS)

    def quantizer(self, kind: str) -> ShiftQuantizer | None:
        """The quantizer of ``kind`` in ``"w", "a", "g", "e"`` (None when float)."""
        bits = getattr(self, f"bits_{kind}")
        if bits is None:
            return None
        rounding = {"w": "nearest", "a": "nearest", "g": self.rounding_g,
                    "e": self.rounding_e}[kind]
        return ShiftQuantizer(bits, rounding, self.shift)

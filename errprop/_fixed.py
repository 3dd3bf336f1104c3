"""Quantizers whose result is given: a tensor quantized elsewhere (GPFQ/SPFQ, a checkpoint's
integer weights) put into a :class:`~errprop.QuantConfig` with its exact, deterministic
error model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._op import Array
from ._quant import ErrorModel, Quantizer


@dataclass(frozen=True, eq=False)
class FixedGrid:
    """A grid that *is* its result: ``quantize`` returns the stored ``values``.

    Made by :class:`Fixed` for a tensor quantized elsewhere (GPFQ/SPFQ, a checkpoint's
    integer weights). Its error is deterministic: ``e = values - x`` exactly, so the
    model has ``mean = e``, ``var = 0``, ``max_abs = |e|``, ``width = 0``.

    ``scale`` is the step of the alphabet the values lie on (broadcasting against
    them; 0 if unknown), the analogue of a uniform grid's step: Monte Carlo's float32
    resolution check and integer kernels read it. ``rounding`` is ``"fixed"``.
    """

    values: Array
    scale: Array
    rounding: str = "fixed"

    def quantize(self, x: Array, *, rng: np.random.Generator | None = None) -> Array:
        """The stored values (broadcast to ``x``'s shape: ``x`` may carry leading axes)."""
        x = np.asarray(x)
        if x.shape[x.ndim - self.values.ndim:] != self.values.shape:
            raise ValueError(f"Fixed: the stored values have shape {self.values.shape}, "
                             f"got a tensor of shape {x.shape}")
        return np.array(np.broadcast_to(self.values, x.shape), dtype=np.float64)

    def error_model(self, x: Array) -> ErrorModel:
        """``mean = values - x``, ``var = 0``, ``max_abs = |values - x|``, ``width = 0``."""
        e = self.quantize(x) - np.asarray(x, dtype=np.float64)
        zero = np.zeros_like(e)
        return ErrorModel(max_abs=np.abs(e), mean=e, var=zero, clipped=np.zeros(e.shape, bool),
                          width=zero)


class Fixed(Quantizer):
    """A quantizer whose result is given: ``Fixed(Q).fit(W)`` returns ``Q`` for ``W``.

    Use it to put a tensor quantized by another algorithm (GPFQ/SPFQ,
    :func:`errprop.gpfq_config`) into a :class:`QuantConfig` per layer, e.g.
    ``overrides={"fc1": {"weights": Fixed(Q1)}}``. The error model is the exact,
    deterministic error ``Q - W`` (``var = 0``).

    Parameters
    ----------
    values : array, the quantized tensor; ``fit`` checks that the tensor has its shape.
    step : float or array broadcasting against ``values``, the step of the alphabet
        ``values`` lie on (``values / step`` integers), or None (0: unknown).
    """

    def __init__(self, values: object, step: object = None) -> None:
        v = np.array(values, dtype=np.float64)
        if v.ndim == 0 or v.size == 0 or not np.all(np.isfinite(v)):
            raise ValueError(f"Fixed: values must be a finite, non-empty array, got shape "
                             f"{v.shape}")
        s = np.zeros(()) if step is None else np.asarray(step, dtype=np.float64)
        try:
            np.broadcast_shapes(s.shape, v.shape)
        except ValueError:
            raise ValueError(f"Fixed: step of shape {s.shape} does not broadcast against the "
                             f"values {v.shape}") from None
        v.setflags(write=False)
        self.values, self.step = v, s

    def fit(self, x: Array, *, channel_axis: int = 0, what: str = "tensor") -> FixedGrid:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != self.values.shape:
            raise ValueError(f"Fixed: {what} has shape {x.shape}, but the stored quantized "
                             f"values have shape {self.values.shape}")
        return FixedGrid(self.values, self.step)

    def __repr__(self) -> str:
        return f"Fixed(<{'x'.join(map(str, self.values.shape))} values>)"

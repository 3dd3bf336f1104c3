"""Elementwise activations (declared as a table) and softmax."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import special

from ._checks import check_int
from ._op import Array, Op, sample_max

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # a Python float keeps float32 arrays float32
_GELU_TANH_A = 0.044715


# Beyond |x| = 40 the Gaussian density is exactly 0 in float64 and beyond 30 tanh of the
# GELU-tanh argument is exactly ±1: clipping there changes no float, and keeps x², x³
# from overflowing near 1e154 (0 · inf would make the derivatives NaN)
_GELU_CLIP = 40.0


def _phi(x: Array) -> Array:
    x = np.clip(x, -_GELU_CLIP, _GELU_CLIP)
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _gelu_d2(x: Array, y: Array) -> Array:
    xc = np.clip(x, -_GELU_CLIP, _GELU_CLIP)
    return _phi(xc) * (2.0 - xc * xc)


def _gelu_tanh_parts(x: Array) -> tuple[Array, Array]:
    x = np.clip(x, -_GELU_CLIP, _GELU_CLIP)
    u = _SQRT_2_OVER_PI * (x + _GELU_TANH_A * x**3)
    return np.tanh(u), _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_A * x * x)


def _gelu_tanh_d1(x: Array, y: Array) -> Array:
    t, du = _gelu_tanh_parts(x)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


def _gelu_tanh_d2(x: Array, y: Array) -> Array:
    t, du = _gelu_tanh_parts(x)
    sech2 = 1.0 - t * t
    d2u = _SQRT_2_OVER_PI * 6.0 * _GELU_TANH_A * np.clip(x, -_GELU_CLIP, _GELU_CLIP)
    return sech2 * du + 0.5 * x * (-2.0 * t * sech2 * du * du + sech2 * d2u)


@dataclass(frozen=True)
class _Elementwise:
    """``f``, ``f'`` and ``f''``; derivatives receive both ``x`` and ``y = f(x)``."""

    f: Callable[[Array], Array]
    d1: Callable[[Array, Array], Array]
    d2: Callable[[Array, Array], Array]
    kink: float | None = None  # location of a non-differentiable point, if any


#: name -> (f, f', f''). Adding an activation is one entry here.
ACTIVATIONS: dict[str, _Elementwise] = {
    # ReLU convention: f'(0) = 0 (as PyTorch); first order is unreliable within |Δx| of 0.
    "relu": _Elementwise(lambda x: np.maximum(x, 0.0),
                         lambda x, y: (x > 0).astype(x.dtype),
                         lambda x, y: np.zeros_like(x), kink=0.0),
    "gelu": _Elementwise(lambda x: x * special.ndtr(x),
                         lambda x, y: special.ndtr(x) + x * _phi(x),
                         _gelu_d2),
    "gelu_tanh": _Elementwise(lambda x: 0.5 * x * (1.0 + _gelu_tanh_parts(x)[0]),
                              _gelu_tanh_d1, _gelu_tanh_d2),
    "tanh": _Elementwise(np.tanh, lambda x, y: 1.0 - y * y,
                         lambda x, y: -2.0 * y * (1.0 - y * y)),
    "sigmoid": _Elementwise(special.expit, lambda x, y: y * (1.0 - y),
                            lambda x, y: y * (1.0 - y) * (1.0 - 2.0 * y)),
    "silu": _Elementwise(lambda x: x * special.expit(x),
                         lambda x, y: (s := special.expit(x)) * (1.0 + x * (1.0 - s)),
                         lambda x, y: (s := special.expit(x)) * (1.0 - s)
                         * (2.0 + x * (1.0 - 2.0 * s))),
    "identity": _Elementwise(lambda x: x, lambda x, y: np.ones_like(x),
                             lambda x, y: np.zeros_like(x)),
}


#: the most axes an op sees: (batch, tokens, features); passes may add leading sample axes
_MAX_NDIM = 3


def check_activation(kind: object, owner: str) -> str:
    """An activation name from :data:`ACTIVATIONS`."""
    names = ", ".join(sorted(ACTIVATIONS))
    if isinstance(kind, str) and kind in ACTIVATIONS:
        return kind
    if isinstance(kind, str):
        close = difflib.get_close_matches(kind, list(ACTIVATIONS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{owner}: unknown activation {kind!r}; expected one of {names}{hint}")
    raise TypeError(f"{owner}: the activation must be a name (one of {names}), got {kind!r} "
                    f"({type(kind).__name__})")


def softmax_abs(y: Array, r: Array, axis: int = -1) -> Array:
    """``|J| r`` for the softmax Jacobian ``J = diag(y) − y yᵀ``:
    ``y_i (1 − y_i) r_i + y_i Σ_{k≠i} y_k r_k = y_i ((1 − 2 y_i) r_i + Σ_k y_k r_k)``."""
    return y * ((1.0 - 2.0 * y) * r + np.sum(y * r, axis=axis, keepdims=True))


def softmax_gain(y: Array, axis: int = -1) -> Array:
    """Per row, a bound on the spectral norm of ``diag(y) − y yᵀ`` (Gershgorin: its
    absolute row sums are ``2 y_i (1 − y_i)``), at most 1/2."""
    return np.max(2.0 * y * (1.0 - y), axis=axis)


def saturated_rows(p: Array, axis: int = -1, threshold: float = 0.99) -> float:
    """Fraction of softmax rows whose largest probability exceeds ``threshold``: there
    the Jacobian ``diag(y) - y yᵀ`` nearly vanishes and a change of the winning logit
    is invisible to first order."""
    return float(np.mean(np.max(p, axis=axis) > threshold))


class Activation(Op):
    """Elementwise nonlinearity ``y = f(x)``; first-order rule ``Δy = f'(x)·Δx``.

    Parameters
    ----------
    kind : one of ``relu``, ``gelu`` (erf form), ``gelu_tanh``, ``tanh``,
        ``sigmoid``, ``silu``, ``identity``.

    Notes
    -----
    ReLU is not differentiable at 0; errprop uses ``f'(0) = 0``. Units whose
    input lies within one error of 0 may flip, which is why first order
    converges only as O(√step) through ReLU (see ``docs/theory.md``).
    """

    def __init__(self, kind: str, name: str | None = None) -> None:
        super().__init__(name)
        self.kind = check_activation(kind, f"Activation {name!r}" if name else "Activation")
        self.fn = ACTIVATIONS[kind]

    @property
    def prefix(self) -> str:  # type: ignore[override]
        return self.kind

    @property
    def commutes_with_requantization(self) -> bool:  # type: ignore[override]
        return self.kind in ("relu", "identity")

    def forward(self, x: Array, params: Mapping[str, Array] | None = None) -> Array:
        return self.fn.f(x)

    def jvp(self, x, y, dx, dparams):
        if dx is None:
            return np.zeros_like(y)
        return self.fn.d1(x, y) * dx

    def vjp(self, x, y, g, params=()):
        return self.fn.d1(x, y) * g, {}

    def abs_jvp(self, x, y, r, rparams):
        if r is None:
            return np.zeros_like(y)
        # at a kink the one-sided slopes differ: bound with the larger (1 for ReLU)
        slope = np.abs(self.fn.d1(x, y))
        if self.fn.kink is not None:
            slope = np.where(x == self.fn.kink, np.maximum(slope, 1.0), slope)
        return slope * r

    def norm_jvp(self, x, y, r, rparams):
        if r is None:
            return np.zeros(x.shape[0])
        slope = np.abs(self.fn.d1(x, y))
        if self.fn.kink is not None:
            slope = np.where(x == self.fn.kink, np.maximum(slope, 1.0), slope)
        return sample_max(slope) * r

    def diagnose(self, x, y, dx):
        if self.fn.kink is None:
            return {}
        # inputs within one error of the kink may cross it: no derivative describes that
        return {"near_kink": float(np.mean(np.abs(x - self.fn.kink) <= np.abs(dx)))}

    def jvp2(self, x, y, a, b, dparams):
        # b_out = f'(x)·b + ½ f''(x)·a²
        out = np.zeros_like(y) if b is None else self.fn.d1(x, y) * b
        return out if a is None else out + 0.5 * self.fn.d2(x, y) * a * a

    def config(self) -> dict[str, object]:
        return {"kind": self.kind}

    def describe(self) -> str:
        return self.kind


class Softmax(Op):
    """Numerically stable softmax along ``axis`` (default the last).

    Notes
    -----
    ``y = exp(x - max x) / Σ exp(x - max x)``; first-order rule (the softmax
    Jacobian ``diag(y) - y yᵀ``)::

        Δy = y ⊙ (Δx - Σ_k y_k Δx_k)
    """

    prefix = "softmax"

    def __init__(self, axis: int = -1, name: str | None = None) -> None:
        super().__init__(name)
        label = f"Softmax {name!r}" if name else "Softmax"
        axis = check_int(axis, label, "axis")
        if not -_MAX_NDIM <= axis < 0:
            raise ValueError(f"{label}: axis must be a negative integer from -{_MAX_NDIM} to -1 "
                             f"(counted from the feature axis, so leading batch/sample axes "
                             f"may vary; errprop layers see at most {_MAX_NDIM} axes: batch, "
                             f"tokens, features), got {axis!r}")
        self.axis = axis

    @property
    def min_ndim(self) -> int:  # type: ignore[override]
        """The input needs the axis the softmax runs along (and a batch axis)."""
        return max(2, -self.axis)

    def forward(self, x: Array, params: Mapping[str, Array] | None = None) -> Array:
        z = x - np.max(x, axis=self.axis, keepdims=True)
        e = np.exp(z)
        return e / np.sum(e, axis=self.axis, keepdims=True)

    def jvp(self, x, y, dx, dparams):
        if dx is None:
            return np.zeros_like(y)
        return y * (dx - np.sum(y * dx, axis=self.axis, keepdims=True))

    def vjp(self, x, y, g, params=()):
        # the softmax Jacobian diag(y) - y yᵀ is symmetric
        return self.jvp(x, y, g, {}), {}

    def abs_jvp(self, x, y, r, rparams):
        return np.zeros_like(y) if r is None else softmax_abs(y, r, self.axis)

    def norm_jvp(self, x, y, r, rparams):
        if r is None:
            return np.zeros(x.shape[0])
        return sample_max(softmax_gain(y, self.axis)) * r

    def diagnose(self, x, y, dx):
        return {"saturated": saturated_rows(y, self.axis)}

    def jvp2(self, x, y, a, b, dparams):
        # with c = a - Σ y a:  D²y[a, a] = y ⊙ (c² - Σ_k y_k c_k²)
        out = self.jvp(x, y, b, {}) if b is not None else np.zeros_like(y)
        if a is None:
            return out
        c = a - np.sum(y * a, axis=self.axis, keepdims=True)
        return out + 0.5 * y * (c * c - np.sum(y * c * c, axis=self.axis, keepdims=True))

    def config(self) -> dict[str, object]:
        return {"axis": self.axis}

    def describe(self) -> str:
        return f"axis={self.axis}"

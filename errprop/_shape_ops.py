"""Shape ops and constant scaling: ``Reshape``, ``Transpose``, ``Slice``, ``Scale``.

Each acts on the *trailing* axes of its input, so the batch axis and any leading
direction or sample axes pass through untouched. Their rules come from the structural
registrar (:func:`errprop._registrars.structural_unary`): every output element is one
input element.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ._checks import check_int, check_real
from ._op import Array, Op
from ._registrars import structural_unary


def _tail(a: Array, lead_ndim: int) -> tuple[int, ...]:
    return a.shape[lead_ndim:]


@structural_unary
class Reshape(Op):
    """Replace the last ``axes`` axes by ``shape`` (one entry may be ``-1``): split heads
    with ``Reshape((heads, head_dim))``, merge them back with ``Reshape((d,), axes=2)``."""

    commutes_with_requantization = True

    prefix = "reshape"

    def __init__(self, shape: Sequence[int], *, axes: int = 1, name: str | None = None) -> None:
        super().__init__(name)
        label = f"Reshape {name!r}" if name else "Reshape"
        if isinstance(shape, (int, np.integer)):
            shape = (shape,)
        self.shape = tuple(check_int(s, label, "shape entries", minimum=-1) for s in shape)
        if not self.shape or self.shape.count(-1) > 1 or 0 in self.shape:
            raise ValueError(f"{label}: shape must be positive sizes with at most one -1, "
                             f"got {shape!r}")
        self.axes = check_int(axes, label, "axes", minimum=1)

    @property
    def ndim_change(self) -> int:  # type: ignore[override]
        return len(self.shape) - self.axes

    @property
    def min_ndim(self) -> int:  # type: ignore[override]
        return max(2, self.axes + 1)

    @property
    def in_features(self):
        if self.axes == 1 and -1 not in self.shape:
            return math.prod(self.shape)
        return None

    def out_features(self, in_features):
        last = self.shape[-1]
        if last != -1:
            return last
        if self.axes == 1 and in_features is not None and len(self.shape) == 1:
            return in_features
        return None

    def _to(self, a: Array, lead: int) -> Array:
        tail = a.shape[a.ndim - self.axes:]
        if len(tail) < self.axes or a.ndim - self.axes < 1 + lead:
            raise ValueError(f"{self!r}: needs {self.axes} axes after the batch axis, got an "
                             f"input of shape {a.shape[lead:]}")
        try:
            return a.reshape(*a.shape[:a.ndim - self.axes], *self.shape)
        except ValueError:
            raise ValueError(f"{self!r}: cannot reshape trailing axes {tail} to "
                             f"{self.shape}") from None

    def forward(self, x, params=None):
        return self._to(x, 0)

    def jvp(self, x, y, dx, dparams):
        if dx is None:
            return np.zeros_like(y)
        return dx.reshape(*dx.shape[:dx.ndim - x.ndim], *y.shape)

    def vjp(self, x, y, g, params=()):
        return g.reshape(g.shape[0], *x.shape), {}

    def config(self):
        return {"shape": list(self.shape), "axes": self.axes}

    def describe(self):
        return f"last {self.axes} axes -> {self.shape}"


@structural_unary
class Transpose(Op):
    """Permute the last ``len(perm)`` axes: ``Transpose((1, 0, 2))`` turns
    ``(batch, tokens, heads, head_dim)`` into ``(batch, heads, tokens, head_dim)``."""

    commutes_with_requantization = True

    prefix = "transpose"

    def __init__(self, perm: Sequence[int], *, name: str | None = None) -> None:
        super().__init__(name)
        label = f"Transpose {name!r}" if name else "Transpose"
        self.perm = tuple(check_int(p, label, "perm entries", minimum=0) for p in perm)
        if sorted(self.perm) != list(range(len(self.perm))) or len(self.perm) < 2:
            raise ValueError(f"{label}: perm must be a permutation of 0..n-1 (n >= 2), "
                             f"got {perm!r}")
        self.inverse = tuple(int(i) for i in np.argsort(self.perm))

    @property
    def min_ndim(self) -> int:  # type: ignore[override]
        return len(self.perm) + 1

    def out_features(self, in_features):
        return in_features if self.perm[-1] == len(self.perm) - 1 else None

    def _apply(self, a: Array, perm: tuple[int, ...]) -> Array:
        k = len(perm)
        head = tuple(range(a.ndim - k))
        return np.transpose(a, head + tuple(a.ndim - k + p for p in perm))

    def forward(self, x, params=None):
        if x.ndim < len(self.perm) + 1:
            raise ValueError(f"{self!r}: needs {len(self.perm)} axes after the batch axis, "
                             f"got an input of shape {x.shape}")
        return self._apply(x, self.perm)

    def jvp(self, x, y, dx, dparams):
        return np.zeros_like(y) if dx is None else self._apply(dx, self.perm)

    def vjp(self, x, y, g, params=()):
        return self._apply(g, self.inverse), {}

    def config(self):
        return {"perm": list(self.perm)}

    def describe(self):
        return f"last axes {self.perm}"


@structural_unary
class Slice(Op):
    """``x[..., start:stop]`` along a (negative) ``axis``: one part of a split."""

    commutes_with_requantization = True

    prefix = "slice"

    def __init__(self, start: int, stop: int, *, axis: int = -1, name: str | None = None) -> None:
        super().__init__(name)
        label = f"Slice {name!r}" if name else "Slice"
        self.start = check_int(start, label, "start", minimum=0)
        self.stop = check_int(stop, label, "stop", minimum=self.start + 1)
        self.axis = check_int(axis, label, "axis", maximum=-1)

    @property
    def min_ndim(self) -> int:  # type: ignore[override]
        return max(2, 1 - self.axis)

    def out_features(self, in_features):
        if self.axis == -1:
            if in_features is not None and self.stop > in_features:
                raise ValueError(f"{self!r}: slices features {self.start}:{self.stop} of an "
                                 f"input with {in_features}")
            return self.stop - self.start
        return in_features

    def _index(self, ndim: int) -> tuple:
        return (slice(None),) * (ndim + self.axis) + (slice(self.start, self.stop),)

    def forward(self, x, params=None):
        if x.shape[self.axis] < self.stop:
            raise ValueError(f"{self!r}: slices {self.start}:{self.stop} of axis {self.axis}, "
                             f"but the input has shape {x.shape}")
        return x[self._index(x.ndim)]

    def jvp(self, x, y, dx, dparams):
        return np.zeros_like(y) if dx is None else dx[self._index(dx.ndim)]

    def vjp(self, x, y, g, params=()):
        out = np.zeros((g.shape[0], *x.shape), dtype=g.dtype)
        out[self._index(out.ndim)] = g
        return out, {}

    def config(self):
        return {"start": self.start, "stop": self.stop, "axis": self.axis}

    def describe(self):
        return f"[{self.start}:{self.stop}] on axis {self.axis}"


class Scale(Op):
    """Multiplication by a constant, ``y = c·x`` (attention's ``1/sqrt(head_dim)``). The
    constant is not a parameter: it is never quantized."""

    prefix = "scale"

    def __init__(self, factor: float, *, name: str | None = None) -> None:
        super().__init__(name)
        self.factor = check_real(factor, f"Scale {name!r}" if name else "Scale", "factor")

    def forward(self, x, params=None):
        return self.factor * x

    def jvp(self, x, y, dx, dparams):
        return np.zeros_like(y) if dx is None else self.factor * dx

    def vjp(self, x, y, g, params=()):
        return self.factor * g, {}

    def jvp2(self, x, y, a, b, dparams):
        return np.zeros_like(y) if b is None else self.factor * b

    def abs_jvp(self, x, y, r, rparams):
        return np.zeros_like(y) if r is None else abs(self.factor) * r

    def norm_jvp(self, x, y, r, rparams):
        return np.zeros(y.shape[0]) if r is None else abs(self.factor) * np.asarray(r)

    def config(self):
        return {"factor": self.factor}

    def describe(self):
        return f"× {self.factor:.6g}"

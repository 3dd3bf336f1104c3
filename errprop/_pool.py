"""Mean pooling over the token axis (sentence embeddings), with an optional padding mask."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ._op import Array, Op, check_mask, check_mask_batch


class MeanPool(Op):
    r"""Average over tokens: ``(batch, tokens, d) -> (batch, d)``.

    Parameters
    ----------
    mask : bool array ``(batch, tokens)``, optional: only real tokens (``True``) are
        averaged, as sentence-transformers' mean pooling does.

    Notes
    -----
    ``y[n] = Σ_i w[n, i] x[n, i]`` with ``w[n, i] = m[n, i] / Σ_j m[n, j]``. Linear, so
    the rule is the same average of ``Δx`` and is exact; the transposed rule spreads
    ``g[n]`` back as ``w[n, i] g[n]``; ``‖Δy_n‖ ≤ ‖w_n‖₂ ‖Δx_n‖_F`` (Cauchy-Schwarz).
    """

    prefix = "pool"
    maskable = True
    ndim_change = -1
    min_ndim = 3
    max_ndim = 3

    def __init__(self, mask: object | None = None, name: str | None = None) -> None:
        super().__init__(name)
        self.mask = None if mask is None else check_mask(
            mask, f"MeanPool {name!r}" if name else "MeanPool")

    def config(self) -> dict[str, object]:
        return {"mask": self.mask}

    def batch_slice(self, rows: slice) -> MeanPool:
        return self if self.mask is None else self.with_mask(self.mask[rows])

    def _weights(self, x: Array) -> Array:
        """``w``: ``(batch, tokens, 1)`` (or ``(tokens, 1)`` without a mask)."""
        if self.mask is None:
            return np.full((x.shape[-2], 1), 1.0 / x.shape[-2])
        check_mask_batch(self.mask, x, f"MeanPool {self.name!r}" if self.name else "MeanPool")
        m = self.mask.astype(np.float64)
        return (m / m.sum(axis=1, keepdims=True))[..., None]

    def _pool(self, x: Array, a: Array) -> Array:
        return np.sum(a * self._weights(x), axis=-2)

    def forward(self, x: Array, params: Mapping[str, Array] | None = None) -> Array:
        return self._pool(x, x)

    def jvp(self, x, y, dx, dparams):
        return np.zeros_like(y) if dx is None else self._pool(x, dx)

    def jvp2(self, x, y, a, b, dparams):
        return self.jvp(x, y, b, dparams)

    def vjp(self, x, y, g, params=()):
        return g[..., None, :] * self._weights(x), {}

    def abs_jvp(self, x, y, r, rparams):
        return self.jvp(x, y, r, rparams)

    def norm_jvp(self, x, y, r, rparams):
        if r is None:
            return np.zeros(x.shape[0])
        w = np.broadcast_to(self._weights(x)[..., 0], x.shape[:-1])
        return r * np.sqrt(np.sum(w * w, axis=1))

    def describe(self) -> str:
        return "mean over tokens" + (", padding mask" if self.mask is not None else "")

"""Rotary position embedding (RoPE, Su et al. 2021): rotate feature pairs by position.

For an input ``(batch, ..., tokens, d)`` and token position ``m`` (the axis ``-2``),
feature pair ``j`` is rotated by the angle ``m θ_j`` with ``θ_j = base^(-2j / r)`` over
the first ``r = rotary_dim`` features (the rest pass through). The pairs are
``(j, j + r/2)`` in the ``"half"`` layout (Llama, GPT-NeoX, Qwen, Mistral: transformers'
``rotate_half``) and ``(2j, 2j + 1)`` in the ``"interleaved"`` layout (GPT-J, RoFormer).

The map is linear in ``x`` and orthogonal per pair, so its rules are exact and simple:
``Δy = R Δx``, ``‖Δy‖ = ‖Δx‖``, ``|Δy| ≤ |cos|·r + |sin|·P r`` (``P`` the pair swap), no
second-order term. In decoders it acts on the heads of ``q`` and ``k`` (after a
``Reshape`` to ``(heads, head_dim)`` and a ``Transpose`` to put tokens at axis ``-2``).
"""

from __future__ import annotations

import numpy as np

from ._checks import check_choice, check_int, check_real
from ._op import Array, Op

_LAYOUTS = ("half", "interleaved")


class Rotary(Op):
    """Rotary position embedding over the last axis, positions along axis ``-2``.

    Parameters
    ----------
    dim : feature size ``d`` of the input (the last axis); even.
    base : the frequency base (10000 in most models; ``rope_theta`` in a transformers
        config).
    layout : ``"half"`` (pairs ``j, j + r/2``) or ``"interleaved"`` (pairs ``2j, 2j+1``).
    rotary_dim : how many leading features rotate (default ``dim``; partial rotary as
        in GPT-NeoX / Phi); even.
    scaling : positions are divided by this factor (linear RoPE scaling; 1 = none).
    offset : position of the first token (a KV-cache continuation starts later).
    """

    prefix = "rope"
    min_ndim = 3
    ndim_because = "rotary embeddings rotate by token position (axis -2)"

    def __init__(self, dim: int, *, base: float = 10000.0, layout: str = "half",
                 rotary_dim: int | None = None, scaling: float = 1.0, offset: int = 0,
                 name: str | None = None) -> None:
        super().__init__(name)
        label = f"Rotary {name!r}" if name else "Rotary"
        self.dim = check_int(dim, label, "dim", minimum=2)
        self.rotary_dim = self.dim if rotary_dim is None else \
            check_int(rotary_dim, label, "rotary_dim", minimum=2)
        if self.dim % 2 or self.rotary_dim % 2 or self.rotary_dim > self.dim:
            raise ValueError(f"{label}: dim and rotary_dim must be even with rotary_dim <= "
                             f"dim, got dim={self.dim}, rotary_dim={self.rotary_dim}")
        self.base = check_real(base, label, "base", positive=True)
        if self.base <= 1.0:
            raise ValueError(f"{label}: base must be > 1, got {self.base!r}")
        self.layout = check_choice(layout, label, "layout", _LAYOUTS)
        self.scaling = check_real(scaling, label, "scaling", positive=True)
        self.offset = check_int(offset, label, "offset", minimum=0)

    @property
    def in_features(self) -> int:
        return self.dim

    def out_features(self, in_features):
        return self.dim

    def config(self) -> dict[str, object]:
        return {"dim": self.dim, "base": self.base, "layout": self.layout,
                "rotary_dim": self.rotary_dim, "scaling": self.scaling, "offset": self.offset}

    def describe(self) -> str:
        part = "" if self.rotary_dim == self.dim else f", rotary_dim={self.rotary_dim}"
        return f"d={self.dim}, base={self.base:g}, {self.layout}{part}"

    # ------------------------------------------------------------------ the map
    def _pairs(self) -> tuple[Array, Array]:
        """Indices ``(first, second)`` of each rotated pair."""
        r = self.rotary_dim
        if self.layout == "half":
            return np.arange(r // 2), np.arange(r // 2, r)
        return np.arange(0, r, 2), np.arange(1, r, 2)

    def _angles(self, tokens: int) -> tuple[Array, Array]:
        """``cos, sin`` of shape ``(tokens, r/2)``."""
        r = self.rotary_dim
        theta = self.base ** (-np.arange(0, r, 2, dtype=np.float64) / r)
        pos = (self.offset + np.arange(tokens, dtype=np.float64)) / self.scaling
        ang = pos[:, None] * theta[None, :]
        return np.cos(ang), np.sin(ang)

    def _rotate(self, x: Array, tokens: int, sign: float) -> Array:
        """``R x`` (``sign=1``) or ``Rᵀ x`` (``sign=-1``) on the last axis; any leading
        axes (batch, heads, directions, samples) broadcast."""
        cos, sin = self._angles(tokens)
        i, j = self._pairs()
        a, b = x[..., i], x[..., j]
        out = x.copy()
        out[..., i] = a * cos - sign * b * sin
        out[..., j] = b * cos + sign * a * sin
        return out

    def _check(self, x: Array) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"{self!r} expects inputs with {self.dim} features on the last "
                             f"axis, got shape {x.shape}")

    # ------------------------------------------------------------------ rules
    def forward(self, x, params=None):
        self._check(x)
        return self._rotate(x, x.shape[-2], 1.0)

    def jvp(self, x, y, dx, dparams):
        if dx is None:
            return np.zeros_like(y)
        return self._rotate(dx, x.shape[-2], 1.0)

    def vjp(self, x, y, g, params=()):
        return self._rotate(g, x.shape[-2], -1.0), {}

    def jvp2(self, x, y, a, b, dparams):
        return self.jvp(x, y, b, {})

    def abs_jvp(self, x, y, r, rparams):
        if r is None:
            return np.zeros_like(y)
        cos, sin = self._angles(x.shape[-2])
        i, j = self._pairs()
        cos, sin = np.abs(cos), np.abs(sin)
        out = np.array(r, dtype=float, copy=True)
        out[..., i] = cos * r[..., i] + sin * r[..., j]
        out[..., j] = cos * r[..., j] + sin * r[..., i]
        return out

    def norm_jvp(self, x, y, r, rparams):
        return np.zeros(y.shape[0]) if r is None else np.asarray(r, dtype=float)

"""Normalization layers over the feature (last) axis: LayerNorm, RMSNorm, L2Normalize.

Every statistic that squares the input is taken on the row scaled by a power of two near
its largest magnitude, so rows of any finite size normalise correctly (``x*x`` overflows
float64 from ``|x| ≈ 1.3e154``, and then every output would collapse to ``beta``).
Scaling by a power of two is exact: rows of ordinary size give the same floats as the
plain formulas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ._checks import check_real
from ._op import (Array, Op, align_sampled, as_param, param_tangent, per_sample_sum,
                  sample_max, sample_norm)

#: rows whose power-of-two scale lies in [2^-400, 2^400] square without overflow and
#: keep ``eps`` representable next to them: there the plain formula runs unchanged
_SAFE_LOW, _SAFE_HIGH = 2.0 ** -400, 2.0 ** 400


def _mean(a: Array) -> Array:
    return np.mean(a, axis=-1, keepdims=True)


def _scaled(x: Array) -> tuple[Array, Array]:
    """``(u, s)`` with ``x = s·u`` per row: ``s`` a power of two, ``1 ≤ max|u| < 2``
    (``s = 1`` for an all-zero row)."""
    amax = np.max(np.abs(x), axis=-1, keepdims=True)
    _, e = np.frexp(amax)
    s = np.ldexp(1.0, np.where(amax > 0, e - 1, 0))
    return x / s, s


def _root(q: Array, s: Array, eps: float) -> Array:
    """``sqrt(s²·q + eps)`` (finite and positive for every finite row): the plain formula
    where ``s`` is moderate, ``hypot(s·sqrt(q), sqrt(eps))`` where ``s²`` would overflow
    or ``eps/s²`` underflow."""
    sc = np.clip(s, _SAFE_LOW, _SAFE_HIGH)
    plain = np.sqrt(sc * sc * q + eps)
    if np.all(s == sc):
        return plain
    return np.where(s == sc, plain, np.hypot(s * np.sqrt(q), math.sqrt(eps)))


def _check_eps(eps: object, label: str) -> float:
    eps = check_real(eps, label, "eps")
    if not eps > 0:
        raise ValueError(f"{label}: eps must be a positive finite number, got {eps!r}")
    return eps


def _abs_projection(u: Array, r: Array, *, centred: bool, chunk: int = 2 ** 22) -> Array:
    """``Σ_j |δ_ij − (c + u_i u_j)/d| r_j`` per row (``c = 1`` centred, 0 otherwise),
    in row chunks so the ``(rows, d, d)`` blocks stay under ``chunk`` elements."""
    d = u.shape[-1]
    c = 1.0 if centred else 0.0
    uf, rf = u.reshape(-1, d), np.broadcast_to(r, (*r.shape[:r.ndim - u.ndim], *u.shape))
    lead = rf.shape[:rf.ndim - u.ndim]
    rf = rf.reshape(-1, uf.shape[0], d)
    out = np.empty_like(rf)
    eye = np.eye(d)
    step = max(1, chunk // (d * d))
    for i in range(0, uf.shape[0], step):
        M = np.abs(eye - (c + uf[i:i + step, :, None] * uf[i:i + step, None, :]) / d)
        out[:, i:i + step] = np.einsum("nij,knj->kni", M, rf[:, i:i + step])
    return out.reshape(*lead, *u.shape)


class LayerNorm(Op):
    r"""Layer normalization over the last axis.

    Parameters
    ----------
    gamma, beta : arrays, shape ``(d,)``
    eps : float, default 1e-5 (PyTorch's)

    Notes
    -----
    ``x̂ = (x - μ) / σ_ε`` with ``σ_ε = sqrt(Var x + eps)`` (biased variance),
    ``y = γ ⊙ x̂ + β``. First-order rule, exact including ``eps``::

        Δx̂ = (Δx - mean(Δx) - x̂ ⊙ mean(x̂ ⊙ Δx)) / σ_ε
        Δy = γ ⊙ Δx̂ + Δγ ⊙ x̂ + Δβ

    With (near-)constant input ``σ_ε → sqrt(eps)`` and the gain ``1/σ_ε`` can
    be as large as ``1/sqrt(eps)``: first order then describes a very steep
    map; the validity diagnostics flag it (``flat_norm``: rows with
    ``Var x < 100·eps``). A constant row gives ``x̂ = 0``, ``y = β`` and the
    derivative ``γ ⊙ (Δx − mean Δx) / sqrt(eps)``, the exact derivative of the
    ``eps``-regularised map.

    The statistics are taken on each row scaled by a power of two near its
    largest magnitude, so any finite input normalises correctly (``1e300`` as
    well as ``1e-300``); the rules use only ``x̂`` and ``σ_ε``.
    """

    prefix = "ln"

    def __init__(self, gamma: object, beta: object, eps: float = 1e-5,
                 name: str | None = None) -> None:
        super().__init__(name)
        label = f"LayerNorm {name!r}" if name else "LayerNorm"
        gamma = as_param(gamma, layer=label, param="gamma", ndim=1)
        self.params["gamma"] = gamma
        self.params["beta"] = as_param(beta, layer=label, param="beta", shape=gamma.shape)
        self.param_kinds.update(gamma="norm", beta="norm")
        self.eps = _check_eps(eps, label)

    @property
    def in_features(self) -> int:
        return int(self.params["gamma"].shape[0])

    def _normalize(self, x: Array) -> tuple[Array, Array]:
        """``(x̂, σ_ε)``, computed on the scaled row ``u = x / s`` (see the module notes):
        ``σ_ε = sqrt(s²·Var u + eps)``, ``x̂ = (u − mean u) / (σ_ε / s)``."""
        u, s = _scaled(x)
        mu = _mean(u)
        # one correction step makes the mean exact to rounding: a constant row is centred
        # to exactly 0 (a residue of one ulp would be a huge variance at scale 1e300)
        uc = u - (mu + _mean(u - mu))
        sigma = _root(_mean(uc * uc), s, self.eps)
        with np.errstate(over="ignore"):  # subnormal rows: σ_ε/s = inf, x̂ = 0 (underflow)
            return uc / (sigma / s), sigma

    def forward(self, x: Array, params: Mapping[str, Array] | None = None) -> Array:
        xhat, _ = self._normalize(x)
        gamma = align_sampled(self._p(params, "gamma"), 1, x.ndim)
        beta = align_sampled(self._p(params, "beta"), 1, x.ndim)
        return gamma * xhat + beta

    def jvp(self, x, y, dx, dparams):
        xhat, sigma = self._normalize(x)
        dy = np.zeros_like(y)
        if dx is not None:
            dxhat = (dx - _mean(dx) - xhat * _mean(xhat * dx)) / sigma
            dy = self.params["gamma"] * dxhat
        if "gamma" in dparams:
            dy = dy + param_tangent(dparams["gamma"], 1, y.ndim) * xhat
        if "beta" in dparams:
            dy = dy + param_tangent(dparams["beta"], 1, y.ndim)
        return dy

    def vjp(self, x, y, g, params=()):
        # J = diag(γ)/σ · (I - 11ᵀ/d - x̂x̂ᵀ/d); the projection is symmetric
        xhat, sigma = self._normalize(x)
        u = self.params["gamma"] * g
        gx = (u - _mean(u) - xhat * _mean(xhat * u)) / sigma
        gparams = {}
        if "gamma" in params:
            gparams["gamma"] = per_sample_sum(g * xhat, x.ndim)
        if "beta" in params:
            gparams["beta"] = per_sample_sum(g, x.ndim)
        return gx, gparams

    def abs_jvp(self, x, y, r, rparams):
        xhat, sigma = self._normalize(x)
        out = np.zeros_like(y)
        if r is not None:
            # |J|_ij = |γ_i|/σ · |δ_ij − (1 + x̂_i x̂_j)/d|, one (d, d) block per row
            out = np.abs(self.params["gamma"]) * _abs_projection(xhat, r, centred=True) / sigma
        if "gamma" in rparams:
            out = out + param_tangent(rparams["gamma"], 1, y.ndim) * np.abs(xhat)
        if "beta" in rparams:
            out = out + param_tangent(rparams["beta"], 1, y.ndim)
        return out

    def norm_jvp(self, x, y, r, rparams):
        # per row ‖J‖₂ ≤ max|γ| / σ (the centring projection has norm 1)
        xhat, sigma = self._normalize(x)
        out = np.zeros(x.shape[0])
        if r is not None:
            out = out + np.max(np.abs(self.params["gamma"])) * sample_max(1.0 / sigma) * r
        if "gamma" in rparams:  # ‖Δγ ⊙ x̂‖ ≤ max|Δγ| ‖x̂‖
            out = out + np.max(rparams["gamma"]) * sample_norm(xhat)
        if "beta" in rparams:
            out = out + np.linalg.norm(rparams["beta"]) * np.sqrt(x[0, ..., 0].size)
        return out

    def diagnose(self, x, y, dx):
        # rows whose variance is within 100·eps of eps: gain near 1/sqrt(eps)
        _, sigma = self._normalize(x)
        return {"flat_norm": float(np.mean(sigma < math.sqrt(101.0 * self.eps)))}

    def config(self) -> dict[str, object]:
        return {"eps": self.eps}

    def describe(self) -> str:
        return f"d={self.in_features}, eps={self.eps:g}"


class RMSNorm(Op):
    r"""Root-mean-square normalization over the last axis.

    Parameters
    ----------
    gamma : array, shape ``(d,)``
    eps : float, default 1e-6

    Notes
    -----
    ``r = sqrt(mean(x²) + eps)``, ``y = γ ⊙ x / r``. First-order rule::

        Δy = γ ⊙ (Δx - (x/r) ⊙ mean((x/r) ⊙ Δx)) / r + Δγ ⊙ x / r

    Convention at zero: an all-zero row (or one with ``mean(x²) ≪ eps``) gives
    ``y = 0`` and the derivative ``γ ⊙ Δx / sqrt(eps)``: the exact derivative of the
    ``eps``-regularised map, a gain of ``1/sqrt(eps)`` (1000 for the default eps), valid
    only for errors much smaller than ``sqrt(eps)``. The validity diagnostics flag
    such rows (``flat_norm``: ``mean(x²) < 100·eps``). As in LayerNorm, ``mean(x²)``
    is taken on the row scaled by a power of two, so huge and tiny rows are exact.
    """

    prefix = "rms"

    def __init__(self, gamma: object, eps: float = 1e-6, name: str | None = None) -> None:
        super().__init__(name)
        label = f"RMSNorm {name!r}" if name else "RMSNorm"
        self.params["gamma"] = as_param(gamma, layer=label, param="gamma", ndim=1)
        self.param_kinds["gamma"] = "norm"
        self.eps = _check_eps(eps, label)

    @property
    def in_features(self) -> int:
        return int(self.params["gamma"].shape[0])

    def _normalize(self, x: Array) -> tuple[Array, Array]:
        """``(x / r, r)`` with ``r = sqrt(s²·mean(u²) + eps)`` on the scaled row."""
        u, s = _scaled(x)
        r = _root(_mean(u * u), s, self.eps)
        with np.errstate(over="ignore"):  # subnormal rows: r/s = inf, x/r = 0 (underflow)
            return u / (r / s), r

    def forward(self, x: Array, params: Mapping[str, Array] | None = None) -> Array:
        return align_sampled(self._p(params, "gamma"), 1, x.ndim) * self._normalize(x)[0]

    def jvp(self, x, y, dx, dparams):
        xn, r = self._normalize(x)
        dy = np.zeros_like(y)
        if dx is not None:
            dy = self.params["gamma"] * (dx - xn * _mean(xn * dx)) / r
        if "gamma" in dparams:
            dy = dy + param_tangent(dparams["gamma"], 1, y.ndim) * xn
        return dy

    def vjp(self, x, y, g, params=()):
        xn, r = self._normalize(x)
        u = self.params["gamma"] * g
        gx = (u - xn * _mean(xn * u)) / r
        gparams = {}
        if "gamma" in params:
            gparams["gamma"] = per_sample_sum(g * xn, x.ndim)
        return gx, gparams

    def abs_jvp(self, x, y, r, rparams):
        xn, rms = self._normalize(x)
        out = np.zeros_like(y)
        if r is not None:
            out = np.abs(self.params["gamma"]) * _abs_projection(xn, r, centred=False) / rms
        if "gamma" in rparams:
            out = out + param_tangent(rparams["gamma"], 1, y.ndim) * np.abs(xn)
        return out

    def norm_jvp(self, x, y, r, rparams):
        xn, rms = self._normalize(x)
        out = np.zeros(x.shape[0])
        if r is not None:
            out = out + np.max(np.abs(self.params["gamma"])) * sample_max(1.0 / rms) * r
        if "gamma" in rparams:
            out = out + np.max(rparams["gamma"]) * sample_norm(xn)
        return out

    def diagnose(self, x, y, dx):
        _, r = self._normalize(x)
        return {"flat_norm": float(np.mean(r < math.sqrt(101.0 * self.eps)))}

    def config(self) -> dict[str, object]:
        return {"eps": self.eps}

    def describe(self) -> str:
        return f"d={self.in_features}, eps={self.eps:g}"


class L2Normalize(Op):
    r"""Scale each row to unit Euclidean norm (``torch.nn.functional.normalize``).

    Parameters
    ----------
    eps : float, default 1e-12: rows with ``‖x‖ < eps`` are divided by ``eps``.

    Notes
    -----
    ``y = x / max(‖x‖, eps)``. It is RMSNorm with ``γ = 1/sqrt(d)`` and no ``eps`` inside
    the root, so the rule is that projection::

        Δy = (Δx - y (y·Δx)) / ‖x‖

    Sentence-transformers' ``Normalize`` module ends all-MiniLM-L6-v2 with it. The norm
    is taken on the row scaled by a power of two, so rows beyond ``1e154`` (whose
    ``Σ x²`` overflows) or with ``‖x‖`` beyond the float range still give unit rows.
    """

    prefix = "l2norm"

    def __init__(self, eps: float = 1e-12, name: str | None = None) -> None:
        super().__init__(name)
        self.eps = _check_eps(eps, f"L2Normalize {name!r}" if name else "L2Normalize")

    def _scaled_norm(self, x: Array) -> tuple[Array, Array]:
        """``(max(‖x‖, eps) / s, s)`` for the row scale ``s`` (``‖x‖`` itself may exceed
        the float range when ``x`` does not)."""
        u, s = _scaled(x)
        with np.errstate(over="ignore"):  # subnormal rows: eps/s = inf, y = 0 (underflow)
            floor = self.eps / s
        return np.maximum(np.sqrt(np.sum(u * u, axis=-1, keepdims=True)), floor), s

    def _norm(self, x: Array) -> Array:
        n, s = self._scaled_norm(x)
        with np.errstate(over="ignore"):  # ‖x‖ beyond the float range: a gain of 0
            return n * s

    def forward(self, x: Array, params: Mapping[str, Array] | None = None) -> Array:
        n, s = self._scaled_norm(x)
        return (x / s) / n

    def jvp(self, x, y, dx, dparams):
        if dx is None:
            return np.zeros_like(y)
        return (dx - y * np.sum(y * dx, axis=-1, keepdims=True)) / self._norm(x)

    def vjp(self, x, y, g, params=()):
        return self.jvp(x, y, g, {}), {}  # the projection is symmetric

    def abs_jvp(self, x, y, r, rparams):
        if r is None:
            return np.zeros_like(y)
        d = x.shape[-1]
        # Δy = (Δx - u mean(u Δx)) / (sqrt(d) ‖x‖ / sqrt(d)) with u = sqrt(d) y
        return _abs_projection(np.sqrt(d) * y, r, centred=False) / self._norm(x)

    def norm_jvp(self, x, y, r, rparams):
        # the projection has norm 1: ‖Δy‖ ≤ ‖Δx‖ / min‖x‖
        if r is None:
            return np.zeros(x.shape[0])
        return sample_max(1.0 / self._norm(x)) * r

    def diagnose(self, x, y, dx):
        return {"flat_norm": float(np.mean(self._norm(x) <= 100.0 * self.eps))}

    def config(self) -> dict[str, object]:
        return {"eps": self.eps}

    def describe(self) -> str:
        return "x / ‖x‖"

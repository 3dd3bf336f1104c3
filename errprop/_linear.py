"""Linear layer, PyTorch convention ``y = x @ W.T + b``."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import linalg

from ._op import (Array, Op, align_sampled, as_param, per_sample_outer, per_sample_sum,
                  sample_norm)


def _flat_matmul(a: Array, Wt: Array) -> Array:
    """``a @ Wt`` for ``a: (..., in)`` and a 2-D ``Wt: (in, out)`` as ONE GEMM: NumPy's
    matmul of a stack loops over the leading axes with one small GEMM each (tokens rows),
    several times slower for (sources, batch, tokens, in) tangents."""
    if a.ndim <= 2:
        return a @ Wt
    return (a.reshape(-1, a.shape[-1]) @ Wt).reshape(*a.shape[:-1], Wt.shape[1])


def _matmul_t(x: Array, W: Array) -> Array:
    """``x @ W.T`` for ``x: (..., in)`` and ``W: (out, in)`` or ``(S, out, in)``.

    A weight with a leading sample axis ``S`` pairs with the leading axis of
    ``x`` (Monte Carlo draws one weight per sample).
    """
    if W.ndim == 2:
        # stacked, not flattened: each (tokens, in) slice is its own GEMM of a fixed shape,
        # so a sample's result does not depend on how many samples share the call
        # (one flat GEMM can round the last bit differently at block edges)
        return x @ W.T
    if x.shape[0] == W.shape[0]:
        # one (rows, in) @ (in, out) product per sample, rows = batch · tokens
        flat = x.reshape(x.shape[0], -1, x.shape[-1]) @ np.swapaxes(W, -1, -2)
        return flat.reshape(*x.shape[:-1], W.shape[1])
    extra = x.ndim - 2  # axes between the sample axis and the feature axis
    Wt = np.swapaxes(W, -1, -2).reshape(W.shape[0], *([1] * (extra - 1)), W.shape[2], W.shape[1])
    return x @ Wt


def affine_tangent(x: Array, W: Array, dx: Array | None, dW: Array | None,
                   db: Array | None) -> Array | None:
    """Tangent of ``x Wᵀ + b``: ``dx Wᵀ + x dWᵀ + db`` (``None`` when all are absent).

    ``dx`` may carry leading direction axes; ``dW (P, out, in)`` and ``db (P, out)``
    may carry one leading direction axis ``P`` (random probes of the parameters).
    """
    lead: tuple[int, ...] = () if dx is None else dx.shape[: dx.ndim - x.ndim]
    t = None if dx is None else _flat_matmul(dx, W.T)
    if dW is not None:
        if dW.ndim == 3:
            # one GEMM for all probes: x (..., in) @ (in, P·out)
            P, n_out, n_in = dW.shape
            lead = (P,)
            xw = (x.reshape(-1, n_in) @ dW.reshape(P * n_out, n_in).T)
            xw = np.moveaxis(xw.reshape(*x.shape[:-1], P, n_out), -2, 0)
        else:
            xw = _flat_matmul(x, dW.T)
        t = xw if t is None else t + xw
    if db is not None:
        if db.ndim == 2:
            lead = db.shape[:1]
            db = db.reshape(db.shape[0], *([1] * (x.ndim - 1)), db.shape[1])
        t = db if t is None else t + db
    if t is None:
        return None
    shape = (*lead, *x.shape[:-1], W.shape[0])
    return t if t.shape == shape else np.broadcast_to(t, shape).copy()


def spectral_norm(W: Array) -> float:
    """``‖W‖₂`` from the largest eigenvalue of the smaller Gram matrix (5x cheaper than an
    SVD of a square matrix), nudged up by 1e-12 so rounding never makes a bound too small."""
    G = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
    top = float(linalg.eigvalsh(G, subset_by_index=[G.shape[0] - 1, G.shape[0] - 1])[0])
    return float(np.sqrt(max(top, 0.0))) * (1.0 + 1e-12)


def affine_norm(x: Array, W: Array, r: Array | None, boxW: Array | None,
                boxb: Array | None) -> Array:
    """``‖Δ(x Wᵀ + b)‖ ≤ ‖W‖₂ r + ‖ΔW‖₂ ‖x‖ + ‖Δb‖·sqrt(tokens)`` per batch element,
    with ``‖ΔW‖₂ ≤ ‖ΔW‖_F ≤ ‖boxW‖_F`` and ``‖Δb‖ ≤ ‖boxb‖``."""
    out = np.zeros(x.shape[0])
    if r is not None:
        out = out + spectral_norm(W) * r
    if boxW is not None:
        out = out + np.linalg.norm(boxW) * sample_norm(x)
    if boxb is not None:
        out = out + np.linalg.norm(boxb) * np.sqrt(x[0, ..., 0].size)
    return out


class Linear(Op):
    r"""Affine map ``y = x Wᵀ + b``.

    Parameters
    ----------
    W : array, shape ``(out, in)``
    b : array, shape ``(out,)``, optional
    name : str, optional

    Notes
    -----
    First-order rule (exact: the map is bilinear in ``(x, W)``, so the only
    neglected term is the second-order ``ΔW·Δx``)::

        Δy = Δx Wᵀ + x ΔWᵀ + Δb

    Transposed (reverse mode): ``gx = g W``, ``gW = Σ_tokens g ⊗ x``, ``gb = Σ_tokens g``.
    """

    prefix = "fc"
    quantize_input = True
    integer_matmul = True

    def macs(self, shape):
        return int(np.prod(shape[:-1])) * int(self.params["W"].size)

    def __init__(self, W: object, b: object | None = None, name: str | None = None) -> None:
        super().__init__(name)
        label = f"Linear {name!r}" if name else "Linear"
        W = as_param(W, layer=label, param="W", ndim=2)
        self.params["W"] = W
        self.param_kinds["W"] = "weight"
        if b is not None:
            self.params["b"] = as_param(b, layer=label, param="b", shape=(W.shape[0],))
            self.param_kinds["b"] = "bias"

    @property
    def in_features(self) -> int:
        return int(self.params["W"].shape[1])

    def out_features(self, in_features: int | None) -> int:
        return int(self.params["W"].shape[0])

    def forward(self, x: Array, params: Mapping[str, Array] | None = None) -> Array:
        W = self._p(params, "W")
        b = self._p(params, "b")
        y = _matmul_t(x, W)
        if b is not None:
            y = y + align_sampled(b, 1, y.ndim)
        return y

    def jvp(self, x, y, dx, dparams):
        dy = affine_tangent(x, self.params["W"], dx, dparams.get("W"), dparams.get("b"))
        return np.zeros_like(y) if dy is None else dy

    def abs_jvp(self, x, y, r, rparams):
        out = affine_tangent(np.abs(x), np.abs(self.params["W"]), r, rparams.get("W"),
                             rparams.get("b"))
        return np.zeros_like(y) if out is None else out

    def norm_jvp(self, x, y, r, rparams):
        return affine_norm(x, self.params["W"], r, rparams.get("W"), rparams.get("b"))

    def jvp2(self, x, y, a, b, dparams):
        # the only second-order term of a bilinear map is the cross term a·dWᵀ
        out = affine_tangent(x, self.params["W"], b, None, None)
        if a is not None and "W" in dparams:
            cross = a @ dparams["W"].T
            out = cross if out is None else out + cross
        return np.zeros_like(y) if out is None else out

    def vjp(self, x, y, g, params=()):
        gparams = {}
        if "W" in params:
            gparams["W"] = per_sample_outer(g, x)
        if "b" in params:
            gparams["b"] = per_sample_sum(g, x.ndim)
        return _flat_matmul(g, self.params["W"]), gparams

    def describe(self) -> str:
        out, inp = self.params["W"].shape
        return f"{inp}->{out}" + ("" if "b" in self.params else ", no bias")

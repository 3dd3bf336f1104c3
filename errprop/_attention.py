"""Multi-head scaled dot-product self-attention over the token axis."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ._activation import saturated_rows, softmax_abs
from ._checks import check_bool, check_int
from ._linear import _flat_matmul, _matmul_t, affine_norm, affine_tangent
from ._op import (Array, Op, Rule, align_sampled, as_param, check_mask, check_mask_batch,
                  per_sample_outer, per_sample_sum)

_WEIGHTS = ("Wq", "Wk", "Wv", "Wo")
_BIASES = ("bq", "bk", "bv", "bo")


class Attention(Op):
    r"""Multi-head self-attention, weights in the ``Linear`` convention.

    Parameters
    ----------
    Wq, Wk, Wv : arrays, shape ``(inner, d)``
    Wo : array, shape ``(d, inner)``
    bq, bk, bv : arrays ``(inner,)``, optional; bo : ``(d,)``, optional
    heads : int, divides ``inner``; ``head_dim = inner / heads``
    causal : bool, mask keys after the query position
    mask : bool array ``(batch, tokens)``, optional: key padding mask, ``True`` for real
        tokens. Padded keys get probability exactly 0 (BERT's additive ``-inf``); the mask
        ties the layer to that batch (see :func:`errprop.mask_padding`).

    Notes
    -----
    For ``x: (batch, tokens, d)`` and each head ``h``::

        q = x Wqᵀ + bq,  k = x Wkᵀ + bk,  v = x Wvᵀ + bv   (split into heads)
        S = q kᵀ / sqrt(head_dim)  (+ -inf above the diagonal if causal)
        A = softmax(S)  over keys,   o = A v   (heads merged),   y = o Woᵀ + bo

    First-order rule (product rule through each stage)::

        Δq = Δx Wqᵀ + x ΔWqᵀ + Δbq          (likewise Δk, Δv)
        ΔS = (Δq kᵀ + q Δkᵀ) / sqrt(head_dim)
        ΔA = A ⊙ (ΔS - Σ_keys A ⊙ ΔS)
        Δo = ΔA v + A Δv
        Δy = Δo Woᵀ + o ΔWoᵀ + Δbo

    The transposed rule runs the same stages backwards (``vjp``).
    """

    prefix = "attn"
    quantize_input = True
    maskable = True
    min_ndim = 3
    max_ndim = 3
    ndim_because = "the network contains attention"

    def macs(self, shape):
        """Projections, plus ``q kᵀ`` and ``A v`` (``2 T·inner`` per token)."""
        tokens = int(np.prod(shape[:-1]))
        proj = sum(int(self.params[k].size) for k in _WEIGHTS)
        return tokens * proj + 2 * tokens * shape[-2] * int(self.params["Wq"].shape[0])

    def __init__(self, Wq: object, Wk: object, Wv: object, Wo: object,
                 bq: object | None = None, bk: object | None = None,
                 bv: object | None = None, bo: object | None = None, *,
                 heads: int = 1, causal: bool = False, mask: object | None = None,
                 name: str | None = None) -> None:
        super().__init__(name)
        label = f"Attention {name!r}" if name else "Attention"
        Wq = as_param(Wq, layer=label, param="Wq", ndim=2)
        inner, d = Wq.shape
        self.params["Wq"] = Wq
        self.params["Wk"] = as_param(Wk, layer=label, param="Wk", shape=(inner, d))
        self.params["Wv"] = as_param(Wv, layer=label, param="Wv", shape=(inner, d))
        self.params["Wo"] = as_param(Wo, layer=label, param="Wo", shape=(d, inner))
        for key, value, size in (("bq", bq, inner), ("bk", bk, inner), ("bv", bv, inner),
                                 ("bo", bo, d)):
            if value is not None:
                self.params[key] = as_param(value, layer=label, param=key, shape=(size,))
        for key in self.params:
            self.param_kinds[key] = "weight" if key.startswith("W") else "bias"
        heads = check_int(heads, label, "heads")
        if heads < 1 or inner % heads:
            raise ValueError(f"{label}: heads must be a positive integer dividing the inner "
                             f"width {inner}, got {heads!r}")
        self.heads = heads
        self.head_dim = inner // self.heads
        self.causal = check_bool(causal, label, "causal")
        self.mask = None if mask is None else check_mask(mask, label)

    def config(self) -> dict[str, object]:
        return {"heads": self.heads, "causal": self.causal, "mask": self.mask}

    def batch_slice(self, rows: slice) -> Attention:
        return self if self.mask is None else self.with_mask(self.mask[rows])

    @property
    def in_features(self) -> int:
        return int(self.params["Wq"].shape[1])

    # ----------------------------------------------------------------- helpers
    def _split(self, t: Array) -> Array:
        """(..., T, inner) -> (..., heads, T, head_dim)"""
        return np.swapaxes(t.reshape(*t.shape[:-1], self.heads, self.head_dim), -2, -3)

    @staticmethod
    def _merge(t: Array) -> Array:
        """(..., heads, T, head_dim) -> (..., T, inner)"""
        t = np.swapaxes(t, -2, -3)
        return t.reshape(*t.shape[:-2], t.shape[-2] * t.shape[-1])

    def _affine(self, x: Array, params, w: str, b: str) -> Array:
        out = _matmul_t(x, self._p(params, w))
        bias = self._p(params, b)
        return out if bias is None else out + align_sampled(bias, 1, out.ndim)

    def _mask(self, x: Array) -> Array | None:
        """Where logits are masked: ``(T, T)`` (causal), ``(batch, 1, 1, T)`` (padding)."""
        T = x.shape[-2]
        masked = None
        if self.mask is not None:
            check_mask_batch(self.mask, x, f"Attention {self.name!r}" if self.name
                             else "Attention")
            masked = ~self.mask[:, None, None, :]
        if self.causal:
            future = np.triu(np.ones((T, T), dtype=bool), k=1)
            masked = future if masked is None else masked | future
        return masked

    def _attend(self, x: Array, params) -> tuple[Array, ...]:
        q = self._split(self._affine(x, params, "Wq", "bq"))
        k = self._split(self._affine(x, params, "Wk", "bk"))
        v = self._split(self._affine(x, params, "Wv", "bv"))
        S = (q @ np.swapaxes(k, -1, -2)) / math.sqrt(self.head_dim)
        mask = self._mask(x)
        if mask is not None:
            S = np.where(mask, -np.inf, S)
        # max-subtraction keeps exp finite for any logit scale
        S = S - np.max(S, axis=-1, keepdims=True)
        E = np.exp(S)
        A = E / np.sum(E, axis=-1, keepdims=True)
        o = self._merge(A @ v)
        return q, k, v, A, o

    # -------------------------------------------------------------------- math
    def forward(self, x: Array, params: Mapping[str, Array] | None = None) -> Array:
        *_, o = self._attend(x, params)
        return self._affine(o, params, "Wo", "bo")

    def linearize(self, x: Array) -> tuple[Array, Rule]:
        q, k, v, A, o = self._attend(x, None)
        y = self._affine(o, None, "Wo", "bo")
        P = self.params
        scale = 1.0 / math.sqrt(self.head_dim)

        def d_affine(dx, dparams, w, b, inp):
            return affine_tangent(inp, P[w], dx, dparams.get(w), dparams.get(b))

        def rule(dx, dparams):
            dq, dk, dv = (d_affine(dx, dparams, w, b, x)
                          for w, b in (("Wq", "bq"), ("Wk", "bk"), ("Wv", "bv")))
            do = None
            if dq is not None or dk is not None:
                dS = 0.0
                if dq is not None:
                    dS = dS + self._split(dq) @ np.swapaxes(k, -1, -2)
                if dk is not None:
                    dS = dS + q @ np.swapaxes(self._split(dk), -1, -2)
                dS = dS * scale
                dA = A * (dS - np.sum(A * dS, axis=-1, keepdims=True))
                do = dA @ v
            if dv is not None:
                do = A @ self._split(dv) if do is None else do + A @ self._split(dv)
            dy = d_affine(None if do is None else self._merge(do), dparams, "Wo", "bo", o)
            return np.zeros_like(y) if dy is None else np.broadcast_to(
                dy, (*dy.shape[:dy.ndim - y.ndim], *y.shape)).copy()

        return y, rule

    def jvp(self, x, y, dx, dparams):
        return self.linearize(x)[1](dx, dparams)

    def abs_jvp(self, x, y, r, rparams):
        # the first-order rule stage by stage, every factor in absolute value
        q, k, v, A, o = self._attend(x, None)
        P = self.params
        ax, scale = np.abs(x), 1.0 / math.sqrt(self.head_dim)

        def stage(rin, inp, w, b):
            return affine_tangent(inp, np.abs(P[w]), rin, rparams.get(w), rparams.get(b))

        rq, rk, rv = (stage(r, ax, w, b) for w, b in (("Wq", "bq"), ("Wk", "bk"), ("Wv", "bv")))
        ro = None
        if rq is not None or rk is not None:
            rS = 0.0
            if rq is not None:
                rS = rS + self._split(rq) @ np.swapaxes(np.abs(k), -1, -2)
            if rk is not None:
                rS = rS + np.abs(q) @ np.swapaxes(self._split(rk), -1, -2)
            ro = softmax_abs(A, rS * scale) @ np.abs(v)
        if rv is not None:
            ro = A @ self._split(rv) if ro is None else ro + A @ self._split(rv)
        out = stage(None if ro is None else self._merge(ro), np.abs(o), "Wo", "bo")
        return np.zeros_like(y) if out is None else np.broadcast_to(
            out, (*out.shape[:out.ndim - y.ndim], *y.shape)).copy()

    def norm_jvp(self, x, y, r, rparams):
        # per batch element and head: ‖ΔS‖ ≤ c(‖Δq‖‖k_h‖₂ + ‖q_h‖₂‖Δk‖), ‖ΔA‖ ≤ ½‖ΔS‖
        # (softmax Gershgorin bound), ‖Δo_h‖ ≤ ‖ΔA‖‖v_h‖₂ + ‖A_h‖₂‖Δv‖; heads add up
        q, k, v, A, o = self._attend(x, None)
        P = self.params
        scale = 1.0 / math.sqrt(self.head_dim)
        nq, nk, nv = (affine_norm(x, P[w], r, rparams.get(w), rparams.get(b))
                      for w, b in (("Wq", "bq"), ("Wk", "bk"), ("Wv", "bv")))

        def spectral(t: Array) -> Array:  # (B, H, m, n) -> (B, H)
            return np.linalg.svd(t, compute_uv=False)[..., 0]

        dS = scale * (nq[:, None] * spectral(k) + spectral(q) * nk[:, None])
        do = 0.5 * dS * spectral(v) + spectral(A) * nv[:, None]
        return affine_norm(o, P["Wo"], do.sum(axis=1), rparams.get("Wo"), rparams.get("bo"))

    def diagnose(self, x, y, dx):
        A = self._attend(x, None)[3]
        return {"saturated": saturated_rows(A)}

    def vjp(self, x, y, g, params=()):
        q, k, v, A, o = self._attend(x, None)
        P = self.params
        scale = 1.0 / math.sqrt(self.head_dim)
        gparams = {}
        go = _flat_matmul(g, P["Wo"])
        gO = self._split(go)
        gA = gO @ np.swapaxes(v, -1, -2)
        gv = np.swapaxes(A, -1, -2) @ gO
        gS = A * (gA - np.sum(A * gA, axis=-1, keepdims=True)) * scale
        gq = gS @ k
        gk = np.swapaxes(gS, -1, -2) @ q
        branches = {"q": self._merge(gq), "k": self._merge(gk), "v": self._merge(gv)}
        gx = sum(_flat_matmul(branches[c], P[f"W{c}"]) for c in "qkv")
        for c, gc in (*branches.items(), ("o", g)):
            inp = o if c == "o" else x
            if f"W{c}" in params:
                gparams[f"W{c}"] = per_sample_outer(gc, inp)
            if f"b{c}" in params:
                gparams[f"b{c}"] = per_sample_sum(gc, x.ndim)
        return gx, gparams

    def describe(self) -> str:
        inner, d = self.params["Wq"].shape
        return (f"d={d}, heads={self.heads}" + (", causal" if self.causal else "")
                + (", padding mask" if self.mask is not None else ""))

"""Registrars: the optional rules of an op derived from one declaration.

An op must write ``forward`` and ``jvp`` side by side. The other rules (``vjp``,
``jvp2``, ``abs_jvp``, ``norm_jvp``) follow, for common shapes of Jacobian, from one
declaration instead of hand-written code:

* :func:`structural` — every output element is one input element (or zero): reshape,
  transpose, slice, concatenation, sums of inputs. The Jacobian's entries are 0 or 1 and
  the rule is linear, so ``jvp2 = J b``, ``|J| r = J r``, ``‖J Δx‖ ≤ ‖Δx‖`` (for a sum of
  inputs, ``≤ Σ‖Δxᵢ‖``).
* :func:`bilinear` — ``y = P(a, b)`` with ``P`` bilinear and its coefficients ``0/1``
  (elementwise product, matrix product): ``Δy = P(Δa, b) + P(a, Δb)``,
  ``jvp2 = P(Bₐ, b) + P(a, B_b) + P(Aₐ, A_b)`` exactly, ``|Δy| ≤ P(rₐ, |b|) + P(|a|, r_b)``.

``errprop.testing.check_rule`` checks the rules a registrar writes exactly as it checks
hand-written ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ._op import Array, sample_norm


def _lead_of(dxs: Sequence[Array | None], xs: Sequence[Array]) -> tuple[int, ...]:
    for d, x in zip(dxs, xs):
        if d is not None:
            return d.shape[:d.ndim - x.ndim]
    return ()


def structural(cls: type) -> type:
    """Give a merge op (``jvp(xs, y, dxs)`` linear with 0/1 entries, no parameters) its
    ``jvp2``, ``abs_jvp`` and ``norm_jvp`` from its ``jvp``. ``norm_combine`` on the class
    (default ``"sum"``) says how input norms bound the output's: ``"sum"`` (each output is
    a sum over inputs) or ``"rss"`` (each output is one input's: ``sqrt(Σ rᵢ²)``)."""

    def jvp2(self, xs, y, a_s, b_s, dparams=None):
        if all(b is None for b in b_s):
            return np.zeros_like(y)
        return self.jvp(xs, y, b_s, {})

    def abs_jvp(self, xs, y, rs, rparams=None):
        if all(r is None for r in rs):
            return np.zeros_like(y)
        return self.jvp(xs, y, rs, {})

    def norm_jvp(self, xs, y, rs, rparams=None):
        live = [r for r in rs if r is not None]
        if not live:
            return np.zeros(y.shape[0])
        if getattr(cls, "norm_combine", "sum") == "rss":
            return np.sqrt(sum(r * r for r in live))
        return sum(live)

    for key, rule in (("jvp2", jvp2), ("abs_jvp", abs_jvp), ("norm_jvp", norm_jvp)):
        if key not in cls.__dict__:
            setattr(cls, key, rule)
    return cls


def structural_unary(cls: type) -> type:
    """The same for a one-input op (``Op.jvp(x, y, dx, dparams)``): reshape, transpose,
    slice. ``‖J Δx‖ ≤ ‖Δx‖`` per batch element."""

    def jvp2(self, x, y, a, b, dparams):
        return np.zeros_like(y) if b is None else self.jvp(x, y, b, {})

    def abs_jvp(self, x, y, r, rparams):
        return np.zeros_like(y) if r is None else self.jvp(x, y, r, {})

    def norm_jvp(self, x, y, r, rparams):
        return np.zeros(y.shape[0]) if r is None else np.asarray(r, dtype=float)

    for key, rule in (("jvp2", jvp2), ("abs_jvp", abs_jvp), ("norm_jvp", norm_jvp)):
        if key not in cls.__dict__:
            setattr(cls, key, rule)
    return cls


def bilinear(cls: type) -> type:
    """Give a two-input merge op with a bilinear ``product(a, b)`` (0/1 coefficients) its
    ``forward``, ``jvp``, ``jvp2``, ``abs_jvp`` and ``norm_jvp``. The op writes
    ``product`` and ``vjp`` (the transposed products), and ``factor_norm(v)``: a
    per-batch-element bound ``c`` with ``‖P(Δa, b)‖ ≤ c(b)·‖Δa‖`` (and the same with the
    roles swapped)."""
    product: Callable[[Array, Array], Array] = cls.product

    def forward(self, xs, params=None):
        a, b = xs
        return self.product(a, b)

    def jvp(self, xs, y, dxs, dparams=None):
        (a, b), (da, db) = xs, dxs
        out = None
        if da is not None:
            out = self.product(da, b)
        if db is not None:
            part = self.product(a, db)
            out = part if out is None else out + part
        if out is None:
            lead = _lead_of(dxs, xs)
            return np.zeros((*lead, *y.shape))
        return out

    def jvp2(self, xs, y, a_s, b_s, dparams=None):
        out = self.jvp(xs, y, b_s, {})
        if a_s[0] is not None and a_s[1] is not None:
            out = out + self.product(a_s[0], a_s[1])
        return out

    def abs_jvp(self, xs, y, rs, rparams=None):
        (a, b), (ra, rb) = xs, rs
        out = np.zeros_like(y)
        if ra is not None:
            out = out + self.product(ra, np.abs(b))
        if rb is not None:
            out = out + self.product(np.abs(a), rb)
        return out

    def norm_jvp(self, xs, y, rs, rparams=None):
        (a, b), (ra, rb) = xs, rs
        out = np.zeros(y.shape[0])
        if ra is not None:
            out = out + ra * self.factor_norm(b)
        if rb is not None:
            out = out + self.factor_norm(a) * rb
        return out

    del product
    for key, rule in (("forward", forward), ("jvp", jvp), ("jvp2", jvp2),
                      ("abs_jvp", abs_jvp), ("norm_jvp", norm_jvp)):
        if key not in cls.__dict__:
            setattr(cls, key, rule)
    cls.__abstractmethods__ = frozenset(k for k in getattr(cls, "__abstractmethods__", ())
                                        if k not in ("forward", "jvp"))
    return cls


def frobenius(v: Array) -> Array:
    """Per-batch-element Frobenius norm (an operator-norm bound for a matrix factor)."""
    return sample_norm(v)


def max_abs(v: Array) -> Array:
    """Per-batch-element largest ``|v|`` (the operator norm of an elementwise factor)."""
    return np.max(np.abs(v).reshape(v.shape[0], -1), axis=1)

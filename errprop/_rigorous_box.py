"""Interval arithmetic for the rigorous bound mode: boxes and their sound primitives.

A :class:`Box` holds, elementwise, an interval ``[lo, hi]`` that surely contains the value
the quantized network computes at a node, for *every* pattern of parameter and input
errors in the sources' boxes. Each primitive here returns an enclosure of the exact
range of its operation, widened outward for the float64 rounding of both this
computation and the network's own (``γ_n = (n + 2)·2u`` times the magnitudes involved,
``u`` the unit roundoff), so a bound is never below what float64 arithmetic can produce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ._op import Array

_EPS = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class Box:
    """Elementwise interval ``lo ≤ value ≤ hi`` (arrays of one shape)."""

    lo: Array
    hi: Array

    @staticmethod
    def point(x: Array) -> Box:
        return Box(x, x)

    @staticmethod
    def around(c: Array, r: Array) -> Box:
        """``[c − r, c + r]``."""
        return Box(c - r, c + r)

    @property
    def mid(self) -> Array:
        return 0.5 * self.lo + 0.5 * self.hi

    @property
    def rad(self) -> Array:
        """A radius about :attr:`mid` whose interval contains ``[lo, hi]`` despite rounding."""
        c = self.mid
        return np.maximum(self.hi - c, c - self.lo) * (1.0 + 4 * _EPS)

    def widen(self, slack: Array | float) -> Box:
        return Box(self.lo - slack, self.hi + slack)

    def outward(self, ulps: float = 4.0) -> Box:
        """Widened by ``ulps`` relative rounding units (results of elementwise functions)."""
        return Box(self.lo - ulps * _EPS * np.abs(self.lo), self.hi + ulps * _EPS * np.abs(self.hi))

    def __add__(self, other: Box) -> Box:
        return Box(self.lo + other.lo, self.hi + other.hi).outward(2.0)


def rounding_slack(terms: int, magnitude: Array) -> Array:
    """Bound on the float64 rounding of a sum of ``terms`` products whose absolute values sum
    to ``magnitude``, computed twice (here and by the network): ``2 (terms + 2) u · magnitude``."""
    return 2.0 * (terms + 2) * _EPS * magnitude


def affine_box(box: Box, W: Array, aW: Array | None, b: Array | None, ab: Array | None,
               matmul: Callable[[Array, Array], Array]) -> Box:
    """Enclosure of ``x Wᵀ + b`` over ``x ∈ box``, ``|ΔW| ≤ aW``, ``|Δb| ≤ ab`` (midpoint-radius).

    With ``x = c ± r``: ``(W + ΔW)(c ± r) + b + Δb ⊂ W c + b ± (|W| r + aW (|c| + r) + ab)``;
    ``matmul(x, W)`` is ``x Wᵀ`` over the last axis.
    """
    c, r = box.mid, box.rad
    absW = np.abs(W)
    y = matmul(c, W)
    size = np.abs(c) + r
    radius = matmul(r, absW)
    magnitude = matmul(size, absW if aW is None else absW + aW)
    if aW is not None:
        radius = radius + matmul(size, aW)
    if b is not None:
        y = y + b
        magnitude = magnitude + np.abs(b)
    if ab is not None:
        radius = radius + ab
        magnitude = magnitude + ab
    radius = radius + rounding_slack(W.shape[-1], magnitude + radius)
    return Box.around(y, radius)


def matmul_box(a: Box, b: Box) -> Box:
    """Enclosure of ``a @ b`` over both boxes (Rump's midpoint-radius product):
    ``mA mB ± (|mA| rB + rA |mB| + rA rB)``."""
    ma, ra, mb, rb = a.mid, a.rad, b.mid, b.rad
    y = ma @ mb
    radius = np.abs(ma) @ rb + ra @ (np.abs(mb) + rb)
    magnitude = np.abs(ma) @ np.abs(mb) + radius
    return Box.around(y, radius + rounding_slack(ma.shape[-1], magnitude))


def mul_box(a: Box, b: Box) -> Box:
    """Elementwise product: the hull of the four corner products."""
    corners = (a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi)
    return Box(np.minimum.reduce(corners), np.maximum.reduce(corners)).outward(2.0)


def scale_box(box: Box, s: Array | float) -> Box:
    """``s · box`` for ``s ≥ 0``."""
    return Box(box.lo * s, box.hi * s).outward(2.0)


def param_box(p: Array, box: Array | None) -> Box:
    """A parameter ``p`` with error ``|Δp| ≤ box``."""
    return Box.point(p) if box is None else Box.around(p, box).outward(2.0)


def square_box(box: Box) -> Box:
    """``{x² : x ∈ box}``: ``[0, max²]`` when the box contains 0, else between the squares."""
    lo2, hi2 = box.lo * box.lo, box.hi * box.hi
    low = np.where((box.lo <= 0) & (box.hi >= 0), 0.0, np.minimum(lo2, hi2))
    return Box(low, np.maximum(lo2, hi2)).outward(2.0)


def sum_others(box: Box, axis: int = -1) -> Box:
    """``Σ_{k≠i} x_k`` along ``axis`` for every ``i``: the total minus the own term, widened
    for the cancellation of that subtraction (``n`` rounding units of the total's size)."""
    n = box.lo.shape[axis]
    slack = rounding_slack(n, np.sum(np.maximum(np.abs(box.lo), np.abs(box.hi)), axis=axis,
                                     keepdims=True))
    lo = np.sum(box.lo, axis=axis, keepdims=True) - box.lo
    hi = np.sum(box.hi, axis=axis, keepdims=True) - box.hi
    return Box(lo - slack, hi + slack)


def ratio_box(num: Box, rest: Box, denom: Callable[[Array, Array], Array],
              limit: float) -> Box:
    """Range of ``f(u, R) = u / denom(u, R)`` over ``u ∈ num``, ``R ∈ rest`` (``R ≥ 0``), where
    ``f`` increases in ``u`` and ``|f|`` decreases in ``R`` (``denom = sqrt(u²/d + R)`` and
    the like), intersected with ``|f| ≤ limit``: the exact range over that box, as the
    extremes sit at its corners (low ``u`` with large ``R`` if ``u ≥ 0``, else small ``R``)."""
    r_lo, r_hi = np.maximum(rest.lo, 0.0), np.maximum(rest.hi, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        low = num.lo / denom(num.lo, np.where(num.lo >= 0, r_hi, r_lo))
        high = num.hi / denom(num.hi, np.where(num.hi >= 0, r_lo, r_hi))
    low = np.where(np.isnan(low), -limit, low)
    high = np.where(np.isnan(high), limit, high)
    out = Box(low, high).outward(8.0)
    return Box(np.maximum(out.lo, -limit), np.minimum(out.hi, limit))


def softmax_box(box: Box, axis: int = -1) -> Box:
    """Elementwise range of ``softmax(x)_i = 1 / (1 + Σ_{k≠i} exp(x_k − x_i))`` over the box:
    the smallest ``y_i`` takes ``x_i`` low and the others high, the largest the reverse.
    ``lo = hi = −inf`` (a masked logit) gives exactly 0."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        # the low end shifts by the largest upper end (every exponent ≤ 0: no overflow;
        # underflow only lowers it); the high end shifts by the largest lower end, which
        # the network's own shift (its row maximum) is at least, so where exp underflows
        # here the network's exp underflows as well
        m_hi = np.max(box.hi, axis=axis, keepdims=True)
        m_lo = np.max(box.lo, axis=axis, keepdims=True)
        e_lo, e_hi = np.exp(box.lo - m_hi), np.exp(box.hi - m_hi)
        low = e_lo / (e_lo + sum_others(Box(e_hi, e_hi), axis).hi)
        e_lo, e_hi = np.exp(box.lo - m_lo), np.exp(box.hi - m_lo)
        high = e_hi / (e_hi + np.maximum(sum_others(Box(e_lo, e_lo), axis).lo, 0.0))
    low = np.where(np.isnan(low), 0.0, low)
    high = np.where(np.isnan(high), 1.0, high)
    out = Box(low, high).outward(8.0 + 2.0 * box.lo.shape[axis])
    return Box(np.clip(out.lo, 0.0, 1.0), np.clip(out.hi, 0.0, 1.0))


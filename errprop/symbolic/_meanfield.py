"""Mean-field closed forms: output error variance of random networks with quantized weights.

Setting: width ``n``, depth ``L``, weights ``N(0, σ_w²/n)`` without biases, input
``x ~ N(0, q₀)`` per element, every weight matrix quantized per output channel with ``b``
bits (symmetric, restricted range, round to nearest). Per unit, ``q_l = E[x_l²]`` is the
signal and ``v_l = E[Δx_l²]`` the error. The weight error of a row is uniform noise of
variance ``s²/12`` with ``s = max_row|W| / (2^(b−1) − 1)``, so relative to the weight
variance::

    ε² = E[M_n²] / (12 (2^(b−1) − 1)²),   M_n = max of n |N(0, 1)|          (quadrature)

Mean-field assumptions: ``n → ∞`` (sums over units are Gaussian and self-averaging), the
quantization error is independent of the weights and of the signal, and upstream error is
independent of the next layer's weights (so cross terms vanish in expectation). The four
architectures and their recursions (``Q(q) = E φ(√q z)²``, ``D(q) = E φ'(√q z)²``)::

    mlp        h_l = W_l φ(h_{l−1})            q_l = σ_w² Q(q_{l−1})
               v_l = σ_w² D(q_{l−1}) v_{l−1} + ε² q_l
    residual   x_l = x_{l−1} + W₂ φ(W₁ x_{l−1}),  a = σ_w² q_{l−1}
               q_l = q_{l−1} + σ_w² Q(a)
               v_l = v_{l−1} + σ_w⁴ D(a)(v_{l−1} + ε² q_{l−1}) + ε² σ_w² Q(a)
    prenorm    x_l = x_{l−1} + W₂ φ(W₁ LN(x_{l−1})):  q_l = q_{l−1} + g,  g = σ_w² Q(σ_w²)
               v_l = v_{l−1} (1 + c/q_{l−1}) + β,  c = κ σ_w⁴ D(σ_w²),  β = ε²(σ_w⁴ D(σ_w²) + g)
    attention  x_l = x_{l−1} + Attn(LN(x_{l−1})), logits scaled by τ (on W_q):
               q_l = q_{l−1} + g,  g = σ_w⁴ p₂,  p₂ = E Σ_j A_ij² ≈ e^{τ²σ_w⁴}/T
               v_l = v_{l−1} (1 + c/q_{l−1}) + β,  c = κ g (1 + 2τ²σ_w⁴),  β = ε² g (2 + 2τ²σ_w⁴)
    swiglu     x_l = x_{l−1} + W_d (φ(W_g x_{l−1}) ⊙ W_u x_{l−1})  (SwiGLU: φ = silu),
               a = σ_w² q_{l−1},  q_l = q_{l−1} + g,  g = σ_w² a Q(a)
               v_l = v_{l−1} + σ_w⁴ (v_{l−1} + ε² q_{l−1}) (a D(a) + Q(a)) + ε² g

with ``κ = 1 − 2/n`` (LayerNorm removes the mean and the radial direction of the error).
The attention rule treats the logits of a row as i.i.d. Gaussian of variance ``τ²σ_w⁴``
and the softmax denominator as self-averaging (``p₂ = e^{τ²σ_w⁴}/T``, capped at 1), the
value, query and key errors as independent of the attention pattern and the tokens as
uncorrelated. The gated rule uses that ``W_g x`` and ``W_u x`` are independent (independent
weights): ``E (φ(h_g) h_u)² = Q(a)·a`` and the product rule
``Δm = φ'(h_g) Δh_g h_u + φ(h_g) Δh_u`` has no cross term in expectation. See
docs/symbolic.md for where these fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import sympy as sp
from scipy import integrate, special

from .._activation import ACTIVATIONS
from ._forwards import SYMBOLIC_ACTIVATIONS

ARCHITECTURES = ("mlp", "residual", "prenorm", "attention", "swiglu")

# symbols of the closed forms
L, n, q0, eps2, sw2, tau, T = sp.symbols(r"L n q_0 \varepsilon^2 \sigma_w^2 \tau T",
                                         positive=True)
_l, _k = sp.symbols("l k", integer=True, positive=True)


# ------------------------------------------------------------------ the ingredients
@lru_cache(maxsize=None)
def max_abs_gaussian_moment(count: int) -> float:
    """``E[M²]`` for ``M`` the largest of ``count`` i.i.d. ``|N(0, 1)|`` (quadrature of
    ``∫ 2t (1 − (2Φ(t) − 1)^count) dt``)."""
    def tail(t: float) -> float:
        return 2.0 * t * -math.expm1(count * math.log(max(special.erf(t / math.sqrt(2)),
                                                         1e-300)))
    value, _ = integrate.quad(tail, 0.0, 12.0, points=[math.sqrt(2 * math.log(count + 1))],
                              limit=200)
    return float(value)


def relative_weight_noise(bits: int, fan_in: int) -> float:
    """``ε²``: per-channel weight quantization noise variance over the weight variance."""
    levels = 2 ** (bits - 1) - 1
    return max_abs_gaussian_moment(fan_in) / (12.0 * levels ** 2)


def epsilon_squared_expr() -> sp.Expr:
    """``ε²`` as a sympy expression of the bits ``b`` and ``E[M_n²]``."""
    b, m2 = sp.symbols(r"b \mathbb{E}M_n^2", positive=True)
    return m2 / (12 * (2 ** (b - 1) - 1) ** 2)


@lru_cache(maxsize=None)
def gaussian_moments(activation: str, q: float) -> tuple[float, float]:
    """``(Q, D) = (E φ(√q z)², E φ'(√q z)²)``, ``z ~ N(0, 1)``, by quadrature; φ' is
    derived by sympy from :data:`SYMBOLIC_ACTIVATIONS`."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}")
    z = sp.Symbol("z", real=True)
    f_expr = SYMBOLIC_ACTIVATIONS[activation](z)
    f = sp.lambdify(z, f_expr, "math")
    d = sp.lambdify(z, sp.diff(f_expr, z), "math")
    s = math.sqrt(q)

    def moment(g) -> float:
        value, _ = integrate.quad(lambda t: g(s * t) ** 2 * math.exp(-t * t / 2), -12, 12,
                                  points=[0.0], limit=200)
        return value / math.sqrt(2 * math.pi)

    return moment(f), moment(d)


def attention_p2(logit_scale: float, tokens: int, sigma_w2: float = 1.0) -> float:
    """``p₂ = E Σ_j A_ij²`` under the self-averaging softmax: ``e^{τ²σ_w⁴}/T``, at most 1."""
    return min(1.0, math.exp(logit_scale ** 2 * sigma_w2 ** 2) / tokens)


# ------------------------------------------------------------------ the recursion
@dataclass(frozen=True)
class MeanField:
    """Signal ``q`` and error ``v`` per unit at depths ``1..L`` (arrays of length L)."""

    architecture: str
    depth: np.ndarray
    signal: np.ndarray
    error: np.ndarray

    @property
    def relative(self) -> np.ndarray:
        """Relative error ``sqrt(v_l / q_l)``."""
        return np.sqrt(self.error / self.signal)


def mean_field(architecture: str, depth: int, width: int, *, activation: str = "relu",
               sigma_w2: float = 2.0, bits: int = 8, q_in: float = 1.0,
               logit_scale: float = 1.0, tokens: int = 16) -> MeanField:
    """Iterate the mean-field recursion (module docstring) for ``depth`` layers/blocks."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    e2 = relative_weight_noise(bits, width)
    kappa = 1.0 - 2.0 / width
    q, v = q_in, 0.0
    qs, vs = [], []
    for layer in range(depth):
        if architecture == "mlp":
            if layer == 0:
                q_new, chi = sigma_w2 * q, sigma_w2
            else:
                Q, D = gaussian_moments(activation, q)
                q_new, chi = sigma_w2 * Q, sigma_w2 * D
            v = chi * v + e2 * q_new
            q = q_new
        elif architecture == "residual":
            Q, D = gaussian_moments(activation, sigma_w2 * q)
            v = v + sigma_w2 ** 2 * D * (v + e2 * q) + e2 * sigma_w2 * Q
            q = q + sigma_w2 * Q
        elif architecture == "prenorm":
            Q, D = gaussian_moments(activation, sigma_w2)
            g = sigma_w2 * Q
            v = v * (1 + kappa * sigma_w2 ** 2 * D / q) + e2 * (sigma_w2 ** 2 * D + g)
            q = q + g
        elif architecture == "attention":
            g = sigma_w2 ** 2 * attention_p2(logit_scale, tokens, sigma_w2)
            s2 = logit_scale ** 2 * sigma_w2 ** 2
            v = v * (1 + kappa * g * (1 + 2 * s2) / q) + e2 * g * (2 + 2 * s2)
            q = q + g
        else:
            a = sigma_w2 * q
            try:
                Q, D = gaussian_moments(activation, a)
            except OverflowError:
                raise ValueError(f"mean_field swiglu: the signal q = {q:.3g} before block "
                                 f"{layer + 1} is out of float range for the moments (the "
                                 f"gated branch is quadratic in x, so q grows like a power "
                                 f"tower); use a smaller sigma_w2 or depth") from None
            g = sigma_w2 * a * Q
            v = v + sigma_w2 ** 2 * (v + e2 * q) * (a * D + Q) + e2 * g
            q = q + g
        qs.append(q)
        vs.append(v)
    return MeanField(architecture, np.arange(1, depth + 1), np.array(qs), np.array(vs))


# ------------------------------------------------------------------ closed forms
@dataclass(frozen=True)
class ClosedForm:
    """A mean-field closed form: ``relative`` is ``v_L/q_L`` (the squared relative error)
    as a sympy expression of ``L``, ``ε²`` and the architecture's constants."""

    architecture: str
    activation: str
    relative: sp.Expr
    assumptions: str

    def latex(self) -> str:
        """``\\frac{v_L}{q_L} = ...`` ready to paste."""
        return r"\frac{\mathbb{E}\,\Delta x_L^2}{\mathbb{E}\,x_L^2} = " + sp.latex(self.relative)

    def __call__(self, **values: float) -> float:
        """Evaluate with numeric values for the symbols (by their plain names:
        ``L, n, q_0, eps2, sigma_w2, tau, T``)."""
        table = {"L": L, "n": n, "q_0": q0, "eps2": eps2, "sigma_w2": sw2, "tau": tau, "T": T}
        expr = self.relative.subs({table[k]: v for k, v in values.items()})
        return float(expr.doit().evalf())


@lru_cache(maxsize=None)
def closed_form(architecture: str, activation: str = "relu") -> ClosedForm:
    """The squared relative output error ``v_L / q_L`` in closed form, derived by sympy
    from the recursion (:func:`mean_field`; module docstring).

    * ``mlp`` with ``identity`` or ``relu``: ``L ε²`` (the layer gains cancel: every layer
      adds ``ε²`` of relative error, whatever ``σ_w²``); with ``tanh`` in the ordered phase
      at its fixed point ``q*``: ``ε² (1 − χ^L)/(1 − χ)``, ``χ = σ_w² E sech⁴(√q* z)``.
    * ``residual`` (homogeneous φ, gain ``a = σ_w⁴ E φ(z)²``): ``2 L ε² a/(1 + a)``.
    * ``prenorm`` and ``attention``: the exact sum of the linear recursion with
      ``q_l = q₀ + l g`` (rising factorials; logarithmic in ``L`` when ``c = g``).
    """
    if architecture == "mlp":
        if activation in ("identity", "relu"):
            chi = sp.Symbol(r"\chi", positive=True)
            ql = q0 * sw2 * chi ** (_l - 1)
            v = sp.summation(chi ** (L - _l) * eps2 * ql, (_l, 1, L))
            rel = sp.simplify(v / (q0 * sw2 * chi ** (L - 1)))
            return ClosedForm(architecture, activation, rel,
                              "homogeneous φ: q_l and the error gain grow by the same χ")
        if activation == "tanh":
            chi = sp.Symbol(r"\chi_*", positive=True)
            v = sp.summation(chi ** (L - _l) * eps2, (_l, 1, L))
            return ClosedForm(architecture, activation, sp.simplify(v),
                              "input at the fixed point q* of q ↦ σ_w² E tanh²(√q z)")
        raise ValueError(f"no closed form for an mlp with {activation!r}; use mean_field")
    if architecture == "residual":
        if activation not in ("identity", "relu"):
            raise ValueError(f"no closed form for a residual stream with {activation!r} "
                             f"(not homogeneous); use mean_field")
        a = sp.Symbol("a", positive=True)
        ql = q0 * (1 + a) ** (_l - 1)
        v = sp.summation((1 + a) ** (L - _l) * 2 * a * eps2 * ql, (_l, 1, L))
        rel = sp.simplify(v / (q0 * (1 + a) ** L))
        return ClosedForm(architecture, activation, rel,
                          "homogeneous φ (identity, relu): a = σ_w⁴ E φ(z)²")
    if architecture in ("prenorm", "attention"):
        return ClosedForm(architecture, activation, _normalized_stream(),
                          "g, c, β as in the module docstring")
    if architecture == "swiglu":
        raise ValueError("no closed form for a gated (swiglu) stream: its branch is "
                         "quadratic in x, so the gain changes with q_l; use mean_field")
    raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")


@lru_cache(maxsize=None)
def _normalized_stream() -> sp.Expr:
    """``v_L/q_L`` for ``v_l = v_{l−1}(1 + c/q_{l−1}) + β``, ``q_l = q₀ + l g``, ``v₀ = 0``."""
    g, c, beta = sp.symbols("g c beta", positive=True)
    growth = sp.product((q0 + (_k - 1) * g + c) / (q0 + (_k - 1) * g), (_k, _l + 1, L))
    v = sp.summation(beta * growth, (_l, 1, L))
    return sp.simplify(v / (q0 + L * g))


def constants(architecture: str, width: int, *, activation: str = "relu",
              sigma_w2: float = 2.0, bits: int = 8, logit_scale: float = 1.0,
              tokens: int = 16) -> dict[str, float]:
    """Numeric values of the closed form's symbols (plain names, see
    :meth:`ClosedForm.__call__`, plus ``g, c, beta, a, chi``)."""
    e2 = relative_weight_noise(bits, width)
    kappa = 1.0 - 2.0 / width
    out = {"eps2": e2, "n": width, "sigma_w2": sigma_w2}
    if architecture == "mlp":
        out["chi"] = sigma_w2 * gaussian_moments(activation, 1.0)[1] if activation != "tanh" \
            else tanh_fixed_point(sigma_w2)[1]
    elif architecture == "residual":
        out["a"] = sigma_w2 ** 2 * gaussian_moments(activation, 1.0)[0]
    elif architecture == "prenorm":
        Q, D = gaussian_moments(activation, sigma_w2)
        g = sigma_w2 * Q
        out.update(g=g, c=kappa * sigma_w2 ** 2 * D, beta=e2 * (sigma_w2 ** 2 * D + g))
    elif architecture == "attention":
        g = sigma_w2 ** 2 * attention_p2(logit_scale, tokens, sigma_w2)
        s2 = logit_scale ** 2 * sigma_w2 ** 2
        out.update(g=g, c=kappa * g * (1 + 2 * s2), beta=e2 * g * (2 + 2 * s2))
    return out


def tanh_fixed_point(sigma_w2: float) -> tuple[float, float]:
    """``(q*, χ*)``: the fixed point of ``q ↦ σ_w² E tanh²(√q z)`` (σ_w² > 1) and the error
    gain ``σ_w² E sech⁴(√q* z)`` there."""
    q = 1.0
    for _ in range(500):
        q = sigma_w2 * gaussian_moments("tanh", q)[0]
    return q, sigma_w2 * gaussian_moments("tanh", q)[1]


def evaluate_closed_form(form: ClosedForm, depth: int | np.ndarray,
                         values: dict[str, float]) -> np.ndarray:
    """``v_L/q_L`` from ``form`` at each depth, with ``values`` from :func:`constants`."""
    syms = {s.name: s for s in form.relative.free_symbols}
    rename = {"q_0": "q_0", r"\varepsilon^2": "eps2", r"\sigma_w^2": "sigma_w2",
              r"\chi": "chi", r"\chi_*": "chi", "a": "a", "g": "g", "c": "c", "beta": "beta",
              "n": "n", r"\tau": "tau", "T": "T"}
    subs = {s: values[rename[name]] for name, s in syms.items() if name != "L"}
    expr = form.relative.subs(subs)
    f = sp.lambdify(L, expr, modules=["mpmath"])
    return np.array([float(f(int(d))) for d in np.atleast_1d(depth)])

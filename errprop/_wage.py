"""WAGE-style training arithmetic: how quantized errors and gradients perturb ∂L/∂W.

WAGE (Wu et al. 2018) constrains weights (W), activations (A), gradients (G) and
back-propagated errors (E) to ``k``-bit integers with a power-of-two ("shift") scale:

    σ(k) = 2^(1-k),   Shift(x) = 2^round(log2 x),
    Q(x, k) = clip(σ(k)·round(x / σ(k)), -1 + σ(k), 1 - σ(k))

and, for a tensor ``x`` of any range, ``Shift(max|x|)·Q(x / Shift(max|x|), k)``: a grid of
step ``σ(k)·Shift(max|x|)`` with ``2^(k-1) - 1`` levels either side of 0. Errors and
gradients are rounded stochastically (``floor(x/s + u)``, ``u ~ U[0, 1)``), which is unbiased
with variance ``p(1-p)s²`` for a value at fraction ``p`` between two levels.

:class:`ShiftQuantizer` is that grid as an errprop quantizer (usable in ``QuantConfig``);
:class:`WAGE` holds the four bit widths; :func:`gradient_error` analyses the backward pass
of an MLP — first order (analytic) versus repeated quantized backward passes (Monte Carlo).

Scope and conventions
---------------------
* The network is a plain ``Sequential`` of ``Linear`` layers, each optionally followed by
  elementwise ``Activation`` s (no residuals, attention or norms), on inputs
  ``(batch, features)``. With the cross-entropy loss a final ``Softmax`` node is folded
  into the loss (the loss takes the logits).
* One forward pass is shared: every Linear uses ``Q_W(W)`` and ``Q_A(a)`` (round to
  nearest, deterministic). The analysis is of the *backward* arithmetic on that forward.
* ``e_l = ∂L/∂z_l`` is the error at the output ``z_l`` of Linear ``l``. The quantized
  backward pass is::

      ê_L = Q_E(e_L),   ê_{l-1} = Q_E((ê_l Ŵ_l) ⊙ f'(z_{l-1})),   Ĝ_l = Q_G(ê_lᵀ â_{l-1})

  with ``Ŵ = Q_W(W)``, ``â = Q_A(a)``. Values are *dequantized* (the scale is multiplied
  back): WAGE drops the per-tensor power-of-two factor of E and folds that of G into the
  learning rate, which rescales a layer's step but is not an error.
* ``reference="ste"`` (default): the reference gradient is the float backward pass through
  the same quantized forward (what quantization-aware training with a straight-through
  estimator computes): ``e_{l-1} = (e_l Ŵ_l) ⊙ f'``, ``G_l = e_lᵀ â``.
  ``reference="float_operands"``: the reference uses the float ``W`` and ``a`` in the
  backward products, so the gradient error also holds the deterministic terms
  ``e_l ΔW_l`` (propagated) and ``e_lᵀ Δa_{l-1}``.
* The quantized backward pass is linear in ``ê`` given the forward, so the propagation
  ``Δe_{l-1} = (Δe_l Ŵ_l + e_l ΔW_l) ⊙ f'(z_{l-1}) + ε_{l-1}`` and
  ``ΔG_l = Δe_lᵀ â + e_lᵀ Δa + γ_l`` is exact; the one model is the noise law of each
  rounding ``ε_l``, ``γ_l``, evaluated at the float value it rounds (as for activation
  quantization in :func:`errprop.analyze`): mean = clipping error (``Shift`` rounds
  ``max|x|`` to the *nearest* power of two, so the largest values may saturate at
  ``(1 - σ)·Shift``; ``shift="ceil"`` never clips), variance ``p(1-p)s²`` (stochastic)
  or ``s²/12`` (nearest). The covariance of ``Δe_l`` is carried per batch row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import special

from ._activation import Activation, Softmax
from ._graph import Sequential
from ._linear import Linear
from ._op import Array
from ._quant import ErrorModel
from ._wage_quant import WAGE, ShiftQuantizer

LOSSES = ("mse", "cross_entropy")
REFERENCES = ("ste", "float_operands")
_Z99 = 2.5758293035489004  # two-sided 99% normal quantile

# ------------------------------------------------------------------ the MLP
@dataclass(frozen=True)
class _Layer:
    name: str
    W: Array  # as used in the forward (quantized)
    dW: Array  # Q_W(W) - W
    a: Array  # input as used (quantized)
    da: Array  # Q_A(a) - a
    slope: Array  # f'(z) of the activations after this layer (1 when none)


def mlp_layers(net: Sequential, what: str, *, softmax_last: bool = False
               ) -> list[tuple[str, Linear, list[Activation]]]:
    """``[(name, Linear, [activations after it])]`` or a clear error for other graphs.
    ``softmax_last``: a final Softmax node is allowed and left out (folded into a loss)."""
    if not isinstance(net, Sequential):
        raise TypeError(f"{what}: net must be an errprop.Sequential, got {type(net).__name__}")
    out: list[tuple[str, Linear, list[Activation]]] = []
    nodes = net.nodes()
    if softmax_last and nodes and isinstance(nodes[-1].node, Softmax):
        nodes = nodes[:-1]
    for info in nodes:
        node = info.node
        if isinstance(node, Linear):
            out.append((info.name, node, []))
        elif isinstance(node, Activation) and out:
            out[-1][2].append(node)
        else:
            raise ValueError(f"{what} handles MLPs (Linear layers, each followed by "
                             f"elementwise Activations); node {info.name!r} is "
                             f"{info.kind}" + (" before the first Linear"
                                               if isinstance(node, Activation) else ""))
    if not out:
        raise ValueError(f"{what}: the network has no Linear layer")
    return out


def _forward(net: Sequential, x: Array, config: WAGE) -> tuple[list[_Layer], Array]:
    qw, qa = config.quantizer("w"), config.quantizer("a")
    layers, h = [], x
    for name, lin, acts in mlp_layers(net, "gradient_error", softmax_last=True):
        W = lin.params["W"]
        Wq = W if qw is None else qw.fit(W).quantize(W)
        aq = h if qa is None else qa.fit(h).quantize(h)
        z = aq @ Wq.T + lin.params.get("b", 0.0)
        slope = np.ones_like(z)
        for act in acts:
            y = act.forward(z)
            slope = slope * act.fn.d1(z, y)
            z = y
        layers.append(_Layer(name, Wq, Wq - W, aq, aq - h, slope))
        h = z
    return layers, h


def _loss_error(y: Array, target: Array, loss: str) -> tuple[float, Array]:
    """Loss value and ``∂L/∂y`` for ``y: (batch, out)``."""
    if loss == "mse":
        r = y - target
        return float(np.mean(r * r)), 2.0 * r / r.size
    logp = special.log_softmax(y, axis=1)
    if target.ndim == 1:
        onehot = np.zeros_like(y)
        onehot[np.arange(y.shape[0]), target.astype(int)] = 1.0
    else:
        onehot = target
    return float(-np.mean(np.sum(onehot * logp, axis=1))), (np.exp(logp) - onehot) / y.shape[0]


def _check_target(y: Array, target: object, loss: str) -> Array:
    t = np.asarray(target)
    if loss == "cross_entropy" and t.ndim == 1:
        if t.shape != (y.shape[0],) or not np.all((t >= 0) & (t < y.shape[1]) & (t == np.round(t))):
            raise ValueError(f"gradient_error: cross_entropy targets must be class indices "
                             f"in [0, {y.shape[1]}) of shape ({y.shape[0]},) or probabilities "
                             f"{y.shape}, got shape {t.shape}")
        return t.astype(np.int64)
    if t.shape != y.shape:
        raise ValueError(f"gradient_error: target must have the output's shape {y.shape}, "
                         f"got {t.shape}")
    return t.astype(np.float64)


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class GradientErrorRow:
    """One layer: its weight gradient ``G`` and the error ``ΔG`` of the quantized backward.

    ``mse_*`` are means over the gradient's elements of ``E[ΔG²]``; ``bias_*`` the mean over
    elements of ``(E ΔG)²``; ``relative = sqrt(mse) / rms(G)``. Validity flags:
    ``scale_flip`` — the upstream error can move a tensor's ``max|x|`` across a power of
    two, so its step may double or halve (the analytic model then misses);
    ``clipped`` — the fraction of the layer's E and G elements that saturate.
    """

    layer: str
    grad_rms: float
    mse_analytic: float
    bias_analytic: float
    mse_mc: float
    mse_ci: tuple[float, float]
    bias_mc: float
    scale_flip: bool = False
    clipped: float = 0.0

    @property
    def relative_analytic(self) -> float:
        return float(np.sqrt(self.mse_analytic)) / self.grad_rms if self.grad_rms else np.inf

    @property
    def relative_mc(self) -> float:
        return float(np.sqrt(self.mse_mc)) / self.grad_rms if self.grad_rms else np.inf

    @property
    def inside(self) -> bool:
        """The analytic MSE lies inside the Monte Carlo 99% interval."""
        return self.mse_ci[0] <= self.mse_analytic <= self.mse_ci[1]


@dataclass(frozen=True)
class GradientError:
    """Result of :func:`gradient_error`.

    Attributes
    ----------
    rows : one :class:`GradientErrorRow` per Linear layer, in execution order.
    gradient : layer -> reference weight gradient ``G_l`` ``(out, in)``.
    mean, var : layer -> analytic per-element mean and variance of ``ΔG_l``.
    mc_mean, mc_var : layer -> Monte Carlo per-element mean and variance.
    loss, samples, seed, config, reference.
    """

    rows: list[GradientErrorRow]
    gradient: dict[str, Array]
    mean: dict[str, Array]
    var: dict[str, Array]
    mc_mean: dict[str, Array] = field(repr=False)
    mc_var: dict[str, Array] = field(repr=False)
    loss: str = "mse"
    samples: int = 0
    seed: int = 0
    config: WAGE = WAGE()
    reference: str = "ste"

    def row(self, layer: str) -> GradientErrorRow:
        for r in self.rows:
            if r.layer == layer:
                return r
        raise KeyError(f"no layer {layer!r}; layers: {', '.join(r.layer for r in self.rows)}")

    def table(self) -> str:
        head = (f"{'layer':<10} {'rms(G)':>10} {'MSE analytic':>13} {'MSE MC':>11} "
                f"{'99% CI':>23} {'rel. analytic':>13} {'rel. MC':>9}  flags")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lo, hi = r.mse_ci
            flag = ("" if r.inside else " !") + (" scale-flip" if r.scale_flip else "") \
                + (f" clip {r.clipped:.1%}" if r.clipped else "")
            lines.append(f"{r.layer:<10} {r.grad_rms:>10.3g} {r.mse_analytic:>13.4g} "
                         f"{r.mse_mc:>11.4g} {lo:>11.4g}..{hi:<11.4g} "
                         f"{r.relative_analytic:>13.3g} {r.relative_mc:>9.3g} {flag}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ------------------------------------------------------------------ analysis
def gradient_error(net: Sequential, x: object, target: object, config: WAGE | None = None, *,
                   loss: str = "mse", samples: int = 200, seed: int = 0,
                   reference: str = "ste", smooth: bool = True) -> GradientError:
    """Error of each layer's weight gradient from WAGE's quantized backward pass.

    Parameters
    ----------
    net : an MLP (see the module notes for the scope).
    x : ``(batch, in)``; target : ``(batch, out)`` for ``loss="mse"`` (``mean((y-t)²)``),
        class indices ``(batch,)`` or probabilities for ``"cross_entropy"`` (batch mean).
    config : :class:`WAGE` (default 8-8-8-8).
    samples : Monte Carlo repetitions of the quantized backward pass (0: analytic only).
    seed : seeds the stochastic rounding draws.
    reference : ``"ste"`` or ``"float_operands"`` (see the module notes).
    smooth : the variance of each stochastic rounding is averaged over the upstream
        error of the value it rounds (Gaussian, with the propagated variance;
        :func:`smoothed_sr_variance`); False evaluates ``p(1-p)s²`` at the float value.

    Returns
    -------
    GradientError
        Per layer the analytic (first-order, exact up to the rounding noise model)
        and Monte Carlo statistics of ``ΔG_l``.
    """
    config = WAGE() if config is None else config
    if not isinstance(config, WAGE):
        raise TypeError(f"gradient_error: config must be an errprop.WAGE, got "
                        f"{type(config).__name__}")
    if loss not in LOSSES:
        raise ValueError(f"gradient_error: loss must be 'mse' or 'cross_entropy', got {loss!r}")
    if reference not in REFERENCES:
        raise ValueError(f"gradient_error: reference must be 'ste' or 'float_operands', "
                         f"got {reference!r}")
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) \
            or samples < 0 or samples == 1:
        raise ValueError(f"gradient_error: samples must be 0 or an integer >= 2, got {samples!r}")
    mlp_layers(net, "gradient_error", softmax_last=loss == "cross_entropy")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"gradient_error: x must be (batch, features), got shape {x.shape}")
    layers, y = _forward(net, x, config)
    target = _check_target(y, target, loss)
    _, eL = _loss_error(y, target, loss)
    eL = eL * layers[-1].slope
    qe, qg = config.quantizer("e"), config.quantizer("g")
    float_ops = reference == "float_operands"

    # float backward (the reference) and its error models
    errors: list[Array] = [np.empty(0)] * len(layers)
    e = eL
    for i in range(len(layers) - 1, -1, -1):
        errors[i] = e
        if i:
            W_ref = layers[i].W - layers[i].dW if float_ops else layers[i].W
            e = (e @ W_ref) * layers[i - 1].slope
    grads = {}
    for i, L in enumerate(layers):
        a_ref = L.a - L.da if float_ops else L.a
        grads[L.name] = errors[i].T @ a_ref

    mean, var, flags = _analytic(layers, errors, qe, qg, float_ops, smooth)
    mc_mean: dict[str, Array] = {}
    mc_var: dict[str, Array] = {}
    mc_mse: dict[str, Array] = {}
    if samples:
        mc_mean, mc_var, mc_mse = _monte_carlo(layers, eL, grads, mean, qe, qg, samples,
                                               seed)
    rows = []
    for L in layers:
        g = grads[L.name]
        mse_a = float(np.mean(var[L.name] + mean[L.name] ** 2))
        if samples:
            per = mc_mse[L.name]
            m = float(per.mean())
            half = _Z99 * float(per.std(ddof=1)) / np.sqrt(samples)
            ci = (m - half, m + half)
            bias_mc = float(np.mean(mc_mean[L.name] ** 2))
        else:
            m, ci, bias_mc = float("nan"), (float("nan"), float("nan")), float("nan")
        rows.append(GradientErrorRow(L.name, float(np.sqrt(np.mean(g * g))), mse_a,
                                     float(np.mean(mean[L.name] ** 2)), m, ci, bias_mc,
                                     *flags[L.name]))
    return GradientError(rows, grads, mean, var, mc_mean, mc_var, loss, int(samples),
                         int(seed), config, reference)


def smoothed_sr_variance(p: Array, sigma: Array) -> Array:
    """``E[f(p + u)]`` for ``f(w) = frac(w)(1 - frac(w))``, ``u ~ N(0, sigma²)`` (in steps).

    The variance of stochastic rounding, in units of ``s²``, of a value at fraction ``p``
    that upstream error has moved by ``u``: exact for Gaussian ``u``, from the truncated
    moments of ``u`` on every grid cell within 7 standard deviations. Equals ``p(1-p)``
    at ``sigma = 0`` and tends to ``1/6`` as ``sigma`` grows.
    """
    p, sigma = np.broadcast_arrays(np.asarray(p, float), np.asarray(sigma, float))
    out = p * (1.0 - p)
    wide = sigma > 3.0
    out = np.where(wide, 1.0 / 6.0, out)
    mid = (sigma > 0) & ~wide
    if np.any(mid):
        pm, sm = p[mid], sigma[mid]
        K = int(np.ceil(7 * sm.max())) + 1
        k = np.arange(-K, K + 1)[:, None]
        a, b = (k - pm) / sm, (k + 1 - pm) / sm  # cell [k, k+1) in units of sigma
        Pa, Pb = special.ndtr(a), special.ndtr(b)
        fa, fb = np.exp(-0.5 * a * a), np.exp(-0.5 * b * b)
        fa, fb = fa / np.sqrt(2 * np.pi), fb / np.sqrt(2 * np.pi)
        m0 = Pb - Pa
        m1 = fa - fb
        m2 = m0 + np.where(np.isfinite(a), a * fa, 0.0) - np.where(np.isfinite(b), b * fb, 0.0)
        # (t - a)(b - t) with t in units of sigma, times sigma² (the cell is in steps)
        val = (-m2 + (a + b) * m1 - a * b * m0) * sm * sm
        out = out.copy()
        out[mid] = np.sum(val, axis=0)
    return out


def _model(q: ShiftQuantizer | None, v: Array, upstream_var: Array | None = None
           ) -> ErrorModel | None:
    """Error model of ``q`` at the float value ``v``; for stochastic rounding with an
    upstream error of variance ``upstream_var`` (Gaussian), the variance is averaged over
    where that error moves the value (:func:`smoothed_sr_variance`)."""
    if q is None:
        return None
    grid = q.fit(v)
    em = grid.error_model(v)
    if upstream_var is None or q.rounding != "stochastic":
        return em
    s = np.broadcast_to(grid.scale, v.shape)
    p = v / s - np.floor(v / s)
    var = smoothed_sr_variance(p, np.sqrt(np.maximum(upstream_var, 0.0)) / s) * s * s
    return ErrorModel(em.max_abs, em.mean, np.where(em.clipped, 0.0, var), em.clipped,
                      em.width)


def _scale_may_flip(q: ShiftQuantizer | None, v: Array, upstream_var: Array) -> bool:
    """Whether the upstream error (3 standard deviations) can move ``max|v|`` across a
    power-of-two boundary of ``Shift``: the step would then double or halve, a jump that
    no noise model at the float value describes."""
    if q is None:
        return False
    spread = 3.0 * np.sqrt(np.maximum(upstream_var, 0.0))
    hi, lo = np.max(np.abs(v) + spread), np.max(np.abs(v) - spread)
    return bool(q.step(hi) != q.step(max(lo, 0.0)) if lo > 0 else hi > 0)


def _analytic(layers: Sequence[_Layer], errors: Sequence[Array], qe: ShiftQuantizer | None,
              qg: ShiftQuantizer | None, float_ops: bool, smooth: bool
              ) -> tuple[dict[str, Array], dict[str, Array], dict[str, tuple[bool, float]]]:
    """Per-element mean and variance of ``ΔG_l`` (see the module notes), and per layer
    whether a scale may flip and the fraction of clipped E and G elements."""
    mean: dict[str, Array] = {}
    var: dict[str, Array] = {}
    flags: dict[str, tuple[bool, float]] = {}
    B = errors[-1].shape[0]
    mu = np.zeros_like(errors[-1])  # mean of Δe_l, (B, d)
    cov = np.zeros((B, mu.shape[1], mu.shape[1]))  # covariance of Δe_l per batch row
    for i in range(len(layers) - 1, -1, -1):
        L, e = layers[i], errors[i]
        idx = np.arange(cov.shape[1])
        up = cov[:, idx, idx].copy()
        # the models are evaluated at the value the quantizer is expected to see, e + E Δe
        em = _model(qe, e + mu, up if smooth else None)
        flip, clipped, count = _scale_may_flip(qe, e + mu, up), 0, 0
        if em is not None:
            clipped, count = clipped + int(em.clipped.sum()), count + e.size
            mu = mu + em.mean
            # a saturated element forgets its upstream error (clip has slope 0 there)
            keep = (~em.clipped).astype(float)
            cov = cov * keep[:, :, None] * keep[:, None, :]
            cov[:, idx, idx] += em.var
        # ΔG = Δeᵀ â + eᵀ Δa + γ
        m = mu.T @ L.a + (e.T @ L.da if float_ops else 0.0)
        v = np.einsum("nii,nj->ij", cov, L.a * L.a)
        g_seen = (e + mu).T @ L.a  # the value Q_G rounds, in expectation
        gm = _model(qg, g_seen, v if smooth else None)
        if gm is not None:
            flip = flip or _scale_may_flip(qg, g_seen, v)
            clipped, count = clipped + int(gm.clipped.sum()), count + v.size
            m, v = m + gm.mean, np.where(gm.clipped, 0.0, v) + gm.var
        mean[L.name], var[L.name] = m, v
        flags[L.name] = (flip, clipped / count if count else 0.0)
        if i:
            # Δe_{l-1} = (Δe Ŵ + e ΔW) ⊙ f'
            D = layers[i - 1].slope
            mu = (mu @ L.W + (e @ L.dW if float_ops else 0.0)) * D
            M = L.W[None, :, :] * D[:, None, :]  # (B, out, in): Ŵ diag(f')
            cov = np.einsum("noi,nop,npj->nij", M, cov, M, optimize=True)
    return mean, var, flags


def _monte_carlo(layers: Sequence[_Layer], eL: Array, grads: dict[str, Array],
                 center: dict[str, Array], qe: ShiftQuantizer | None,
                 qg: ShiftQuantizer | None, samples: int, seed: int
                 ) -> tuple[dict[str, Array], dict[str, Array], dict[str, Array]]:
    """Repeat the quantized backward pass ``samples`` times, vectorized over samples.

    Moments are accumulated around ``center`` (the analytic mean), so a variance far
    below the squared mean does not cancel."""
    rng = np.random.default_rng(seed)
    s1 = {L.name: np.zeros_like(grads[L.name]) for L in layers}
    s2 = {L.name: np.zeros_like(grads[L.name]) for L in layers}
    per = {L.name: np.empty(samples) for L in layers}
    # a few live arrays of the largest per-sample size (an error or a gradient) under 2^28 B
    per_sample = max(max(L.a.shape[0] * L.W.shape[0], L.W.size, L.a.size) for L in layers)
    chunk = max(1, min(samples, int(2 ** 28 // (8 * 4 * per_sample))))
    for start in range(0, samples, chunk):
        S = min(chunk, samples - start)
        e = np.broadcast_to(eL, (S, *eL.shape))
        for i in range(len(layers) - 1, -1, -1):
            L = layers[i]
            if qe is not None:
                e = qe.quantize_stack(e, rng)
            G = np.swapaxes(e, 1, 2) @ L.a
            if qg is not None:
                G = qg.quantize_stack(G, rng)
            d = G - grads[L.name]
            per[L.name][start:start + S] = np.mean(d * d, axis=(1, 2))
            d = d - center[L.name]
            s1[L.name] += d.sum(axis=0)
            s2[L.name] += (d * d).sum(axis=0)
            if i:
                e = (e @ L.W) * layers[i - 1].slope
    shift = {k: v / samples for k, v in s1.items()}
    mc_var = {k: np.maximum(s2[k] - samples * shift[k] ** 2, 0.0) / (samples - 1) for k in s1}
    mc_mean = {k: center[k] + shift[k] for k in s1}
    return mc_mean, mc_var, per

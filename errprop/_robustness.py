"""Bit robustness: one error-vs-bits curve, a differentiable quantization penalty, and the
weights that sit on a rounding threshold.

* :func:`bit_curve` — the output error of a fixed model across bit widths (2..8 by default),
  analytic (first-order MSE by reverse mode), Monte Carlo (99% interval) and exact.
* :class:`QuantizationPenalty` — ``R(W)``, the first-order output MSE that round-to-nearest
  weight quantization is predicted to cause, as a function of the weights, with its exact
  gradient: a regularizer a training loop can add to make a model robust to quantization.
* :func:`threshold_weights` — per layer, the fraction of weights within ``ε`` steps of a
  rounding threshold (the weights that oscillate in quantization-aware training) and the
  first-order output-error change if they flipped to the other grid point.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ._analysis import analyze
from ._config import QuantConfig
from ._graph import Sequential
from ._montecarlo import monte_carlo
from ._op import Array
from ._fixed import Fixed
from ._quant import Quantizer, Uniform, UniformGrid
from ._wage import mlp_layers


# ------------------------------------------------------------------ bit curve
@dataclass(frozen=True)
class BitCurveRow:
    """One bit width: output MSE analytic (first order), Monte Carlo and exact."""

    bits: int
    mse_analytic: float
    mse_mc: float
    mse_ci: tuple[float, float]
    mse_exact: float
    signal: float  # mean square of the float output

    @property
    def sqnr_db(self) -> float:
        """Analytic output SQNR, ``10 log10(mean y² / mse)``."""
        return float(10 * np.log10(self.signal / self.mse_analytic)) \
            if self.mse_analytic > 0 else np.inf

    @property
    def inside(self) -> bool:
        return self.mse_ci[0] <= self.mse_analytic <= self.mse_ci[1]


@dataclass(frozen=True)
class BitCurve:
    """Result of :func:`bit_curve`: ``rows`` in bit order, and the settings."""

    rows: list[BitCurveRow]
    quantizer: Quantizer
    activations: Quantizer | None
    samples: int

    def table(self) -> str:
        head = (f"{'bits':>4} {'MSE analytic':>13} {'MSE MC':>11} {'99% CI':>23} "
                f"{'MSE exact':>11} {'SQNR dB':>8}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lo, hi = r.mse_ci
            lines.append(f"{r.bits:>4} {r.mse_analytic:>13.4g} {r.mse_mc:>11.4g} "
                         f"{lo:>11.4g}..{hi:<11.4g} {r.mse_exact:>11.4g} {r.sqnr_db:>8.2f}"
                         + ("" if r.inside else "  !"))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def bit_curve(net: Sequential, x: object, bits: Iterable[int] = range(2, 9), *,
              granularity: str = "channel", quantizer: Uniform | None = None,
              activations: Quantizer | None = None, samples: int = 200,
              seed: int = 0) -> BitCurve:
    """Output error of ``net`` on ``x`` with its weights quantized at each of ``bits``.

    Parameters
    ----------
    bits : bit widths (each 2..16).
    granularity : of the weight quantizer ``Uniform(b, granularity=...)``; or give
        ``quantizer`` (a :class:`Uniform` recipe; its ``with_bits`` makes each width).
    activations : quantizer of every Linear/Attention input, fixed across the curve (None:
        weights only).
    samples : Monte Carlo samples per width (noise mode: each weight error drawn from its
        model); 0 skips Monte Carlo.

    Returns
    -------
    BitCurve
        ``rows``: per width the analytic first-order output MSE (``analyze(...).mse``, exact
        reverse-mode statistics), the Monte Carlo MSE with its 99% interval, and the exact
        MSE of the one fake-quantized network.

    Notes
    -----
    The analytic and Monte Carlo columns describe the rounding-noise *model* (each weight's
    error uniform on ``[-s/2, s/2]``); the exact column is the one deterministic rounding of
    this model, a single draw that the model's spread should cover. At 2–3 bits first
    order and the noise model separate from the real network: the curve shows where.
    """
    template = quantizer if quantizer is not None else Uniform(8, granularity=granularity)
    if not isinstance(template, Uniform):
        raise TypeError(f"bit_curve: quantizer must be an errprop.Uniform recipe, got "
                        f"{type(template).__name__}")
    widths = [int(b) for b in bits]
    if not widths:
        raise ValueError("bit_curve: bits is empty")
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) \
            or samples < 0 or samples == 1:
        raise ValueError(f"bit_curve: samples must be 0 or an integer >= 2, got {samples!r}")
    rows = []
    for b in widths:
        config = QuantConfig(weights=template.with_bits(b), activations=activations)
        report = analyze(net, x, config, seed=seed)
        if samples:
            mc = monte_carlo(net, x, config, samples, seed=seed, quantiles=(), nodes=(),
                             progress=False)
            mse_mc, ci = float(mc.mse), (float(mc.mse_ci[0]), float(mc.mse_ci[1]))
        else:
            mse_mc, ci = float("nan"), (float("nan"), float("nan"))
        rows.append(BitCurveRow(b, float(report.mse), mse_mc, ci, float(report.exact_mse),
                                float(np.mean(report.output ** 2))))
    return BitCurve(rows, template, activations, int(samples))


# ------------------------------------------------------------------ penalty
def _check_penalty_quantizer(q: object) -> Uniform:
    if not isinstance(q, Uniform):
        raise TypeError(f"QuantizationPenalty: quantizer must be an errprop.Uniform, got "
                        f"{type(q).__name__}")
    if not (q.symmetric and q.rounding == "nearest" and q.clip == "minmax"
            and q.scale == "float" and q.granularity in ("tensor", "channel")
            and q.arithmetic == "float64"):
        raise ValueError(f"QuantizationPenalty models symmetric round-to-nearest weights with "
                         f"min-max float scales per tensor or per channel (the scale "
                         f"max|W|/qmax is then a differentiable function of W); got {q!r}")
    return q


class QuantizationPenalty:
    r"""The predicted output MSE of weight quantization, as a differentiable function of W.

    For an MLP ``z_l = a_{l-1} W_lᵀ + b_l``, ``a_l = f_l(z_l)`` (``l = 1..L``, output
    ``y = a_L``), round-to-nearest weight errors independent with variance ``s_{l,i}²/12``
    (``s_{l,i} = max_j |W_{l,ij}| / qmax`` per channel, or ``max |W_l| / qmax`` per tensor)
    give the first-order output MSE (mean over the ``B·K`` output elements)::

        R(W) = 1/(B K) Σ_l Σ_i (s_{l,i}²/12) Σ_n Σ_{j ≠ j_i} a_{l-1,n,j}² Σ_k (∂y_{n,k}/∂z_{l,n,i})²

    where ``j_i`` is the entry of row ``i`` that sets its scale (``|W_ij| = qmax·s``: it lies
    on the grid and has no error; per tensor only the row holding the maximum has one):
    exactly what :func:`errprop.analyze` reports as ``report.mse`` for
    ``QuantConfig(weights=quantizer)`` (the exact reverse-mode statistics). Its gradient
    with respect to every ``W_l`` is computed in closed form by reverse mode through the
    forward pass and the Jacobian recursion ``∂y/∂z_{l-1} = (∂y/∂z_l W_l) ⊙ f'_{l-1}``
    (which needs ``f''``), plus the subgradient of ``max|W|`` at the largest entry.

    Parameters
    ----------
    net : an MLP (Linear layers, each followed by at most one elementwise Activation).
    x : ``(batch, in)``, the data the penalty is averaged over.
    quantizer : :class:`Uniform`, symmetric, nearest, min-max, float scale, per tensor or
        per channel (default ``Uniform(4, granularity="channel")``).

    Notes
    -----
    ``R`` is piecewise smooth: the scale's ``max`` switches entries, and ReLU's ``f''`` is 0
    (units at the kink are non-differentiable). Biases are held fixed.
    """

    def __init__(self, net: Sequential, x: object, quantizer: Uniform | None = None) -> None:
        self.quantizer = _check_penalty_quantizer(
            Uniform(4, granularity="channel") if quantizer is None else quantizer)
        layers = mlp_layers(net, "QuantizationPenalty")
        for name, _, acts in layers:
            if len(acts) > 1:
                raise ValueError(f"QuantizationPenalty: Linear {name!r} is followed by "
                                 f"{len(acts)} activations; at most one is supported")
        self.names = [name for name, _, _ in layers]
        self.biases = [lin.params.get("b") for _, lin, _ in layers]
        self.acts = [acts[0] if acts else None for _, _, acts in layers]
        self.weights = [lin.params["W"].copy() for _, lin, _ in layers]
        self.x = np.asarray(x, dtype=np.float64)
        if self.x.ndim != 2 or self.x.shape[1] != self.weights[0].shape[1]:
            raise ValueError(f"QuantizationPenalty: x must be (batch, "
                             f"{self.weights[0].shape[1]}), got {self.x.shape}")

    def _check(self, Ws: Sequence[object]) -> list[Array]:
        if not Ws:
            return self.weights
        if len(Ws) != len(self.weights):
            raise ValueError(f"QuantizationPenalty: expected {len(self.weights)} weight "
                             f"matrices ({', '.join(self.names)}), got {len(Ws)}")
        out = []
        for name, W, ref in zip(self.names, Ws, self.weights):
            W = np.asarray(W, dtype=np.float64)
            if W.shape != ref.shape:
                raise ValueError(f"QuantizationPenalty: {name}.W must have shape "
                                 f"{ref.shape}, got {W.shape}")
            out.append(W)
        return out

    def _scale(self, W: Array) -> tuple[Array, Array]:
        """Per output row: the step ``s_i`` and the flat index of the entry that sets it."""
        qmax = self.quantizer.qmax
        if self.quantizer.granularity == "channel":
            j = np.argmax(np.abs(W), axis=1)
            idx = np.arange(W.shape[0]) * W.shape[1] + j
            return np.abs(W.ravel()[idx]) / qmax, idx
        k = int(np.argmax(np.abs(W)))
        return np.full(W.shape[0], abs(W.ravel()[k]) / qmax), np.full(W.shape[0], k)

    def _on_grid(self, W: Array, idx: Array) -> tuple[Array, Array]:
        """Rows whose scale-setting entry lies in them, and that entry's column."""
        rows = np.unique(idx // W.shape[1]) if self.quantizer.granularity == "tensor" \
            else np.arange(W.shape[0])
        return rows, idx[rows] % W.shape[1]

    def value(self, *Ws: object) -> float:
        """``R(W)`` (default: the network's own weights)."""
        return self.value_and_grad(*Ws)[0]

    def value_and_grad(self, *Ws: object) -> tuple[float, list[Array]]:
        """``R(W)`` and ``[∂R/∂W_1, ..., ∂R/∂W_L]`` (each of its weight's shape)."""
        W = self._check(Ws)
        L = len(W)
        # forward
        a, z, D, C = [self.x], [], [], []
        for l in range(L):
            zl = a[-1] @ W[l].T + (0.0 if self.biases[l] is None else self.biases[l])
            act = self.acts[l]
            if act is None:
                al, Dl, Cl = zl, np.ones_like(zl), np.zeros_like(zl)
            else:
                al = act.forward(zl)
                Dl, Cl = act.fn.d1(zl, al), act.fn.d2(zl, al)
            z.append(zl), a.append(al), D.append(Dl), C.append(Cl)
        B, K = a[-1].shape
        c = 1.0 / (B * K)
        # Jacobians G_l[k, n, i] = ∂y_{n,k}/∂z_{l,n,i}, H_l = G_{l+1} W_{l+1}
        G: list[Array] = [np.empty(0)] * L
        H: list[Array] = [np.empty(0)] * L
        G[L - 1] = np.eye(K)[:, None, :] * D[L - 1][None]
        for l in range(L - 1, 0, -1):
            H[l - 1] = G[l] @ W[l]
            G[l - 1] = H[l - 1] * D[l - 1][None]
        scales = [self._scale(Wl) for Wl in W]
        q = [s * s / 12.0 for s, _ in scales]
        A = [np.sum(a[l] ** 2, axis=1) for l in range(L)]  # ‖a_{l-1,n}‖², index l -> layer l+1
        T = [np.sum(G[l] ** 2, axis=0) for l in range(L)]  # (B, d_l)
        # the entry that sets a row's scale lies on the grid and has no error: its input's
        # square leaves row i's sum, E[n, i] = a_{l-1,n,j_i}² (rows without it: 0)
        rows, cols = zip(*(self._on_grid(Wl, idx) for Wl, (_, idx) in zip(W, scales)))
        E = [np.zeros((B, Wl.shape[0])) for Wl in W]
        for l in range(L):
            E[l][:, rows[l]] = a[l][:, cols[l]] ** 2
        value = c * sum(float(np.sum((A[l][:, None] - E[l]) * T[l] * q[l])) for l in range(L))

        # reverse: direct adjoints of R
        dW = [np.zeros_like(Wl) for Wl in W]
        dq = [c * np.sum((A[l][:, None] - E[l]) * T[l], axis=0) for l in range(L)]
        dA = [c * (T[l] @ q[l]) for l in range(L)]
        dE = [c * T[l][:, rows[l]] * q[l][rows[l]] for l in range(L)]  # adjoint of -E
        dG = [2.0 * c * q[l][None, None, :] * (A[l][:, None] - E[l])[None] * G[l]
              for l in range(L)]
        dz = [np.zeros_like(zl) for zl in z]
        # through the Jacobian recursion, l = 1 .. L
        for l in range(L - 1):
            dH = dG[l] * D[l][None]
            dz[l] += np.sum(dG[l] * H[l], axis=0) * C[l]
            dG[l + 1] = dG[l + 1] + dH @ W[l + 1].T
            dW[l + 1] += np.einsum("kni,knj->ij", G[l + 1], dH, optimize=True)
        dz[L - 1] += np.einsum("knk->nk", dG[L - 1]) * C[L - 1]
        # through the forward pass, l = L .. 1
        da = np.zeros_like(a[-1])
        for l in range(L - 1, -1, -1):
            dz[l] += da * D[l]
            dW[l] += dz[l].T @ a[l]
            da = dz[l] @ W[l] + 2.0 * dA[l][:, None] * a[l]
            np.add.at(da.T, cols[l], -2.0 * (dE[l] * a[l][:, cols[l]]).T)
        # through the scales s = max|W| / qmax (at the entry that attains the max)
        for l in range(L):
            s, idx = scales[l]
            ds = dq[l] * s / 6.0
            flat = dW[l].reshape(-1)
            np.add.at(flat, idx, ds * np.sign(W[l].ravel()[idx]) / self.quantizer.qmax)
        return value, dW


# ------------------------------------------------------------------ threshold weights
@dataclass(frozen=True)
class ThresholdRow:
    """One weight tensor: the weights within ``eps`` steps of a rounding threshold.

    ``fraction`` of ``count`` weights are near (``2·eps`` for weights spread evenly over a
    step); ``mask`` marks them and ``delta`` holds the change of their quantized value if
    they flipped to the other grid point (``±s``, 0 elsewhere). ``change`` is the first-order
    output change of flipping them all; ``mse_change`` the resulting first-order change of
    the output MSE, ``mean((e + change)²) - mean(e²)`` with ``e`` the first-order output
    error of the configuration; ``exact_mse_change`` the same through the real network.
    """

    source: str
    count: int
    near: int
    mask: Array
    delta: Array
    change: Array
    mse_change: float
    exact_mse_change: float

    @property
    def fraction(self) -> float:
        return self.near / self.count if self.count else 0.0

    @property
    def change_rms(self) -> float:
        return float(np.sqrt(np.mean(self.change ** 2)))


@dataclass(frozen=True)
class ThresholdWeights:
    """Result of :func:`threshold_weights`: one row per weight source, and the baseline."""

    rows: list[ThresholdRow]
    eps: float
    mse: float  # first-order output MSE of the configuration (this draw: mean(e²))
    exact_mse: float

    def row(self, source: str) -> ThresholdRow:
        for r in self.rows:
            if r.source == source:
                return r
        raise KeyError(f"no weight source {source!r}; sources: "
                       f"{', '.join(r.source for r in self.rows)}")

    def table(self) -> str:
        head = (f"{'source':<14} {'weights':>8} {'near':>6} {'fraction':>9} "
                f"{'rms change':>11} {'ΔMSE 1st order':>15} {'ΔMSE exact':>11}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.source:<14} {r.count:>8} {r.near:>6} {r.fraction:>9.2%} "
                         f"{r.change_rms:>11.3g} {r.mse_change:>15.3g} "
                         f"{r.exact_mse_change:>11.3g}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def threshold_weights(net: Sequential, x: object, config: QuantConfig | Quantizer,
                      eps: float = 0.05) -> ThresholdWeights:
    """Per weight tensor, the weights within ``eps`` steps of a rounding threshold.

    Parameters
    ----------
    net, x : the network and the batch (any graph :func:`errprop.analyze` takes).
    config : a :class:`QuantConfig`, or a quantizer for the weights alone. The weights of
        layers with one weight tensor (Linear) quantized by round-to-nearest uniform grids
        are examined.
    eps : in units of the step, in ``(0, 0.5]``: a weight ``w`` is near when
        ``| |w/s - round(w/s)| - 1/2 | < eps`` and its other neighbour is on the grid.

    Returns
    -------
    ThresholdWeights
        Per source: the fraction near a threshold, the first-order output change if they
        all flipped to the other grid point (one analysis per source with ``Fixed``
        weights), and the first-order and exact change of the output MSE.
    """
    if not (isinstance(eps, (int, float)) and 0 < eps <= 0.5):
        raise ValueError(f"threshold_weights: eps must be in (0, 0.5], got {eps!r}")
    if isinstance(config, Quantizer):
        config = QuantConfig(weights=config)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"threshold_weights: config must be a QuantConfig or a quantizer, "
                        f"got {type(config).__name__}")
    base = analyze(net, x, config)
    e0 = base.first_order
    rows = []
    for name, src in base.sources.items():
        grid = src.grid
        if src.kind != "weight" or not isinstance(grid, UniformGrid) \
                or grid.rounding != "nearest" \
                or len(_weight_params(net, src.source.layer)) != 1:
            continue
        W = src.value
        s = np.broadcast_to(grid.scale, W.shape)
        u = W / s
        r = u - np.rint(u)
        other = np.rint(u) + np.where(r >= 0, 1.0, -1.0) + np.broadcast_to(grid.zero_point,
                                                                           W.shape)
        mask = (np.abs(0.5 - np.abs(r)) < eps) & ~src.model.clipped \
            & (other >= grid.qmin) & (other <= grid.qmax)
        delta = np.where(mask, np.where(r >= 0, s, -s), 0.0)
        layer = src.source.layer
        overrides = {k: v for k, v in config.overrides.items() if k != layer}
        q_flip = W + src.error + delta
        flipped = QuantConfig(weights=config.weights, biases=config.biases,
                              activations=config.activations, input=config.input,
                              norms=config.norms, embeddings=config.embeddings,
                              hardware=config.hardware,
                              overrides={**overrides, layer: {"weights": Fixed(q_flip)}})
        alone = analyze(net, x, QuantConfig(
            overrides={layer: {"weights": Fixed(W + delta)}}))
        change = alone.contributions.get(name, np.zeros_like(e0))
        exact = analyze(net, x, flipped)
        rows.append(ThresholdRow(name, int(W.size), int(mask.sum()), mask, delta, change,
                                 float(np.mean((e0 + change) ** 2) - np.mean(e0 ** 2)),
                                 float(exact.exact_mse - base.exact_mse)))
    return ThresholdWeights(rows, float(eps), float(np.mean(e0 ** 2)), float(base.exact_mse))


def _weight_params(net: Sequential, layer: str) -> list[str]:
    op = net[layer]
    return [p for p, kind in op.params.items() if op.param_kinds.get(p) == "weight"]

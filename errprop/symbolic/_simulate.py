"""Exact numerical runs of the random networks the mean-field closed forms describe."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from .._activation import Activation
from .._attention import Attention
from .._graph import Parallel, Residual, Sequential
from .._linear import Linear
from .._merge import Mul
from .._network import Network, walk
from .._norm import LayerNorm
from .._quant import Uniform
from ._meanfield import ARCHITECTURES, MeanField


def random_network(architecture: str, depth: int, width: int, *, activation: str = "relu",
                   sigma_w2: float = 2.0, logit_scale: float = 1.0, heads: int = 4,
                   seed: int = 0, transform: Callable[[np.ndarray], np.ndarray] | None = None
                   ) -> Sequential:
    """The network of :func:`mean_field`: weights ``N(0, σ_w²/n)``, no biases, LayerNorm
    with ``γ = 1, β = 0``; attention's logit scale multiplies ``W_q``; ``swiglu`` blocks
    are ``x + W_d (φ(W_g x) ⊙ W_u x)`` (a ``Parallel`` with a ``Mul`` merge). ``transform`` is
    applied to every weight matrix (a quantizer: the same seed gives the quantized twin)."""
    return _build(architecture, depth, width, activation=activation, sigma_w2=sigma_w2,
                  logit_scale=logit_scale, heads=heads, seed=seed, transform=transform)[0]


def _build(architecture: str, depth: int, width: int, *, activation: str, sigma_w2: float,
           logit_scale: float, heads: int, seed: int,
           transform: Callable[[np.ndarray], np.ndarray] | None) -> tuple[Sequential, list]:
    """:func:`random_network` and the op (or block) whose output is depth ``1..L``."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    rng = np.random.default_rng(seed)

    def W(scale: float = 1.0) -> np.ndarray:
        w = scale * rng.normal(0.0, np.sqrt(sigma_w2 / width), (width, width))
        return w if transform is None else transform(w)

    def norm() -> LayerNorm:
        return LayerNorm(np.ones(width), np.zeros(width))

    layers: list = []
    marks: list = []
    for layer in range(depth):
        if architecture == "mlp":
            if layer:
                layers.append(Activation(activation))
            layers.append(Linear(W()))
        elif architecture == "residual":
            layers.append(Residual(Linear(W()), Activation(activation), Linear(W())))
        elif architecture == "prenorm":
            layers.append(Residual(norm(), Linear(W()), Activation(activation), Linear(W())))
        elif architecture == "attention":
            layers.append(Residual(norm(), Attention(W(logit_scale), W(), W(), W(),
                                                     heads=heads)))
        else:
            gate, up, down = Linear(W()), Linear(W()), Linear(W())
            layers.append(Residual(Parallel([gate, Activation(activation)], [up], merge=Mul()),
                                   down))
        marks.append(layers[-1])
    return Sequential(layers), marks


def simulate(architecture: str, depth: int, width: int, *, activation: str = "relu",
             sigma_w2: float = 2.0, bits: int = 8, logit_scale: float = 1.0,
             tokens: int = 16, heads: int = 4, batch: int = 64,
             seeds: Iterable[int] = (0,)) -> MeanField:
    """Measured signal ``E x_l²`` and exact error ``E Δx_l²`` per unit after each layer
    (MLP) or block, averaged over ``seeds`` (new weights and inputs ``N(0, 1)`` each),
    with every weight quantized per channel to ``bits`` (fake quantization, as
    :func:`errprop.analyze` runs it; one run of depth ``L`` gives every depth ``1..L``)."""
    quantizer = Uniform(bits, granularity="channel")

    def quantize(w: np.ndarray) -> np.ndarray:
        return quantizer.fit(w, channel_axis=0).quantize(w)

    qs, vs = [], []
    for seed in seeds:
        built = [_build(architecture, depth, width, activation=activation, sigma_w2=sigma_w2,
                        logit_scale=logit_scale, heads=heads, seed=seed, transform=t)
                 for t in (None, quantize)]
        shape = (batch, tokens, width) if architecture == "attention" else (batch, width)
        x = np.random.default_rng(10_000 + seed).standard_normal(shape)
        ref, quant = (_node_values(net, x) for net, _ in built)
        net, marks = built[0]
        names = [net.name_of(m) for m in marks]
        qs.append([float(np.mean(ref[k] ** 2)) for k in names])
        vs.append([float(np.mean((quant[k] - ref[k]) ** 2)) for k in names])
    return MeanField(architecture, np.arange(1, depth + 1), np.mean(qs, axis=0),
                     np.mean(vs, axis=0))


class _Record:
    def __init__(self) -> None:
        self.values: dict[str, np.ndarray] = {}

    def leaf(self, name, op, x):
        self.values[name] = op.forward(x)
        return self.values[name]

    def merge(self, name, op, xs):
        self.values[name] = op.forward(xs)
        return self.values[name]


def _node_values(net: Network, x: np.ndarray) -> dict[str, np.ndarray]:
    record = _Record()
    walk(net, x, record)
    return record.values

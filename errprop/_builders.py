"""Seeded builders for the networks used in examples, tests and papers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._activation import Activation, check_activation
from ._attention import Attention
from ._checks import check_bool, check_choice, check_int, check_seed
from ._graph import Residual, Sequential
from ._linear import Linear
from ._norm import LayerNorm

#: variance gain of the weight init per activation (He for ReLU, LeCun otherwise)
_GAIN = {"relu": 2.0}


def _rng(seed: int | np.random.Generator, owner: str) -> np.random.Generator:
    """A generator, or one seeded by a non-negative integer (never None: builders are
    reproducible)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(check_seed(seed, owner, allow_none=False))


def _positive_int(value: object, owner: str, what: str) -> int:
    return check_int(value, owner, what, minimum=1)


def _dense(rng: np.random.Generator, n_in: int, n_out: int, gain: float, *,
           bias: bool = True, name: str | None = None) -> Linear:
    W = rng.normal(0.0, np.sqrt(gain / n_in), size=(n_out, n_in))
    b = rng.normal(0.0, 0.1, size=n_out) if bias else None
    return Linear(W, b, name=name)


def mlp(widths: Sequence[int], activation: str = "relu", *, seed: int | np.random.Generator = 0,
        bias: bool = True, name: str | None = None) -> Sequential:
    """A multilayer perceptron ``widths[0] -> ... -> widths[-1]``.

    Layers are ``fc1, <act>1, fc2, <act>2, ..., fcL`` (no activation after the
    last). Weights ``N(0, g/fan_in)`` with ``g = 2`` for ReLU and 1 otherwise,
    biases ``N(0, 0.1²)``.
    """
    if isinstance(widths, (str, bytes)) or not isinstance(widths, (Sequence, np.ndarray)):
        raise TypeError(f"mlp: widths must be a list of layer sizes, e.g. [784, 256, 10], "
                        f"got {widths!r}")
    widths = [_positive_int(w, "mlp", f"widths[{i}]") for i, w in enumerate(widths)]
    if len(widths) < 2:
        raise ValueError(f"mlp: widths needs at least an input and an output size, got {widths}")
    check_activation(activation, "mlp")
    bias = check_bool(bias, "mlp", "bias")
    rng = _rng(seed, "mlp")
    gain = _GAIN.get(activation, 1.0)
    layers: list = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(_dense(rng, n_in, n_out, gain if i else 1.0, bias=bias))
        if i < len(widths) - 2:
            layers.append(Activation(activation))
    return Sequential(layers, name=name)


def _attention(rng: np.random.Generator, d: int, heads: int, causal: bool) -> Attention:
    std = np.sqrt(1.0 / d)
    Wq, Wk, Wv, Wo = (rng.normal(0.0, std, size=(d, d)) for _ in range(4))
    bq, bk, bv, bo = (rng.normal(0.0, 0.02, size=d) for _ in range(4))
    return Attention(Wq, Wk, Wv, Wo, bq, bk, bv, bo, heads=heads, causal=causal, name="attn")


def _layer_norm(rng: np.random.Generator, d: int, name: str) -> LayerNorm:
    return LayerNorm(1.0 + 0.1 * rng.normal(size=d), 0.05 * rng.normal(size=d), name=name)


def transformer_block(d_model: int, heads: int, d_ff: int, *, norm: str = "pre",
                      activation: str = "gelu", causal: bool = False,
                      seed: int | np.random.Generator = 0, name: str | None = None) -> Sequential:
    """One encoder block on ``(batch, tokens, d_model)``.

    ``norm="pre"``: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``;
    ``norm="post"`` (original Transformer / BERT): ``ln1(x + attn(x))``, then
    ``ln2(x + mlp(x))``. The MLP is ``fc1 -> activation -> fc2`` in a scope
    ``mlp``, so nodes read ``block0.attn``, ``block0.mlp.fc1``, ``block0.res1``.
    """
    owner = "transformer_block"
    d_model = _positive_int(d_model, owner, "d_model")
    heads = _positive_int(heads, owner, "heads")
    d_ff = _positive_int(d_ff, owner, "d_ff")
    if d_model % heads:
        raise ValueError(f"transformer_block: heads ({heads}) must divide d_model ({d_model})")
    check_choice(norm, owner, "norm", ("pre", "post"))
    check_activation(activation, owner)
    causal = check_bool(causal, owner, "causal")
    rng = _rng(seed, owner)
    attn = _attention(rng, d_model, heads, causal)
    ffn = Sequential([_dense(rng, d_model, d_ff, 1.0, name="fc1"), Activation(activation),
                      _dense(rng, d_ff, d_model, _GAIN.get(activation, 1.0), name="fc2")],
                     name="mlp")
    ln1, ln2 = _layer_norm(rng, d_model, "ln1"), _layer_norm(rng, d_model, "ln2")
    if norm == "pre":
        layers = [Residual(ln1, attn), Residual(ln2, ffn)]
    else:
        layers = [Residual(attn), ln1, Residual(ffn), ln2]
    return Sequential(layers, name=name)


def transformer(d_model: int, heads: int, d_ff: int, blocks: int, *, norm: str = "pre",
                activation: str = "gelu", causal: bool = False,
                seed: int | np.random.Generator = 0) -> Sequential:
    """A stack of ``blocks`` encoder blocks named ``block0, block1, ...``.

    Pre-norm stacks end with a final LayerNorm ``ln_f``, as GPT-2 and ViT do.
    """
    blocks = _positive_int(blocks, "transformer", "blocks")
    for what, value in (("d_model", d_model), ("heads", heads), ("d_ff", d_ff)):
        _positive_int(value, "transformer", what)
    rng = _rng(seed, "transformer")
    layers: list = [transformer_block(d_model, heads, d_ff, norm=norm, activation=activation,
                                      causal=causal, seed=rng, name=f"block{i}")
                    for i in range(blocks)]
    if norm == "pre":
        layers.append(_layer_norm(rng, d_model, "ln_f"))
    return Sequential(layers)

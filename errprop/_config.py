"""Where quantization error enters: sources and the config that maps them to quantizers.

Source names
------------
``"<layer>.<param>"`` for a parameter (``fc1.W``, ``fc1.b``, ``block0.attn.Wq``,
``block0.ln1.gamma``), ``"<layer>.in"`` for the quantized input of a Linear or
Attention layer (activation quantization), and ``"input"`` for the network input.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._graph import Sequential, suggest
from ._op import Array, Op
from ._hwgap import IntegerKernel
from ._quant import Quantizer

#: QuantConfig field -> the parameter kind it quantizes.
_PARAM_FIELDS = {"weights": "weight", "biases": "bias", "norms": "norm",
                 "embeddings": "embedding"}
_FIELDS = (*_PARAM_FIELDS, "activations")


@dataclass(frozen=True)
class Source:
    """One place where error enters: a parameter, a layer input, or the network input."""

    name: str
    layer: str | None  # None for the network input
    kind: str  # "weight" | "bias" | "norm" | "embedding" | "activation" | "input"
    param: str | None  # parameter key for weight/bias/norm sources
    quantizer: Quantizer


@dataclass(frozen=True)
class QuantConfig:
    """Which quantizer applies to which source.

    Parameters
    ----------
    weights, biases : quantizer or None, for the weights (Linear ``W``,
        Attention ``Wq Wk Wv Wo``) and biases of every layer.
    activations : quantizer or None, for the input of every Linear and
        Attention layer. Its range is calibrated per layer on the *float*
        activations of the analysed batch (per tensor by default), then applied
        to the activations the quantized network actually produces.
    input : quantizer or None, for the network input. A layer that reads the network
        input and also quantizes its input rounds the already quantized values (one
        rounding, not two: with equal recipes its own source is exactly zero).
    norms : quantizer or None, for LayerNorm/RMSNorm ``gamma`` and ``beta``.
    embeddings : quantizer or None, for the tables of an ``Embedding`` (word, position,
        token type; per channel means one scale per table row, i.e. per token).
    hardware : :class:`errprop.IntegerKernel` or None: the integer-only kernel the network is
        deployed with; adds the hardware-gap sources ``<layer>.acc``,
        ``<layer>.in.rescale`` and ``<layer>.in.rounding`` (see errprop/_hwgap.py).
    overrides : mapping ``pattern -> {field: quantizer or None}``. A pattern is a
        layer name or an ``fnmatch`` glob (``"block0.*"``); fields are
        ``weights``, ``biases``, ``activations``, ``norms``, ``embeddings``. Later entries win.
        A pattern that matches no layer is an error.

    Examples
    --------
    >>> QuantConfig(weights=Uniform(8), overrides={"fc1": {"weights": Uniform(4)}})
    """

    weights: Quantizer | None = None
    biases: Quantizer | None = None
    activations: Quantizer | None = None
    input: Quantizer | None = None
    norms: Quantizer | None = None
    embeddings: Quantizer | None = None
    hardware: IntegerKernel | None = None
    overrides: Mapping[str, Mapping[str, Quantizer | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in (*_FIELDS, "input"):
            _check_quantizer(getattr(self, key), key)
        if not isinstance(self.overrides, Mapping):
            raise TypeError(f"QuantConfig: overrides must be a mapping pattern -> "
                            f"{{field: quantizer}}, got {type(self.overrides).__name__}")
        if self.hardware is not None and not isinstance(self.hardware, IntegerKernel):
            raise TypeError(f"QuantConfig: hardware must be an errprop.IntegerKernel or None, "
                            f"got {type(self.hardware).__name__}")
        for pattern, spec in self.overrides.items():
            if not isinstance(pattern, str) or not pattern:
                raise TypeError(f"QuantConfig: override keys must be layer names or globs, "
                                f"got {pattern!r}")
            if not isinstance(spec, Mapping):
                raise TypeError(f"QuantConfig: override {pattern!r} must map fields "
                                f"({', '.join(_FIELDS)}) to quantizers, got "
                                f"{type(spec).__name__}")
            for key, q in spec.items():
                if key not in _FIELDS:
                    hint = " (the network input is set with QuantConfig(input=...))" \
                        if key == "input" else ""
                    raise ValueError(f"QuantConfig: override {pattern!r} has unknown field "
                                     f"{key!r}; expected one of {', '.join(_FIELDS)}{hint}")
                _check_quantizer(q, f"overrides[{pattern!r}][{key!r}]")

    def _for_layer(self, name: str) -> dict[str, Quantizer | None]:
        chosen: dict[str, object] = {key: getattr(self, key) for key in _FIELDS}
        for pattern, spec in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                chosen.update(spec)
        return chosen  # type: ignore[return-value]

    def sources(self, net: Sequential) -> list[Source]:
        """All error sources of ``net`` under this config, in execution order."""
        layers = net.layers()
        names = [name for name, _ in layers]
        for pattern in self.overrides:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(f"QuantConfig: override {pattern!r} matches no layer"
                                 f"{suggest(pattern, names)}")
        out: list[Source] = []
        if self.input is not None:
            if layers and layers[0][1].integer_input:
                raise ValueError(f"QuantConfig: input quantization does not apply: the network "
                                 f"starts with {layers[0][0]!r}, whose input is integer ids")
            out.append(Source("input", None, "input", None, self.input))
        for name, op in layers:
            out.extend(_layer_sources(name, op, self._for_layer(name)))
        if self.hardware is not None:
            out = self.hardware.sources(net, out)
        return out


def _layer_sources(name: str, op: Op, chosen: Mapping[str, Quantizer | None]) -> list[Source]:
    out = []
    q_act = chosen["activations"]
    if op.quantize_input and q_act is not None:
        out.append(Source(f"{name}.in", name, "activation", None, q_act))
    by_kind = {kind: chosen[f] for f, kind in _PARAM_FIELDS.items()}
    for param, kind in op.param_kinds.items():
        q = by_kind[kind]
        if q is not None:
            out.append(Source(f"{name}.{param}", name, kind, param, q))
    return out


def _check_quantizer(q: object, where: str) -> None:
    if q is not None and not isinstance(q, Quantizer):
        raise TypeError(f"QuantConfig: {where} must be a quantizer (e.g. Uniform(8)) or None, "
                        f"got {type(q).__name__}")


def seen_by_quantizer(layer_input: Array, network_input: Array,
                      input_error: Array | None) -> Array:
    """The float value an activation quantizer of a layer is evaluated at.

    A layer that reads the network input directly gets it already quantized by the
    ``input`` source, so its own quantizer rounds ``x + e_input``, not ``x``: one
    tensor is never rounded twice as if independently. With equal recipes the second
    rounding is exactly zero (``Q(Q(x)) = Q(x)``); with different grids it is the
    real second rounding. Identity (``is``), not equality, says the layer reads the
    network input: every pass hands the input array itself to the first layers.
    """
    if input_error is not None and layer_input is network_input:
        return network_input + input_error
    return layer_input

"""Import PyTorch modules: ``from_torch(module)`` -> an errprop ``Sequential``.

Supported: ``nn.Sequential`` (nested), ``Linear``, ``ReLU``, ``GELU`` (``approximate``
``'none'`` and ``'tanh'``), ``Tanh``, ``Sigmoid``, ``SiLU``, ``Softmax``, ``LayerNorm``
and ``RMSNorm`` (over the last axis), ``MultiheadAttention`` (self-attention),
``TransformerEncoderLayer`` (both norm orders), ``TransformerEncoder``; ``Identity`` and
``Dropout`` are dropped (eval semantics); quantized ``torch.ao`` modules are listed as
unsupported. TorchScript modules (``torch.jit.script``, or a saved one loaded with
``trusted=True``) convert the same way through their ``original_name``; traced modules
too as long as no attribute the conversion needs was lost in tracing.

Node names are the torch module paths: ``'0'``, ``'2.1'``, ``'layers.0.linear1'``,
``'layers.0.self_attn'``. errprop uses ``.`` for its scopes, so each torch container
becomes a named ``Sequential`` scope and the path reads the same. Nodes that torch has
no module for get errprop's derived names in the same scope: the residual joins
``layers.0.res1`` / ``res2`` and a functional activation ``layers.0.activation``.

torch is imported lazily; it is an optional extra (``pip install "errprop[torch]"``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ._optional import optional
from ._activation import Activation, Softmax
from ._attention import Attention
from ._checks import check_bool, check_int
from ._files import MEMORY_LIMIT
from ._graph import Residual, Sequential
from ._linear import Linear
from ._norm import LayerNorm, RMSNorm
from ._op import Op
from ._torch_load import load_torch_file

_ELEMENTWISE = {"ReLU": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "SiLU": "silu"}
_DROPPED = ("Identity", "Dropout")
_BAD_NAME_CHARS = str.maketrans({c: "_" for c in "*?[]"})
#: torch.ao's quantized, QAT and observer modules: their classes reuse float names
#: (``Linear``) but hold packed integer weights, so they must not match the float rules
_QUANTIZED = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic", "torch.ao.nn.qat",
              "torch.ao.nn.quantizable", "torch.ao.nn.sparse", "torch.ao.quantization",
              "torch.nn.quantized", "torch.nn.intrinsic", "torch.nn.qat",
              "torch.nn.quantizable")


def import_torch() -> Any:
    """``import torch``, or an ImportError that names the extra to install."""
    return optional("torch", feature="errprop.from_torch", extra="torch")


def from_torch(module: Any, *, trusted: bool = False,
               memory_limit: int = MEMORY_LIMIT) -> Sequential:
    """Convert a PyTorch module (or a TorchScript file) to an errprop network.

    Parameters
    ----------
    module : ``torch.nn.Module``, a TorchScript module, or a path to a ``.pt`` file.
        A path is treated as untrusted: anything but TorchScript is read only with
        ``torch.load(..., weights_only=True)``, which refuses pickled modules (they can run
        arbitrary code when unpickled) and yields at most a ``state_dict``, which has no
        architecture: both raise a ``ValueError`` that says what to do instead.
    trusted : a TorchScript archive (``torch.jit.save``) runs the code stored in it when it
        is loaded (its ``__setstate__`` and methods), so a path to one is refused with an
        :class:`errprop.UntrustedCodeError` unless ``trusted=True``.
    memory_limit : bytes; a ``.pt`` archive whose members declare more is refused before
        torch reads it (default 4 GiB).

    Returns
    -------
    Sequential
        The float forward ``net(x)`` equals the module's eval-mode output (dropout off).
        Inputs are ``(batch, features)`` or ``(batch, tokens, features)``; with attention
        always ``(batch, tokens, d_model)``, also for ``batch_first=False`` modules (pass
        ``x_torch.transpose(0, 1)``).

    Raises
    ------
    ImportError
        torch is not installed.
    ValueError
        One error listing *every* unsupported module (path and type, and why).

    Notes
    -----
    * ``Softmax(dim=d)`` with ``d ≥ 0`` is read for the input rank errprop uses
      (3 when the module has attention, else 2); ``dim=None`` is refused.
    * ``TransformerEncoderLayer(activation=nn.GELU(approximate='tanh'))`` converts to
      ``gelu_tanh``, which is what its slow path computes; torch's fused eval fast path
      (``torch.no_grad()``) computes the erf GELU there instead (torch 2.13).
    * ``LayerNorm(elementwise_affine=False)`` / ``bias=False`` get ``gamma = 1`` /
      ``beta = 0``; a norm quantizer represents both exactly.
    * ``RMSNorm(eps=None)`` gets torch's default, the machine epsilon of the module's
      weight dtype (``torch.finfo(torch.float32).eps`` for a float32 module).
    """
    trusted = check_bool(trusted, "from_torch", "trusted")
    memory_limit = check_int(memory_limit, "from_torch", "memory_limit", minimum=1)
    torch = import_torch()
    if isinstance(module, (str, os.PathLike)):
        module = load_torch_file(torch, Path(module), trusted=trusted,
                                 memory_limit=memory_limit)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch expects a torch.nn.Module, a TorchScript module or a "
                        f"path to a .pt file, got {type(module).__name__}")
    conv = _Converter(torch, rank=3 if _has_attention(torch, module) else 2)
    layers = conv.convert_root(module)
    if conv.problems:
        lines = "\n".join(f"  {path or '<root>'} ({kind}): {why}"
                          for path, kind, why in conv.problems)
        raise ValueError(f"from_torch: {len(conv.problems)} unsupported module(s):\n{lines}\n"
                         f"Supported: Sequential, Linear, ReLU, GELU, Tanh, Sigmoid, SiLU, "
                         f"Softmax, LayerNorm, RMSNorm, MultiheadAttention, "
                         f"TransformerEncoderLayer, TransformerEncoder, Identity, Dropout.")
    return Sequential(layers or [Activation("identity")])


# ------------------------------------------------------------------ conversion
def _kind(torch: Any, m: Any) -> str:
    """The torch class name of ``m`` (TorchScript keeps it as ``original_name``), or a
    qualified name for classes defined outside torch (their forward is unknown)."""
    if isinstance(m, torch.jit.ScriptModule):
        qualified = str(m._c._type().qualified_name())  # __torch__.torch.ao.nn...Linear
        if qualified.removeprefix("__torch__.").startswith(_QUANTIZED):
            return f"quantized {m.original_name}"
        return str(m.original_name)
    cls = type(m)
    if cls.__module__.startswith(_QUANTIZED):
        return f"quantized {cls.__name__}"
    if cls.__module__.startswith("torch."):
        return cls.__name__
    return f"{cls.__module__}.{cls.__qualname__}"


def _has_attention(torch: Any, module: Any) -> bool:
    names = {"MultiheadAttention", "TransformerEncoderLayer", "TransformerEncoder"}
    return any(_kind(torch, m) in names for m in module.modules())


def _local(name: str) -> str:
    return name.translate(_BAD_NAME_CHARS)


class _Missing(Exception):
    """An attribute the conversion needs is not on the (traced) module."""


class _Converter:
    def __init__(self, torch: Any, rank: int) -> None:
        self.torch = torch
        self.rank = rank
        self.problems: list[tuple[str, str, str]] = []

    # -------------------------------------------------------------- helpers
    def array(self, t: Any) -> Any:
        return t.detach().cpu().to(self.torch.float64).numpy()

    @staticmethod
    def attr(m: Any, key: str) -> Any:
        try:
            return getattr(m, key)
        except AttributeError:
            raise _Missing(key) from None

    def child(self, m: Any, key: str) -> Any:
        return dict(m.named_children())[key]

    def fail(self, path: str, kind: str, why: str) -> list:
        self.problems.append((path, kind, why))
        return []

    # -------------------------------------------------------------- dispatch
    def convert_root(self, m: Any) -> list:
        kind = _kind(self.torch, m)
        if kind in ("Sequential", "TransformerEncoder", "TransformerEncoderLayer"):
            return self.scope_children(m, "", kind)
        return self.leaf(m, "", kind, None)  # a lone layer keeps errprop's derived name

    def convert(self, m: Any, path: str, local: str, *, in_sequential: bool = False) -> list:
        """The errprop nodes for module ``m`` at torch path ``path`` (its name ``local``)."""
        kind = _kind(self.torch, m)
        if kind in ("Sequential", "TransformerEncoder", "TransformerEncoderLayer"):
            inner = self.scope_children(m, path, kind)
            return [Sequential(inner, name=_local(local))] if inner else []
        if kind == "MultiheadAttention" and in_sequential:
            return self.fail(path, kind, "inside nn.Sequential it would receive one input but "
                             "takes (query, key, value) and returns a tuple; use it on its "
                             "own or inside TransformerEncoderLayer")
        return self.leaf(m, path, kind, local)

    def scope_children(self, m: Any, path: str, kind: str) -> list:
        try:
            if kind == "Sequential":
                out: list = []
                for key, c in m.named_children():
                    out += self.convert(c, _join(path, key), key, in_sequential=True)
                return out
            if kind == "TransformerEncoder":
                return self.encoder(m, path)
            return self.encoder_layer(m, path)
        except _Missing as exc:
            return self.fail(path, kind, _missing_message(str(exc)))

    def leaf(self, m: Any, path: str, kind: str, local: str | None) -> list:
        name = None if local is None else _local(local)
        try:
            build = _LEAVES.get(kind)
            if build is None:
                if kind in _DROPPED:
                    return []
                why = _QUANTIZED_WHY if kind.startswith("quantized ") else \
                    "not a supported module" if "." not in kind else \
                    "a custom module: its forward is arbitrary Python (compose it from " \
                    "nn.Sequential, or export it to ONNX)"
                return self.fail(path, kind, why)
            op = build(self, m, name)
        except _Missing as exc:
            return self.fail(path, kind, _missing_message(str(exc)))
        except _Unsupported as exc:
            return self.fail(path, kind, str(exc))
        return [op]

    # -------------------------------------------------------------- containers
    def encoder(self, m: Any, path: str) -> list:
        layers_mod = self.child(m, "layers")
        blocks = []
        for key, layer in layers_mod.named_children():
            lkind = _kind(self.torch, layer)
            lpath = _join(_join(path, "layers"), key)
            if lkind != "TransformerEncoderLayer":
                self.fail(lpath, lkind, "TransformerEncoder layers must be "
                          "TransformerEncoderLayer")
                continue
            inner = self.scope_children(layer, lpath, lkind)
            if inner:
                blocks.append(Sequential(inner, name=_local(key)))
        out: list = [Sequential(blocks, name="layers")] if blocks else []
        norm = dict(m.named_children()).get("norm")
        if norm is not None:
            out += self.convert(norm, _join(path, "norm"), "norm")
        return out

    def encoder_layer(self, m: Any, path: str) -> list:
        children = dict(m.named_children())
        before = len(self.problems)
        parts = {}
        for key in ("self_attn", "norm1", "linear1", "linear2", "norm2"):
            got = self.convert(children[key], _join(path, key), key)
            parts[key] = got[0] if got else None
        act = self.encoder_activation(m, children, path)
        if len(self.problems) > before or act is None:
            return []
        ffn = [parts["linear1"], act, parts["linear2"]]
        if bool(self.attr(m, "norm_first")):
            return [Residual(parts["norm1"], parts["self_attn"]),
                    Residual(parts["norm2"], *ffn)]
        return [Residual(parts["self_attn"]), parts["norm1"], Residual(*ffn), parts["norm2"]]

    def encoder_activation(self, m: Any, children: dict, path: str) -> Op | None:
        apath = _join(path, "activation")
        if "activation" in children:  # an nn.Module activation
            got = self.convert(children["activation"], apath, "activation")
            return got[0] if got else None
        if not isinstance(m, self.torch.jit.ScriptModule):
            fn = getattr(m, "activation", None)
            F = self.torch.nn.functional
            kind = {F.relu: "relu", F.gelu: "gelu"}.get(fn)
            if kind is None:
                self.fail(apath, type(fn).__name__, f"activation {fn!r} is not supported "
                          f"(use 'relu', 'gelu' or an nn activation module)")
                return None
            return Activation(kind, name="activation")
        code = int(self.attr(m, "activation_relu_or_gelu"))
        if code not in (1, 2):
            self.fail(apath, "function", "a TorchScript layer with a custom activation "
                      "function is not supported")
            return None
        return Activation("relu" if code == 1 else "gelu", name="activation")

    # -------------------------------------------------------------- leaves
    def linear(self, m: Any, name: str | None) -> Op:
        b = self.attr(m, "bias")
        return Linear(self.array(self.attr(m, "weight")), None if b is None else self.array(b),
                      name=name)

    def gelu(self, m: Any, name: str | None) -> Op:
        approximate = str(self.attr(m, "approximate"))
        if approximate not in ("none", "tanh"):
            raise _Unsupported(f"approximate={approximate!r}")
        return Activation("gelu" if approximate == "none" else "gelu_tanh", name=name)

    def softmax(self, m: Any, name: str | None) -> Op:
        dim = self.attr(m, "dim")
        if dim is None:
            raise _Unsupported("dim=None (implicit dimension); give dim=-1")
        axis = int(dim) - self.rank if dim >= 0 else int(dim)
        if not -self.rank <= axis < 0:
            raise _Unsupported(f"dim={dim} is outside the input rank {self.rank} errprop uses "
                               f"here; give a negative dim")
        return Softmax(axis=axis, name=name)

    def layer_norm(self, m: Any, name: str | None) -> Op:
        shape = tuple(self.attr(m, "normalized_shape"))
        if len(shape) != 1:
            raise _Unsupported(f"normalized_shape={shape}: only the last axis is supported")
        w, b = self.attr(m, "weight"), self.attr(m, "bias")
        gamma = np.ones(shape) if w is None else self.array(w)
        beta = np.zeros(shape) if b is None else self.array(b)
        return LayerNorm(gamma, beta, eps=float(self.attr(m, "eps")), name=name)

    def rms_norm(self, m: Any, name: str | None) -> Op:
        shape = tuple(self.attr(m, "normalized_shape"))
        if len(shape) != 1:
            raise _Unsupported(f"normalized_shape={shape}: only the last axis is supported")
        w, eps = self.attr(m, "weight"), self.attr(m, "eps")
        if eps is None:  # torch then uses the machine epsilon of the input's dtype
            dtype = self.torch.get_default_dtype() if w is None else w.dtype
            eps = self.torch.finfo(dtype).eps
        gamma = np.ones(shape) if w is None else self.array(w)
        return RMSNorm(gamma, eps=float(eps), name=name)

    def attention(self, m: Any, name: str | None) -> Op:
        if not bool(self.attr(m, "_qkv_same_embed_dim")):
            raise _Unsupported("kdim/vdim differ from embed_dim (not self-attention)")
        if self.attr(m, "bias_k") is not None or self.attr(m, "bias_v") is not None:
            raise _Unsupported("add_bias_kv=True")
        if bool(self.attr(m, "add_zero_attn")):
            raise _Unsupported("add_zero_attn=True")
        E = int(self.attr(m, "embed_dim"))
        W = self.array(self.attr(m, "in_proj_weight"))
        b = self.attr(m, "in_proj_bias")
        bq = bk = bv = None
        if b is not None:
            bq, bk, bv = self.array(b)[:E], self.array(b)[E:2 * E], self.array(b)[2 * E:]
        out = self.child(m, "out_proj")
        bo = self.attr(out, "bias")
        return Attention(W[:E], W[E:2 * E], W[2 * E:], self.array(self.attr(out, "weight")),
                         bq, bk, bv, None if bo is None else self.array(bo),
                         heads=int(self.attr(m, "num_heads")), name=name)


class _Unsupported(Exception):
    """A supported module type with an unsupported setting."""


def _elementwise(kind: str) -> Callable[[_Converter, Any, str | None], Op]:
    return lambda conv, m, name: Activation(kind, name=name)


_LEAVES: dict[str, Callable[[_Converter, Any, str | None], Op]] = {
    "Linear": _Converter.linear,
    "NonDynamicallyQuantizableLinear": _Converter.linear,
    "GELU": _Converter.gelu,
    "Softmax": _Converter.softmax,
    "LayerNorm": _Converter.layer_norm,
    "RMSNorm": _Converter.rms_norm,
    "MultiheadAttention": _Converter.attention,
    **{k: _elementwise(v) for k, v in _ELEMENTWISE.items()},
}


_QUANTIZED_WHY = ("a quantized (torch.ao) module: errprop does not import quantized modules "
                  "yet. Pass the float model (before torch.ao.quantization.convert) and "
                  "describe its quantization with an errprop QuantConfig")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _missing_message(key: str) -> str:
    return (f"attribute {key!r} is not available (a traced module keeps only tensors); "
            f"script the model with torch.jit.script instead of torch.jit.trace")



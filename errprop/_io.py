"""Saving and loading networks: errprop's own format, and one ``load`` for every source.

errprop's format is a folder with ``model.json`` (the graph, human-readable: layer types,
names, shapes, settings) and ``weights.npz`` (every parameter under its node name, e.g.
``block0.attn.Wq``). Floats are stored as float64, exactly as the network holds them, so
``load(save(net))`` reproduces every output bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._activation import Activation, Softmax
from ._attention import Attention
from ._embedding import Embedding
from ._graph import Residual, Sequential, _Container
from ._linear import Linear
from ._norm import L2Normalize, LayerNorm, RMSNorm
from ._op import Array, Op
from ._pool import MeanPool

FORMAT = "errprop-model"
VERSION = 1
SPEC, WEIGHTS = "model.json", "weights.npz"

#: op types ``save`` can write and ``load`` can rebuild
OPS: dict[str, type[Op]] = {cls.__name__: cls for cls in (
    Linear, Activation, Softmax, Attention, LayerNorm, RMSNorm, L2Normalize, Embedding,
    MeanPool)}


# ---------------------------------------------------------------------- save
def save(net: Sequential, path: str | os.PathLike) -> Path:
    """Write ``net`` to the folder ``path`` (``model.json`` + ``weights.npz``).

    The folder is written whole or not at all: the files go to a temporary folder
    next to it, which then replaces ``path``. Returns the folder's path.
    """
    if not isinstance(net, Sequential):
        raise TypeError(f"save expects an errprop Sequential, got {type(net).__name__}")
    unknown = sorted({f"{name} ({type(op).__name__})" for name, op in net.layers()
                      if OPS.get(type(op).__name__) is not type(op)})
    if unknown:
        raise TypeError(f"save cannot write these layers (known types: {', '.join(OPS)}): "
                        f"{', '.join(unknown)}")
    arrays: dict[str, Array] = {}
    spec = {"format": FORMAT, "version": VERSION, "num_params": net.num_params(),
            "net": _node_spec(net, net, arrays)}
    path = Path(path)
    if path.exists() and not (path / SPEC).is_file() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not an errprop model folder; "
                              f"refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with open(tmp / WEIGHTS, "wb") as f:
            np.savez(f, **arrays)
        (tmp / SPEC).write_text(json.dumps(spec, indent=1) + "\n")
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _node_spec(node: Any, root: Sequential, arrays: dict[str, Array]) -> dict[str, Any]:
    if isinstance(node, _Container):
        return {"type": type(node).__name__, "name": node.name,
                "layers": [_node_spec(child, root, arrays) for child in node.children]}
    qualified = root.name_of(node)
    params = {}
    for key, value in node.params.items():
        arrays[f"{qualified}.{key}"] = value
        params[key] = {"array": f"{qualified}.{key}", "shape": list(value.shape)}
    config: dict[str, Any] = {}
    for key, value in node.config().items():
        if isinstance(value, np.ndarray):
            arrays[f"{qualified}:{key}"] = value
            config[key] = {"array": f"{qualified}:{key}"}
        else:
            config[key] = value
    return {"type": type(node).__name__, "name": node.name, "node": qualified,
            "params": params, "config": config}


# ---------------------------------------------------------------------- load
def load(path: str | os.PathLike, **options: Any) -> Sequential:
    """Load a network from any source errprop reads.

    * an errprop model folder (``model.json`` + ``weights.npz``, written by :func:`save`);
    * a Hugging Face BERT-style folder (``config.json`` with ``model_type: bert`` and
      ``model.safetensors``), e.g. all-MiniLM-L6-v2 — see :func:`errprop.load_bert`,
      which receives ``options``;
    * an ONNX file (``.onnx``) — see :func:`errprop.from_onnx`;
    * a TorchScript or state file (``.pt``/``.pth``) — see :func:`errprop.from_torch`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if path.is_dir():
        if (path / SPEC).is_file():
            return _load_errprop(path)
        config = path / "config.json"
        if config.is_file():
            from ._bert import load_bert
            return load_bert(path, **options)
        raise ValueError(f"{path} is neither an errprop model folder ({SPEC} + {WEIGHTS}) nor "
                         f"a Hugging Face folder (config.json + model.safetensors)")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from ._onnx import from_onnx
        return from_onnx(path, **options)
    if suffix in (".pt", ".pth"):
        from ._torch import from_torch
        return from_torch(path, **options)
    if path.name == SPEC:
        return _load_errprop(path.parent)
    raise ValueError(f"cannot tell what {path} is: expected an errprop or Hugging Face model "
                     f"folder, a .onnx file or a .pt/.pth file")


def _load_errprop(folder: Path) -> Sequential:
    try:
        spec = json.loads((folder / SPEC).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{folder / SPEC} is not valid JSON: {exc}") from None
    if not isinstance(spec, Mapping) or spec.get("format") != FORMAT:
        raise ValueError(f"{folder / SPEC} is not an errprop model spec (format "
                         f"{FORMAT!r} expected)")
    if spec.get("version") != VERSION:
        raise ValueError(f"{folder / SPEC}: format version {spec.get('version')!r} is not "
                         f"supported (this errprop reads version {VERSION})")
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} has {SPEC} but no {WEIGHTS}")
    with np.load(folder / WEIGHTS, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    net = _build(spec["net"], arrays, folder)
    if not isinstance(net, Sequential):
        raise ValueError(f"{folder / SPEC}: the top node must be a Sequential")
    return net


def _build(spec: Mapping[str, Any], arrays: Mapping[str, Array], folder: Path) -> Any:
    kind = spec.get("type")
    if kind in ("Sequential", "Residual"):
        children = [_build(child, arrays, folder) for child in spec.get("layers", [])]
        if kind == "Sequential":
            return Sequential(children, name=spec.get("name"))
        return Residual(*children, name=spec.get("name"))
    if kind not in OPS:
        raise ValueError(f"{folder / SPEC}: unknown layer type {kind!r} (node "
                         f"{spec.get('node')!r}); known: {', '.join(OPS)}")

    def array(ref: Mapping[str, Any]) -> Array:
        key = ref["array"]
        if key not in arrays:
            raise ValueError(f"{folder / WEIGHTS} lacks the array {key!r} named in {SPEC}")
        return arrays[key]

    params = {k: array(v) for k, v in spec.get("params", {}).items()}
    config = {k: array(v) if isinstance(v, Mapping) else v
              for k, v in spec.get("config", {}).items()}
    return OPS[kind](**params, **config, name=spec.get("name"))


# ------------------------------------------------------------------- padding
def mask_padding(net: Sequential, mask: object) -> Sequential:
    """The network with a padding mask ``(batch, tokens)`` (``True`` = real token) on every
    layer that takes one: attention ignores padded keys, mean pooling averages real tokens
    only, and an embedding checks that the ids hold padding exactly there.

    The parameters are shared with ``net`` (nothing is copied); the result runs on batches
    of exactly that ``(batch, tokens)`` shape. ``mask=None`` removes the masks.
    """
    if not isinstance(net, Sequential):
        raise TypeError(f"mask_padding expects an errprop Sequential, got {type(net).__name__}")
    if not any(op.maskable for _, op in net.layers()):
        raise ValueError("mask_padding: the network has no layer that takes a padding mask "
                         "(Attention, MeanPool, Embedding)")

    def rebuild(node: Any) -> Any:
        if isinstance(node, Op):
            return node.with_mask(mask) if node.maskable else node
        children = [rebuild(child) for child in node.children]
        if isinstance(node, Sequential):
            return Sequential(children, name=node.name)
        return Residual(*children, name=node.name)

    return rebuild(net)

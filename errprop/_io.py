"""Saving and loading networks: errprop's own format, and one ``load`` for every source.

errprop's format is a folder with ``model.json`` (the graph, human-readable: layer types,
names, shapes, settings) and ``weights.npz`` (every parameter under its node name, e.g.
``block0.attn.Wq``). Floats are stored as float64, exactly as the network holds them, so
``load(save(net))`` reproduces every output bit for bit.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._activation import Activation, Softmax
from ._attention import Attention
from ._checks import check_bool, check_int
from ._embedding import Embedding
from ._files import (MEMORY_LIMIT, STALE_ANY, FileFormatError, make_readable, read_json,
                     remove, temp_name)
from ._graph import Residual, Sequential, _Container
from ._linear import Linear
from ._norm import L2Normalize, LayerNorm, RMSNorm
from ._npz import read_npz
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
    if not path.exists():
        _recover(path)
    if path.exists() and not (path / SPEC).is_file() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not an errprop model folder; "
                              f"refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_old_saves(path)
    tmp = Path(tempfile.mkdtemp(**temp_name(path)))
    try:
        with open(tmp / WEIGHTS, "wb") as f:
            np.savez(f, **arrays)
        (tmp / SPEC).write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
        make_readable(tmp)
        if not path.exists():
            os.replace(tmp, path)
        elif not _exchange(tmp, path):  # no atomic swap here: two renames, recoverable
            old = path.with_name(f".{path.name}.old")
            remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            tmp = old
    finally:
        remove(tmp)  # the new model's temp on error, the previous model on success
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform or the file system cannot."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _clean_old_saves(path: Path) -> None:
    """Remove what killed saves of ``path`` left: ``.NAME.old`` once ``NAME`` holds a
    model, and temporary folders of earlier errprop versions, which named them
    ``.NAME.XXXXXXXX`` (only model files inside, an hour old)."""
    old = path.with_name(f".{path.name}.old")
    if (path / SPEC).is_file() and old.is_dir():
        remove(old)
    legacy = re.compile(rf"^\.{re.escape(path.name)}\.[a-z0-9_]{{8}}$")
    for entry in path.parent.iterdir():
        if legacy.match(entry.name) and entry.is_dir() and not entry.is_symlink() and \
                {p.name for p in entry.iterdir()} <= {SPEC, WEIGHTS} and \
                time.time() - entry.stat().st_mtime > STALE_ANY:
            remove(entry)


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
def load(path: str | os.PathLike, *, trusted: bool = False, memory_limit: int = MEMORY_LIMIT,
         **options: Any) -> Sequential:
    """Load a network from any source errprop reads.

    * an errprop model folder (``model.json`` + ``weights.npz``, written by :func:`save`);
    * a Hugging Face BERT-style folder (``config.json`` with ``model_type: bert`` and
      ``model.safetensors``), e.g. all-MiniLM-L6-v2 — see :func:`errprop.load_bert`,
      which receives ``options``;
    * an ONNX file (``.onnx``) — see :func:`errprop.from_onnx`;
    * a TorchScript or state file (``.pt``/``.pth``) — see :func:`errprop.from_torch`.

    Files are treated as untrusted: nothing is unpickled, sizes declared in a file are
    checked against ``memory_limit`` (bytes, default 4 GiB) before anything is allocated,
    and a format that runs code stored in the file when it is loaded (TorchScript) is
    refused unless ``trusted=True``. A damaged or malformed file raises
    :class:`errprop.FileFormatError` (a ``ValueError``) naming the file and what is wrong.
    """
    trusted = check_bool(trusted, "load", "trusted")
    memory_limit = check_int(memory_limit, "load", "memory_limit", minimum=1)
    path = Path(path)
    if not path.exists():
        _recover(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    try:
        return _dispatch(path, trusted, memory_limit, options)
    except MemoryError:  # a backstop: declared sizes are checked before allocating
        raise FileFormatError(path, f"loading it needs more memory than is available "
                              f"(memory_limit={memory_limit} bytes)") from None


def _dispatch(path: Path, trusted: bool, memory_limit: int, options: dict[str, Any]
              ) -> Sequential:
    if path.is_dir():
        if (path / SPEC).is_file():
            return _load_errprop(path, memory_limit, options)
        config = path / "config.json"
        if config.is_file():
            from ._bert import load_bert
            return load_bert(path, **options)
        raise ValueError(f"{path} is neither an errprop model folder ({SPEC} + {WEIGHTS}) nor "
                         f"a Hugging Face folder (config.json + model.safetensors)")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from ._onnx import from_onnx
        return from_onnx(path, memory_limit=memory_limit, **options)
    if suffix in (".pt", ".pth"):
        from ._torch import from_torch
        return from_torch(path, trusted=trusted, memory_limit=memory_limit, **options)
    if path.name == SPEC:
        return _load_errprop(path.parent, memory_limit, options)
    raise ValueError(f"cannot tell what {path} is: expected an errprop or Hugging Face model "
                     f"folder, a .onnx file or a .pt/.pth file")


def _load_errprop(folder: Path, memory_limit: int, options: Mapping[str, Any]) -> Sequential:
    if options:
        raise TypeError(f"load: {', '.join(options)} do not apply to an errprop model folder "
                        f"({folder})")
    file = folder / SPEC
    spec = read_json(file, "model spec")
    if not isinstance(spec, Mapping) or spec.get("format") != FORMAT:
        raise FileFormatError(file, f"not an errprop model spec (format {FORMAT!r} expected)")
    if spec.get("version") != VERSION:
        raise FileFormatError(file, f"format version {spec.get('version')!r} is not "
                              f"supported (this errprop reads version {VERSION})")
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} has {SPEC} but no {WEIGHTS}")
    top = spec.get("net")
    refs: dict[str, tuple[int, ...] | None] = {}
    try:
        _collect(top, refs, file, "net")
        arrays = read_npz(folder / WEIGHTS, refs, memory_limit=memory_limit)
        net = _build(top, arrays, file)
    except RecursionError:
        raise FileFormatError(file, "the graph is nested too deeply") from None
    except FileFormatError:
        raise
    except (TypeError, ValueError) as exc:
        raise FileFormatError(file, f"the graph cannot be built: {exc}") from None
    if not isinstance(net, Sequential):
        raise FileFormatError(file, "the top node must be a Sequential")
    return net


def _collect(spec: Any, refs: dict[str, tuple[int, ...] | None], file: Path, where: str
             ) -> None:
    """Check the structure of the node ``spec`` and gather the arrays it names with their
    declared shapes, so every size is known before ``weights.npz`` is read."""
    def bad(what: str) -> FileFormatError:
        return FileFormatError(file, f"{where}: {what}")

    if not isinstance(spec, Mapping):
        raise bad(f"a node must be a JSON object, got {type(spec).__name__}")
    kind = spec.get("type")
    if not isinstance(spec.get("name", None), (str, type(None))):
        raise bad(f"'name' must be a string, got {spec['name']!r}")
    if kind in ("Sequential", "Residual"):
        layers = spec.get("layers", [])
        if not isinstance(layers, list):
            raise bad(f"'layers' must be a list, got {type(layers).__name__}")
        for i, child in enumerate(layers):
            _collect(child, refs, file, f"{where}.layers[{i}]")
        return
    if kind not in OPS:
        raise bad(f"unknown layer type {kind!r} (node {spec.get('node')!r}); known: "
                  f"{', '.join(OPS)}")
    for section in ("params", "config"):
        entries = spec.get(section, {})
        if not isinstance(entries, Mapping):
            raise bad(f"'{section}' must be an object, got {type(entries).__name__}")
        for key, ref in entries.items():
            if section == "config" and not isinstance(ref, Mapping):
                continue  # a plain setting
            if not isinstance(ref, Mapping) or not isinstance(ref.get("array"), str):
                raise bad(f"{section} {key!r} must be {{\"array\": NAME, ...}}, got {ref!r}")
            shape = ref.get("shape")
            if section == "params" and not (isinstance(shape, list) and all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
                raise bad(f"param {key!r}: 'shape' must be a list of sizes, got {shape!r}")
            refs[ref["array"]] = None if shape is None else tuple(shape)


def _build(spec: Mapping[str, Any], arrays: Mapping[str, Array], file: Path) -> Any:
    kind = spec.get("type")
    if kind in ("Sequential", "Residual"):
        children = [_build(child, arrays, file) for child in spec.get("layers", [])]
        if kind == "Sequential":
            return Sequential(children, name=spec.get("name"))
        return Residual(*children, name=spec.get("name"))
    params = {k: arrays[v["array"]] for k, v in spec.get("params", {}).items()}
    config = {k: arrays[v["array"]] if isinstance(v, Mapping) else v
              for k, v in spec.get("config", {}).items()}
    try:
        return OPS[kind](**params, **config, name=spec.get("name"))
    except (TypeError, ValueError) as exc:
        raise FileFormatError(file, f"node {spec.get('node')!r} ({kind}) cannot be built: "
                              f"{exc}") from None


def _recover(path: Path) -> None:
    """A save killed between its two renames leaves the previous model in ``.NAME.old``
    and nothing at ``NAME``: put it back."""
    old = path.with_name(f".{path.name}.old")
    if (old / SPEC).is_file():
        with contextlib.suppress(OSError):  # another process may have recovered it first
            os.rename(old, path)


# ------------------------------------------------------------------- padding
def mask_padding(net: Sequential, mask: object) -> Sequential:
    """The network with a padding mask ``(batch, tokens)`` (``True`` = real token) on every
    layer that takes one: attention ignores padded keys, mean pooling averages real tokens
    only, and an embedding checks that the ids hold padding exactly there.

    The parameters are shared with ``net`` (nothing is copied); the result runs on batches
    of exactly that ``(batch, tokens)`` shape. ``mask=None`` removes the masks.
    """
    if not isinstance(net, Sequential):
        raise TypeError(f"mask_padding expects an errprop Sequential, got "
                        f"{type(net).__name__}")
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

"""Saving and loading networks: errprop's own format, and one ``load`` for every source.

errprop's format is a folder with ``model.json`` (the graph, human-readable: layer types,
names, shapes, settings) and ``weights.npz`` (every parameter under its node name, e.g.
``block0.attn.Wq``). Floats are stored as float64, exactly as the network holds them, so
``load(save(net))`` reproduces every output bit for bit.

``model.json`` holds the network as it was built: ``Sequential``/``Residual`` (``layers``),
``Parallel`` (``branches``, ``merge``) and functional ``Graph`` s (``nodes``, each an op
with its ``inputs`` by node name, ``""`` the graph input). An op is ``{"type", "name",
"node", "params", "config"}`` (``op.config()``); the registry :func:`register_op` says
which op types are saved and how each is rebuilt. Version-1 files (trees of the first
ops, e.g. the shipped digits MLP) read as before.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._activation import Activation, Softmax
from ._attention import Attention
from ._checks import check_bool, check_int
from ._embedding import Embedding
from ._files import (MEMORY_LIMIT, STALE_ANY, FileFormatError, make_readable, read_json,
                     remove, temp_name)
from ._functional import Graph
from ._graph import Parallel, Residual, Sequential
from ._linear import Linear
from ._merge import Add, Concat, MatMul, Merge, Mul
from ._network import Network, Node, NodeInfo, _Join
from ._norm import L2Normalize, LayerNorm, RMSNorm
from ._npz import SpecReader, check_links, read_npz
from ._op import Array, Op, check_local_name
from ._pool import MeanPool
from ._rotary import Rotary
from ._shape_ops import Reshape, Scale, Slice, Transpose

FORMAT = "errprop-model"
#: format versions this errprop reads; a file gets the lowest that has all it uses
VERSIONS = (1, 2)
SPEC, WEIGHTS = "model.json", "weights.npz"


# ---------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class OpEntry:
    """How ``save`` writes and ``load`` rebuilds one op class."""

    cls: type
    type: str  # its name in model.json
    version: int  # the first format version that has it
    build: Callable[[dict[str, Array], dict[str, Any], str | None], Any]


_BY_CLASS: dict[type, OpEntry] = {}
_BY_TYPE: dict[str, OpEntry] = {}


def register_op(cls: type, *, type_name: str | None = None, version: int = 2,
                build: Callable[[dict[str, Array], dict[str, Any], str | None], Any]
                | None = None) -> type:
    """Let :func:`save` write ops of exactly the class ``cls`` and :func:`load` rebuild
    them. ``build(params, config, name)`` makes the op from its parameters, its
    ``config()`` and its name (default: ``cls(**params, **config, name=name)``, the
    contract of :meth:`errprop.Op.config`); ``type_name`` is its name in ``model.json``
    (default the class name)."""
    name = cls.__name__ if type_name is None else type_name
    known = _BY_TYPE.get(name)
    if known is not None and known.cls is not cls:
        raise ValueError(f"register_op: the type name {name!r} is taken by "
                         f"{known.cls.__module__}.{known.cls.__qualname__}")
    entry = OpEntry(cls, name, version, build or (
        lambda params, config, op_name: cls(**params, **config, name=op_name)))
    _BY_CLASS[cls] = _BY_TYPE[name] = entry
    return cls


for _cls in (Linear, Activation, Softmax, Attention, LayerNorm, RMSNorm, L2Normalize,
             Embedding, MeanPool):
    register_op(_cls, version=1)
for _cls in (Add, Mul, Concat, MatMul, Reshape, Transpose, Slice, Scale, Rotary):
    register_op(_cls)
# a Residual's join, as it appears in a Graph that holds a Residual (from a block)
register_op(_Join, type_name="ResidualJoin")


def _graph(name: str | None, nodes: list[Node], infos: list[NodeInfo]) -> Graph:
    """A :class:`Graph` with exactly these nodes and names (checked as any graph is)."""
    check_local_name(name)
    net = Graph.__new__(Graph)
    net.name = name
    net._finish(infos, nodes)
    return net


# ---------------------------------------------------------------------- structures
class _SequentialCodec:
    cls, type, version = Sequential, "Sequential", 1

    def write(self, node, w):
        return {"type": self.type, "name": node.name,
                "layers": [w.node(child) for child in node.children]}

    def check(self, spec, r, where):
        for i, child in enumerate(r.listed(spec, "layers", where)):
            r.check(child, f"{where}.layers[{i}]")

    def children(self, spec, r):
        return [r.build(child) for child in spec.get("layers", [])]

    def build(self, spec, r):
        return Sequential(self.children(spec, r), name=spec.get("name"))

    def map(self, node, fn):
        return Sequential([fn(child) for child in node.children], name=node.name)


class _ResidualCodec(_SequentialCodec):
    cls, type, version = Residual, "Residual", 1

    def build(self, spec, r):
        return Residual(*self.children(spec, r), name=spec.get("name"))

    def map(self, node, fn):
        return Residual(*(fn(child) for child in node.children), name=node.name)


class _ParallelCodec:
    cls, type, version = Parallel, "Parallel", 2

    def write(self, node, w):
        name = w.root.name_of(node.merge)
        return {"type": self.type, "branches": [[w.node(c) for c in b] for b in node.branches],
                "merge": w.op(node.merge, name, name)}

    def check(self, spec, r, where):
        for i, branch in enumerate(r.listed(spec, "branches", where)):
            if not isinstance(branch, list):
                raise r.bad(where, f"branch {i} must be a list of layers, got "
                            f"{type(branch).__name__}")
            for j, child in enumerate(branch):
                r.check(child, f"{where}.branches[{i}][{j}]")
        r.check_op(spec.get("merge"), f"{where}.merge")

    def build(self, spec, r):
        branches = [[r.build(c) for c in b] for b in spec.get("branches", [])]
        merge = r.build(spec["merge"])
        if isinstance(merge, Merge):  # name the node (Parallel's own message cannot)
            merge.check_arity(len(branches), str(spec["merge"].get("node")))
        return Parallel(*branches, merge=merge)

    def map(self, node, fn):
        return Parallel(*([fn(c) for c in b] for b in node.branches), merge=node.merge)


class _GraphCodec:
    cls, type, version = Graph, "Graph", 2

    def write(self, net, w):
        nodes = []
        for node, info in zip(net.dag(), net.nodes()):
            spec = w.op(node.op, node.name, w.root.name_of(info.node))
            nodes.append({**spec, "inputs": list(node.inputs)})
        return {"type": self.type, "name": net.name, "nodes": nodes}

    def check(self, spec, r, where):
        nodes = r.listed(spec, "nodes", where)
        for i, node in enumerate(nodes):
            r.check_op(node, f"{where}.nodes[{i}]")
        check_links(nodes, r.bad, where)

    def build(self, spec, r):
        nodes, infos = [], []
        for node in spec["nodes"]:
            op, name = r.build(node), node["node"]
            if isinstance(op, Op) and len(node["inputs"]) != 1:
                raise ValueError(f"node {name!r} ({node['type']}) takes one input, got "
                                 f"{len(node['inputs'])}")
            nodes.append(Node(name, op, tuple(node["inputs"])))
            # the kind a graph reports: a merge says its own (a join: "Residual")
            kind = op.kind if isinstance(op, Merge) else type(op).__name__
            infos.append(NodeInfo(name, op, kind))
        return _graph(spec.get("name"), nodes, infos)

    def map(self, net, fn):
        nodes, infos = [], []
        for node, info in zip(net.dag(), net.nodes()):
            op = fn(node.op)
            nodes.append(Node(node.name, op, node.inputs))
            infos.append(NodeInfo(info.name, op if info.node is node.op else info.node,
                                  info.kind))
        return _graph(net.name, nodes, infos)


_STRUCTURES = {c.cls: c for c in (_SequentialCodec(), _ResidualCodec(), _ParallelCodec(),
                                  _GraphCodec())}
_STRUCTURE_TYPES = {c.type: c for c in _STRUCTURES.values()}


# ---------------------------------------------------------------------- save
def save(net: Network, path: str | os.PathLike) -> Path:
    """Write ``net`` (a ``Sequential`` or a ``Graph``) to the folder ``path``
    (``model.json`` + ``weights.npz``).

    The folder is written whole or not at all: the files go to a temporary folder
    next to it, which then replaces ``path``. Returns the folder's path.
    """
    if not isinstance(net, Network) or type(net) not in _STRUCTURES:
        raise TypeError(f"save expects an errprop Sequential or Graph, got "
                        f"{type(net).__name__}")
    unknown = sorted({f"{node.name} ({type(node.op).__name__})" for node in net.dag()
                      if type(node.op) not in _BY_CLASS})
    if unknown:
        raise TypeError(f"save cannot write these layers (known types: "
                        f"{', '.join(_BY_TYPE)}; errprop._io.register_op adds one): "
                        f"{', '.join(unknown)}")
    writer = _Writer(net)
    top = writer.node(net)
    spec = {"format": FORMAT, "version": writer.version, "num_params": net.num_params(),
            "net": top}
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
            np.savez(f, **writer.arrays)
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


class _Writer:
    """Specs of the nodes of ``root`` and the arrays they name."""

    def __init__(self, root: Network) -> None:
        self.root, self.arrays, self.version = root, {}, 1

    def node(self, node: Any) -> dict[str, Any]:
        codec = _STRUCTURES.get(type(node))
        if codec is not None:
            self.version = max(self.version, codec.version)
            return codec.write(node, self)
        if type(node) not in _BY_CLASS:
            raise TypeError(f"save cannot write {type(node).__name__} blocks (it writes "
                            f"{', '.join(c.type for c in _STRUCTURES.values())} and ops)")
        name = self.root.name_of(node)
        return self.op(node, name, name)

    def op(self, op: Any, node: str, qualified: str) -> dict[str, Any]:
        """``op`` as the node named ``node``; its arrays are stored as ``qualified.KEY``."""
        entry = _BY_CLASS[type(op)]
        self.version = max(self.version, entry.version)
        params = {}
        for key, value in op.params.items():
            self.arrays[f"{qualified}.{key}"] = value
            params[key] = {"array": f"{qualified}.{key}", "shape": list(value.shape)}
        config: dict[str, Any] = {}
        for key, value in op.config().items():
            if isinstance(value, np.ndarray):
                self.arrays[f"{qualified}:{key}"] = value
                config[key] = {"array": f"{qualified}:{key}"}
            else:
                config[key] = value
        return {"type": entry.type, "name": op.name, "node": node, "params": params,
                "config": config}


# ---------------------------------------------------------------------- load
def load(path: str | os.PathLike, *, trusted: bool = False, memory_limit: int = MEMORY_LIMIT,
         **options: Any) -> Network:
    """Load a network from any source errprop reads.

    * an errprop model folder (``model.json`` + ``weights.npz``, written by :func:`save`):
      the ``Sequential`` or ``Graph`` that was saved;
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
              ) -> Network:
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


def _load_errprop(folder: Path, memory_limit: int, options: Mapping[str, Any]) -> Network:
    if options:
        raise TypeError(f"load: {', '.join(options)} do not apply to an errprop model folder "
                        f"({folder})")
    file = folder / SPEC
    spec = read_json(file, "model spec")
    if not isinstance(spec, Mapping) or spec.get("format") != FORMAT:
        raise FileFormatError(file, f"not an errprop model spec (format {FORMAT!r} expected)")
    if spec.get("version") not in VERSIONS:
        raise FileFormatError(file, f"format version {spec.get('version')!r} is not "
                              f"supported (this errprop reads versions "
                              f"{', '.join(map(str, VERSIONS))})")
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} has {SPEC} but no {WEIGHTS}")
    top = spec.get("net")
    reader = SpecReader(file, _STRUCTURE_TYPES, _BY_TYPE)
    try:
        reader.check(top, "net")
        reader.arrays = read_npz(folder / WEIGHTS, reader.refs, memory_limit=memory_limit)
        net = reader.build(top)
    except RecursionError:
        raise FileFormatError(file, "the graph is nested too deeply") from None
    except FileFormatError:
        raise
    except (TypeError, ValueError) as exc:
        raise FileFormatError(file, f"the graph cannot be built: {exc}") from None
    if not isinstance(net, Network):
        raise FileFormatError(file, "the top node must be a Sequential or a Graph")
    return net


def _recover(path: Path) -> None:
    """A save killed between its two renames leaves the previous model in ``.NAME.old``
    and nothing at ``NAME``: put it back."""
    old = path.with_name(f".{path.name}.old")
    if (old / SPEC).is_file():
        with contextlib.suppress(OSError):  # another process may have recovered it first
            os.rename(old, path)


# ---------------------------------------------------------------------- padding
def mask_padding(net: Network, mask: object) -> Network:
    """The network with a padding mask ``(batch, tokens)`` (``True`` = real token) on every
    layer that takes one: attention ignores padded keys, mean pooling averages real tokens
    only, and an embedding checks that the ids hold padding exactly there.

    The parameters are shared with ``net`` (nothing is copied); the result runs on batches
    of exactly that ``(batch, tokens)`` shape. ``mask=None`` removes the masks.
    """
    if not isinstance(net, Network) or type(net) not in _STRUCTURES:
        raise TypeError(f"mask_padding expects an errprop Sequential or Graph, got "
                        f"{type(net).__name__}")
    if not any(op.maskable for _, op in net.layers()):
        raise ValueError("mask_padding: the network has no layer that takes a padding mask "
                         "(Attention, MeanPool, Embedding)")

    def rebuild(node: Any) -> Any:
        codec = _STRUCTURES.get(type(node))
        if codec is not None:
            return codec.map(node, rebuild)
        if isinstance(node, Op):
            return node.with_mask(mask) if node.maskable else node
        if isinstance(node, Merge):
            return node
        raise TypeError(f"mask_padding cannot rebuild {type(node).__name__} blocks")

    return rebuild(net)

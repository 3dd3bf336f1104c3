"""Reading an errprop model folder that may be hostile: ``.npz`` archives whose sizes are
checked before anything is decompressed or allocated, and the checks of ``model.json``
made before ``weights.npz`` is opened (array references, a graph's links).

Each member ``NAME.npy`` starts with a small header (``np.lib.format``) declaring its
dtype and shape. :func:`read_npz` reads only those headers first, checks each declared
shape against the one the caller expects and the total against ``memory_limit``, checks
that the member holds exactly the bytes its header declares (a deflate bomb's member
does not), and only then reads the arrays. Every problem is a
:class:`~errprop._files.FileFormatError` naming the file and the member.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._files import FileFormatError, check_bytes
from ._network import INPUT
from ._op import Array

_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError,
               zipfile.LargeZipFile)
_KINDS = "biuf"  # bool, signed and unsigned integers, floats: what errprop stores


def read_npz(path: Path, expected: Mapping[str, tuple[int, ...] | None], *,
             memory_limit: int) -> dict[str, np.ndarray]:
    """The arrays ``expected`` names (``name -> declared shape``, ``None``: any shape)."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = {info.filename: info for info in zf.infolist()}
            headers = {}
            for name, shape in expected.items():
                info = members.get(f"{name}.npy")
                if info is None:
                    raise FileFormatError(path, f"lacks the array {name!r} that model.json "
                                          f"names")
                headers[name] = _header(zf, info, path, name, shape, memory_limit)
            check_bytes(sum(h[2] for h in headers.values()), memory_limit, path,
                        f"reading the {len(headers)} arrays model.json names")
            out = {}
            for name in expected:
                with zf.open(members[f"{name}.npy"]) as f:
                    out[name] = np.lib.format.read_array(f, allow_pickle=False)
            return out
    except _ZIP_ERRORS as exc:
        raise FileFormatError(path, f"is not a readable .npz (zip) archive: "
                              f"{exc or type(exc).__name__}") from None
    except ValueError as exc:
        if isinstance(exc, FileFormatError):
            raise
        raise FileFormatError(path, f"holds a damaged array: {exc}") from None


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, name: str,
            shape: tuple[int, ...] | None, memory_limit: int
            ) -> tuple[tuple[int, ...], np.dtype, int]:
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                got, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                got, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"format version {version}")
        except ValueError as exc:
            raise FileFormatError(path, f"member {name!r} is not a NumPy array ({exc})"
                                  ) from None
        offset = f.tell()
    if dtype.hasobject or dtype.kind not in _KINDS or dtype.fields is not None:
        raise FileFormatError(path, f"array {name!r} has dtype {dtype}; errprop stores only "
                              f"numbers (bool, integers, floats), never objects")
    nbytes = math.prod(got) * dtype.itemsize
    if shape is not None and tuple(got) != tuple(shape):
        raise FileFormatError(path, f"array {name!r} has shape {tuple(got)}, but model.json "
                              f"declares {tuple(shape)}")
    check_bytes(nbytes, memory_limit, path, f"array {name!r} of shape {tuple(got)}")
    if info.file_size != offset + nbytes:
        raise FileFormatError(path, f"array {name!r} declares shape {tuple(got)} ({nbytes} "
                              f"bytes of data) but its member holds {info.file_size - offset} "
                              f"bytes: the archive is damaged or forged")
    return tuple(got), dtype, nbytes


# ------------------------------------------------------------------ model.json
class SpecReader:
    """Checks the node specs of one ``model.json`` (gathering the arrays they name with
    their declared shapes, so every size is known before ``weights.npz`` is read), then
    builds them. ``structures``: type name -> codec (``check(spec, reader, where)``,
    ``build(spec, reader)``) of Sequential, Graph, ...; ``ops``: type name -> registry
    entry (``build(params, config, name)``), see :func:`errprop._io.register_op`."""

    def __init__(self, file: Path, structures: Mapping[str, Any], ops: Mapping[str, Any]
                 ) -> None:
        self.file, self.structures, self.ops = file, structures, ops
        self.refs: dict[str, tuple[int, ...] | None] = {}
        self.arrays: Mapping[str, Array] = {}

    def bad(self, where: str, what: str) -> FileFormatError:
        return FileFormatError(self.file, f"{where}: {what}")

    def listed(self, spec: Mapping[str, Any], key: str, where: str) -> list:
        value = spec.get(key, [])
        if not isinstance(value, list):
            raise self.bad(where, f"'{key}' must be a list, got {type(value).__name__}")
        return value

    def _object(self, spec: Any, where: str) -> None:
        if not isinstance(spec, Mapping):
            raise self.bad(where, f"a node must be a JSON object, got {type(spec).__name__}")
        if not isinstance(spec.get("name", None), (str, type(None))):
            raise self.bad(where, f"'name' must be a string, got {spec['name']!r}")
        if not isinstance(spec.get("type"), str):
            raise self.bad(where, f"'type' must be a string (an op or container type), got "
                           f"{spec.get('type')!r}")

    def check(self, spec: Any, where: str) -> None:
        """A node of the tree: a structure or an op."""
        self._object(spec, where)
        codec = self.structures.get(spec.get("type"))
        if codec is None:
            self.check_op(spec, where)
        else:
            codec.check(spec, self, where)

    def check_op(self, spec: Any, where: str) -> None:
        self._object(spec, where)
        kind = spec.get("type")
        if kind in self.structures:
            raise self.bad(where, f"expected one op here, got a {kind} (node "
                           f"{spec.get('node')!r})")
        if kind not in self.ops:
            raise self.bad(where, f"unknown layer type {kind!r} (node {spec.get('node')!r}); "
                           f"known: {', '.join([*self.ops, *self.structures])}")
        collect_refs(spec, self.refs, lambda what: self.bad(where, what))

    def build(self, spec: Mapping[str, Any]) -> Any:
        codec = self.structures.get(spec.get("type"))
        if codec is not None:
            return codec.build(spec, self)
        entry = self.ops[spec["type"]]
        params = {k: self.arrays[v["array"]] for k, v in spec.get("params", {}).items()}
        config = {k: self.arrays[v["array"]] if isinstance(v, Mapping) else v
                  for k, v in spec.get("config", {}).items()}
        try:
            return entry.build(params, config, spec.get("name"))
        except (TypeError, ValueError) as exc:
            raise FileFormatError(self.file, f"node {spec.get('node')!r} ({entry.type}) "
                                  f"cannot be built: {exc}") from None


def collect_refs(spec: Mapping, refs: dict[str, tuple[int, ...] | None],
                 bad: Callable[[str], Exception]) -> None:
    """Check an op's ``params`` and ``config`` sections and add the arrays they name, with
    their declared shapes, to ``refs``."""
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


def check_links(nodes: list[Mapping], bad: Callable[[str, str], Exception], where: str
                ) -> None:
    """A graph's node list: each node has a name (dot-separated parts without glob
    characters) and a list of input names; they read only defined names, have no cycle,
    come after their inputs, and each but the output (the last) is read."""
    if not nodes:
        raise bad(where, "a Graph needs at least one node")
    reads: dict[str, list[str]] = {}
    for i, node in enumerate(nodes):
        name, inputs = node.get("node"), node.get("inputs")
        if not isinstance(name, str) or not all(
                part and not any(c in part for c in "*?[]") for part in name.split(".")):
            raise bad(f"{where}.nodes[{i}]", f"'node' (the node's name) must be a string of "
                      f"non-empty parts without '*', '?', '[' or ']', got {name!r}")
        if name in reads:
            raise bad(f"{where}.nodes[{i}]", f"two nodes are named {name!r}")
        if not isinstance(inputs, list) or not inputs or not all(
                isinstance(k, str) for k in inputs):
            raise bad(f"{where}.nodes[{i}]", f"node {name!r}: 'inputs' must be a non-empty "
                      f"list of node names (\"\" for the graph input), got {inputs!r}")
        reads[name] = inputs
    for name, inputs in reads.items():
        for k in inputs:
            if k != INPUT and k not in reads:
                raise bad(where, f"node {name!r} reads {k!r}, which is neither the graph "
                          f"input (\"\") nor a node of this graph")
    cycle = _find_cycle(reads)
    if cycle:
        raise bad(where, f"the nodes form a cycle (each reads the next): {' -> '.join(cycle)}")
    order = {name: i for i, name in enumerate(reads)}
    read: set[str] = set()
    for name, inputs in reads.items():
        for k in inputs:
            if k != INPUT and order[k] > order[name]:
                raise bad(where, f"node {name!r} reads {k!r}, which is listed after it; "
                          f"nodes must be listed in execution order")
        read.update(inputs)
    dead = [name for name in list(reads)[:-1] if name not in read]
    if dead:
        raise bad(where, f"node {dead[0]!r} is read by no node and is not the output "
                  f"(the last node)")


def _find_cycle(reads: Mapping[str, list[str]]) -> list[str] | None:
    """A cycle of the reads-from relation as ``[a, b, ..., a]``, or None (an explicit
    stack: a long chain of nodes needs no deep recursion)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in reads:
        if start in state:
            continue
        state[start], path, stack = 1, [start], [iter(reads[start])]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif nxt in reads and state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt in reads and nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(reads[nxt]))
    return None

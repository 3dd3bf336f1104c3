"""The layer graph: ``Sequential`` and ``Residual`` containers, naming, validation.

The graph is data. Analysis passes are *interpreters* over it: :func:`walk`
hands every leaf op and every residual join to an interpreter object, which
decides what a "value" is (a float array, a value plus tangents, a batch of
Monte Carlo samples). Containers never know which pass is running.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ._checks import real_array
from ._op import Array, Op, check_local_name


class Interpreter(Protocol):
    def leaf(self, name: str, op: Op, state: Any) -> Any: ...

    def residual(self, name: str, skip: Any, branch: Any) -> Any: ...


@dataclass(frozen=True)
class NodeInfo:
    """A named node of a graph, in execution order."""

    name: str
    node: Op | Residual
    kind: str  # op class name, or "Residual"


class _Container:
    name: str | None
    children: tuple[Op | _Container, ...]
    prefix = "seq"

    def _iter_children(self) -> Iterator[Op | _Container]:
        return iter(self.children)


class Residual(_Container):
    """Skip connection ``y = x + f(x)`` where ``f`` is the given layers in sequence.

    A Residual does not open a naming scope: its layers are named in the scope
    of the enclosing named ``Sequential``. The Residual itself is a node (the
    residual stream after the addition) named ``res1``, ``res2``, ... unless a
    name is given.
    """

    prefix = "res"

    def __init__(self, *layers: Op | _Container, name: str | None = None) -> None:
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        check_local_name(name)
        self.name = name
        self.children = _check_children(layers, "Residual")


class Sequential(_Container):
    """Layers applied in order; ``net(x)`` is the float forward.

    Parameters
    ----------
    layers : sequence of ops / containers
    name : str, optional. A named Sequential opens a naming scope: its layers
        are called ``<name>.<layer>`` (e.g. ``block0.mlp.fc1``).

    Unnamed layers get readable derived names, counted per kind inside the
    scope: ``fc1, fc2`` (Linear), ``relu1`` / ``gelu1`` (Activation), ``ln1``
    (LayerNorm), ``rms1``, ``softmax1``, ``attn1``, ``res1`` (Residual).
    Shapes are checked when the graph is built.
    """

    def __init__(self, layers: Sequence[Op | _Container], name: str | None = None) -> None:
        if isinstance(layers, (Op, _Container)):
            raise TypeError("Sequential takes a list of layers: Sequential([layer1, layer2, ...])")
        check_local_name(name)
        self.name = name
        self.children = _check_children(tuple(layers), "Sequential")
        self._infos = _assign_names(self)
        self._by_name = {info.name: info for info in self._infos}
        self._names = {id(info.node): info.name for info in self._infos}
        self.in_features, self.out_features = _check_shapes(self, None, self._names)
        self.min_ndim, self.max_ndim, self._ndim_reason = _input_ndim(self.layers())
        self._dag = _lower(self)

    # ---------------------------------------------------------------- access
    def nodes(self) -> list[NodeInfo]:
        """All named nodes (ops and residual joins) in execution order."""
        return list(self._infos)

    def layers(self) -> list[tuple[str, Op]]:
        """``(name, op)`` for every leaf op, in execution order."""
        return [(i.name, i.node) for i in self._infos if isinstance(i.node, Op)]

    def __getitem__(self, name: str) -> Op | Residual:
        try:
            return self._by_name[name].node
        except KeyError:
            raise KeyError(unknown_name_message("node", name, list(self._by_name))) from None

    def name_of(self, node: Op | Residual) -> str:
        return self._names[id(node)]

    def num_params(self) -> int:
        return sum(op.num_params() for _, op in self.layers())

    # ---------------------------------------------------------------- run
    def __call__(self, x: object) -> Array:
        x = check_input(self, x)
        # overflow is reported per node by the interpreter, not as a NumPy warning
        with np.errstate(over="ignore", invalid="ignore"):
            return walk(self, x, _FloatForward())

    def __repr__(self) -> str:
        lines = [f"Sequential({self.name!r})" if self.name else "Sequential"]
        for info in self._infos:
            desc = info.node.describe() if isinstance(info.node, Op) else "x + f(x)"
            lines.append(f"  {info.name:<24} {info.kind:<10} {desc}")
        return "\n".join(lines)


# ------------------------------------------------------------------ walking
#: the name of the graph input in a node list (not a valid layer name, so never a node's)
INPUT = ""


@dataclass(frozen=True)
class Node:
    """One node of the graph as a list: ``name``, the ``op`` (None for a residual join
    ``skip + branch``) and the names of its inputs (:data:`INPUT` for the graph input)."""

    name: str
    op: Op | None
    inputs: tuple[str, ...]


def _lower(root: Sequential) -> tuple[tuple[Node, ...], dict[str, int]]:
    """The containers as a node list in execution order, and each value's last reader."""
    names = root._names
    nodes: list[Node] = []

    def run(node, src: str) -> str:
        if isinstance(node, Op):
            nodes.append(Node(names[id(node)], node, (src,)))
            return nodes[-1].name
        if isinstance(node, Residual):
            branch = src
            for child in node.children:
                branch = run(child, branch)
            nodes.append(Node(names[id(node)], None, (src, branch)))
            return nodes[-1].name
        for child in node.children:
            src = run(child, src)
        return src

    run(root, INPUT)
    last = {k: i for i, node in enumerate(nodes) for k in node.inputs}
    return tuple(nodes), last


def walk(root: Sequential, state: Any, interp: Interpreter) -> Any:
    """Run ``interp`` over the graph rooted at ``root``: one loop over its node list in
    execution order; a value is dropped after its last reader (memory as a chain)."""
    nodes, last = root._dag
    values = {INPUT: state}
    for i, node in enumerate(nodes):
        args = [values[k] for k in node.inputs]
        if node.op is not None:
            out = interp.leaf(node.name, node.op, args[0])
        else:
            out = interp.residual(node.name, args[0], args[1])
        for k in node.inputs:
            if last[k] == i:
                values.pop(k, None)
        values[node.name] = out
    return values[nodes[-1].name]


def walk_backward(root: Sequential, g: Any, leaf: Callable[[str, Op, Any], Any]) -> Any:
    """Reverse-mode walk: carry a cotangent from the output of ``root`` to its input.

    ``leaf(name, op, g_out)`` returns the cotangent at the op's input; a residual join
    ``x + f(x)`` passes its cotangent to both inputs. Cotangents of a value read by
    several nodes are summed (the join's first, as ``g + branch``).
    """
    nodes, _ = root._dag
    grads = {nodes[-1].name: g}
    for node in reversed(nodes):
        g_out = grads.pop(node.name)
        parts = [leaf(node.name, node.op, g_out)] if node.op is not None else [g_out, g_out]
        for k, part in zip(node.inputs, parts):
            grads[k] = part if k not in grads else grads[k] + part
    return grads[INPUT]


def check_finite_node(name: str, what: str, a: Array) -> Array:
    """Raise a clear error if a node's output left the float range."""
    if not np.all(np.isfinite(a)):
        raise ValueError(f"node {name!r}: the {what} contains NaN/Inf (shape {a.shape}); "
                         f"the inputs or parameters overflow float64 here")
    return a


class _FloatForward:
    def leaf(self, name, op, x):
        return check_finite_node(name, "output", op.forward(x))

    def residual(self, name, skip, branch):
        return check_finite_node(name, "output", skip + branch)


# ------------------------------------------------------------------ checks
def _check_children(layers: tuple, where: str) -> tuple:
    if not layers:
        raise ValueError(f"{where} needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, (Op, _Container)):
            raise TypeError(f"{where}: layer {i} is a {type(layer).__name__}, expected an errprop "
                            f"layer (Linear, Activation, Attention, ...) or container")
    return layers


def _assign_names(root: Sequential) -> list[NodeInfo]:
    """Give every node a unique full name; explicit names win over derived ones."""
    seen: set[int] = set()
    explicit: set[str] = set()

    def collect(node, scope):
        if id(node) in seen:
            raise ValueError(f"layer {node!r} appears twice in the graph; build a new layer "
                             f"object for each position (parameters may be shared by value)")
        seen.add(id(node))
        if node.name is not None and not (isinstance(node, Sequential)):
            full = scope + node.name
            if full in explicit:
                raise ValueError(f"duplicate layer name {full!r}")
            explicit.add(full)
        if isinstance(node, _Container):
            inner = scope + node.name + "." if isinstance(node, Sequential) and node.name \
                else scope
            for child in node.children:
                collect(child, inner)

    root_scope = root.name + "." if root.name else ""
    seen.add(id(root))
    for child in root.children:
        collect(child, root_scope)

    infos: list[NodeInfo] = []
    counters: dict[tuple[str, str], int] = {}

    def derive(node, scope):
        if node.name is not None:
            return scope + node.name
        key = (scope, node.prefix)
        while True:
            counters[key] = counters.get(key, 0) + 1
            full = f"{scope}{node.prefix}{counters[key]}"
            if full not in explicit:
                explicit.add(full)
                return full

    def visit(node, scope):
        if isinstance(node, Op):
            infos.append(NodeInfo(derive(node, scope), node, type(node).__name__))
        elif isinstance(node, Residual):
            name = derive(node, scope)  # reserve in order of appearance
            for child in node.children:
                visit(child, scope)
            infos.append(NodeInfo(name, node, "Residual"))
        else:
            inner = scope + node.name + "." if node.name else scope
            for child in node.children:
                visit(child, inner)

    for child in root.children:
        visit(child, root_scope)
    return infos


def _check_shapes(node, features: int | None, names: dict[int, str]) -> tuple[int | None,
                                                                                int | None]:
    """Propagate the feature size through ``node``; returns (in_features, out_features)."""
    first_in: list[int | None] = [None]

    def run(n, f, prev):
        if isinstance(n, Op):
            need = n.in_features
            if need is not None:
                if f is not None and f != need:
                    after = f", but the previous layer {prev!r} outputs {f}" if prev else \
                        f", got {f}"
                    raise ValueError(f"{type(n).__name__} {names.get(id(n), n.name)!r} expects "
                                     f"inputs with {need} features{after}")
                if f is None and first_in[0] is None:
                    first_in[0] = need
            return n.out_features(f if f is not None else need), names.get(id(n), n.name)
        if isinstance(n, Residual):
            if f is None:  # the residual opens the network: its input size is its first op's
                f = _first_in_features(n)
                if first_in[0] is None:
                    first_in[0] = f
            out, last = f, prev
            for child in n.children:
                out, last = run(child, out, last)
            if f is not None and out is not None and out != f:
                raise ValueError(f"Residual {names.get(id(n), n.name)!r}: its layers map {f} "
                                 f"features to {out}; a skip connection needs equal sizes")
            return (out if f is None else f), names.get(id(n), n.name)
        for child in n.children:
            f, prev = run(child, f, prev)
        return f, prev

    out, _ = run(node, features, None)
    return first_in[0], out


def _input_ndim(layers: list[tuple[str, Op]]) -> tuple[int, int, str | None]:
    """The input's smallest and largest ndim: every op sees at least its ``min_ndim`` and
    at most 3 axes, counting the axes ops before it add (Embedding) or remove (pooling).
    Also returns the first layer that needs the smallest ndim (None: none does)."""
    shift, low, top = 0, 2, 0
    needs: str | None = None
    for name, op in layers:
        if op.min_ndim - shift > low:
            low, needs = op.min_ndim - shift, name
        shift += op.ndim_change
        top = max(top, shift)
        if low > 3 - top:
            moved = f"; with the axes the layers before it add or remove, the network " \
                    f"input would need {low}" if shift or top else ""
            raise ValueError(f"{type(op).__name__} {name!r} needs inputs with at least "
                             f"{op.min_ndim} axes, but errprop layers see at most 3 (batch, "
                             f"tokens, features){moved}: no network input fits")
    return low, 3 - top, needs


def suggest(name: str, known: list[str]) -> str:
    """``"; did you mean 'x'?"`` for a close match, else a short list of the known names."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return f"; known: {', '.join(known[:12])}{' ...' if len(known) > 12 else ''}"


def _first_in_features(node) -> int | None:
    if isinstance(node, Op):
        return node.in_features
    for child in node.children:
        f = _first_in_features(child)
        if f is not None:
            return f
    return None


def unknown_name_message(what: str, name: str, known: list[str]) -> str:
    return f"no {what} named {name!r}{suggest(name, known)}"


def check_input(net: Sequential, x: object, *, what: str = "input x") -> Array:
    """Validate a network input and return it as float64."""
    if not isinstance(net, Sequential):
        raise TypeError(f"expected an errprop Sequential network, got {type(net).__name__}")
    try:
        arr = real_array(x, "network input", what)
    except ValueError as exc:  # a ragged nested list
        raise TypeError(f"{what} must be a numeric array, got a {type(x).__name__} whose rows "
                        f"differ in length") from exc
    first = net.layers()[0][0]
    if arr.ndim < net.min_ndim:
        if net.min_ndim == 3:
            op = net[net._ndim_reason] if net._ndim_reason else None
            because = "the network contains attention" if op is None or \
                type(op).__name__ == "Attention" else \
                f"{type(op).__name__} {net._ndim_reason!r} needs a token axis"
            raise ValueError(f"{what} must have shape (batch, tokens, features) because "
                             f"{because}, got {arr.shape}")
        raise ValueError(f"{what} must have shape (batch, features) or (batch, tokens, "
                         f"features), got {arr.shape}")
    if arr.ndim > net.max_ndim:
        if net.max_ndim == 2:
            raise ValueError(f"{what} must have shape (batch, tokens) because the network "
                             f"starts with {first!r}, got {arr.shape}")
        raise ValueError(f"{what} must have shape (batch, features) or (batch, tokens, "
                         f"features), got {arr.shape}")
    if net.in_features is not None and arr.shape[-1] != net.in_features:
        raise ValueError(f"first layer {first!r} expects inputs with {net.in_features} features, "
                         f"got {what} of shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{what} contains {bad} NaN/Inf value(s)")
    return arr

"""The container builders: ``Sequential``, ``Residual`` and ``Parallel``, and their naming.

A container tree lowers into the node list of :mod:`errprop._network` (name, op, input
names), which every pass walks. ``Sequential`` is a network; ``Residual`` (``x + f(x)``)
and ``Parallel`` (branches from one input, joined by a merge op such as ``Mul``) are
blocks inside one. The functional builder for any DAG is :class:`errprop.Graph`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ._merge import Add, Merge
from ._network import (INPUT, Interpreter, Network, Node, NodeInfo, _Join,  # noqa: F401
                       check_finite_node, check_input, float_values, suggest,
                       unknown_name_message, walk, walk_backward)
from ._op import Op, check_local_name

__all__ = ["Sequential", "Residual", "Parallel", "walk", "walk_backward", "Node", "INPUT",
           "NodeInfo", "check_input", "check_finite_node", "suggest", "unknown_name_message"]


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
        self._join = _Join()


class Parallel(_Container):
    """Branches that read the same input, joined by a merge op: ``merge(b₁(x), b₂(x), ...)``.

    Each branch is a layer, a container, or a list of layers applied in order (an empty
    list is the identity). ``Parallel([W1, silu], [W3], merge=Mul())`` is a gated MLP's
    ``silu(W1 x) ⊙ W3 x``; ``Parallel([], [conv, bn], merge=Add())`` a shortcut. Like a
    Residual it opens no naming scope; the merge op is the node after it (``mul1``, ...).
    """

    prefix = "par"

    def __init__(self, *branches: object, merge: Merge | None = None,
                 name: str | None = None) -> None:
        check_local_name(name)
        if merge is None:
            merge = Add(name=name)
        if not isinstance(merge, Merge):
            raise TypeError(f"Parallel: merge must be a merge op (Add, Mul, Concat, MatMul), "
                            f"got {type(merge).__name__}")
        if len(branches) < 2:
            raise ValueError(f"Parallel needs at least two branches, got {len(branches)}")
        merge.check_arity(len(branches), merge.name or "Parallel")
        self.name = None
        self.merge = merge
        self.branches = tuple(_branch(b, i) for i, b in enumerate(branches))
        self.children = tuple(c for b in self.branches for c in b)


def _branch(b: object, i: int) -> tuple:
    if isinstance(b, (Op, _Container, Network)):
        return (b,)
    if isinstance(b, (list, tuple)):
        for j, layer in enumerate(b):
            if not isinstance(layer, (Op, _Container, Network)):
                raise TypeError(f"Parallel: branch {i} layer {j} is a {type(layer).__name__}, "
                                f"expected an errprop layer or container")
        return tuple(b)
    raise TypeError(f"Parallel: branch {i} is a {type(b).__name__}; give a layer, a "
                    f"container or a list of layers")


class Sequential(_Container, Network):
    """Layers applied in order; ``net(x)`` is the float forward.

    Parameters
    ----------
    layers : sequence of ops / containers
    name : str, optional. A named Sequential opens a naming scope: its layers
        are called ``<name>.<layer>`` (e.g. ``block0.mlp.fc1``).

    Unnamed layers get readable derived names, counted per kind inside the
    scope: ``fc1, fc2`` (Linear), ``relu1`` / ``gelu1`` (Activation), ``ln1``
    (LayerNorm), ``rms1``, ``softmax1``, ``attn1``, ``res1`` (Residual), ``mul1``
    (a ``Parallel`` block's ``Mul``). Shapes are checked when the graph is built.
    """

    def __init__(self, layers: Sequence[Op | _Container], name: str | None = None) -> None:
        if isinstance(layers, (Op, _Container)):
            raise TypeError("Sequential takes a list of layers: Sequential([layer1, layer2, ...])")
        check_local_name(name)
        self.name = name
        self.children = _check_children(tuple(layers), "Sequential")
        infos = _assign_names(self)
        names = {id(info.node): info.name for info in infos}
        self._finish(infos, _lower(self, names))


def _lower(root: Sequential, names: dict[int, str]) -> list[Node]:
    """The containers as a node list in execution order."""
    nodes: list[Node] = []

    def run(node, src: str) -> str:
        if isinstance(node, Op):
            nodes.append(Node(names[id(node)], node, (src,)))
        elif isinstance(node, Residual):
            branch = src
            for child in node.children:
                branch = run(child, branch)
            nodes.append(Node(names[id(node)], node._join, (src, branch)))
        elif isinstance(node, Parallel):
            outs = []
            for branch in node.branches:
                out = src
                for child in branch:
                    out = run(child, out)
                outs.append(out)
            nodes.append(Node(names[id(node.merge)], node.merge, tuple(outs)))
        elif isinstance(node, _Container):
            for child in node.children:
                src = run(child, src)
            return src
        else:  # a Graph used as a block: its nodes, renamed into this scope
            rename = {INPUT: src}
            for inner, info in zip(node.dag(), node.nodes()):
                rename[inner.name] = names[id(info.node)]
                nodes.append(Node(rename[inner.name], inner.op,
                                  tuple(rename[k] for k in inner.inputs)))
        return nodes[-1].name

    run(root, INPUT)
    return nodes


# ------------------------------------------------------------------ checks
def _check_children(layers: tuple, where: str) -> tuple:
    if not layers:
        raise ValueError(f"{where} needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, (Op, _Container, Network)):
            raise TypeError(f"{where}: layer {i} is a {type(layer).__name__}, expected an errprop "
                            f"layer (Linear, Activation, Attention, ...) or container")
    return layers


def _assign_names(root: Sequential) -> list[NodeInfo]:
    """Give every node a unique full name; explicit names win over derived ones."""
    seen: set[int] = set()
    explicit: set[str] = set()

    def claim(node, scope):
        if id(node) in seen:
            raise ValueError(f"layer {node!r} appears twice in the graph; build a new layer "
                             f"object for each position (parameters may be shared by value)")
        seen.add(id(node))
        if node.name is not None and not isinstance(node, Sequential):
            full = scope + node.name
            if full in explicit:
                raise ValueError(f"duplicate layer name {full!r}")
            explicit.add(full)

    def collect(node, scope):
        if isinstance(node, Network) and not isinstance(node, _Container):
            if id(node) in seen:
                raise ValueError(f"graph {node!r} appears twice; build a new one for each "
                                 f"position")
            seen.add(id(node))
            for info in node.nodes():
                full = scope + info.name
                if full in explicit:
                    raise ValueError(f"duplicate layer name {full!r}")
                explicit.add(full)
            return
        if not isinstance(node, Parallel):
            claim(node, scope)
        if isinstance(node, _Container):
            inner = scope + node.name + "." if isinstance(node, Sequential) and node.name \
                else scope
            for child in node.children:
                collect(child, inner)
            if isinstance(node, Parallel):
                claim(node.merge, scope)

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
        elif isinstance(node, Parallel):
            for child in node.children:
                visit(child, scope)
            infos.append(NodeInfo(derive(node.merge, scope), node.merge,
                                  type(node.merge).__name__))
        elif isinstance(node, _Container):
            inner = scope + node.name + "." if node.name else scope
            for child in node.children:
                visit(child, inner)
        else:  # a Graph block keeps its node names, inside this scope
            infos.extend(NodeInfo(scope + i.name, i.node, i.kind) for i in node.nodes())

    for child in root.children:
        visit(child, root_scope)
    return infos

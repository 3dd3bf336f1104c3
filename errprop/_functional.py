"""The functional builder: any DAG of named nodes, written as calls.

>>> x = errprop.Input()
>>> gate = errprop.Activation("silu")(errprop.Linear(W1, name="gate")(x))
>>> up = errprop.Linear(W3, name="up")(x)
>>> out = errprop.Linear(W2, name="down")(errprop.Mul()(gate, up))
>>> net = errprop.Graph(x, out)

Every call of an op (or a ``Merge`` on several handles, or a container on one handle)
returns a :class:`Handle`, which the next op takes as input; a handle may feed any
number of consumers. ``Graph(input, output)`` collects the nodes between them in the
order they were made (a topological order), names them as ``Sequential`` does
(explicit names win; else ``fc1``, ``mul1``, ...) and checks the result.
"""

from __future__ import annotations

from ._handle import Handle, Input
from ._merge import Merge
from ._network import INPUT, Network, Node, NodeInfo
from ._op import check_local_name

__all__ = ["Graph", "Handle", "Input"]


class Graph(Network):
    """A network written functionally (see the module docstring): ``Graph(input, output)``.

    Parameters
    ----------
    inputs : the handle from :func:`errprop.Input`.
    outputs : the handle of the output node.
    name : optional scope: nodes are called ``<name>.<node>``.
    """

    def __init__(self, inputs: Handle, outputs: Handle, *, name: str | None = None) -> None:
        check_local_name(name)
        if not isinstance(inputs, Handle) or inputs.op is not None:
            raise TypeError("Graph: inputs must be the handle errprop.Input() returned")
        if not isinstance(outputs, Handle) or outputs.op is None:
            raise TypeError("Graph: outputs must be the handle of a node (the result of "
                            "calling an op on the graph's input)")
        self.name = name
        handles = _reachable(outputs, inputs)
        scope = name + "." if name else ""
        explicit: set[str] = set()
        seen: set[int] = set()
        for h in handles:
            if h.block is None:
                if id(h.op) in seen:
                    raise ValueError(f"layer {h.op!r} appears twice in the graph; build a new "
                                     f"layer object for each position (parameters may be "
                                     f"shared by value)")
                seen.add(id(h.op))
                if h.op.name is not None:
                    full = scope + h.op.name
                    if full in explicit:
                        raise ValueError(f"duplicate layer name {full!r}")
                    explicit.add(full)
            else:
                explicit.update(scope + info.name for info in h.block.nodes())
        counters: dict[str, int] = {}
        out_name: dict[int, str] = {id(inputs): INPUT}
        nodes: list[Node] = []
        infos: list[NodeInfo] = []
        for h in handles:
            ins = tuple(out_name[id(i)] for i in h.inputs)
            if h.block is not None:
                rename = {INPUT: ins[0]}
                for node, info in zip(h.block.dag(), h.block.nodes()):
                    full = scope + node.name
                    rename[node.name] = full
                    nodes.append(Node(full, node.op, tuple(rename[k] for k in node.inputs)))
                    infos.append(NodeInfo(full, info.node, info.kind))
                out_name[id(h)] = nodes[-1].name
                continue
            if h.op.name is not None:
                full = scope + h.op.name
            else:
                while True:
                    counters[h.op.prefix] = counters.get(h.op.prefix, 0) + 1
                    full = f"{scope}{h.op.prefix}{counters[h.op.prefix]}"
                    if full not in explicit:
                        explicit.add(full)
                        break
            nodes.append(Node(full, h.op, ins))
            infos.append(NodeInfo(full, h.op, h.op.kind if isinstance(h.op, Merge)
                                  else type(h.op).__name__))
            out_name[id(h)] = full
        self._finish(infos, nodes)


def _reachable(output: Handle, start: Handle) -> list[Handle]:
    """The handles ``output`` depends on, in creation order; checks they all lead back to
    ``start``."""
    found: dict[int, Handle] = {}
    stack = [output]
    while stack:
        h = stack.pop()
        if id(h) in found:
            continue
        if h.op is None:
            if h is not start:
                raise ValueError("Graph: the output depends on a second errprop.Input(); a "
                                 "graph has one input")
            continue
        found[id(h)] = h
        stack.extend(h.inputs)
    if not _depends(output, start):
        raise ValueError("Graph: the output does not depend on the given input")
    return sorted(found.values(), key=lambda h: h.seq)


def _depends(h: Handle, start: Handle) -> bool:
    stack, seen = [h], set()
    while stack:
        v = stack.pop()
        if v is start:
            return True
        if id(v) not in seen:
            seen.add(id(v))
            stack.extend(v.inputs)
    return False

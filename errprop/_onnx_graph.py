"""ONNX import: the values the tracer carries (semantic nodes, index views, attention
heads and scores) and the helpers that read a view's layout.

A :class:`View` is an ONNX tensor expressed as ``scale * node.flat[idx]``: ``idx`` is an
integer array of the tensor's shape that holds, for every element, its flat position in
the canonical ``(batch, [tokens,] features)`` layout of a semantic node (:class:`SNode`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

_ids = itertools.count()


class Unsupported(Exception):
    """A node that the importer cannot express in errprop's graph (message: the reason)."""


@dataclass(eq=False)
class SNode:
    """A semantic tensor in canonical layout ``shape``: the network input, a linear
    layer, an elementwise op, a reduction, a known op, an attention core or a join."""

    kind: str
    shape: tuple[int, ...]
    srcs: list[SNode]
    onnx: list[str]
    data: dict = field(default_factory=dict)
    roots: frozenset = frozenset()
    id: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self) -> None:
        if not self.roots:
            self.roots = frozenset({self.id})


@dataclass(eq=False)
class View:
    """An ONNX tensor equal to ``scale * node.flat[idx]``; ``rowwise``: ``idx`` (last axis
    1) points at rows of ``node`` whose entries are all equal (a mean over features)."""

    node: SNode
    idx: np.ndarray
    scale: float = 1.0
    rowwise: bool = False


@dataclass(eq=False)
class Heads:
    """A view decoded as per-head slices ``(*lead, tokens, head_dim)`` of a node's features."""

    node: SNode
    start: int
    hd: int
    H: int
    b: np.ndarray
    h: np.ndarray
    lead: tuple[int, ...]
    T: int


@dataclass(eq=False)
class Scores:
    """Attention logits ``scale · q kᵀ`` (+ causal mask); ``probs`` after Softmax."""

    q: Heads
    k: Heads
    scale: float
    onnx: list[str]
    causal: bool = False
    probs: bool = False


class _Unknown:
    """Output of an unsupported node: downstream nodes are not reported again."""


UNKNOWN = _Unknown()

def is_full(view: View) -> bool:
    n = int(np.prod(view.node.shape))
    if view.rowwise:
        D = view.node.shape[-1]
        rows = view.idx.ravel()
        return bool(np.all(rows % D == 0)) and rows.size * D == n and \
            np.array_equal(np.sort(rows // D), np.arange(n // D))
    return view.idx.size == n and np.array_equal(np.sort(view.idx.ravel()), np.arange(n))


def feature_rows(view: View) -> np.ndarray:
    """Row numbers of ``view.node`` when the view's last axis is a whole feature row."""
    D = view.node.shape[-1]
    if view.rowwise or view.idx.ndim == 0 or view.idx.shape[-1] != D:
        raise Unsupported(f"the last axis (size {view.idx.shape[-1:] or '()'}) is not the "
                          f"feature axis of size {D}")
    rows = view.idx.reshape(-1, D)
    if not (np.all(rows[:, :1] % D == 0) and np.array_equal(rows, rows[:, :1] + np.arange(D))):
        raise Unsupported("the last axis is not the feature axis (a transposed or mixed layout)")
    return (rows[:, 0] // D).reshape(view.idx.shape[:-1])


def canonical_const(c: np.ndarray, ref: View) -> np.ndarray:
    """A constant operand broadcast to the reference view, laid out like its node."""
    out = np.zeros(ref.node.shape)
    if ref.rowwise:
        D = ref.node.shape[-1]
        rows = out.reshape(-1, D)
        rows[ref.idx.ravel() // D] = np.broadcast_to(c, ref.idx.shape).reshape(-1, 1)
        return out
    out.flat[ref.idx.ravel()] = np.broadcast_to(c, ref.idx.shape).ravel()
    return out


def decode_heads(view: View, features_last: bool) -> Heads:
    """Read a view ``(*lead, tokens, head_dim)`` (or ``(*lead, head_dim, tokens)``) as one
    head of one batch element per leading index, each a contiguous feature block."""
    if view.rowwise or len(view.node.shape) != 3:
        raise Unsupported("attention operands must come from (batch, tokens, features) tensors")
    idx = view.idx if features_last else np.swapaxes(view.idx, -1, -2)
    B, T, F = view.node.shape
    if idx.ndim < 2 or idx.shape[-2] != T:
        raise Unsupported(f"attention runs over an axis of size {idx.shape[-2:]} that is not "
                          f"the token axis ({T} tokens; export with batch_first=True)")
    c = idx.shape[-1]
    flat = idx.reshape(-1, T, c)
    b, t, f = np.unravel_index(flat, (B, T, F))
    ok = (np.all(b == b[:, :1, :1]) and np.all(t == np.arange(T)[None, :, None])
          and np.all(f == f[:, :1, :1] + np.arange(c)))
    if not ok:
        raise Unsupported("the attention operands are not (batch, head)-slices of a "
                          "(batch, tokens, features) tensor")
    off = f[:, 0, 0]
    start = int(off.min())
    h = (off - start) // c
    H = int(h.max()) + 1
    pairs = set(zip(b[:, 0, 0].tolist(), h.tolist()))
    if np.any((off - start) % c) or len(pairs) != len(off) or len(off) != B * H:
        raise Unsupported("heads are not contiguous, equal feature blocks covering every "
                          "batch element once")
    return Heads(view.node, start, c, H, b[:, 0, 0], h, idx.shape[:-2], T)


def check_pair(q: Heads, other: Heads, what: str) -> None:
    if q.lead != other.lead or q.H != other.H or not (np.array_equal(q.b, other.b)
                                                      and np.array_equal(q.h, other.h)):
        raise Unsupported(f"queries and {what} are split into heads differently")


def emit_graph(out: SNode, inp: SNode, parents, is_ancestor):
    """The semantic graph ending at ``out`` as a functional :class:`errprop.Graph`.

    Nodes are created in the order a depth-first walk from the output finishes them
    (operands in ONNX input order), so the graph names them as ``Sequential`` would
    (``fc1, silu1, fc2, mul1, fc3``). An ``Add`` join whose one operand lies on the path of
    the other is a residual join (``res1``: skip, branch); one of parallel branches is an
    ``Add`` merge (``add1``)."""
    from ._functional import Graph, Input
    from ._linear import Linear
    from ._merge import Add
    from ._network import _Join

    x = Input()
    handles = {inp.id: x}
    stack = [(out, False)]
    while stack:
        n, ready = stack.pop()
        if n.id in handles:
            continue
        ps = parents(n)
        if not ready:
            stack.append((n, True))
            stack.extend((p, False) for p in reversed(ps) if p.id not in handles)
            continue
        hs = [handles[p.id] for p in ps]
        if n.kind == "linear":
            handles[n.id] = Linear(n.data["W"], n.data["b"])(hs[0])
        elif n.kind == "op":
            handles[n.id] = n.data["op"](hs[0])
        elif n.kind == "merge":
            handles[n.id] = n.data["op"](*hs)
        elif n.kind == "join":
            a, b = ps
            if a is not b and is_ancestor(b, a):
                handles[n.id] = _Join()(hs[1], hs[0])
            elif a is not b and is_ancestor(a, b):
                handles[n.id] = _Join()(hs[0], hs[1])
            else:
                handles[n.id] = Add()(*hs)
        else:
            names = ", ".join(repr(o) for o in n.onnx)
            raise Unsupported(f"nodes {names} ({n.kind}) could not be mapped to a layer")
    return Graph(x, handles[out.id])

"""The network as data: a DAG of named nodes, the walks that interpret it, its checks.

A network is a list of :class:`Node` (name, op, input names) in topological order; the
graph input is called :data:`INPUT`. Builders (``Sequential``/``Residual``/``Parallel``
in :mod:`errprop._graph`, the functional :class:`errprop.Graph`) lower into it, and
every analysis pass is an *interpreter* driven by :func:`walk`:

* ``interp.leaf(name, op, x)`` for a one-input :class:`~errprop.Op`,
* ``interp.merge(name, op, xs)`` for a several-input :class:`~errprop.Merge`
  (``Add``, ``Mul``, ``Concat``, ``MatMul``; a residual join is an ``Add``).

The interpreter decides what a "value" is (a float array, a value plus keyed tangent
rows, a batch of Monte Carlo samples); the walk never looks at an op's type. A value
read by several nodes is handed to each (fan-out); it is dropped after its last reader.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ._checks import real_array
from ._handle import is_symbolic, node
from ._merge import Add, Merge
from ._op import Array, Op

#: the name of the graph input in a node list (not a valid layer name, so never a node's)
INPUT = ""


class Interpreter(Protocol):
    def leaf(self, name: str, op: Op, state: Any) -> Any: ...

    def merge(self, name: str, op: Merge, states: list[Any]) -> Any: ...


@dataclass(frozen=True)
class Node:
    """One node of the graph: ``name``, its ``op`` (an :class:`Op` or a :class:`Merge`)
    and the names of its inputs (:data:`INPUT` for the graph input)."""

    name: str
    op: Op | Merge
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class NodeInfo:
    """A named node of a graph, in execution order."""

    name: str
    node: object  # the Op or Merge; for a residual join, its Residual container
    kind: str  # op class name, or "Residual"


class _Join(Add):
    """The join ``skip + branch`` of a ``Residual``."""

    prefix = "res"
    kind = "Residual"

    def out_features(self, features, where):
        skip, branch = features
        if skip is not None and branch is not None and skip != branch:
            raise ValueError(f"Residual {where!r}: its layers map {skip} features to "
                             f"{branch}; a skip connection needs equal sizes")
        return skip if skip is not None else branch


def walk(net: Network, state: Any, interp: Any) -> Any:
    """Run ``interp`` over ``net``: one loop over its node list in execution order."""
    nodes, last = net._dag
    values = {INPUT: state}
    merge = getattr(interp, "merge", None)
    for i, node in enumerate(nodes):
        args = [values[k] for k in node.inputs]
        if isinstance(node.op, Op):
            out = interp.leaf(node.name, node.op, args[0])
        elif merge is not None:
            out = merge(node.name, node.op, args)
        elif isinstance(node.op, Add) and len(args) == 2 and hasattr(interp, "residual"):
            out = interp.residual(node.name, args[0], args[1])
        else:
            raise NotImplementedError(
                f"{_pass_name(interp)} does not support {type(node.op).__name__} nodes yet "
                f"(node {node.name!r}); it handles Sequential/Residual networks")
        for k in node.inputs:
            if last[k] == i:
                values.pop(k, None)
        values[node.name] = out
    return values[nodes[-1].name]


def _pass_name(interp: Any) -> str:
    module = type(interp).__module__.replace("errprop.", "errprop ").split(".")[0]
    return f"this pass ({module} {type(interp).__name__.lstrip('_')})"


def walk_backward(net: Network, g: Any, leaf: Callable[[str, Op, Any], Any],
                  merge: Callable[[str, Merge, Any], list[Any]] | None = None) -> Any:
    """Reverse-mode walk: carry a cotangent from the output of ``net`` to its input.

    ``leaf(name, op, g_out)`` returns the cotangent at an op's input, ``merge(name, op,
    g_out)`` the list of cotangents at a merge's inputs (default: an ``Add`` passes
    ``g_out`` to each input). Cotangents of a value read by several nodes are summed.
    """
    nodes, _ = net._dag
    grads = {nodes[-1].name: g}
    for node in reversed(nodes):
        g_out = grads.pop(node.name)
        if isinstance(node.op, Op):
            parts = [leaf(node.name, node.op, g_out)]
        elif merge is not None:
            parts = merge(node.name, node.op, g_out)
        elif isinstance(node.op, Add):
            parts = [g_out] * len(node.inputs)
        else:
            raise NotImplementedError(f"this reverse pass does not support "
                                      f"{type(node.op).__name__} nodes yet ({node.name!r})")
        for k, part in zip(node.inputs, parts):
            grads[k] = part if k not in grads else grads[k] + part
    return grads[INPUT]


def forward_pairs(forward: dict) -> Iterator[tuple[tuple[Array, ...], Array]]:
    """The recorded float ``(inputs, output)`` of every node, inputs always a tuple (a leaf
    records ``(x, y)``, a merge ``((x1, x2, ...), y)``)."""
    for xs, y in forward.values():
        yield (xs if isinstance(xs, tuple) else (xs,)), y


def check_finite_node(name: str, what: str, a: Array) -> Array:
    """Raise a clear error if a node's output left the float range."""
    if not np.all(np.isfinite(a)):
        raise ValueError(f"node {name!r}: the {what} contains NaN/Inf (shape {a.shape}); "
                         f"the inputs or parameters overflow float64 here")
    return a


class _FloatForward:
    def leaf(self, name, op, x):
        return check_finite_node(name, "output", op.forward(x))

    def merge(self, name, op, xs):
        return check_finite_node(name, "output", op.forward(xs))


def float_values(net: Network, x: Array) -> dict[str, tuple[Any, Array]]:
    """Node name -> its float ``(input, output)``; a merge's input is the tuple of its
    inputs. (What :func:`errprop.analyze` records as ``forward``.)"""
    out: dict[str, tuple[Any, Array]] = {}

    class _Record:
        def leaf(self, name, op, v):
            out[name] = (v, op.forward(v))
            return out[name][1]

        def merge(self, name, op, vs):
            out[name] = (tuple(vs), op.forward(vs))
            return out[name][1]

    with np.errstate(over="ignore", invalid="ignore"):
        walk(net, x, _Record())
    return out


# ------------------------------------------------------------------ the network
class Network:
    """What every errprop network is: named nodes in execution order (``nodes()``), its
    ops (``layers()``), access by name, the float forward ``net(x)``. Built by
    :class:`errprop.Sequential` or :class:`errprop.Graph`."""

    name: str | None

    def _finish(self, infos: list[NodeInfo], nodes: Sequence[Node]) -> None:
        self._infos = infos
        self._by_name = {info.name: info for info in infos}
        self._names = {id(info.node): info.name for info in infos}
        last = {k: i for i, node in enumerate(nodes) for k in node.inputs}
        self._dag = (tuple(nodes), last)
        facts = check_dag(nodes, {i.name: i.kind for i in infos})
        (self.in_features, self.out_features, self._in_reason, self.min_ndim,
         self.max_ndim, self._ndim_reason, self._max_reason) = facts

    # ---------------------------------------------------------------- access
    def nodes(self) -> list[NodeInfo]:
        """All named nodes (ops, merges and residual joins) in execution order."""
        return list(self._infos)

    def layers(self) -> list[tuple[str, Op]]:
        """``(name, op)`` for every one-input op, in execution order."""
        return [(i.name, i.node) for i in self._infos if isinstance(i.node, Op)]

    def dag(self) -> list[Node]:
        """The graph as :class:`Node` s (name, op, input names) in execution order; the
        network input is called ``""``."""
        return list(self._dag[0])

    def __getitem__(self, name: str):
        try:
            return self._by_name[name].node
        except KeyError:
            raise KeyError(unknown_name_message("node", name, list(self._by_name))) from None

    def name_of(self, node: object) -> str:
        return self._names[id(node)]

    def num_params(self) -> int:
        return sum(op.num_params() for _, op in self.layers())

    def __call__(self, x: object) -> Array:
        if is_symbolic((x,)):
            return node(self, (x,), block=self)
        x = check_input(self, x)
        # overflow is reported per node by the interpreter, not as a NumPy warning
        with np.errstate(over="ignore", invalid="ignore"):
            return walk(self, x, _FloatForward())

    def __repr__(self) -> str:
        title = type(self).__name__
        lines = [f"{title}({self.name!r})" if self.name else title]
        inputs = {n.name: n.inputs for n in self._dag[0]}
        for i, info in enumerate(self._infos):
            desc = info.node.describe() if hasattr(info.node, "describe") else "x + f(x)"
            ins = inputs[info.name]
            prev = self._infos[i - 1].name if i else ""
            if len(ins) > 1 or ins[0] != prev:
                desc += "  <- " + ", ".join(k or "input" for k in ins)
            lines.append(f"  {info.name:<24} {info.kind:<10} {desc}")
        return "\n".join(lines)


_IN = "input"  # a feature size equal to the network input's (not known yet)
_PROBE = 2 ** 40 + 7  # a feature size no op asks for: out_features(_PROBE) == _PROBE keeps it


def check_dag(nodes: Sequence[Node], kinds: dict[str, str]) -> tuple:
    """Check a node list (unique names, inputs defined before use, arities, feature sizes,
    numbers of axes) and return ``(in_features, out_features, in_reason, min_ndim,
    max_ndim, min_reason, max_reason)``."""
    if not nodes:
        raise ValueError("a network needs at least one node")
    features: dict[str, object] = {INPUT: _IN}
    shift: dict[str, int] = {INPUT: 0}
    in_f: int | None = None
    in_reason = None
    low, high, low_reason, high_reason = 2, None, None, None
    for node in nodes:
        name, op = node.name, node.op
        if name in features:
            raise ValueError(f"duplicate node name {name!r}")
        for k in node.inputs:
            if k not in features:
                raise ValueError(f"node {name!r} reads {k!r}, which is not defined before it")
        fs = [in_f if features[k] is _IN and in_f is not None else features[k]
              for k in node.inputs]
        if isinstance(op, Op):
            f, need = fs[0], op.in_features
            if need is not None and f is not _IN and f is not None and f != need:
                src = node.inputs[0]
                after = f", but the previous layer {src!r} outputs {f}" if src else \
                    f", but the network input has {f} (as {in_reason!r} expects)"
                raise ValueError(f"{type(op).__name__} {name!r} expects inputs with {need} "
                                 f"features{after}")
            if need is not None and f is _IN:
                in_f, in_reason, f = need, name, need
            if f is _IN:
                out = _IN if op.out_features(_PROBE) == _PROBE else op.out_features(None)
            else:
                out = op.out_features(f if f is not None else need)
            s = shift[node.inputs[0]]
            if op.min_ndim - s > low:
                low, low_reason = op.min_ndim - s, name
            cap = getattr(op, "max_ndim", None)
            if cap is not None and (high is None or cap - s < high):
                high, high_reason = cap - s, name
            if high is not None and low > high:
                raise ValueError(f"{type(op).__name__} {name!r} needs inputs with "
                                 f"{_axes(op)}, but with the axes the layers before it add "
                                 f"or remove, no network input fits (it would need at least "
                                 f"{low} and at most {high} axes)")
            shift[name] = s + op.ndim_change
        else:
            op.check_arity(len(node.inputs), name)
            if any(f is _IN for f in fs) and all(f is _IN or f is None for f in fs):
                out = _IN
            else:
                out = op.out_features([None if f is _IN else f for f in fs], name)
            shifts = {shift[k] for k in node.inputs}
            if len(shifts) > 1:
                raise ValueError(f"{type(op).__name__} {name!r}: its inputs have different "
                                 f"numbers of axes ({', '.join(k or 'input' for k in node.inputs)})")
            shift[name] = shifts.pop() + op.ndim_change
        features[name] = out
    out_f = features[nodes[-1].name]
    out_f = in_f if out_f is _IN else out_f
    return in_f, out_f, in_reason, low, high, low_reason, high_reason


def _axes(op: Op) -> str:
    cap = getattr(op, "max_ndim", None)
    if cap is not None and cap == op.min_ndim:
        return f"exactly {cap} axes"
    return f"at least {op.min_ndim} axes" + (f" and at most {cap}" if cap else "")


# ------------------------------------------------------------------ names and input
def suggest(name: str, known: list[str]) -> str:
    """``"; did you mean 'x'?"`` for a close match, else a short list of the known names."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return f"; known: {', '.join(known[:12])}{' ...' if len(known) > 12 else ''}"


def unknown_name_message(what: str, name: str, known: list[str]) -> str:
    return f"no {what} named {name!r}{suggest(name, known)}"


def check_input(net: Network, x: object, *, what: str = "input x") -> Array:
    """Validate a network input and return it as float64."""
    if not isinstance(net, Network):
        raise TypeError(f"expected an errprop Graph or Sequential network, got "
                        f"{type(net).__name__}")
    try:
        arr = real_array(x, "network input", what)
    except ValueError as exc:  # a ragged nested list
        raise TypeError(f"{what} must be a numeric array, got a {type(x).__name__} whose rows "
                        f"differ in length") from exc
    if arr.ndim < net.min_ndim:
        reason = net._ndim_reason
        op = net[reason] if reason else None
        if net.min_ndim == 3:
            because = getattr(op, "ndim_because", None) or (
                "the network contains attention" if op is None else
                f"{type(op).__name__} {reason!r} needs a token axis")
            raise ValueError(f"{what} must have shape (batch, tokens, features) because "
                             f"{because}, got {arr.shape}")
        if reason is None:
            raise ValueError(f"{what} must have shape (batch, features) or (batch, ..., "
                             f"features), got {arr.shape}")
        raise ValueError(f"{what} must have at least {net.min_ndim} axes because "
                         f"{type(op).__name__} {reason!r} needs {_axes(op)} there, got "
                         f"{arr.shape}")
    if net.max_ndim is not None and arr.ndim > net.max_ndim:
        reason = net._max_reason
        op = net[reason]
        if net.max_ndim == 2 and reason == net.layers()[0][0]:
            raise ValueError(f"{what} must have shape (batch, tokens) because the network "
                             f"starts with {reason!r}, got {arr.shape}")
        raise ValueError(f"{what} must have at most {net.max_ndim} axes because "
                         f"{type(op).__name__} {reason!r} takes {_axes(op)}, got {arr.shape}")
    if net.in_features is not None and arr.shape[-1] != net.in_features:
        raise ValueError(f"first layer {net._in_reason!r} expects inputs with "
                         f"{net.in_features} features, got {what} of shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{what} contains {bad} NaN/Inf value(s)")
    return arr

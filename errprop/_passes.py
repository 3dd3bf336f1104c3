"""Extra passes over an analysed graph: second order, interval and norm bounds.

(The rigorous bound over the real nonlinear network is in :mod:`errprop._rigorous`.)

Each is an interpreter for :func:`errprop._graph.walk` that reuses the float
forward values recorded by :func:`errprop.analyze` (a merge records its inputs as a tuple)
and calls one rule per node, a one-input op or a merge alike: ``jvp2`` (second-order Taylor
coefficient), ``abs_jvp`` (elementwise interval bound), ``norm_jvp`` (operator-norm bound
per batch element). A pass whose rule some node lacks refuses before any work
(:func:`require_rules`), naming the node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ._config import Source
from ._graph import Sequential, walk
from ._merge import Merge
from ._network import Network
from ._op import Array, Op, sample_norm
from ._report import SourceResult

Forward = Mapping[str, tuple[Array, Array]]
ByLayer = Mapping[str, list[Source]]

#: the base classes' placeholder rules, which only raise NotImplementedError: an op whose
#: class resolves a rule to one of these does not have it. (``Op.jvp2`` is not one: it is
#: a working numerical default from the op's own ``jvp``.)
_PLACEHOLDERS = frozenset({Op.vjp, Op.abs_jvp, Op.norm_jvp, Merge.jvp, Merge.vjp, Merge.jvp2,
                           Merge.abs_jvp, Merge.norm_jvp})


class MissingRule(NotImplementedError):
    """A pass needs a rule that a node's op does not have (raised before the pass runs)."""


def has_rule(op: Op | Merge, rule: str) -> bool:
    """Whether ``op`` has its own ``rule`` (``"vjp"``, ``"jvp2"``, ``"abs_jvp"``, ...), not
    the base class's placeholder."""
    method = getattr(type(op), rule, None)
    return method is not None and method not in _PLACEHOLDERS


def require_rules(net: Network, purpose: str, *rules: str) -> None:
    """Refuse a pass up front when a node's op lacks one of ``rules``: ``"interval bounds
    need abs_jvp, which Mul 'gate' does not have"``."""
    for node in net.dag():
        for rule in rules:
            if not has_rule(node.op, rule):
                raise MissingRule(f"{purpose} need {rule}, which {type(node.op).__name__} "
                                  f"{node.name!r} does not have (see docs/adding-an-op.md)")


class _SecondOrder:
    """Taylor-mode second order of the total error, ``Δ ≈ a + b``.

    ``a`` is the first-order total, ``b`` the second-order coefficient; at each op
    ``b_out = Jₓ b + ½ D²f[(a, dp), (a, dp)]`` (``Op.jvp2``): the cross terms
    ``ΔW·Δx``, the curvature ``½ f''(x) Δx²``, and the second derivatives of softmax,
    normalization and attention.
    """

    def __init__(self, forward: Forward, by_layer: ByLayer, dparams: Mapping[str, Array],
                 errors: Mapping[str, Array]) -> None:
        self.forward, self.by_layer, self.dparams, self.errors = forward, by_layer, dparams, errors
        self.nodes: dict[str, Array] = {}

    def leaf(self, name: str, op: Op, state: tuple) -> tuple:
        a, b = state
        x, y = self.forward[name]
        dps = {}
        for src in self.by_layer.get(name, []):
            if src.param is None:
                e = self.errors[src.name]
                a = e if a is None else a + e
            else:
                dps[src.param] = self.dparams[src.name]
        a_out = op.jvp(x, y, a, dps)
        b_out = op.jvp2(x, y, a, b, dps)
        self.nodes[name] = a_out + b_out
        return a_out, b_out

    def merge(self, name: str, op: Merge, states: list[tuple]) -> tuple:
        xs, y = self.forward[name]
        a_s = [a for a, _ in states]
        b_s = [b for _, b in states]
        if all(a is None for a in a_s):  # only before any source (b is None there too)
            self.nodes[name] = np.zeros_like(y)
            return None, None
        a_out = op.jvp(xs, y, a_s, {})
        b_out = op.jvp2(xs, y, a_s, b_s)
        self.nodes[name] = a_out + b_out
        return a_out, b_out


def second_order_pass(net: Sequential, forward: Forward, by_layer: ByLayer,
                      dparams: Mapping[str, Array],
                      sources: Mapping[str, SourceResult]) -> dict[str, Array]:
    """Second-order prediction of the exact error at every node."""
    require_rules(net, "second-order predictions", "jvp", "jvp2")
    errors = {k: v.error for k, v in sources.items() if v.source.param is None}
    second = _SecondOrder(forward, by_layer, dparams, errors)
    a0 = errors.get("input")
    with np.errstate(over="ignore", invalid="ignore"):
        walk(net, (a0, None if a0 is None else np.zeros_like(a0)), second)
    return second.nodes


def layer_sources(here: list[Source], sources: Mapping[str, SourceResult]
                  ) -> tuple[list[SourceResult], dict[str, Array]]:
    """A layer's sources split for a bound pass: the results of its input (activation)
    sources in the order they apply, and ``param -> max_abs`` for its parameter sources."""
    inputs, boxes = [], {}
    for src in here:
        if src.param is None:
            inputs.append(sources[src.name])
        else:
            boxes[src.param] = sources[src.name].model.max_abs
    return inputs, boxes


def sources_by_layer(sources: Mapping[str, SourceResult]) -> dict[str, list[Source]]:
    """Layer name -> its sources, in execution order (the network input has no layer)."""
    out: dict[str, list[Source]] = {}
    for result in sources.values():
        if result.source.layer is not None:
            out.setdefault(result.source.layer, []).append(result.source)
    return out


class _Bound:
    """A bound carried through the graph with one rule per op.

    ``"interval"``: ``|Δ| ≤ r`` elementwise (``Op.abs_jvp``, the Jacobian in absolute
    value stage by stage; looser than the exact worst case because
    ``|J₂ J₁| ≤ |J₂| |J₁|``). ``"norm"``: ``‖Δ_n‖ ≤ r_n`` per batch element
    (``Op.norm_jvp``, operator norms). Every source enters with its ``max_abs`` box;
    both hold for every error pattern in the boxes, at first order only (the real network
    can exceed them; :mod:`errprop._rigorous` bounds it).
    """

    def __init__(self, forward: Forward, by_layer: ByLayer,
                 sources: Mapping[str, SourceResult], rule: str,
                 enter: Callable[[Array], Array]) -> None:
        self.forward, self.by_layer, self.sources = forward, by_layer, sources
        self.rule, self.enter = rule, enter
        self.nodes: dict[str, Array] = {}

    def leaf(self, name: str, op: Op, r: Array | None) -> Array:
        x, y = self.forward[name]
        inputs, rparams = layer_sources(self.by_layer.get(name, []), self.sources)
        for result in inputs:
            box = self.enter(result.model.max_abs)
            r = box if r is None else r + box
        out = getattr(op, self.rule)(x, y, r, rparams)
        self.nodes[name] = out
        return out

    def merge(self, name: str, op: Merge, rs: list[Array | None]) -> Array:
        xs, y = self.forward[name]
        out = getattr(op, self.rule)(xs, y, rs)
        self.nodes[name] = out
        return out


def bound_pass(net: Sequential, forward: Forward, by_layer: ByLayer,
               sources: Mapping[str, SourceResult], kind: str) -> dict[str, Array]:
    """``kind="interval"``: elementwise bounds; ``"norm"``: per-batch-element norm bounds."""
    rule, enter = {"interval": ("abs_jvp", lambda box: box),
                   "norm": ("norm_jvp", sample_norm)}[kind]
    require_rules(net, f"{kind} bounds", rule)
    bound = _Bound(forward, by_layer, sources, rule, enter)
    r0 = enter(sources["input"].model.max_abs) if "input" in sources else None
    with np.errstate(over="ignore", invalid="ignore"):
        walk(net, r0, bound)
    return bound.nodes

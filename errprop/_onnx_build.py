"""ONNX import, stage 2: from semantic nodes to errprop's ``Sequential``/``Residual`` graph,
or a functional ``Graph`` when the network is a DAG.

1. **Elementwise regions.** Connected elementwise nodes (``Add``, ``Mul``, ``Div``, ``Erf``,
   ``Pow``, ``Sqrt``, ``ReduceMean``, ...) with one output are identified *by what they
   compute*, not by how they are spelled: a region with one network input is evaluated
   in float64 on probe inputs and recognised as an affine map (a bias add or scale, folded
   into the preceding ``Linear``/``LayerNorm``), one of errprop's activations (so an
   Erf-based GELU, a tanh-GELU or ``x·sigmoid(x)`` all work), or a LayerNorm / RMSNorm
   (whose ``gamma``, ``beta`` and ``eps`` are fitted, then verified). A leading chain of
   bias/scale ops (``MatMul → Add(bias) → Relu``) is folded first. A region that is none
   of these (or has two network inputs) and ends in a ``Mul``/``Add`` of two tensors is
   split there: each operand is recognised the same way (``silu(a) · b`` of a SwiGLU MLP,
   ``gelu(a) · b``, ``relu(h) + tanh(h)``) and joined by a ``Mul`` merge or an ``Add``.
2. **Attention.** An attention core whose queries, keys and values are slices of linear
   layers on one input, followed by one linear layer (the output projection), becomes an
   :class:`~errprop.Attention`; a score scale other than ``1/sqrt(head_dim)`` is folded
   into ``Wq``/``bq``.
3. **Structure.** From the output back to the input, a ``join`` (``Add`` of two tensors)
   becomes a ``Residual`` when one operand lies on the path of the other. A network that
   is a chain of layers and residuals is a ``Sequential`` (exactly as before DAGs were
   imported); any other (parallel branches, a ``Mul`` merge) is a functional ``Graph``.
"""

from __future__ import annotations

import math

import numpy as np

from ._activation import ACTIVATIONS, Activation
from ._attention import Attention
from ._functional import Graph
from ._graph import Residual
from ._linear import Linear
from ._merge import Mul
from ._norm import LayerNorm, RMSNorm
from ._onnx_graph import SNode, Unsupported, emit_graph
from ._onnx_trace import evaluate as _evaluate


def _close(a: np.ndarray, b: np.ndarray, rtol: float) -> bool:
    scale = float(np.max(np.abs(b))) or 1.0
    return bool(np.all(np.isfinite(a)) and np.max(np.abs(a - b)) <= rtol * scale)


def _affine(g, shape) -> tuple[np.ndarray, np.ndarray] | None:
    c = g(np.zeros(shape))
    a = g(np.ones(shape)) - c
    R = np.random.default_rng(0).normal(0.0, 3.0, shape)
    return (a, c) if _close(g(R), a * R + c, 1e-9) else None


def _activation(g, shape) -> str | None:
    rng = np.random.default_rng(1)
    n = int(np.prod(shape))
    probes = [np.linspace(lo, hi, n).reshape(shape) for lo, hi in ((-8, 8), (-2, 2), (8, -3))]
    probes.append(rng.normal(0.0, 3.0, shape))
    outs = [g(P) for P in probes]
    for kind, fn in ACTIVATIONS.items():
        if kind != "identity" and all(np.allclose(o, fn.f(P), rtol=1e-5, atol=1e-6)
                                      for o, P in zip(outs, probes)):
            return kind
    return None


def _fit_norm(g, shape) -> LayerNorm | RMSNorm | None:
    """Fit ``gamma, beta, eps`` of a LayerNorm (or RMSNorm) to ``g`` and verify it."""
    D = shape[-1]
    if D < 2:
        return None
    rng = np.random.default_rng(2)
    U = rng.normal(size=(3, *shape))
    U -= U.mean(axis=-1, keepdims=True)
    U /= np.sqrt(np.mean(U * U, axis=-1, keepdims=True))  # rows: mean 0, variance 1
    beta = g(np.zeros(shape)).reshape(-1, D)
    if not np.all(np.isfinite(beta)) or not np.allclose(beta, beta[:1]):
        return None
    beta = beta[0]
    r1 = np.stack([g(u) for u in U]) - beta
    r2 = np.stack([g(1e-2 * u) for u in U]) - beta
    # |r(s)| ∝ s / sqrt(s² + eps): the ratio of two scales gives eps
    rho2 = float(np.sum(r2 * r2) / np.sum(r1 * r1))
    s2 = 1e-4
    eps = s2 * (1.0 - rho2) / (rho2 - s2)
    if not (np.isfinite(eps) and eps > 0):
        return None
    gamma = (np.sum(r1 * U, axis=tuple(range(r1.ndim - 1))) /
             np.sum(U * U, axis=tuple(range(U.ndim - 1)))) * math.sqrt(1.0 + eps)
    X = rng.normal(1.5, 3.0, shape)
    for layer in (LayerNorm(gamma, beta, eps=eps), RMSNorm(gamma, eps=eps)):
        if isinstance(layer, RMSNorm) and np.any(beta):
            continue
        if _close(layer.forward(X), g(X), 1e-7):
            return layer
    return None


class Builder:
    """Turns the semantic graph ending at ``out`` into errprop layers (see module doc)."""

    def __init__(self, out: SNode | None, inp: SNode, sinks: list[SNode] = ()) -> None:
        self.out, self.inp, self.sinks = out, inp, list(sinks)
        self.issues: list[str] = []
        self.resolve: dict[int, SNode] = {}

    def get(self, n: SNode) -> SNode:
        while n.id in self.resolve:
            n = self.resolve[n.id]
        return n

    def parents(self, n: SNode) -> list[SNode]:
        return [self.get(s) for s in n.srcs]

    def reach(self) -> tuple[list[SNode], dict[int, list[SNode]]]:
        """Nodes reachable backwards from the output (by id = topological order) and
        each one's consumers."""
        seen: dict[int, SNode] = {}
        stack = [self.get(n) for n in (self.out, *self.sinks) if n is not None]
        while stack:
            n = stack.pop()
            if n.id not in seen:
                seen[n.id] = n
                stack.extend(self.parents(n))
        nodes = sorted(seen.values(), key=lambda n: n.id)
        cons: dict[int, list[SNode]] = {n.id: [] for n in nodes}
        for n in nodes:
            for p in {p.id: p for p in self.parents(n)}.values():
                cons[p.id].append(n)
        return nodes, cons

    # ---------------------------------------------------------------- stage 1
    def regions(self) -> None:
        nodes, cons = self.reach()
        ew = {n.id: n for n in nodes if n.kind in ("ew", "reduce")}
        group = {i: i for i in ew}

        def find(i):
            while group[i] != i:
                group[i] = group[group[i]]
                i = group[i]
            return i

        for n in ew.values():
            for p in n.srcs:
                if p.id in ew:
                    group[find(p.id)] = find(n.id)
        comps: dict[int, list[SNode]] = {}
        for i, n in ew.items():
            comps.setdefault(find(i), []).append(n)
        for comp in sorted(comps.values(), key=lambda c: min(n.id for n in c)):
            self._region(sorted(comp, key=lambda n: n.id), cons)

    def _region(self, R: list[SNode], cons) -> None:
        ids = {n.id for n in R}
        names = ", ".join(repr(name) for n in R for name in n.onnx)
        label = f"nodes {names} ({_ops(R)})"
        inputs = {p.id: p for n in R for p in n.srcs if p.id not in ids}
        outs = [n for n in R if n is self.out or n in self.sinks
                or any(c.id not in ids for c in cons[n.id])]
        srcs = ", ".join(repr(p.onnx[-1]) for p in inputs.values())
        combining = f"{label}: an elementwise computation combining {len(inputs)} network " \
                    f"tensors (from {srcs}) into {len(outs)} outputs is not an errprop layer"
        if len(outs) != 1:
            self.issues.append(combining)
            return
        out, why = outs[0], []
        tree = _tree(R, ids, out, cons, {}, why)
        if tree is None:
            if len(inputs) != 1:
                self.issues.append(f"{combining}; errprop reads such a region as f(a)·g(b) or "
                                   f"f(a) + g(b) with f, g errprop activations or the "
                                   f"identity{''.join(why[:1])}")
                return
            what = "normalization" if any(n.kind == "reduce" for n in R) else "function"
            self.issues.append(f"{label}: this elementwise {what} is none of errprop's "
                               f"activations ({', '.join(sorted(ACTIVATIONS))}), LayerNorm or "
                               f"RMSNorm, nor a bias/scale after a MatMul")
            return
        cur = self._build(tree, cons, label, {})
        if cur is not None:
            self.resolve[out.id] = cur

    def _build(self, tree: tuple, cons, label: str, memo: dict) -> SNode | None:
        """The semantic nodes of a region plan (see :func:`_tree`); None if a fold failed
        (the issue is recorded)."""
        if tree[0] == "input":
            return tree[1]
        if id(tree) in memo:
            return memo[id(tree)]
        if tree[0] == "chain":
            _, x, plan, sub = tree
            ids = {n.id for n in sub}
            cur = x
            for step in plan:
                if step[0] == "fold":
                    sole = cur is not x or all(n.id in ids for n in cons[x.id])
                    if not self._fold(cur, step[1], step[2], sole, label):
                        return None
                else:
                    cur = SNode("op", x.shape, [cur], [n for m in sub for n in m.onnx],
                                {"op": step[1]})
        else:
            _, out, parts = tree
            srcs = [self._build(p, cons, label, memo) for p in parts]
            if any(s is None for s in srcs):
                return None
            if out.data["op"] == "Add":  # a join: a residual or parallel branches (stage 3)
                cur = SNode("join", out.shape, srcs, list(out.onnx))
            else:
                cur = SNode("merge", out.shape, srcs, list(out.onnx), {"op": Mul()})
        memo[id(tree)] = cur
        return cur

    def _fold(self, x: SNode, a, c, sole: bool, label: str) -> bool:
        """Fold ``y = a ⊙ x + c`` (per feature) into the layer that produced ``x``."""
        D = x.shape[-1]
        a2, c2 = a.reshape(-1, D), c.reshape(-1, D)
        if not (np.all(a2 == a2[:1]) and np.all(c2 == c2[:1])):
            self.issues.append(f"{label}: a scale/shift that varies across tokens or batch "
                               f"rows has no errprop layer")
            return False
        a, c = a2[0], c2[0]
        if np.all(a == 1.0) and not np.any(c):
            return True
        if sole and x.kind == "linear":
            W, b = x.data["W"], x.data["b"]
            x.data["W"] = a[:, None] * W
            x.data["b"] = c if b is None else a * b + c
            return True
        op = x.data.get("op")
        if sole and isinstance(op, LayerNorm):
            op.params["gamma"] = a * op.params["gamma"]
            op.params["beta"] = a * op.params["beta"] + c
            return True
        if sole and isinstance(op, RMSNorm) and not np.any(c):
            op.params["gamma"] = a * op.params["gamma"]
            return True
        self.issues.append(f"{label}: a per-feature scale/shift that does not directly follow "
                           f"a MatMul/Gemm or LayerNorm (with no other use) has no errprop layer")
        return False

    # ---------------------------------------------------------------- stage 2
    def attention(self) -> None:
        nodes, cons = self.reach()
        for core in (n for n in nodes if n.kind == "core"):
            label = f"attention at nodes {', '.join(repr(o) for o in core.onnx)}"
            projs = self.parents(core)
            users = cons[core.id]
            if not all(p.kind == "linear" for p in projs):
                self.issues.append(f"{label}: queries, keys and values must each come from a "
                                   f"MatMul/Gemm (+ bias)")
                continue
            xs = {self.get(p.srcs[0]).id for p in projs}
            if len(xs) != 1:
                self.issues.append(f"{label}: queries, keys and values come from different "
                                   f"inputs (cross-attention is not supported)")
                continue
            if any(u is not core for p in projs for u in cons[p.id]):
                self.issues.append(f"{label}: a Q/K/V projection is also used elsewhere")
                continue
            if len(users) != 1 or users[0].kind != "linear" or self.get(self.out) is core:
                self.issues.append(f"{label}: the attention output must feed exactly one "
                                   f"MatMul/Gemm (the output projection)")
                continue
            self.resolve[users[0].id] = self._fuse(core, projs, users[0])

    def _fuse(self, core: SNode, projs: list[SNode], out: SNode) -> SNode:
        d = core.data
        inner = d["heads"] * d["hd"]
        fac = d["scale"] * math.sqrt(d["hd"])  # errprop scales scores by 1/sqrt(head_dim)
        params = {}
        for key, P, s, f in zip("qkv", projs, d["starts"], (fac, 1.0, d["v_scale"])):
            params[f"W{key}"] = P.data["W"][s:s + inner] * f
            b = P.data["b"]
            params[f"b{key}"] = None if b is None else b[s:s + inner] * f
        layer = Attention(params["Wq"], params["Wk"], params["Wv"], out.data["W"],
                          params["bq"], params["bk"], params["bv"], out.data["b"],
                          heads=d["heads"], causal=d["causal"])
        names = [n for p in (*projs, core, out) for n in p.onnx]
        return SNode("op", out.shape, [self.get(projs[0].srcs[0])], list(dict.fromkeys(names)),
                     {"op": layer})

    # ---------------------------------------------------------------- stage 3
    def structure(self) -> list | Graph:
        """The layers of a ``Sequential`` when the network is a chain of layers and
        residuals (as before DAGs were imported), else a functional ``Graph``."""
        try:
            return self._chain(self.get(self.out), self.inp)
        except Unsupported:
            return emit_graph(self.get(self.out), self.inp, self.parents, self._is_ancestor)

    def _is_ancestor(self, a: SNode, b: SNode) -> bool:
        stack, seen = [b], set()
        while stack:
            n = stack.pop()
            if n is a:
                return True
            if n.id not in seen:
                seen.add(n.id)
                stack.extend(self.parents(n))
        return False

    def _chain(self, n: SNode, stop: SNode) -> list:
        layers: list = []
        while n is not stop:
            if n.kind == "input":
                raise Unsupported("a branch does not pass through the tensor it is added to")
            names = ", ".join(repr(o) for o in n.onnx)
            if n.kind == "join":
                a, b = self.parents(n)
                if self._is_ancestor(b, a):
                    a, b = b, a
                elif not self._is_ancestor(a, b):
                    raise Unsupported(f"Add {names} joins two parallel branches; errprop's graph "
                                      f"supports x + f(x) residuals only")
                branch = self._chain(b, a)
                if not branch:
                    raise Unsupported(f"Add {names} adds a tensor to itself")
                layers.append(Residual(*branch))
                n = a
                continue
            if n.kind == "linear":
                layers.append(Linear(n.data["W"], n.data["b"]))
            elif n.kind == "op":
                layers.append(n.data["op"])
            else:
                raise Unsupported(f"nodes {names} ({n.kind}) could not be mapped to a layer")
            n = self.parents(n)[0]
        return layers[::-1]


def _is_affine_step(n: SNode) -> bool:
    """``Add/Sub/Mul`` with one constant, or ``Div`` of the stream by a constant."""
    if n.kind != "ew" or n.data["op"] not in ("Add", "Sub", "Mul", "Div"):
        return False
    args = n.data["args"]
    streams = [i for i, a in enumerate(args) if a is not None and a[0] == "s"]
    return len(streams) == 1 and (n.data["op"] != "Div" or streams[0] == 0)


def _plan(R: list[SNode], x: SNode, out: SNode, cons) -> list | None:
    """How the elementwise region ``R`` (input ``x``, output ``out``) maps onto errprop:
    a list of ``("fold", a, c)`` (scale/shift of the previous layer) and ``("layer", op)``
    steps, or None. Tries, in order: the whole region affine; a leading bias/scale chain
    followed by one activation or normalization; a cut into two consecutive regions."""
    shape = x.shape
    aff = _affine(lambda X: _evaluate(R, x, out, X), shape)
    if aff is not None:
        return [("fold", *aff)]
    ids = {n.id for n in R}
    pre: list[SNode] = []
    cur = x
    while len(cons[cur.id]) == 1 and cons[cur.id][0] is not out and \
            cons[cur.id][0].id in ids and _is_affine_step(cons[cur.id][0]):
        cur = cons[cur.id][0]
        pre.append(cur)
    core = [n for n in R if n not in pre]
    g = lambda X: _evaluate(core, cur, out, X)  # noqa: E731
    kind = _activation(g, shape)
    layer = Activation(kind) if kind else \
        _fit_norm(g, shape) if any(n.kind == "reduce" for n in core) else None
    if layer is not None:
        steps: list = [("layer", layer)]
        if pre:
            steps.insert(0, ("fold", *_affine(lambda X: _evaluate(pre, x, pre[-1], X), shape)))
        return steps
    for m in R:
        if m is out:
            continue
        A = _ancestors_within(m, ids)
        B = [n for n in R if n.id not in A]
        if not all((p.id in ids and p.id not in A) or p is m for n in B for p in n.srcs) or \
                any(c.id not in A for a in R if a.id in A and a is not m for c in cons[a.id]):
            continue
        first = _plan([n for n in R if n.id in A], x, m, cons)
        second = _plan(B, m, out, cons) if first is not None else None
        if second is not None:
            return first + second
    return None


def _ops(R: list[SNode]) -> str:
    return ", ".join(n.data.get("op", "ReduceMean") for n in R)


def _tree(R: list[SNode], ids: set[int], out: SNode, cons, memo: dict, why: list):
    """How the part of region ``R`` that computes ``out`` maps onto errprop nodes:
    ``("chain", x, plan, sub)`` (one network input ``x``, a :func:`_plan` over the nodes
    ``sub``), ``("merge", out, [operand, operand])`` for ``out = f(a) ⊙ g(b)`` or
    ``f(a) + g(b)`` whose operands are trees too, ``("input", x)`` for an operand that is a
    network tensor itself; None (and the first failing operand in ``why``) otherwise."""
    if out.id not in ids:
        return ("input", out)
    if out.id in memo:
        return memo[out.id]
    A = _ancestors_within(out, ids)
    sub = [n for n in R if n.id in A]
    inputs = {p.id: p for n in sub for p in n.srcs if p.id not in A}
    tree = None
    if len(inputs) == 1:
        plan = _plan(sub, next(iter(inputs.values())), out, cons)
        if plan is not None:
            tree = ("chain", next(iter(inputs.values())), plan, sub)
    if tree is None and out.kind == "ew" and out.data["op"] in ("Mul", "Add"):
        args = out.data["args"]
        if len(args) == 2 and all(a is not None and a[0] == "s" and a[2] == 1.0 for a in args):
            parts = [_tree(R, ids, out.srcs[a[1]], cons, memo, why) for a in args]
            if all(p is not None for p in parts):
                tree = ("merge", out, parts)
    if tree is None and len(inputs) == 1 and not why:
        names = ", ".join(repr(name) for n in sub for name in n.onnx)
        why.append(f" (the operand computed by nodes {names} ({_ops(sub)}) is none of them)")
    memo[out.id] = tree
    return tree


def _ancestors_within(m: SNode, ids: set[int]) -> set[int]:
    seen, stack = set(), [m]
    while stack:
        n = stack.pop()
        if n.id in ids and n.id not in seen:
            seen.add(n.id)
            stack.extend(n.srcs)
    return seen

"""ONNX import, stage 1: interpret the ONNX graph on *index arrays*.

Exporters wrap the few operations errprop cares about (matrix products, elementwise
functions, normalizations, softmax) in layout plumbing: ``Transpose``, ``Reshape``,
``Gather``, ``Squeeze``, ``Shape`` → ``Concat`` → ``Reshape``, ... Rather than matching
that plumbing node by node, every tensor that depends on the network input is carried as
a :class:`View`: a *semantic node* (an ``SNode``, whose value has a canonical layout
``(batch, [tokens,] features)``) plus an integer array ``idx`` of the tensor's shape
holding, for every element, its flat position in the semantic node. A layout op is then
simply run on ``idx`` (with ONNX's own reference implementation), so any chain of
reshapes and transposes is understood, whatever the exporter emitted.

Computations create semantic nodes: ``MatMul``/``Gemm`` with a constant weight on a view
whose last axis is a whole feature row → ``linear``; elementwise ops → ``ew`` (classified
in stage 2 as bias/scale, activation, or decomposed LayerNorm); ``LayerNormalization`` →
``op``; ``Add`` of two streams with different origins → ``join`` (a residual); and the
attention pattern ``softmax(q kᵀ · scale) v`` on head-split views → ``core``.
Everything that depends only on constants is folded.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from ._activation import ACTIVATIONS, Softmax
from ._norm import LayerNorm, RMSNorm
from ._onnx_graph import (UNKNOWN, Heads, Scores, SNode, Unsupported, View, canonical_const,
                          check_pair, decode_heads, feature_rows, is_full)

LAYOUT_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Gather", "Slice",
              "Split", "Expand", "Identity", "Dropout", "Cast", "Tile"}
EW_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "Sigmoid", "Relu", "Exp",
          "Neg", "Reciprocal", "Abs", "Softplus", "Gelu", "Max", "Min", "LeakyRelu",
          "HardSigmoid", "Elu", "Selu", "Softsign", "Clip", "Log"}
_FLOAT_TYPES = {1, 10, 11, 16}  # float, float16, double, bfloat16
_EW = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
    "Pow": np.power, "Sqrt": np.sqrt, "Erf": special.erf, "Tanh": np.tanh,
    "Sigmoid": special.expit, "Relu": lambda x: np.maximum(x, 0.0), "Exp": np.exp,
    "Neg": np.negative, "Reciprocal": lambda x: 1.0 / x, "Abs": np.abs, "Log": np.log,
    "Softplus": lambda x: np.logaddexp(0.0, x), "Softsign": lambda x: x / (1 + np.abs(x)),
    "Max": np.maximum, "Min": np.minimum,
}


def ew_value(node: SNode, env: dict) -> np.ndarray:
    """The float64 value of an ``ew``/``reduce`` node given its sources' values (``env``:
    node id -> canonical array)."""
    if node.kind == "reduce":
        x = env[node.srcs[0].id] * node.data["scale"]
        return np.broadcast_to(np.mean(x, axis=-1, keepdims=True), x.shape)
    d = node.data
    args = [None if a is None else env[node.srcs[a[1]].id] * a[2] if a[0] == "s" else a[1]
            for a in d["args"]]
    op, at = d["op"], d["attrs"]
    if op == "Gelu":
        kind = "gelu_tanh" if at.get("approximate", "none") == "tanh" else "gelu"
        return ACTIVATIONS[kind].f(args[0])
    if op == "LeakyRelu":
        return np.where(args[0] >= 0, args[0], at.get("alpha", 0.01) * args[0])
    if op == "HardSigmoid":
        return np.clip(at.get("alpha", 0.2) * args[0] + at.get("beta", 0.5), 0, 1)
    if op == "Elu":
        return np.where(args[0] > 0, args[0], at.get("alpha", 1.0) * np.expm1(args[0]))
    if op == "Selu":
        a, g = at.get("alpha", 1.67326319), at.get("gamma", 1.05070102)
        return g * np.where(args[0] > 0, args[0], a * np.expm1(args[0]))
    if op == "Clip":
        lo = args[1] if len(args) > 1 and args[1] is not None else at.get("min", -np.inf)
        hi = args[2] if len(args) > 2 and args[2] is not None else at.get("max", np.inf)
        return np.clip(args[0], lo, hi)
    out = args[0]
    for a in args[1:]:  # Max/Min are variadic; the rest are unary or binary
        out = _EW[op](out, a)
    return _EW[op](out) if len(args) == 1 else out


def evaluate(nodes: list[SNode], start: SNode, out: SNode, X: np.ndarray) -> np.ndarray:
    """The value of ``out`` when ``start`` is ``X`` (``nodes``: the region, in order)."""
    env = {start.id: X}
    with np.errstate(all="ignore"):
        for n in nodes:
            env[n.id] = ew_value(n, env)
    return env[out.id]


def run_node(node, feeds: list, opsets) -> list:
    """Evaluate one ONNX node on NumPy arrays with ONNX's reference implementation."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if name else "" for i, name in enumerate(node.input)]
    outs = [f"out{i}" for i in range(len(node.output))]
    copy = helper.make_node(node.op_type, names, outs, domain=node.domain)
    copy.attribute.extend(node.attribute)
    graph = helper.make_graph([copy], "node", [helper.make_tensor_value_info(n, 0, None)
                                               for n in names if n],
                              [helper.make_tensor_value_info(n, 0, None) for n in outs])
    model = helper.make_model(graph, opset_imports=list(opsets))
    feed = {n: np.asarray(v) for n, v in zip(names, feeds) if n}
    return list(ReferenceEvaluator(model).run(None, feed))


def attrs_of(node) -> dict:
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


class Tracer:
    """Interprets an ONNX graph node by node (see the module docstring)."""

    def __init__(self, opsets) -> None:
        self.opsets = opsets
        self.issues: list[str] = []
        #: nodes feeding an unsupported node: still checked, so one error lists everything
        self.sinks: dict[int, SNode] = {}

    # ------------------------------------------------------------------ dispatch
    def node(self, node, ins: list) -> list:
        op = node.op_type
        n_out = len(node.output)
        if any(v is UNKNOWN for v in ins):
            self._sink(ins)
            return [UNKNOWN] * n_out
        try:
            if node.domain not in ("", "ai.onnx"):
                raise Unsupported(f"custom domain {node.domain!r}")
            if all(v is None or isinstance(v, np.ndarray) for v in ins):
                return run_node(node, ins, self.opsets)
            return self._dispatch(node, op, ins, n_out)
        except Unsupported as exc:
            self.issues.append(f"{node.name or node.output[0]!r} ({op}): {exc}")
            self._sink(ins)
            return [UNKNOWN] * n_out

    def _sink(self, ins: list) -> None:
        for v in ins:
            for n in ([v.node] if isinstance(v, View) else
                      [v.q.node, v.k.node] if isinstance(v, Scores) else []):
                self.sinks[n.id] = n

    def _dispatch(self, node, op, ins, n_out):
        attrs = attrs_of(node)
        if op in ("Shape", "Size"):
            return run_node(node, [self._view(ins[0]).idx], self.opsets)
        if op in LAYOUT_OPS:
            return self._layout(node, op, ins, attrs, n_out)
        if op in ("MatMul", "Gemm"):
            return [self._matmul(node, op, ins, attrs)]
        if op == "Softmax":
            return [self._softmax(node, ins[0], attrs)]
        if op in ("LayerNormalization", "RMSNormalization"):
            if n_out > 1 and any(node.output[1:]):
                raise Unsupported("its mean / inverse-std outputs are used")
            return [self._norm(node, op, ins, attrs)] + [None] * (n_out - 1)
        if op == "ReduceMean":
            return [self._reduce(node, ins, attrs)]
        if op in EW_OPS:
            return [self._elementwise(node, op, ins, attrs)]
        if op == "Concat":
            raise Unsupported("concatenating network tensors (e.g. a class token) has no errprop "
                              "layer")
        raise Unsupported(f"op type {op} is not supported")

    @staticmethod
    def _view(v) -> View:
        if isinstance(v, View):
            return v
        if isinstance(v, Scores):
            raise Unsupported("attention scores are used outside the softmax(q kᵀ) v pattern")
        raise Unsupported(f"expected a network tensor, got {type(v).__name__}")

    # ------------------------------------------------------------------ layout
    def _layout(self, node, op, ins, attrs, n_out):
        if op == "Cast" and attrs.get("to") not in _FLOAT_TYPES:
            raise Unsupported("casting a network tensor to a non-float type")
        if op == "Dropout" and n_out > 1 and node.output[1]:
            raise Unsupported("its mask output is used")
        if op == "Gather" and isinstance(ins[1], (View, Scores)):
            raise Unsupported("gathering with network-computed indices (an embedding lookup) "
                              "is not an errprop layer")
        if isinstance(ins[0], Scores):
            raise Unsupported("reshaping attention scores is not part of the supported "
                              "attention pattern")
        v = self._view(ins[0])
        if any(isinstance(x, (View, Scores)) for x in ins[1:]):
            raise Unsupported("its shape/index inputs depend on network values")
        if op in ("Identity", "Dropout", "Cast"):
            return [v] + [None] * (n_out - 1)
        if v.rowwise:
            raise Unsupported("layout change of a per-row mean")
        outs = run_node(node, [v.idx] + ins[1:], self.opsets)
        return [View(v.node, np.asarray(o), v.scale) for o in outs]

    # ------------------------------------------------------------------ matmul
    def _linear(self, node, v: View, W: np.ndarray, b: np.ndarray | None) -> View:
        """``v @ Wᵀ + b`` with ``W: (out, in)``: a new linear node and the output view."""
        rows = feature_rows(v)
        N = W.shape[0]
        L = SNode("linear", (*v.node.shape[:-1], N), [v.node], [node.name],
                  {"W": W.astype(np.float64) * v.scale,
                   "b": None if b is None else b.astype(np.float64)})
        return View(L, rows[..., None] * N + np.arange(N))

    def _matmul(self, node, op, ins, attrs) -> View | Scores:
        A, B = ins[0], ins[1]
        if op == "Gemm":
            if not isinstance(B, np.ndarray) or not isinstance(A, View):
                raise Unsupported("Gemm is supported as (network tensor) × (constant weight)")
            if attrs.get("transA", 0):
                A = View(A.node, A.idx.T, A.scale, A.rowwise)
            alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
            W = alpha * (B if attrs.get("transB", 0) else B.T)
            b = None
            if len(ins) > 2 and ins[2] is not None:
                C = ins[2]
                if not isinstance(C, np.ndarray):
                    raise Unsupported("the Gemm bias C depends on network values")
                Cb = np.broadcast_to(C, (A.idx.shape[0], W.shape[0]))
                if not np.all(Cb == Cb[:1]):
                    raise Unsupported("the Gemm bias C differs between rows")
                b = beta * Cb[0]
            return self._linear(node, A, W, b)
        if isinstance(A, View) and isinstance(B, np.ndarray):
            if B.ndim != 2:
                raise Unsupported(f"the constant operand has shape {B.shape}; a weight "
                                  f"matrix (in, out) is expected")
            return self._linear(node, A, B.T, None)
        if isinstance(A, np.ndarray) and isinstance(B, View):
            if A.ndim != 2:
                raise Unsupported(f"the constant operand has shape {A.shape}; a weight "
                                  f"matrix (out, in) is expected")
            Bt = View(B.node, np.swapaxes(B.idx, -1, -2), B.scale, B.rowwise)
            out = self._linear(node, Bt, A, None)
            return View(out.node, np.swapaxes(out.idx, -1, -2))
        if isinstance(A, View) and isinstance(B, View):
            q, k = decode_heads(A, True), decode_heads(B, False)
            check_pair(q, k, "keys")
            if q.hd != k.hd:
                raise Unsupported("query and key head sizes differ")
            return Scores(q, k, A.scale * B.scale, [node.name])
        if isinstance(A, Scores) and A.probs and isinstance(B, View):
            v = decode_heads(B, True)
            check_pair(A.q, v, "values")
            if v.hd != A.q.hd:
                raise Unsupported("value head size differs from the query head size")
            return self._core(node, A, v, B.scale)
        raise Unsupported("a matrix product that is neither (tensor × weight) nor part of "
                          "softmax(q kᵀ) v attention")

    def _core(self, node, s: Scores, v: Heads, v_scale: float) -> View:
        q, k = s.q, s.k
        B, T, _ = q.node.shape
        inner = q.H * q.hd
        core = SNode("core", (B, T, inner), [q.node, k.node, v.node], s.onnx + [node.name],
                     {"starts": (q.start, k.start, v.start), "heads": q.H, "hd": q.hd,
                      "scale": s.scale, "causal": s.causal, "v_scale": v_scale})
        t = np.arange(T)[None, :, None]
        c = np.arange(q.hd)[None, None, :]
        idx = (q.b[:, None, None] * T + t) * inner + q.h[:, None, None] * q.hd + c
        return View(core, idx.reshape(*q.lead, T, q.hd))

    # ------------------------------------------------------------- row-wise ops
    def _softmax(self, node, x, attrs):
        axis = int(attrs.get("axis", -1))
        if isinstance(x, Scores):
            ndim = len(x.q.lead) + 2
            if axis not in (-1, ndim - 1) or x.probs:
                raise Unsupported("softmax of attention scores must run over the key axis")
            return Scores(x.q, x.k, x.scale, x.onnx + [node.name], x.causal, True)
        v = self._view(x)
        if axis not in (-1, v.idx.ndim - 1):
            raise Unsupported(f"softmax over axis {axis} is not over the feature axis")
        rows = feature_rows(v)
        if v.scale != 1.0:
            raise Unsupported("softmax of a scaled tensor outside attention")
        y = SNode("op", v.node.shape, [v.node], [node.name], {"op": Softmax()})
        return View(y, rows[..., None] * v.node.shape[-1] + np.arange(v.node.shape[-1]))

    def _norm(self, node, op, ins, attrs):
        v = self._view(ins[0])
        axis = int(attrs.get("axis", -1))
        if axis not in (-1, v.idx.ndim - 1):
            raise Unsupported(f"normalization over axes from {axis} on, not only the feature axis")
        rows = feature_rows(v)
        if v.scale != 1.0:
            raise Unsupported("normalization of a scaled tensor")
        if not all(isinstance(p, np.ndarray) or p is None for p in ins[1:]):
            raise Unsupported("its scale/bias depend on network values")
        D = v.node.shape[-1]
        gamma = np.broadcast_to(ins[1], (D,))
        eps = float(attrs.get("epsilon", 1e-5))
        if op == "LayerNormalization":
            beta = np.zeros(D) if len(ins) < 3 or ins[2] is None else np.broadcast_to(ins[2], (D,))
            layer = LayerNorm(gamma, beta, eps=eps)
        else:
            layer = RMSNorm(gamma, eps=eps)
        y = SNode("op", v.node.shape, [v.node], [node.name], {"op": layer})
        return View(y, rows[..., None] * D + np.arange(D))

    def _reduce(self, node, ins, attrs):
        v = self._view(ins[0])
        axes = attrs.get("axes")
        if axes is None and len(ins) > 1 and ins[1] is not None:
            axes = [int(a) for a in np.ravel(ins[1])]
        nd = v.idx.ndim
        if axes is None or [a % nd for a in axes] != [nd - 1] or not attrs.get("keepdims", 1):
            raise Unsupported("only a mean over the feature (last) axis with keepdims=1 is "
                              "supported (decomposed LayerNorm)")
        feature_rows(v)
        if not is_full(v):
            raise Unsupported("mean over part of a tensor")
        y = SNode("reduce", v.node.shape, [v.node], [node.name], {"scale": v.scale},
                  roots=v.node.roots if v.node.kind in ("ew", "reduce") else
                  frozenset({v.node.id}))
        return View(y, v.idx[..., :1], rowwise=True)

    # -------------------------------------------------------------- elementwise
    def _elementwise(self, node, op, ins, attrs):
        streams = [i for i, v in enumerate(ins) if isinstance(v, (View, Scores))]
        consts = [i for i, v in enumerate(ins) if isinstance(v, np.ndarray)]
        scalar = len(consts) == 1 and ins[consts[0]].size == 1
        if any(isinstance(ins[i], Scores) for i in streams):
            return self._on_scores(node, op, ins, streams, consts)
        views = [ins[i] for i in streams]
        if op in ("Mul", "Div") and len(streams) == 1 and scalar and \
                (op == "Mul" or streams[0] == 0) and not is_full(views[0]):
            c = float(ins[consts[0]].ravel()[0])
            v = views[0]
            return View(v.node, v.idx, v.scale * (c if op == "Mul" else 1.0 / c), v.rowwise)
        for v in views:
            if not is_full(v):
                raise Unsupported("elementwise op on part of a tensor (a slice of features "
                                  "or tokens) has no errprop layer")
        normal = [v for v in views if not v.rowwise]
        ref = normal[0] if normal else views[0]
        out_shape = np.broadcast_shapes(*(np.shape(v) if isinstance(v, np.ndarray) else
                                          v.idx.shape for v in ins if v is not None))
        if out_shape != ref.idx.shape:
            raise Unsupported(f"broadcasting network tensors to {out_shape} is not elementwise")
        canon = ref.node.shape
        for v in views:
            if v.node.shape != canon:
                raise Unsupported("operands have different layouts")
            want = ref.idx[..., :1] if v.rowwise and not ref.rowwise else ref.idx
            if not np.array_equal(v.idx, want):
                raise Unsupported("operands are laid out differently (e.g. one transposed)")
        args = []
        for i, v in enumerate(ins):
            if v is None:
                args.append(None)
            elif isinstance(v, View):
                args.append(("s", streams.index(i), v.scale))
            else:
                args.append(("c", canonical_const(v, ref)))
        nodes = [v.node for v in views]
        if op == "Add" and len(views) == 2 and not any(v.rowwise for v in views) and \
                nodes[0].roots != nodes[1].roots and all(v.scale == 1.0 for v in views):
            y = SNode("join", canon, nodes, [node.name])
        else:
            roots = frozenset().union(*(n.roots for n in nodes))
            y = SNode("ew", canon, nodes, [node.name], {"op": op, "attrs": attrs, "args": args},
                      roots=roots)
        return View(y, ref.idx, rowwise=ref.rowwise)

    def _on_scores(self, node, op, ins, streams, consts):
        s = ins[streams[0]]
        if len(streams) != 1 or len(consts) != 1 or s.probs:
            raise Unsupported("attention scores combined with another network tensor")
        c = ins[consts[0]]
        if op in ("Mul", "Div") and c.size == 1 and (op == "Mul" or streams[0] == 0):
            f = float(c.ravel()[0])
            return Scores(s.q, s.k, s.scale * (f if op == "Mul" else 1.0 / f),
                          s.onnx + [node.name], s.causal)
        if op == "Add" and not s.causal:
            T = s.q.T
            m = np.broadcast_to(c, (*s.q.lead, T, T)).reshape(-1, T, T)
            upper = np.triu(np.ones((T, T), dtype=bool), 1)
            if np.all(m[:, ~upper] == 0) and np.all(m[:, upper] <= -1e4):
                return Scores(s.q, s.k, s.scale, s.onnx + [node.name], True)
            raise Unsupported("an additive attention mask other than a causal one")
        raise Unsupported(f"{op} on attention scores")

"""Import an ONNX model (an exported MLP or transformer encoder) as an errprop graph.

The importer works in two stages (``_onnx_trace``: interpret the graph on index arrays
so layout plumbing disappears; ``_onnx_build``: recognise layers, residuals and merges;
a chain becomes a ``Sequential``, a DAG a functional ``Graph``), collects
*every* node or pattern it cannot express before failing, and finally checks that the
imported graph reproduces the model (onnxruntime, or ONNX's reference evaluator) on a
random input. See ``docs/real-models-onnx.md``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from ._checks import check_bool, check_int
from ._files import MEMORY_LIMIT, FileFormatError, check_bytes
from ._optional import optional
from ._functional import Graph
from ._graph import Sequential
from ._network import Network
from ._onnx_build import Builder
from ._onnx_graph import UNKNOWN, SNode, Unsupported, View
from ._onnx_trace import Tracer

_DEFAULT_DIMS = (2, 3, 4, 5)


def _require_onnx() -> Any:
    return optional("onnx", feature="errprop.from_onnx", extra="onnx")


def _input_shape(value_info, given: tuple[int, ...] | None) -> tuple[int, ...]:
    dims = value_info.type.tensor_type.shape.dim
    shape = []
    for i, d in enumerate(dims):
        if given is not None:
            shape.append(int(given[i]) if i < len(given) else -1)
        elif d.HasField("dim_value") and d.dim_value > 0:
            shape.append(int(d.dim_value))
        else:
            shape.append(_DEFAULT_DIMS[i % len(_DEFAULT_DIMS)])
    if given is not None and len(given) != len(dims):
        raise ValueError(f"input_shape {tuple(given)} has {len(given)} axes, the model input "
                         f"{value_info.name!r} has {len(dims)}")
    if len(shape) not in (2, 3):
        raise ValueError(f"the model input {value_info.name!r} has {len(shape)} axes; errprop "
                         f"needs (batch, features) or (batch, tokens, features)")
    return tuple(shape)


def from_onnx(model: str | os.PathLike | Any, *, input_shape: tuple[int, ...] | None = None,
              verify: bool = True, memory_limit: int = MEMORY_LIMIT) -> Sequential | Graph:
    """Import an ONNX model as an errprop :class:`Sequential` (or :class:`Graph`).

    Parameters
    ----------
    model : path to an ``.onnx`` file, or an ``onnx.ModelProto``. One float input
        ``(batch, features)`` or ``(batch, tokens, features)``, one output.
    input_shape : a concrete input shape for tracing when the model's input has symbolic
        dimensions (default: the declared sizes, symbolic ones set to 2, 3, 4).
    verify : run the model (onnxruntime if installed, else ONNX's reference evaluator) and
        the imported graph on a random input of that shape and raise if they differ.
    memory_limit : bytes (default 4 GiB). The importer traces every tensor as an int64
        index array of its shape; before anything is allocated, the input shape and every
        shape ONNX's shape inference derives from it are checked: one needing more than
        ``memory_limit`` bytes (8 per element) is refused with a
        :class:`errprop.FileFormatError`.

    Returns
    -------
    Sequential, float64 parameters, layers named as errprop's builders name them
    (``fc1, relu1, attn1, res1, ln1, ...``). A network that is not a chain of layers and
    residuals (a gated MLP ``down(silu(gate(x)) * up(x))``, parallel branches added) is a
    functional :class:`Graph` with ``Mul``/``Add`` merges, its nodes named the same way
    in the order a walk from the output back to the input finishes them
    (``fc1, silu1, fc2, mul1, fc3``).

    Raises
    ------
    ImportError : onnx is not installed (``pip install "errprop[onnx]"``).
    ValueError : the model uses ops or patterns errprop cannot express. The message lists
        *all* of them, each with its ONNX node name(s) and op type(s).
    FileFormatError : (a ``ValueError``) the file is not a readable ONNX model, or its
        declared shapes exceed ``memory_limit``.

    Notes
    -----
    Supported: ``MatMul``/``Gemm`` (any ``transA/transB/alpha/beta``) with a constant weight,
    bias and scale ops folded into it; ``Relu, Gelu, Tanh, Sigmoid`` and any elementwise
    subgraph equal to one of errprop's activations (Erf- or tanh-GELU, SiLU); ``Softmax``
    over features; ``LayerNormalization``, ``RMSNormalization`` and their decomposed
    ``ReduceMean/Sub/Pow/Sqrt/Div`` forms; multi-head self-attention (packed or separate
    Q/K/V projections, any reshape/transpose into heads, scaled ``q kᵀ``, optional causal
    mask, softmax, ``A v``, merge, output projection); ``Add`` of a branch to its input
    (→ ``Residual``); ``f(a) * g(b)`` and ``f(a) + g(b)`` of two tensors, ``f, g`` errprop
    activations or the identity (→ ``Mul`` / ``Add`` merges of a ``Graph``); all layout
    and shape plumbing (``Reshape, Transpose, Squeeze, Unsqueeze, Gather, Slice, Split,
    Shape, Concat`` of shapes, ``Identity, Dropout, Constant, Cast``).
    """
    onnx = _require_onnx()
    verify = check_bool(verify, "from_onnx", "verify")
    memory_limit = check_int(memory_limit, "from_onnx", "memory_limit", minimum=1)
    if isinstance(model, onnx.ModelProto):
        proto, label, file = model, "ONNX model", "ONNX model"
    elif isinstance(model, (str, os.PathLike)):
        file = os.fspath(model)
        proto, label = _read(onnx, file), f"ONNX model {file!r}"
    else:
        raise TypeError(f"from_onnx expects a path or an onnx.ModelProto, got "
                        f"{type(model).__name__}")
    graph = proto.graph
    values: dict[str, Any] = _initializers(graph, file)
    inputs = [i for i in graph.input if i.name not in values]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(f"{label}: errprop imports models with one input and one output, got "
                         f"inputs {[i.name for i in inputs]} and outputs "
                         f"{[o.name for o in graph.output]}")
    if inputs[0].type.tensor_type.elem_type not in (1, 11):
        raise ValueError(f"{label}: the input {inputs[0].name!r} must be float32 or float64 "
                         f"(token ids need an embedding, which from_onnx does not import)")
    shape = _input_shape(inputs[0], input_shape)
    _check_sizes(onnx, proto, inputs[0], shape, memory_limit, file)
    inp = SNode("input", shape, [], [inputs[0].name])
    values[inputs[0].name] = View(inp, np.arange(int(np.prod(shape))).reshape(shape))

    tracer = Tracer(proto.opset_import)
    for node in graph.node:
        outs = tracer.node(node, [values.get(name) if name else None for name in node.input])
        values.update(zip(node.output, outs))
    issues = tracer.issues
    out = values.get(graph.output[0].name)
    if out is not UNKNOWN and not isinstance(out, View):
        issues.append(f"output {graph.output[0].name!r} does not depend on the input")
    elif isinstance(out, View) and not (out.scale == 1.0 and not out.rowwise and np.array_equal(
            out.idx, np.arange(out.idx.size).reshape(out.node.shape))):
        issues.append(f"output {graph.output[0].name!r} is a rearranged (transposed, sliced or "
                      f"scaled) layer output; errprop outputs keep the (batch, ..., features) "
                      f"layout")
    builder = Builder(out.node if isinstance(out, View) else None, inp, tracer.sinks.values())
    builder.regions()
    issues = issues + builder.issues
    if not issues:
        builder.attention()
        issues = builder.issues
        if not issues:
            try:
                layers = builder.structure()
            except Unsupported as exc:
                issues = [str(exc)]
    if issues:
        lines = "\n".join(f"  - {m}" for m in issues)
        raise ValueError(f"{label} cannot be imported: {len(issues)} unsupported node(s) or "
                         f"pattern(s):\n{lines}\n(see docs/real-models-onnx.md for what is "
                         f"supported)")
    if isinstance(layers, Graph):
        net: Network = layers
    elif not layers:
        raise ValueError(f"{label}: the output equals the input; there is no layer to import")
    else:
        net = Sequential(layers)
    if verify:
        _verify(proto, net, inputs[0], shape, label)
    return net


def _read(onnx: Any, file: str) -> Any:
    """``onnx.load(file)``; a damaged or malformed file names itself."""
    from google.protobuf.message import DecodeError

    if not os.path.isfile(file):
        raise FileNotFoundError(f"from_onnx: no such file: {file}")
    try:
        return onnx.load(file)
    except DecodeError as exc:
        raise FileFormatError(file, f"is not an ONNX model (protobuf: {exc})") from None
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise FileFormatError(file, f"ONNX cannot load it: {exc}") from None


def _initializers(graph: Any, file: str) -> dict[str, Any]:
    from onnx import numpy_helper

    values = {}
    for t in graph.initializer:
        try:
            values[t.name] = numpy_helper.to_array(t)
        except (ValueError, TypeError) as exc:
            raise FileFormatError(file, f"initializer {t.name!r} (dims {list(t.dims)}) does not "
                                  f"hold the data it declares: {exc}") from None
    return values


def _check_sizes(onnx: Any, proto: Any, value_info: Any, shape: tuple[int, ...],
                 memory_limit: int, file: str) -> None:
    """Refuse the model before tracing if the input, or a tensor whose shape ONNX infers
    from it, needs more than ``memory_limit`` bytes as an int64 index array."""
    check_bytes(8 * math.prod(shape), memory_limit, file,
                f"tracing the input {value_info.name!r} of shape {shape}")
    concrete = onnx.ModelProto()
    concrete.CopyFrom(proto)
    for v in concrete.graph.input:
        if v.name == value_info.name:
            for d, n in zip(v.type.tensor_type.shape.dim, shape):
                d.Clear()
                d.dim_value = n
    try:
        inferred = onnx.shape_inference.infer_shapes(concrete, data_prop=True).graph
    except Exception:  # noqa: BLE001 - inference is only a pre-check; the tracer reports
        return
    for v in (*inferred.value_info, *inferred.output):
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            size = math.prod(d.dim_value for d in dims)
            check_bytes(8 * size, memory_limit, file,
                        f"tracing the tensor {v.name!r} of shape "
                        f"{tuple(d.dim_value for d in dims)} (inferred for input {shape})")


def _verify(proto, net: Network, value_info, shape, label) -> None:
    """Raise if ``net`` and the ONNX model disagree on a random input."""
    dtype = np.float64 if value_info.type.tensor_type.elem_type == 11 else np.float32
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    try:
        import onnxruntime as ort

        session = ort.InferenceSession(proto.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        ref = session.run(None, {value_info.name: x})[0]
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        ref = ReferenceEvaluator(proto).run(None, {value_info.name: x})[0]
    got = net(x.astype(np.float64))
    scale = float(np.max(np.abs(ref))) or 1.0
    err = float(np.max(np.abs(got - ref))) / scale if got.shape == ref.shape else np.inf
    if not err <= 1e-4:
        raise ValueError(f"{label}: the imported graph does not reproduce the model on a random "
                         f"input of shape {shape} (max error {err:.2e} relative to max |y|); "
                         f"this pattern is not understood correctly, please report it")

"""Import an ONNX model (an exported MLP or transformer encoder) as an errprop graph.

The importer works in two stages (``_onnx_trace``: interpret the graph on index arrays
so layout plumbing disappears; ``_onnx_build``: recognise layers and residuals), collects
*every* node or pattern it cannot express before failing, and finally checks that the
imported graph reproduces the model (onnxruntime, or ONNX's reference evaluator) on a
random input. See ``docs/real-models-onnx.md``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._optional import optional
from ._graph import Sequential
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
              verify: bool = True) -> Sequential:
    """Import an ONNX model as an errprop :class:`Sequential`.

    Parameters
    ----------
    model : path to an ``.onnx`` file, or an ``onnx.ModelProto``. One float input
        ``(batch, features)`` or ``(batch, tokens, features)``, one output.
    input_shape : a concrete input shape for tracing when the model's input has symbolic
        dimensions (default: the declared sizes, symbolic ones set to 2, 3, 4).
    verify : run the model (onnxruntime if installed, else ONNX's reference evaluator) and
        the imported graph on a random input of that shape and raise if they differ.

    Returns
    -------
    Sequential, float64 parameters, layers named as errprop's builders name them
    (``fc1, relu1, attn1, res1, ln1, ...``).

    Raises
    ------
    ImportError : onnx is not installed (``pip install "errprop[onnx]"``).
    ValueError : the model uses ops or patterns errprop cannot express. The message lists
        *all* of them, each with its ONNX node name(s) and op type(s).

    Notes
    -----
    Supported: ``MatMul``/``Gemm`` (any ``transA/transB/alpha/beta``) with a constant weight,
    bias and scale ops folded into it; ``Relu, Gelu, Tanh, Sigmoid`` and any elementwise
    subgraph equal to one of errprop's activations (Erf- or tanh-GELU, SiLU); ``Softmax``
    over features; ``LayerNormalization``, ``RMSNormalization`` and their decomposed
    ``ReduceMean/Sub/Pow/Sqrt/Div`` forms; multi-head self-attention (packed or separate
    Q/K/V projections, any reshape/transpose into heads, scaled ``q kᵀ``, optional causal
    mask, softmax, ``A v``, merge, output projection); ``Add`` of a branch to its input
    (→ ``Residual``); all layout and shape plumbing (``Reshape, Transpose, Squeeze,
    Unsqueeze, Gather, Slice, Split, Shape, Concat`` of shapes, ``Identity, Dropout,
    Constant, Cast``).
    """
    onnx = _require_onnx()
    from onnx import numpy_helper

    if isinstance(model, onnx.ModelProto):
        proto, label = model, "ONNX model"
    elif isinstance(model, (str, os.PathLike)):
        proto, label = onnx.load(os.fspath(model)), f"ONNX model {os.fspath(model)!r}"
    else:
        raise TypeError(f"from_onnx expects a path or an onnx.ModelProto, got "
                        f"{type(model).__name__}")
    graph = proto.graph
    values: dict[str, Any] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in values]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(f"{label}: errprop imports models with one input and one output, got "
                         f"inputs {[i.name for i in inputs]} and outputs "
                         f"{[o.name for o in graph.output]}")
    if inputs[0].type.tensor_type.elem_type not in (1, 11):
        raise ValueError(f"{label}: the input {inputs[0].name!r} must be float32 or float64 "
                         f"(token ids need an embedding, which from_onnx does not import)")
    shape = _input_shape(inputs[0], input_shape)
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
    if not layers:
        raise ValueError(f"{label}: the output equals the input; there is no layer to import")
    net = Sequential(layers)
    if verify:
        _verify(proto, net, inputs[0], shape, label)
    return net


def _verify(proto, net: Sequential, value_info, shape, label) -> None:
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

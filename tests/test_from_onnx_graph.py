"""errprop.from_onnx on DAGs: gated MLPs (SwiGLU, GeGLU), a pre-norm block whose MLP is
SwiGLU, and parallel branches become a functional ``Graph``.

References are independent of errprop's passes: onnxruntime for the forward, and the
float64 PyTorch module, loaded with the imported parameters, for the errors: the exact
error is torch's output with the quantized weights minus its float output, and each
weight's first-order contribution is the central difference of torch's forward along
that weight's rounding error.
"""

import copy
import math
import warnings

import numpy as np
import pytest

import errprop as ep

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

nn, F = torch.nn, torch.nn.functional


def _ort(model_or_path, x):
    src = str(model_or_path) if not isinstance(model_or_path, onnx.ModelProto) else \
        model_or_path.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _rel_err(got, ref):
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


# ------------------------------------------------------------------ torch models
class Gated(nn.Module):
    """``down(act(gate(x)) * up(x))``: SwiGLU with silu, GeGLU with gelu."""

    def __init__(self, d, h, act):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)
        self.act = act

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm transformer block, LLaMA-style: attention, then a SwiGLU MLP."""

    def __init__(self, d=16, heads=4, h=32):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.RMSNorm(d, eps=1e-6)
        self.mlp = Gated(d, h, F.silu)

    def forward(self, x):
        n = self.norm1(x)
        x = x + self.attn(n, n, n, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TwoBranch(nn.Module):
    """``a(x) + b(x)``: two branches of one input, added."""

    def __init__(self, d=6, h=10):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, d))
        self.b = nn.Linear(d, d)

    def forward(self, x):
        return self.a(x) + self.b(x)


def _gelu_tanh(z):
    return F.gelu(z, approximate="tanh")


_GATED = {"gate": "fc1", "up": "fc2", "down": "fc3"}
_GATED_DAG = [("fc1", ("",)), ("{act}1", ("fc1",)), ("fc2", ("",)), ("mul1", ("{act}1", "fc2")),
              ("fc3", ("mul1",))]
#: name: (module factory, input shape, activation node, errprop Linear -> torch Linear,
#:        expected (node, inputs) list)
MODELS = {
    "swiglu_2d": (lambda: Gated(8, 16, F.silu), (4, 8), "silu", _GATED, _GATED_DAG),
    "swiglu_3d": (lambda: Gated(8, 16, F.silu), (2, 3, 8), "silu", _GATED, _GATED_DAG),
    "geglu_3d": (lambda: Gated(8, 16, F.gelu), (2, 3, 8), "gelu", _GATED, _GATED_DAG),
    "geglu_tanh_2d": (lambda: Gated(8, 16, _gelu_tanh), (4, 8), "gelu_tanh", _GATED, _GATED_DAG),
    "block": (Block, (2, 5, 16), "silu",
              {"mlp.gate": "fc1", "mlp.up": "fc2", "mlp.down": "fc3"},
              [("ln1", ("",)), ("attn1", ("ln1",)), ("res1", ("", "attn1")),
               ("rms1", ("res1",)), ("fc1", ("rms1",)), ("silu1", ("fc1",)),
               ("fc2", ("rms1",)), ("mul1", ("silu1", "fc2")), ("fc3", ("mul1",)),
               ("res2", ("res1", "fc3"))]),
    "two_branch": (TwoBranch, (4, 6), "tanh", {"a.0": "fc1", "a.2": "fc2", "b": "fc3"},
                   [("fc1", ("",)), ("tanh1", ("fc1",)), ("fc2", ("tanh1",)), ("fc3", ("",)),
                    ("add1", ("fc2", "fc3"))]),
}


def _randomize(module, seed):
    """Nonzero biases and norm parameters, so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{name: (torch module, path, x)}, exported once with the dynamo exporter."""
    out = tmp_path_factory.mktemp("onnx_graph")
    result = {}
    for i, (name, (make, shape, *_)) in enumerate(MODELS.items()):
        torch.manual_seed(i)
        module = _randomize(make(), i).eval()
        x = torch.randn(shape)
        path = out / f"{name}.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.export's own deprecation warnings
            torch.onnx.export(module, (x,), str(path), dynamo=True, external_data=False,
                              verbose=False)
        result[name] = (module, path, x.numpy())
    return result


def _torch_params(module, net, linears):
    """errprop parameter key (``fc1.W``) -> (torch parameter, row slice), and the imported
    values loaded into a float64 copy of ``module``."""
    ref = copy.deepcopy(module).double()
    mods = dict(ref.named_modules())
    table = {}
    for tname, ename in linears.items():
        table[f"{ename}.W"] = (mods[tname].weight, slice(None))
        table[f"{ename}.b"] = (mods[tname].bias, slice(None))
    if isinstance(ref, Block):
        d = ref.norm1.normalized_shape[0]
        for i, c in enumerate("qkv"):
            rows = slice(i * d, (i + 1) * d)
            table[f"attn1.W{c}"] = (ref.attn.in_proj_weight, rows)
            table[f"attn1.b{c}"] = (ref.attn.in_proj_bias, rows)
        table["attn1.Wo"] = (ref.attn.out_proj.weight, slice(None))
        table["attn1.bo"] = (ref.attn.out_proj.bias, slice(None))
        table["ln1.gamma"], table["ln1.beta"] = (ref.norm1.weight, slice(None)), \
            (ref.norm1.bias, slice(None))
        table["rms1.gamma"] = (ref.norm2.weight, slice(None))
        ref.norm1.eps, ref.norm2.eps = net["ln1"].eps, net["rms1"].eps
    imported = {f"{name}.{k}" for name, op in net.layers() for k in op.params}
    assert imported == set(table), imported ^ set(table)
    with torch.no_grad():
        for key, (p, rows) in table.items():
            name, k = key.rsplit(".", 1)
            p[rows] = torch.from_numpy(net[name].params[k])
    return ref, table


def _run(ref, x, moves=()):
    """``ref(x)`` in float64 with ``p[rows] += dW`` for each ``(p, rows, dW)``, restored."""
    with torch.no_grad():
        for p, rows, dW in moves:
            p[rows] += torch.from_numpy(dW)
        try:
            return ref(torch.from_numpy(x)).numpy()
        finally:
            for p, rows, dW in moves:
                p[rows] -= torch.from_numpy(dW)


@pytest.mark.parametrize("name", list(MODELS))
def test_imports_a_graph_equal_to_onnxruntime(exported, name):
    module, path, x = exported[name]
    *_, act, linears, dag = MODELS[name]
    net = ep.from_onnx(path)
    assert isinstance(net, ep.Graph)
    want = [(n.format(act=act), tuple(i.format(act=act) for i in ins)) for n, ins in dag]
    assert [(node.name, node.inputs) for node in net.dag()] == want
    kinds = {info.name: info.kind for info in net.nodes()}
    assert kinds[f"{act}1"] == "Activation" and net[f"{act}1"].kind == act
    merges = {n: net[n].kind for n, ins in want if len(ins) == 2}
    assert merges == {n: {"mul": "Mul", "add": "Add", "res": "Residual"}[n[:3]] for n in merges}
    # each errprop Linear holds its torch layer's weight (the naming follows the model)
    for tname, ename in linears.items():
        W = dict(module.named_modules())[tname].weight.detach().numpy()
        np.testing.assert_array_equal(net[ename].params["W"], W.astype(np.float64))
    assert _rel_err(net(x.astype(np.float64)), _ort(path, x)) < 1e-5
    x2 = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    assert _rel_err(net(x2.astype(np.float64)), _ort(path, x2)) < 1e-5


@pytest.mark.parametrize("name", list(MODELS))
def test_analyze_matches_torch_and_finite_differences(exported, name):
    module, path, x = exported[name]
    net = ep.from_onnx(path)
    ref, table = _torch_params(module, net, MODELS[name][3])
    x = np.random.default_rng(2).standard_normal(x.shape)
    y0 = _run(ref, x)
    np.testing.assert_allclose(net(x), y0, rtol=1e-12, atol=1e-12)
    rep = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(8)))
    weights = sorted(k for k in table if k.rsplit(".", 1)[1].startswith("W"))
    assert sorted(rep.sources) == weights == sorted(rep.contributions)
    errs = {k: rep.sources[k].error for k in weights}
    assert all(np.any(e) for e in errs.values())
    # exact: torch with every weight rounded, minus float
    exact = _run(ref, x, [(*table[k][:2], errs[k]) for k in weights]) - y0
    np.testing.assert_allclose(rep.exact, exact, rtol=1e-9, atol=1e-12 * np.abs(y0).max())
    # first order: central differences along each weight's error, and along all at once
    t = 1e-4

    def fd(keys):
        up = _run(ref, x, [(*table[k][:2], t * errs[k]) for k in keys])
        down = _run(ref, x, [(*table[k][:2], -t * errs[k]) for k in keys])
        return (up - down) / (2 * t)

    for k in weights:
        ref_k = fd([k])
        assert np.max(np.abs(ref_k)) > 0
        np.testing.assert_allclose(rep.contributions[k], ref_k, rtol=1e-6,
                                   atol=1e-7 * np.abs(ref_k).max())
    total = fd(weights)
    np.testing.assert_allclose(rep.first_order, total, rtol=1e-6, atol=1e-7 * np.abs(total).max())
    # weight rounding is deterministic: at 8 bits first order is close to the exact error
    assert ep.relative_residual(rep.exact, rep.first_order) < 0.05


# ------------------------------------------------------------------ hand-built graphs
def _model(nodes, inits, x_shape, out_shape=None):
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape or x_shape)],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


N = helper.make_node


def _check_forward(model, net, shape, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    assert _rel_err(net(x.astype(np.float64)), _ort(model, x)) < 1e-5


def test_spelled_out_geglu_with_folded_bias_and_scale(rng):
    """Erf-GELU spelled out on the gate, a bias and a scale on the up branch (folded into
    its Linear), the product, a down projection: a Graph of five nodes."""
    d, h = 5, 7
    inits = {"W1": rng.normal(size=(d, h)), "b1": rng.normal(size=h),
             "W2": rng.normal(size=(d, h)), "b2": rng.normal(size=h), "s": 0.5,
             "W3": rng.normal(size=(h, d)), "sqrt2": math.sqrt(2.0), "one": 1.0, "half": 0.5}
    nodes = [N("MatMul", ["x", "W1"], ["g0"], name="gate"),
             N("Add", ["g0", "b1"], ["g"], name="gate_bias"),
             N("Div", ["g", "sqrt2"], ["g1"], name="div"), N("Erf", ["g1"], ["g2"], name="erf"),
             N("Add", ["g2", "one"], ["g3"], name="add1"), N("Mul", ["g", "g3"], ["g4"],
                                                             name="mul_x"),
             N("Mul", ["g4", "half"], ["g5"], name="mul_half"),
             N("MatMul", ["x", "W2"], ["u0"], name="up"),
             N("Add", ["u0", "b2"], ["u1"], name="up_bias"),
             N("Mul", ["u1", "s"], ["u"], name="up_scale"),
             N("Mul", ["g5", "u"], ["m"], name="glu"),
             N("MatMul", ["m", "W3"], ["y"], name="down")]
    model = _model(nodes, inits, [3, 4, d])
    net = ep.from_onnx(model)
    assert isinstance(net, ep.Graph)
    assert [(n.name, n.inputs) for n in net.dag()] == [
        ("fc1", ("",)), ("gelu1", ("fc1",)), ("fc2", ("",)), ("mul1", ("gelu1", "fc2")),
        ("fc3", ("mul1",))]
    f32 = {k: np.asarray(v, dtype=np.float32).astype(np.float64) for k, v in inits.items()}
    np.testing.assert_allclose(net["fc2"].params["W"], 0.5 * f32["W2"].T, rtol=1e-15)
    np.testing.assert_allclose(net["fc2"].params["b"], 0.5 * f32["b2"], rtol=1e-15)
    np.testing.assert_allclose(net["fc1"].params["b"], f32["b1"], rtol=1e-15)
    _check_forward(model, net, (3, 4, d), rng)


def test_two_activations_of_one_tensor_added(rng):
    """``relu(h) + tanh(h)`` in one elementwise region: two Activation nodes and an Add."""
    inits = {"W": rng.normal(size=(4, 6)), "W2": rng.normal(size=(6, 3))}
    nodes = [N("MatMul", ["x", "W"], ["h"], name="fc"), N("Relu", ["h"], ["r"], name="relu"),
             N("Tanh", ["h"], ["t"], name="tanh"), N("Add", ["r", "t"], ["s"], name="sum"),
             N("MatMul", ["s", "W2"], ["y"], name="out")]
    model = _model(nodes, inits, [5, 4], [5, 3])
    net = ep.from_onnx(model)
    assert [(n.name, n.inputs) for n in net.dag()] == [
        ("fc1", ("",)), ("relu1", ("fc1",)), ("tanh1", ("fc1",)), ("add1", ("relu1", "tanh1")),
        ("fc2", ("add1",))]
    assert net.nodes()[3].kind == "Add"
    _check_forward(model, net, (5, 4), rng)


def test_parallel_branches_become_an_add_merge(rng):
    """The graph that was refused with 'joins two parallel branches' before DAGs."""
    inits = {"W": rng.normal(size=(4, 4)), "W2": rng.normal(size=(4, 4))}
    nodes = [N("MatMul", ["x", "W"], ["a"], name="left"), N("Relu", ["a"], ["b"], name="r"),
             N("MatMul", ["x", "W2"], ["c"], name="right"), N("Add", ["b", "c"], ["y"],
                                                              name="join")]
    model = _model(nodes, inits, [3, 4])
    net = ep.from_onnx(model)
    assert [(n.name, n.inputs, k.kind) for n, k in zip(net.dag(), net.nodes())] == [
        ("fc1", ("",), "Linear"), ("relu1", ("fc1",), "Activation"), ("fc2", ("",), "Linear"),
        ("add1", ("relu1", "fc2"), "Add")]
    _check_forward(model, net, (3, 4), rng)


def test_input_plus_activation_in_one_region_is_a_residual(rng):
    """``h + gelu(h)`` inside one region: the Add's operand lies on the other's path, so it
    is a Residual and the network stays a Sequential."""
    inits = {"W": rng.normal(size=(4, 4))}
    nodes = [N("MatMul", ["x", "W"], ["h"], name="fc"), N("Sigmoid", ["h"], ["s"], name="sig"),
             N("Mul", ["h", "s"], ["g"], name="silu"), N("Add", ["h", "g"], ["y"], name="skip")]
    model = _model(nodes, inits, [3, 4])
    net = ep.from_onnx(model)
    assert isinstance(net, ep.Sequential)
    assert [(i.name, i.kind) for i in net.nodes()] == [
        ("fc1", "Linear"), ("silu1", "Activation"), ("res1", "Residual")]
    _check_forward(model, net, (3, 4), rng)


def test_a_product_with_the_network_input_itself(rng):
    """``x * silu(x W)``: one operand of the Mul is the graph input."""
    inits = {"W": rng.normal(size=(4, 4))}
    nodes = [N("MatMul", ["x", "W"], ["h"], name="fc"), N("Sigmoid", ["h"], ["s"], name="sig"),
             N("Mul", ["h", "s"], ["g"], name="silu"), N("Mul", ["x", "g"], ["y"], name="gate")]
    model = _model(nodes, inits, [3, 4])
    net = ep.from_onnx(model)
    assert [(n.name, n.inputs) for n in net.dag()] == [
        ("fc1", ("",)), ("silu1", ("fc1",)), ("mul1", ("", "silu1"))]
    _check_forward(model, net, (3, 4), rng)


def _two_inputs(rng, combine):
    inits = {"W": rng.normal(size=(4, 4)), "W2": rng.normal(size=(4, 4))}
    nodes = [N("MatMul", ["x", "W"], ["a"], name="left"),
             N("MatMul", ["x", "W2"], ["b"], name="right"), *combine]
    return _model(nodes, inits, [3, 4])


def test_a_region_errprop_cannot_express_names_its_nodes(rng):
    model = _two_inputs(rng, [N("Div", ["a", "b"], ["y"], name="ratio")])
    with pytest.raises(ValueError) as err:
        ep.from_onnx(model)
    msg = str(err.value)
    assert "1 unsupported" in msg
    assert "nodes 'ratio' (Div): an elementwise computation combining 2 network tensors " \
           "(from 'left', 'right')" in msg, msg
    assert "f(a)·g(b) or f(a) + g(b)" in msg, msg


def test_an_operand_that_is_no_activation_is_named(rng):
    model = _two_inputs(rng, [N("LeakyRelu", ["a"], ["c"], alpha=0.1, name="leaky"),
                              N("Mul", ["c", "b"], ["y"], name="glu")])
    with pytest.raises(ValueError) as err:
        ep.from_onnx(model)
    msg = str(err.value)
    assert "nodes 'leaky', 'glu' (LeakyRelu, Mul): an elementwise computation combining 2" in msg
    assert "the operand computed by nodes 'leaky' (LeakyRelu) is none of them" in msg, msg


def test_an_operand_fold_that_changes_a_shared_layer_is_refused(rng):
    """``(a + c) * silu(a)``: the bias of one operand cannot be folded into ``a``'s Linear,
    which the other operand reads too."""
    inits = {"W": rng.normal(size=(4, 4)), "c": rng.normal(size=4)}
    nodes = [N("MatMul", ["x", "W"], ["a"], name="fc"), N("Add", ["a", "c"], ["ac"], name="shift"),
             N("Sigmoid", ["a"], ["s"], name="sig"), N("Mul", ["a", "s"], ["g"], name="silu"),
             N("Mul", ["ac", "g"], ["y"], name="glu")]
    with pytest.raises(ValueError, match=r"'shift'.*does not directly follow a MatMul"):
        ep.from_onnx(_model(nodes, inits, [3, 4]))

"""errprop.save / errprop.load on every graph: functional Graphs, Parallel blocks, a Graph
inside a Sequential, the shape and merge ops; the same node names, a bitwise forward and
the same analysis after loading; hostile graph files end in one clear error; the CLI
analyzes a saved Graph; version-1 files stay as they were."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import dag_models as dm
import errprop as ep
from errprop import _io
from errprop._files import FileFormatError
from errprop.cli import main

DIGITS = Path(ep.__file__).parent / "data" / "digits-mlp"


def _w(rng, n_out, n_in):
    return rng.normal(0.0, 1 / math.sqrt(n_in), size=(n_out, n_in))


def mixed():
    """A named Graph holding a Sequential block with a Residual (its join becomes a graph
    node), Slice/Scale/Concat, a 3-input Add; used as a block inside a Sequential."""
    rng = np.random.default_rng(3)
    block = ep.Sequential([ep.Residual(ep.Linear(_w(rng, 8, 8), name="fc"),
                                       ep.Activation("tanh"))], name="blk")
    x = ep.Input()
    h = block(x)
    a, b = ep.Slice(0, 4, name="lo")(h), ep.Slice(4, 8, name="hi")(h)
    c = ep.Concat(name="cat")(ep.Scale(0.5)(b), a)
    s = ep.Add(name="sum")(c, x, h)
    g = ep.Graph(x, ep.Linear(_w(rng, 8, 8), rng.normal(0, 0.1, 8), name="head")(s),
                 name="g")
    return ep.Sequential([ep.LayerNorm(rng.normal(1, 0.1, 8), rng.normal(0, 0.1, 8)), g,
                          ep.Activation("gelu")])


def gated_parallel():
    rng = np.random.default_rng(4)
    return ep.Sequential([ep.Parallel([ep.Linear(_w(rng, 8, 6)), ep.Activation("silu")],
                                      ep.Linear(_w(rng, 8, 6)), merge=ep.Mul()),
                          ep.Linear(_w(rng, 3, 8))])


NETS = {
    "swiglu_mlp": (dm.swiglu_mlp, (6, 8)),
    "decomposed attention": (lambda: dm.decomposed_attention(dm.fused_attention()), (3, 5, 8)),
    "resnet_block": (dm.resnet_block, (6, 6)),
    "swiglu_transformer": (dm.swiglu_transformer, (2, 5, 8)),
    "named graph in a Sequential": (mixed, (4, 3, 8)),
    "Parallel with Mul": (gated_parallel, (5, 6)),
}


def _same_analysis(a, b):
    assert np.array_equal(a.exact, b.exact) and np.array_equal(a.first_order, b.first_order)
    assert list(a.contributions) == list(b.contributions)
    assert all(np.array_equal(a.contributions[k], b.contributions[k]) for k in a.contributions)
    assert list(a.nodes) == list(b.nodes)


@pytest.mark.parametrize("kind", NETS)
def test_graph_round_trip_is_bit_for_bit(kind, tmp_path):
    build, shape = NETS[kind]
    net = build()
    x = np.random.default_rng(1).standard_normal(shape)
    back = ep.load(ep.save(net, tmp_path / "m"))
    assert type(back) is type(net)
    assert [(i.name, i.kind) for i in back.nodes()] == [(i.name, i.kind) for i in net.nodes()]
    assert [(n.name, n.inputs, type(n.op)) for n in back.dag()] == \
        [(n.name, n.inputs, type(n.op)) for n in net.dag()]
    assert back.num_params() == net.num_params() and back.name == net.name
    assert np.array_equal(back(x), net(x))
    config = ep.QuantConfig(weights=ep.Uniform(4, granularity="channel"),
                            activations=ep.Uniform(6))
    _same_analysis(ep.analyze(net, x, config), ep.analyze(back, x, config))
    again = ep.load(ep.save(back, tmp_path / "again"))  # a loaded Graph saves the same file
    assert (tmp_path / "m" / "model.json").read_text() == \
        (tmp_path / "again" / "model.json").read_text()
    assert np.array_equal(again(x), net(x))


def test_graph_spec_is_a_readable_node_list(tmp_path):
    net = dm.swiglu_mlp(name="mlp")
    spec = json.loads((ep.save(net, tmp_path / "m") / "model.json").read_text())
    assert spec["version"] == 2
    top = spec["net"]
    assert top["type"] == "Graph" and top["name"] == "mlp"
    rows = [(n["node"], n["type"], n["name"], n["inputs"]) for n in top["nodes"]]
    assert rows == [("mlp.gate", "Linear", "gate", [""]),
                    ("mlp.silu1", "Activation", None, ["mlp.gate"]),
                    ("mlp.up", "Linear", "up", [""]),
                    ("mlp.mul", "Mul", "mul", ["mlp.silu1", "mlp.up"]),
                    ("mlp.down", "Linear", "down", ["mlp.mul"])]
    assert top["nodes"][0]["params"]["W"] == {"array": "mlp.gate.W", "shape": [16, 8]}
    att = json.loads((ep.save(dm.decomposed_attention(dm.fused_attention()), tmp_path / "a")
                      / "model.json").read_text())["net"]["nodes"]
    configs = {n["node"]: n["config"] for n in att}
    assert configs["qk"] == {"transpose_b": True}
    assert configs["merge"] == {"shape": [8], "axes": 2}
    assert configs["transpose1"] == {"perm": [1, 0, 2]}
    assert configs["scale"] == {"factor": 0.5}


def test_version_1_files_are_unchanged(tmp_path):
    """A tree of the first ops is still written as version 1, byte for byte what the
    shipped digits model holds, so an older errprop reads it."""
    net = ep.load(DIGITS)
    assert isinstance(net, ep.Sequential)
    folder = ep.save(net, tmp_path / "digits")
    assert (folder / "model.json").read_bytes() == (DIGITS / "model.json").read_bytes()
    x = np.random.default_rng(0).standard_normal((3, net.in_features))
    assert np.array_equal(ep.load(folder)(x), net(x))


def test_a_loaded_graph_is_a_block_like_any_other(tmp_path):
    mlp = ep.load(ep.save(dm.swiglu_mlp(), tmp_path / "m"))
    net = ep.Sequential([ep.Residual(ep.RMSNorm(np.ones(8)), mlp)], name="b")
    assert [i.name for i in net.nodes()][-3:] == ["b.mul", "b.down", "b.res1"]
    x = np.random.default_rng(2).standard_normal((3, 8))
    ref = dm.swiglu_mlp()
    assert np.array_equal(net(x), x + ref(ep.RMSNorm(np.ones(8)).forward(x)))


# ------------------------------------------------------------------ whole or nothing
def test_saving_a_graph_is_whole_or_nothing(tmp_path, monkeypatch):
    folder = ep.save(dm.swiglu_mlp(), tmp_path / "m")
    before = (folder / "weights.npz").read_bytes()
    monkeypatch.setattr(np, "savez", lambda *a, **k: (_ for _ in ()).throw(OSError("full")))
    with pytest.raises(OSError, match="full"):
        ep.save(dm.swiglu_mlp(seed=1), folder)
    assert (folder / "weights.npz").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_save_names_the_graph_nodes_it_cannot_write(tmp_path):
    class Twice(ep.Op):
        def forward(self, x, params=None):
            return 2 * x

        def jvp(self, x, y, dx, dparams):
            return 2 * dx

    x = ep.Input()
    net = ep.Graph(x, ep.Mul()(Twice(name="t")(x), x))
    with pytest.raises(TypeError, match=r"t \(Twice\)"):
        ep.save(net, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_register_op_adds_a_type(tmp_path, monkeypatch):
    monkeypatch.setattr(_io, "_BY_CLASS", dict(_io._BY_CLASS))
    monkeypatch.setattr(_io, "_BY_TYPE", dict(_io._BY_TYPE))

    class Shift(ep.Op):
        def __init__(self, offset, *, name=None):
            super().__init__(name)
            self.offset = float(offset)

        def forward(self, x, params=None):
            return x + self.offset

        def jvp(self, x, y, dx, dparams):
            return dx

        def config(self):
            return {"offset": self.offset}

    built = []

    def build(params, config, name):
        built.append(config)
        return Shift(**config, name=name)

    _io.register_op(Shift, type_name="test.Shift", build=build)
    x = ep.Input()
    net = ep.Graph(x, ep.Add()(Shift(0.25, name="s")(x), x))
    back = ep.load(ep.save(net, tmp_path / "m"))
    assert built == [{"offset": 0.25}]
    v = np.arange(6.0).reshape(2, 3)
    assert np.array_equal(back(v), net(v))
    with pytest.raises(ValueError, match="'Linear' is taken"):
        _io.register_op(Shift, type_name="Linear")


# ------------------------------------------------------------------ padding masks
def test_mask_padding_reaches_attention_inside_a_graph(tmp_path):
    att = dm.fused_attention()
    x = ep.Input()
    net = ep.Graph(x, ep.Add(name="skip")(att(x), x))
    mask = np.array([[True, True, True, False], [True, True, False, False]])
    v = np.random.default_rng(5).standard_normal((2, 4, 8))
    masked = ep.mask_padding(net, mask)
    assert net["attn"].mask is None and np.array_equal(masked["attn"].mask, mask)
    assert np.array_equal(masked(v), att.with_mask(mask).forward(v) + v)
    assert not np.array_equal(masked(v), net(v))
    back = ep.load(ep.save(masked, tmp_path / "m"))  # the mask is saved with the op
    assert np.array_equal(back(v), masked(v))


# ------------------------------------------------------------------ hostile graph files
def _graph_file(tmp_path, edit, build=dm.swiglu_mlp):
    folder = ep.save(build(), tmp_path / "m")
    spec = json.loads((folder / "model.json").read_text())
    edit(spec["net"])
    (folder / "model.json").write_text(json.dumps(spec))
    return folder


def _nodes(edit):
    return lambda net: edit({n["node"]: n for n in net["nodes"]}, net["nodes"])


HOSTILE = {
    "input that does not exist": (
        _nodes(lambda n, _: n["mul"].update(inputs=["silu1", "upp"])),
        r"net: node 'mul' reads 'upp', which is neither the graph input"),
    "cycle": (
        _nodes(lambda n, _: n["gate"].update(inputs=["down"])),
        r"net: the nodes form a cycle \(each reads the next\): "
        r"gate -> down -> mul -> silu1 -> gate"),
    "node reading itself": (
        _nodes(lambda n, _: n["up"].update(inputs=["up"])), r"cycle.*: up -> up"),
    "unknown op type": (
        _nodes(lambda n, _: n["mul"].update(type="Hadamard")),
        r"net.nodes\[3\]: unknown layer type 'Hadamard' \(node 'mul'\)"),
    "merge with three inputs": (
        _nodes(lambda n, _: n["mul"].update(inputs=["silu1", "up", "gate"])),
        r"Mul 'mul' takes 2 inputs, got 3"),
    "op with two inputs": (
        _nodes(lambda n, _: n["down"].update(inputs=["mul", "up"])),
        r"node 'down' \(Linear\) takes one input, got 2"),
    "no inputs": (
        _nodes(lambda n, _: n["up"].update(inputs=[])),
        r"net.nodes\[2\]: node 'up': 'inputs' must be a non-empty list"),
    "inputs not names": (
        _nodes(lambda n, _: n["up"].update(inputs=[0])), r"'inputs' must be"),
    "duplicate names": (
        _nodes(lambda n, _: n["up"].update(node="gate")),
        r"net.nodes\[2\]: two nodes are named 'gate'"),
    "out of order": (
        lambda net: net["nodes"].insert(0, net["nodes"].pop(1)),
        r"node 'silu1' reads 'gate', which is listed after it"),
    "dead node": (
        _nodes(lambda n, _: n["mul"].update(inputs=["silu1", "silu1"])),
        r"node 'up' is read by no node and is not the output"),
    "a glob in a name": (
        _nodes(lambda n, _: n["gate"].update(node="ga*te")), r"'node' \(the node's name\)"),
    "type not a string": (
        _nodes(lambda n, _: n["mul"].update(type=["Mul"])),
        r"net.nodes\[3\]: 'type' must be a string"),
    "no nodes": (lambda net: net.update(nodes=[]), "a Graph needs at least one node"),
    "nodes not a list": (lambda net: net.update(nodes={}), "'nodes' must be a list"),
    "a container as a graph node": (
        lambda net: net["nodes"].__setitem__(1, {"type": "Sequential", "node": "silu1",
                                                 "layers": []}),
        r"net.nodes\[1\]: expected one op here, got a Sequential"),
    "bad op setting": (
        _nodes(lambda n, _: n["qk"]["config"].update(transpose_b="yes")),
        r"node 'qk' \(MatMul\) cannot be built: MatMul: transpose_b"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_graph_file_gives_one_clear_error(case, tmp_path):
    edit, match = HOSTILE[case]
    build = (lambda: dm.decomposed_attention(dm.fused_attention())) if "setting" in case \
        else dm.swiglu_mlp
    folder = _graph_file(tmp_path, edit, build)
    with pytest.raises(FileFormatError, match=match) as err:
        ep.load(folder)
    assert "model.json" in str(err.value)


def test_graph_links_are_checked_before_the_weights_are_read(tmp_path):
    folder = _graph_file(tmp_path, HOSTILE["cycle"][0])
    (folder / "weights.npz").write_bytes(b"not a zip")
    with pytest.raises(FileFormatError, match="model.json: net: the nodes form a cycle"):
        ep.load(folder)


@pytest.mark.parametrize("edit, match", [
    (lambda net: net["layers"][0].update(merge={"type": "Sequential", "layers": []}),
     r"net.layers\[0\].merge: expected one op here, got a Sequential"),
    (lambda net: net["layers"][0].update(branches=[[], {}]),
     r"net.layers\[0\]: branch 1 must be a list of layers"),
    (lambda net: net["layers"][0]["branches"].append([]),
     r"the graph cannot be built: Mul 'mul1' takes 2 inputs, got 3"),
    (lambda net: net["layers"][0].update(merge={"type": "Activation", "node": "x",
                                             "config": {"kind": "relu"}}),
     r"Parallel: merge must be a merge op"),
])
def test_hostile_parallel_blocks_give_clear_errors(edit, match, tmp_path):
    folder = _graph_file(tmp_path, edit, gated_parallel)
    with pytest.raises(FileFormatError, match=match):
        ep.load(folder)


def test_the_top_node_must_be_a_network(tmp_path):
    folder = _graph_file(tmp_path, lambda net: net.update(
        {"type": "Activation", "node": "a", "config": {"kind": "relu"}}))
    with pytest.raises(FileFormatError, match="top node must be a Sequential or a Graph"):
        ep.load(folder)


# ------------------------------------------------------------------ the command line
def _fake_quant_rows(W, bits):
    q = 2 ** (bits - 1) - 1
    s = np.max(np.abs(W), axis=1, keepdims=True) / q
    return np.clip(np.round(W / s), -q, q) * s


def test_cli_analyzes_a_saved_graph(tmp_path, capsys):
    net = dm.swiglu_mlp()
    x = np.random.default_rng(9).standard_normal((20, 8))
    np.save(tmp_path / "x.npy", x)
    folder = ep.save(net, tmp_path / "model")
    assert main(["analyze", str(folder), "--weights", "4", "--input", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "mul" in printed and "gate.W" in printed
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [n["node"] for n in doc["nodes"]] == ["gate", "silu1", "up", "mul", "down"]
    p = {name: net[name].params for name in ("gate", "up", "down")}

    def forward(Wg, Wu, Wd):
        g = x @ Wg.T
        return (g / (1 + np.exp(-g)) * (x @ Wu.T)) @ Wd.T + p["down"]["b"]

    y = forward(p["gate"]["W"], p["up"]["W"], p["down"]["W"])
    yq = forward(*(_fake_quant_rows(p[n]["W"], 4) for n in ("gate", "up", "down")))
    want = 20 * np.log10(np.linalg.norm(y) / np.linalg.norm(yq - y))
    assert abs(doc["summary"]["output_sqnr_db"] - want) < 1e-9
    assert {r["source"] for r in doc["sources"]} == {"gate.W", "up.W", "down.W"}

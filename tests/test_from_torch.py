"""errprop.from_torch: the converted network computes what the torch module computes.

The oracle is the torch module itself: float32 modules to 1e-5 relative, the same module
in float64 (``.double()``) to 1e-10, for every supported module type, both norm orders
and several seeds. Names map back to the torch paths, unsupported modules are all listed
in one error, and analysis of a converted network matches a hand-built one.
"""

import builtins
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import errprop as ep
from errprop._files import UntrustedCodeError

SEEDS = [0, 1, 2]
ROOT = Path(__file__).resolve().parents[1]


def _rel(got, ref):
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _run(torch, module, x, *, batch_first=True, fast=False):
    """The torch output for errprop's ``(batch, tokens, d)`` input ``x``.

    ``fast=False`` keeps autograd on, so TransformerEncoderLayer takes its slow path
    (the one that calls the submodules); ``fast=True`` allows torch's fused eval path."""
    t = torch.from_numpy(x)
    if not batch_first:
        t = t.transpose(0, 1)
    if fast:
        with torch.no_grad():
            out = module(t)
    else:
        out = module(t)
    if isinstance(out, tuple):
        out = out[0]
    if not batch_first:
        out = out.transpose(0, 1)
    return out.detach().to(torch.float64).numpy()


def _check_both_precisions(torch, module, x, **kw):
    module = module.eval()
    got32 = ep.from_torch(module)(x)
    assert _rel(got32, _run(torch, module.float(), x.astype(np.float32), **kw)) < 1e-5
    got64 = ep.from_torch(module.double())(x)
    assert _rel(got64, _run(torch, module, x, **kw)) < 1e-10
    return got64


def _randomize_norms(torch, module, seed):
    """LayerNorms start at gamma=1, beta=0: move them so a swapped parameter shows."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.add_(0.2 * torch.randn(m.weight.shape, generator=g))
                if m.bias is not None:
                    m.bias.add_(0.2 * torch.randn(m.bias.shape, generator=g))
    return module


# ------------------------------------------------------------------ elementwise and MLPs
def _mlp_cases(nn):
    return {
        "linear-relu": lambda: nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4)),
        "gelu": lambda: nn.Sequential(nn.Linear(6, 9), nn.GELU(), nn.Linear(9, 4)),
        "gelu-tanh": lambda: nn.Sequential(nn.Linear(6, 9), nn.GELU(approximate="tanh")),
        "tanh": lambda: nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)),
        "sigmoid": lambda: nn.Sequential(nn.Linear(6, 9), nn.Sigmoid()),
        "silu": lambda: nn.Sequential(nn.Linear(6, 9), nn.SiLU(), nn.Linear(9, 2)),
        "softmax-1": lambda: nn.Sequential(nn.Linear(6, 5), nn.Softmax(dim=-1)),
        "softmax-dim1": lambda: nn.Sequential(nn.Linear(6, 5), nn.Softmax(dim=1)),
        "layernorm": lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8, eps=1e-3)),
        "layernorm-no-affine": lambda: nn.Sequential(
            nn.Linear(6, 8), nn.LayerNorm(8, elementwise_affine=False)),
        "layernorm-no-bias": lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8, bias=False)),
        "no-bias": lambda: nn.Sequential(nn.Linear(6, 7, bias=False), nn.ReLU()),
        "identity-dropout": lambda: nn.Sequential(nn.Identity(), nn.Linear(6, 7), nn.Dropout(0.5),
                                                  nn.Tanh(), nn.Identity()),
        "nested": lambda: nn.Sequential(nn.Linear(6, 8), nn.Sequential(
            nn.SiLU(), nn.Sequential(nn.Linear(8, 8), nn.GELU())), nn.LayerNorm(8)),
        "lone-linear": lambda: nn.Linear(6, 3),
        "lone-gelu": lambda: nn.GELU(approximate="tanh"),
    }


CASES = ["linear-relu", "gelu", "gelu-tanh", "tanh", "sigmoid", "silu", "softmax-1",
         "softmax-dim1", "layernorm", "layernorm-no-affine", "layernorm-no-bias", "no-bias",
         "identity-dropout", "nested", "lone-linear", "lone-gelu"]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CASES)
def test_mlp_modules_match_torch(case, seed, torch):
    torch.manual_seed(seed)
    module = _randomize_norms(torch, _mlp_cases(torch.nn)[case](), seed)
    x = 2.0 * np.random.default_rng(seed).standard_normal((5, 6))
    _check_both_precisions(torch, module, x)


def test_mlp_on_token_inputs(torch):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.LayerNorm(8),
                                 torch.nn.Softmax(dim=-1))
    x = np.random.default_rng(0).standard_normal((3, 4, 6))
    _check_both_precisions(torch, module, x)


# ------------------------------------------------------------------ attention
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("heads, bias", [(1, True), (2, True), (4, False)])
def test_multihead_attention(heads, bias, batch_first, seed, torch):
    torch.manual_seed(seed)
    mha = torch.nn.MultiheadAttention(8, heads, bias=bias, batch_first=batch_first)
    if bias:  # torch initialises the projection biases to zero
        with torch.no_grad():
            mha.in_proj_bias.normal_(0, 0.3)
            mha.out_proj.bias.normal_(0, 0.3)
    x = np.random.default_rng(seed).standard_normal((3, 5, 8))
    mha = mha.eval()

    class SelfAttention(torch.nn.Module):  # torch's MHA takes (query, key, value)
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, t):
            return self.m(t, t, t, need_weights=False)[0]

    net = ep.from_torch(mha)
    assert [n for n, _ in net.layers()] == ["attn1"]
    ref = _run(torch, SelfAttention(mha), x.astype(np.float32), batch_first=batch_first)
    assert _rel(net(x), ref) < 1e-5
    net64 = ep.from_torch(mha.double())
    ref64 = _run(torch, SelfAttention(mha), x, batch_first=batch_first)
    assert _rel(net64(x), ref64) < 1e-10


def _layer(torch, seed, *, norm_first, activation, batch_first=True, bias=True):
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, activation=activation,
                                             batch_first=batch_first, norm_first=norm_first,
                                             bias=bias)
    return _randomize_norms(torch, layer, seed)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_layer(norm_first, activation, batch_first, seed, torch):
    layer = _layer(torch, seed, norm_first=norm_first, activation=activation,
                   batch_first=batch_first)
    x = np.random.default_rng(seed).standard_normal((3, 5, 8))
    got = _check_both_precisions(torch, layer, x, batch_first=batch_first)
    # torch's fused eval fast path (no_grad) computes the same
    assert _rel(got, _run(torch, layer, x, batch_first=batch_first, fast=True)) < 1e-10


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_layer_activation_modules_and_no_bias(norm_first, torch):
    nn = torch.nn
    for seed, act in enumerate([nn.GELU(approximate="tanh"), nn.SiLU(), nn.ReLU()]):
        layer = _layer(torch, seed, norm_first=norm_first, activation=act, bias=seed != 1)
        net = ep.from_torch(layer)
        assert net["activation"].describe() == {0: "gelu_tanh", 1: "silu", 2: "relu"}[seed]
        x = np.random.default_rng(seed).standard_normal((2, 4, 8))
        _check_both_precisions(torch, layer, x)


@pytest.mark.parametrize("final_norm", [True, False])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_stack(norm_first, final_norm, torch):
    torch.manual_seed(3)
    nn = torch.nn
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, activation="gelu", batch_first=True,
                                   norm_first=norm_first),
        num_layers=2, norm=nn.LayerNorm(8) if final_norm else None, enable_nested_tensor=False)
    _randomize_norms(torch, enc, 3)
    x = np.random.default_rng(3).standard_normal((2, 6, 8))
    got = _check_both_precisions(torch, enc, x)
    assert _rel(got, _run(torch, enc, x, fast=True)) < 1e-10
    net = ep.from_torch(enc)
    assert ("norm" in dict(net.layers())) == final_norm


def test_mixed_sequential_with_encoder(torch):
    nn = torch.nn
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 8), nn.TransformerEncoderLayer(8, 2, 12, batch_first=True),
                          nn.LayerNorm(8), nn.Linear(8, 3), nn.Softmax(dim=2))
    x = np.random.default_rng(4).standard_normal((2, 4, 5))
    _check_both_precisions(torch, model, x)
    assert ep.from_torch(model)["4"].axis == -1  # dim=2 of (batch, tokens, 3)


# ------------------------------------------------------------------ names
def test_names_are_torch_paths(torch):
    nn = torch.nn
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
                                num_layers=2, norm=nn.LayerNorm(8), enable_nested_tensor=False)
    model = nn.Sequential(nn.Linear(4, 8), enc, nn.Linear(8, 2))
    net = ep.from_torch(model)
    names = [n for n, _ in net.layers()]
    assert names == ["0",
                     "1.layers.0.self_attn", "1.layers.0.norm1", "1.layers.0.linear1",
                     "1.layers.0.activation", "1.layers.0.linear2", "1.layers.0.norm2",
                     "1.layers.1.self_attn", "1.layers.1.norm1", "1.layers.1.linear1",
                     "1.layers.1.activation", "1.layers.1.linear2", "1.layers.1.norm2",
                     "1.norm", "2"]
    assert "1.layers.0.res1" in [i.name for i in net.nodes()]
    # every parameterised node is the torch module of the same path
    for name, op in net.layers():
        if isinstance(op, ep.Linear):
            W = model.get_submodule(name).weight.detach().double().numpy()
            np.testing.assert_array_equal(op.params["W"], W)
        elif isinstance(op, ep.LayerNorm):
            np.testing.assert_array_equal(op.params["gamma"],
                                          model.get_submodule(name).weight.detach().double())
        elif isinstance(op, ep.Attention):
            m = model.get_submodule(name)
            np.testing.assert_array_equal(op.params["Wo"], m.out_proj.weight.detach().double())
            np.testing.assert_array_equal(
                np.concatenate([op.params["Wq"], op.params["Wk"], op.params["Wv"]]),
                m.in_proj_weight.detach().double())
    # names work in configs: per-layer overrides by torch path
    cfg = ep.QuantConfig(weights=ep.Uniform(8), overrides={"1.layers.1.*": {"weights": None}})
    srcs = [s.name for s in cfg.sources(net)]
    assert "1.layers.0.self_attn.Wq" in srcs and not any(s.startswith("1.layers.1") for s in srcs)


def test_named_sequential_children(torch):
    from collections import OrderedDict
    nn = torch.nn
    model = nn.Sequential(OrderedDict(fc_in=nn.Linear(3, 4), act=nn.ReLU(),
                                      head=nn.Sequential(OrderedDict(out=nn.Linear(4, 2)))))
    assert [n for n, _ in ep.from_torch(model).layers()] == ["fc_in", "act", "head.out"]


# ------------------------------------------------------------------ unsupported
def test_unsupported_modules_are_all_listed(torch):
    nn = torch.nn

    class Custom(nn.Module):
        def forward(self, x):
            return 2 * x

    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 1, 1), nn.ReLU(),
                          nn.Sequential(nn.BatchNorm1d(4), nn.Tanh(), Custom()),
                          nn.MultiheadAttention(4, 1), nn.Softmax(), nn.LayerNorm((2, 2)),
                          nn.GELU())
    with pytest.raises(ValueError) as info:
        ep.from_torch(model)
    msg = str(info.value)
    assert msg.startswith("from_torch: 6 unsupported module(s):")
    for path, kind in [("1", "Conv1d"), ("3.0", "BatchNorm1d"), ("3.2", "Custom"),
                       ("4", "MultiheadAttention"), ("5", "Softmax"), ("6", "LayerNorm")]:
        assert re.search(rf"^  {re.escape(path)} \([\w.<>]*{kind}\): ", msg, flags=re.M), (path, msg)
    assert "dim=None" in msg and "normalized_shape=(2, 2)" in msg and "custom module" in msg


def test_unsupported_settings_inside_encoder(torch):
    nn = torch.nn
    layer = nn.TransformerEncoderLayer(8, 2, 16, activation=lambda t: t * 2, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    for m in enc.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.add_zero_attn = True
    with pytest.raises(ValueError) as info:
        ep.from_torch(enc)
    msg = str(info.value)
    assert "4 unsupported" in msg
    assert "layers.0.self_attn (MultiheadAttention): add_zero_attn=True" in msg
    assert "layers.1.activation (function): activation" in msg


def test_not_a_module(torch):
    with pytest.raises(TypeError, match="expects a torch.nn.Module.*got list"):
        ep.from_torch([1, 2])


@pytest.mark.parametrize("package, fn, extra", [("torch", "from_torch", "errprop[torch]"),
                                                ("sklearn", "from_sklearn", "errprop[sklearn]")])
def test_missing_extra_names_it(package, fn, extra, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    for mod in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, mod)
    with pytest.raises(ImportError, match=re.escape(f'pip install "{extra}"')):
        getattr(ep, fn)(object())


# ------------------------------------------------------------------ TorchScript and files
def _jit(torch, how, *args):
    # torch 2.13 deprecates torch.jit.script / trace (in favour of torch.export), and
    # scripting TransformerEncoder warns about its own 'norm' constant
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(torch.jit, how)(*args)


def _script_roundtrip(torch, module, tmp_path, name="model.pt"):
    path = tmp_path / name
    _jit(torch, "save", _jit(torch, "script", module), str(path))
    return path


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_torchscript_file(norm_first, torch, tmp_path):
    nn = torch.nn
    torch.manual_seed(5)
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, activation="gelu", batch_first=True,
                                   norm_first=norm_first),
        num_layers=2, norm=nn.LayerNorm(8), enable_nested_tensor=False).eval()
    model = nn.Sequential(nn.Linear(3, 8), nn.GELU(approximate="tanh"), enc, nn.Softmax(-1))
    _randomize_norms(torch, model, 5)
    path = _script_roundtrip(torch, model.double(), tmp_path)
    net = ep.from_torch(path, trusted=True)
    assert [n for n, _ in net.layers()] == [n for n, _ in ep.from_torch(model).layers()]
    x = np.random.default_rng(5).standard_normal((2, 4, 3))
    assert _rel(net(x), _run(torch, model, x)) < 1e-10
    assert _rel(ep.from_torch(str(path), trusted=True)(x), net(x)) == 0.0  # str paths too


def test_traced_modules(torch, tmp_path):
    nn = torch.nn
    torch.manual_seed(6)
    plain = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2), nn.Sigmoid())
    traced = _jit(torch, "trace", plain, torch.randn(2, 4))
    x = np.random.default_rng(6).standard_normal((3, 4))
    ref = _run(torch, plain.double(), x)
    assert _rel(ep.from_torch(traced)(x), ref) < 1e-6
    # tracing drops non-tensor attributes: GELU's `approximate`, Softmax's `dim`
    lossy = _jit(torch, "trace", nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Softmax(-1)),
                 torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"2 unsupported(.|\n)*1 \(GELU\): attribute "
                                         r"'approximate'(.|\n)*torch.jit.script"):
        ep.from_torch(lossy)


def test_state_dict_file_is_refused_with_advice(torch, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(ValueError, match=r"state_dict \(2 entries: weight, bias\).*"
                                         r"load_state_dict"):
        ep.from_torch(path)


class _Exploit:
    """Unpickling this would create a directory: a stand-in for arbitrary code."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_pickled_module_is_never_unpickled(torch, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 2)), path)
    with pytest.raises(ValueError, match=r"refuses it.*TorchScript.*torch.jit.save.*ONNX"):
        ep.from_torch(path)
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"w": _Exploit(str(marker))}, evil)
    with pytest.raises(ValueError, match="does not load it"):
        ep.from_torch(evil)
    assert not marker.exists()


def _evil_torchscript(torch, path, marker):
    """A TorchScript archive whose __setstate__ creates the file ``marker`` when loaded."""

    class Evil(torch.nn.Module):
        def __init__(self, target: str):
            super().__init__()
            self.target = target
            self.buf = torch.zeros(4)

        def forward(self, x):
            return x + self.buf.sum()

        @torch.jit.export
        def __getstate__(self):
            return (self.target, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[str, bool]):
            self.target = state[0]
            self.buf = torch.from_file(state[0], True, 4)  # shared=True creates the file
            self.training = state[1]

    _jit(torch, "save", _jit(torch, "script", Evil(str(marker))), str(path))
    return path


def test_torchscript_runs_code_so_it_needs_trust(torch, tmp_path):
    evil = _evil_torchscript(torch, tmp_path / "evil.pt", tmp_path / "marker")
    for load in (ep.from_torch, ep.load):
        with pytest.raises(UntrustedCodeError, match=r"evil.pt is a TorchScript archive.*"
                                                        r"__setstate__.*trusted=True"):
            load(evil)
    assert not (tmp_path / "marker").exists()
    # the refusal is not hypothetical: trusting the file runs its code
    with pytest.raises(ValueError, match=r"\(Evil\): not a supported module"):
        ep.from_torch(evil, trusted=True)
    assert (tmp_path / "marker").exists()
    with pytest.raises(TypeError, match="trusted must be True or False"):
        ep.from_torch(evil, trusted="yes")


def test_quantized_torch_ao_modules_are_listed_as_unsupported(torch):
    nn, tq = torch.nn, torch.ao.quantization
    float_model = nn.Sequential(tq.QuantStub(), nn.Linear(4, 3), nn.ReLU(),
                                tq.DeQuantStub()).eval()
    float_model.qconfig = tq.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated
        prepared = tq.prepare(float_model)
        prepared(torch.randn(8, 4))
        converted = tq.convert(prepared)
        dynamic = tq.quantize_dynamic(nn.Sequential(nn.Linear(4, 3)), {nn.Linear},
                                      dtype=torch.qint8)
    with pytest.raises(ValueError, match=r"3 unsupported(.|\n)*0 \(quantized Quantize\)"
                                         r"(.|\n)*1 \(quantized Linear\): a quantized \(torch.ao\)"
                                         r"(.|\n)*3 \(quantized DeQuantize\)"):
        ep.from_torch(converted)
    with pytest.raises(ValueError, match=r"0 \(quantized Linear\)"):
        ep.from_torch(dynamic)


@pytest.mark.parametrize("eps, affine", [(None, True), (1e-3, True), (None, False)])
def test_rms_norm_matches_torch(eps, affine, torch):
    nn = torch.nn
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6, eps=eps, elementwise_affine=affine))
    if affine:
        with torch.no_grad():
            model[1].weight.uniform_(0.5, 1.5)
    # small activations: mean(x²) ~ 1e-8, so torch's default eps (float32: 1.2e-7) matters
    x = 1e-4 * np.random.default_rng(7).standard_normal((5, 3, 4))
    with torch.no_grad():
        want = model(torch.tensor(x, dtype=torch.float32)).double().numpy()
    for source in (model, _jit(torch, "script", model)):
        net = ep.from_torch(source)
        assert isinstance(net["1"], ep.RMSNorm)
        assert net["1"].eps == (torch.finfo(torch.float32).eps if eps is None else eps)
        assert _rel(net(x), want) < 1e-5


def test_missing_file(torch, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        ep.from_torch(tmp_path / "nope.pt")


# ------------------------------------------------------------------ analysis
def _torch_encoder_from_errprop(torch, net, norm):
    """A torch TransformerEncoder holding the weights of ``ep.transformer(...)``."""
    nn = torch.nn
    blocks = [name for name in ("block0", "block1")]
    d = net["block0.attn"].params["Wq"].shape[1]
    d_ff = net["block0.mlp.fc1"].params["W"].shape[0]
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(d, net["block0.attn"].heads, d_ff, activation="gelu",
                                   batch_first=True, norm_first=norm == "pre"),
        num_layers=len(blocks), norm=nn.LayerNorm(d) if norm == "pre" else None,
        enable_nested_tensor=False).double()

    def put(param, value):
        with torch.no_grad():
            param.copy_(torch.from_numpy(value))

    for i, block in enumerate(blocks):
        layer = enc.layers[i]
        P = net[f"{block}.attn"].params
        put(layer.self_attn.in_proj_weight, np.concatenate([P["Wq"], P["Wk"], P["Wv"]]))
        put(layer.self_attn.in_proj_bias, np.concatenate([P["bq"], P["bk"], P["bv"]]))
        put(layer.self_attn.out_proj.weight, P["Wo"])
        put(layer.self_attn.out_proj.bias, P["bo"])
        for t, e in (("linear1", "mlp.fc1"), ("linear2", "mlp.fc2")):
            put(getattr(layer, t).weight, net[f"{block}.{e}"].params["W"])
            put(getattr(layer, t).bias, net[f"{block}.{e}"].params["b"])
        for t, e in (("norm1", "ln1"), ("norm2", "ln2")):
            put(getattr(layer, t).weight, net[f"{block}.{e}"].params["gamma"])
            put(getattr(layer, t).bias, net[f"{block}.{e}"].params["beta"])
    if norm == "pre":
        put(enc.norm.weight, net["ln_f"].params["gamma"])
        put(enc.norm.bias, net["ln_f"].params["beta"])
    return enc.eval()


def _to_torch_name(name):
    name = re.sub(r"^block(\d)\.", r"layers.\1.", name)
    for a, b in (("attn", "self_attn"), ("mlp.fc1", "linear1"), ("mlp.fc2", "linear2"),
                 ("ln1", "norm1"), ("ln2", "norm2"), ("ln_f", "norm")):
        name = name.replace(f".{a}.", f".{b}.") if not name.startswith(a) \
            else name.replace(a, b, 1)
    return name


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_analysis_of_converted_equals_hand_built(norm, torch):
    hand = ep.transformer(d_model=8, heads=2, d_ff=16, blocks=2, norm=norm, seed=7)
    enc = _torch_encoder_from_errprop(torch, hand, norm)
    net = ep.from_torch(enc)
    x = np.random.default_rng(7).standard_normal((2, 5, 8))
    np.testing.assert_allclose(net(x), hand(x), rtol=0, atol=1e-13)
    cfg = ep.QuantConfig(weights=ep.Uniform(6, granularity="channel"), biases=ep.Uniform(8),
                         norms=ep.Uniform(8))
    a, b = ep.analyze(hand, x, cfg), ep.analyze(net, x, cfg)
    np.testing.assert_allclose(b.exact, a.exact, rtol=0, atol=1e-13)
    np.testing.assert_allclose(b.first_order, a.first_order, rtol=0, atol=1e-13)
    assert len(a.contributions) == len(b.contributions) == 32 + (2 if norm == "pre" else 0)
    for key, value in a.contributions.items():
        np.testing.assert_allclose(b.contributions[_to_torch_name(key)], value, rtol=0,
                                   atol=1e-13)
    assert float(np.max(np.abs(b.std))) > 0  # the statistics run on the converted net


# ------------------------------------------------------------------ docs
def test_docs_python_blocks_run():
    doc = ROOT / "docs" / "real-models-torch.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)
    assert blocks
    cwd = os.getcwd()
    namespace: dict = {}
    try:
        exec(compile("\n".join(blocks), str(doc), "exec"), namespace)  # noqa: S102
    finally:
        os.chdir(cwd)


def test_importing_errprop_imports_neither_torch_nor_sklearn():
    code = "import sys, errprop; print('torch' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=str(ROOT))
    assert out.stdout.split() == ["False", "False"]

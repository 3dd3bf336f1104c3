"""errprop.save / errprop.load: bit-for-bit round trips, whole-or-nothing writes, clear errors."""

import json
import os
import stat
import time

import numpy as np
import pytest

import errprop as ep


def _tiny_bert(rng, batch=3, tokens=6, d=8, vocab=30):
    ids = rng.integers(1, vocab, (batch, tokens))
    lengths = np.array([tokens, 2, 4])[:batch]
    mask = np.arange(tokens)[None] < lengths[:, None]
    ids[~mask] = 0
    W = lambda *s: rng.standard_normal(s) / np.sqrt(s[-1])  # noqa: E731
    net = ep.Sequential([
        ep.Embedding(rng.standard_normal((vocab, d)), rng.standard_normal((tokens, d)),
                     rng.standard_normal((2, d)), pad_id=0, name="embed"),
        ep.LayerNorm(np.ones(d), np.zeros(d), eps=1e-12),
        ep.Residual(ep.Attention(W(d, d), W(d, d), W(d, d), W(d, d), *rng.standard_normal((4, d)),
                                 heads=2)),
        ep.Residual(ep.Linear(W(16, d), rng.standard_normal(16)), ep.Activation("gelu"),
                    ep.Linear(W(d, 16))),
        ep.RMSNorm(1 + rng.standard_normal(d)),
        ep.MeanPool(), ep.L2Normalize()])
    return ep.mask_padding(net, mask), ids


NETS = {
    "mlp": lambda rng: (ep.mlp([6, 16, 16, 3], "tanh", seed=1), rng.standard_normal((5, 6))),
    "pre-norm transformer": lambda rng: (ep.transformer(8, 2, 16, 2, seed=2),
                                         rng.standard_normal((2, 5, 8))),
    "post-norm causal": lambda rng: (ep.transformer(8, 4, 16, 1, norm="post", causal=True,
                                                    seed=3), rng.standard_normal((2, 4, 8))),
    "masked bert-like": _tiny_bert,
}


@pytest.mark.parametrize("kind", NETS)
def test_round_trip_is_bit_for_bit(kind, rng, tmp_path):
    net, x = NETS[kind](rng)
    folder = ep.save(net, tmp_path / "model")
    back = ep.load(folder)
    assert [n for n, _ in back.layers()] == [n for n, _ in net.layers()]
    assert np.array_equal(back(x), net(x))
    config = ep.QuantConfig(weights=ep.Uniform(4, granularity="channel"))
    if kind != "masked bert-like":
        config = ep.QuantConfig(weights=ep.Uniform(4, granularity="channel"),
                                activations=ep.Uniform(6))
    a, b = ep.analyze(net, x, config), ep.analyze(back, x, config)
    assert np.array_equal(a.exact, b.exact) and np.array_equal(a.first_order, b.first_order)
    spec = json.loads((folder / "model.json").read_text())  # human-readable graph
    assert spec["format"] == "errprop-model" and spec["num_params"] == net.num_params()


def test_spec_names_layers_and_shapes(tmp_path):
    net = ep.mlp([4, 5, 2], seed=0)
    spec = json.loads((ep.save(net, tmp_path / "m") / "model.json").read_text())
    first = spec["net"]["layers"][0]
    assert first["type"] == "Linear" and first["node"] == "fc1"
    assert first["params"]["W"]["shape"] == [5, 4]


def test_save_is_whole_or_nothing(tmp_path, monkeypatch):
    net = ep.mlp([4, 5, 2], seed=0)
    folder = ep.save(net, tmp_path / "m")
    before = (folder / "weights.npz").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        ep.save(ep.mlp([4, 7, 2], seed=1), folder)
    assert (folder / "weights.npz").read_bytes() == before  # the old model is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind
    with pytest.raises(OSError):
        ep.save(net, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_save_replaces_an_existing_model_but_not_other_folders(tmp_path):
    ep.save(ep.mlp([4, 5, 2], seed=0), tmp_path / "m")
    ep.save(ep.mlp([4, 9, 2], seed=0), tmp_path / "m")
    assert ep.load(tmp_path / "m")["fc1"].params["W"].shape == (9, 4)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an errprop model"):
        ep.save(ep.mlp([4, 5, 2]), tmp_path / "data")


def test_save_lists_every_unknown_layer(tmp_path):
    class Double(ep.Op):
        def forward(self, x, params=None):
            return 2 * x

        def jvp(self, x, y, dx, dparams):
            return 2 * dx

    net = ep.Sequential([ep.Linear(np.eye(3)), Double(), ep.Linear(np.eye(3)), Double()])
    with pytest.raises(TypeError, match=r"op1 \(Double\), op2 \(Double\)"):
        ep.save(net, tmp_path / "m")


@pytest.mark.parametrize("damage, match", [
    (lambda f: (f / "model.json").write_text("{nope"), "not valid JSON"),
    (lambda f: (f / "model.json").write_text('{"format": "other"}'), "not an errprop model"),
    (lambda f: (f / "model.json").write_text(
        (f / "model.json").read_text().replace('"version": 1', '"version": 99')), "version 99"),
    (lambda f: (f / "weights.npz").unlink(), "no weights.npz"),
    (lambda f: (f / "model.json").write_text(
        (f / "model.json").read_text().replace('"Linear"', '"Conv"', 1)), "unknown layer type"),
])
def test_damaged_model_folders_give_clear_errors(damage, match, tmp_path):
    folder = ep.save(ep.mlp([4, 5, 2], seed=0), tmp_path / "m")
    damage(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        ep.load(folder)


def test_load_says_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError):
        ep.load(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="cannot tell what"):
        ep.load(tmp_path / "weights.bin")


def test_mask_padding_shares_parameters_and_checks_the_mask(rng):
    net, ids = _tiny_bert(rng)
    plain = ep.mask_padding(net, None)
    assert plain["embed"].params["word"] is net["embed"].params["word"]
    with pytest.raises(ValueError, match="mask_padding"):
        plain(ids)  # padded ids through unmasked attention
    with pytest.raises(ValueError, match="mask every token"):
        ep.mask_padding(net, np.zeros(ids.shape, bool))
    with pytest.raises(ValueError, match="no layer that takes a padding mask"):
        ep.mask_padding(ep.mlp([3, 3]), np.ones((2, 3), bool))


def test_load_dispatches_torchscript_and_onnx_files(tmp_path, torch, rng):
    """errprop.load reads a TorchScript .pt and an .onnx file through the importers."""
    import warnings
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x = rng.standard_normal((3, 4))
    want = m.double()(torch.tensor(x)).detach().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates torch.jit
        torch.jit.save(torch.jit.script(m), str(tmp_path / "m.pt"))
    np.testing.assert_allclose(ep.load(tmp_path / "m.pt", trusted=True)(x), want,
                               rtol=1e-12, atol=1e-12)
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    W1, W2 = (m[0].weight.detach().double().numpy(), m[2].weight.detach().double().numpy())
    b1, b2 = (m[0].bias.detach().double().numpy(), m[2].bias.detach().double().numpy())
    inits = [numpy_helper.from_array(a.astype(np.float32), n)
             for a, n in ((W1, "W1"), (b1, "b1"), (W2, "W2"), (b2, "b2"))]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], transB=1),
         helper.make_node("Tanh", ["h"], ["t"]),
         helper.make_node("Gemm", ["t", "W2", "b2"], ["y"], transB=1)], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])], inits)
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    np.testing.assert_allclose(ep.load(tmp_path / "m.onnx")(x), want, rtol=1e-5, atol=1e-6)


def test_token_ids_are_checked_by_name(rng):
    table = rng.standard_normal((10, 4))
    net = ep.Sequential([ep.Embedding(table, rng.standard_normal((5, 4)), name="embed"),
                         ep.MeanPool()])
    with pytest.raises(ValueError, match=r"'embed'.*integers in \[0, 10\)"):
        net(np.array([[1.5, 2.0]]))
    with pytest.raises(ValueError, match=r"'embed'.*integers in \[0, 10\)"):
        net(np.array([[3, 10]]))
    with pytest.raises(ValueError, match="6 tokens, but the position table has 5 rows"):
        net(np.zeros((1, 6)))
    with pytest.raises(ValueError, match="input quantization does not apply.*integer ids"):
        ep.analyze(net, np.zeros((1, 3)), ep.QuantConfig(input=ep.Uniform(8)))
    with pytest.raises(ValueError, match="pad_id"):
        ep.Embedding(table, pad_id=10)


# ------------------------------------------------------------------ C15: replacing, temps
def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_saved_folders_and_files_have_the_usual_permissions(tmp_path):
    folder = ep.save(ep.mlp([4, 5, 2], seed=0), tmp_path / "m")
    ep.save(ep.mlp([4, 6, 2], seed=0), folder)  # replacing keeps them too
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~_umask()
    for name in ("model.json", "weights.npz"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o666 & ~_umask()


def test_replacing_a_model_never_leaves_the_path_empty(tmp_path, monkeypatch):
    """Watch every rename save makes: after each one a complete model is at the path."""
    from errprop import _io
    folder = ep.save(ep.mlp([4, 5, 2], seed=0), tmp_path / "m")
    seen = []
    real_replace, real_exchange = os.replace, _io._exchange

    def watch(fn):
        def wrapped(*args):
            out = fn(*args)
            seen.append(ep.load(folder)["fc1"].params["W"].shape)
            return out
        return wrapped

    monkeypatch.setattr(_io.os, "replace", watch(real_replace))
    monkeypatch.setattr(_io, "_exchange", watch(real_exchange))
    ep.save(ep.mlp([4, 9, 2], seed=0), folder)
    assert seen and seen[-1] == (9, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the old model is gone


def test_a_save_killed_between_renames_is_recovered(tmp_path, monkeypatch):
    """Without an atomic swap, save renames the old model to .m.old first; if it dies
    right there, the next load (or save) puts the old model back."""
    from errprop import _io
    folder = ep.save(ep.mlp([4, 5, 2], seed=0), tmp_path / "m")
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    calls = []

    def dies_on_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the model moved to .m.old
        return os.rename(src, dst)

    monkeypatch.setattr(_io.os, "replace", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        ep.save(ep.mlp([4, 9, 2], seed=0), folder)
    monkeypatch.undo()
    assert not folder.exists() and (tmp_path / ".m.old" / "model.json").is_file()
    assert ep.load(folder)["fc1"].params["W"].shape == (5, 4)  # recovered
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    ep.save(ep.mlp([4, 9, 2], seed=0), folder)  # the fallback path works end to end
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    ep.save(ep.mlp([4, 7, 2], seed=0), folder)
    assert ep.load(folder)["fc1"].params["W"].shape == (7, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _dead_pid():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_temps_of_killed_writers_are_cleaned_on_the_next_write(tmp_path):
    """A writer killed mid-write leaves .NAME.tmp<pid>-XXXXXXXX behind: the next save or
    write_text into that folder removes it once its process is gone (or it is an hour
    old), and leaves live writers' temps and other hidden files alone."""
    from errprop._files import write_text
    dead, now = _dead_pid(), time.time()
    stale_dir = tmp_path / f".bigmodel.tmp{dead}-abcd1234"
    stale_dir.mkdir()
    (stale_dir / "weights.npz").write_bytes(b"x" * 1000)
    stale_csv = tmp_path / f".nodes.csv.tmp{dead}-0123abcd"
    stale_png = tmp_path / f".fig.png.tmp{dead}-zzzz9999.png"
    old_live = tmp_path / f".report.json.tmp{os.getppid()}-q1w2e3r4"  # a live pid, 2 h old
    fresh_dead = tmp_path / f".sources.csv.tmp{dead}-aaaa1111"      # died 10 s ago
    live = tmp_path / f".rows.csv.tmp{os.getppid()}-bbbb2222"      # being written now
    legacy = tmp_path / ".m.k3j4h5g6"  # a temp folder of an earlier errprop's save
    legacy.mkdir()
    (legacy / "model.json").write_text("{}")
    keep = [tmp_path / ".bashrc", tmp_path / ".m.notes", tmp_path / ".x.tmp12-short"]
    for p in (stale_csv, stale_png, old_live, fresh_dead, live, *keep):
        p.write_text("partial")
    for p, age in ((stale_dir, 120), (stale_csv, 120), (stale_png, 120), (old_live, 7200),
                   (fresh_dead, 10), (legacy, 7200), (keep[0], 9999), (keep[1], 9999)):
        os.utime(p, (now - age, now - age))
    ep.save(ep.mlp([4, 5, 2], seed=0), tmp_path / "m")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["m", fresh_dead.name, live.name, *(p.name for p in keep)])
    os.utime(fresh_dead, (now - 120, now - 120))
    write_text(tmp_path / "notes.txt", "hi")  # every writer cleans, not only save
    assert not fresh_dead.exists() and live.exists()

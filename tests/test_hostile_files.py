"""Hostile and damaged files: every case ends in one clear error that names the file
(a ValueError or OSError subclass), runs no code stored in the file, and stays far below
a memory cap (the bombs declare many GiB; the cap asserted here is 500 MB)."""

import io
import json
import resource
import struct
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest

import errprop as ep
from errprop._files import FileFormatError, UntrustedCodeError

CAP = 500 * 2 ** 20  # bytes: peak allocation allowed while refusing one file
GiB = 2 ** 30


def _npy_header(shape, dtype="<f8"):
    """The bytes of a .npy header declaring ``shape`` (version 1.0)."""
    d = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (dtype, tuple(shape))
    d += " " * (63 - (len(d) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(d)) + d.encode("latin1")


def _bomb_member(zf, name, header, zeros):
    """A deflated member: ``header`` then ``zeros`` zero bytes (compresses ~1000:1)."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with zf.open(info, "w", force_zip64=True) as f:
        f.write(header)
        chunk = bytes(2 ** 20)
        for _ in range(zeros // len(chunk)):
            f.write(chunk)


def _model(tmp_path, name="m"):
    return ep.save(ep.mlp([4, 5, 2], seed=0), tmp_path / name)


def _edit_spec(folder, edit):
    spec = json.loads((folder / "model.json").read_text())
    edit(spec)
    (folder / "model.json").write_text(json.dumps(spec))


# ------------------------------------------------------------------ errprop folders
def bomb_undeclared_shape(tmp_path):
    """fc1.W's header declares 2**31 floats (16 GiB); model.json says (5, 4)."""
    folder = _model(tmp_path)
    with zipfile.ZipFile(folder / "weights.npz", "w") as zf:
        _bomb_member(zf, "fc1.W.npy", _npy_header((2 ** 31,)), 8 * 2 ** 20)
    return folder, "weights.npz", r"has shape \(2147483648,\), but model.json declares \(5, 4\)"


def bomb_declared_in_spec(tmp_path):
    """model.json and the header agree on a 16 GiB weight: over memory_limit."""
    folder = bomb_undeclared_shape(tmp_path)[0]
    _edit_spec(folder, lambda s: s["net"]["layers"][0]["params"]["W"].update(shape=[2 ** 31]))
    return folder, "weights.npz", r"needs 16.0 GiB, over memory_limit"


def bomb_trailing_data(tmp_path):
    """A correct (5, 4) header followed by 64 MiB of deflated zeros."""
    folder = _model(tmp_path)
    with zipfile.ZipFile(folder / "weights.npz", "w") as zf:
        _bomb_member(zf, "fc1.W.npy", _npy_header((5, 4)), 64 * 2 ** 20)
    return folder, "weights.npz", "declares shape .* but its member holds"


def random_npz(tmp_path):
    folder = _model(tmp_path)
    (folder / "weights.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    return folder, "weights.npz", r"not a readable \.npz \(zip\) archive"


def truncated_npz(tmp_path):
    folder = _model(tmp_path)
    data = (folder / "weights.npz").read_bytes()
    (folder / "weights.npz").write_bytes(data[:len(data) // 2])
    return folder, "weights.npz", "not a readable .npz"


def corrupted_npz_member(tmp_path):
    """One byte of stored array data flipped: the zip's CRC check fails on reading."""
    folder = _model(tmp_path)
    data = bytearray((folder / "weights.npz").read_bytes())
    at = data.index(b"NUMPY") + 200
    data[at] ^= 0xFF
    (folder / "weights.npz").write_bytes(bytes(data))
    return folder, "weights.npz", "not a readable .npz.*CRC"


def pickled_npz_member(tmp_path):
    folder = _model(tmp_path)
    arrays = dict(np.load(folder / "weights.npz"))
    arrays["fc1.W"] = np.array([{"x": 1}], dtype=object)
    np.savez(folder / "weights.npz", **arrays)
    return folder, "weights.npz", "dtype object; errprop stores only numbers"


def _spec_case(text_or_edit, match):
    def case(tmp_path):
        folder = _model(tmp_path)
        if callable(text_or_edit):
            _edit_spec(folder, text_or_edit)
        else:
            (folder / "model.json").write_bytes(text_or_edit)
        return folder, "model.json", match
    return case


SPEC_CASES = {
    "json not json": _spec_case(b"{nope", "not valid JSON"),
    "json not utf-8": _spec_case('{"format": "caf\xe9"}'.encode("latin1"),
                                 r"not UTF-8 text \(byte 15: b'\\xe9'\)"),
    "json nested deeply": _spec_case(b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    "json a list": _spec_case(b"[1, 2]", "not an errprop model spec"),
    "json net missing": _spec_case(lambda s: s.pop("net"), "net: a node must be a JSON object"),
    "json net a string": _spec_case(lambda s: s.update(net="fc1"), "got str"),
    "json layers a dict": _spec_case(lambda s: s["net"].update(layers={}),
                                     "'layers' must be a list"),
    "json shape a string": _spec_case(
        lambda s: s["net"]["layers"][0]["params"]["W"].update(shape="5x4"),
        "'shape' must be a list of sizes"),
    "json param not a ref": _spec_case(
        lambda s: s["net"]["layers"][0]["params"].update(W=[1, 2]), "must be .\"array\""),
    "json unknown argument": _spec_case(
        lambda s: s["net"]["layers"][0]["config"].update(bogus=1),
        r"node 'fc1' \(Linear\) cannot be built.*bogus"),
    "json graph nested deeply": _spec_case(
        b'{"format": "errprop-model", "version": 1, "net": '
        + b'{"type": "Sequential", "layers": [' * 5000 + b"]}" * 5000 + b"}",
        "nested too deeply"),
}


# ------------------------------------------------------------------ other formats
def _onnx_file(tmp_path, nodes, shape, inits=()):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, shape)], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], list(inits))
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def onnx_huge_input(tmp_path):
    from onnx import helper, numpy_helper
    path = _onnx_file(tmp_path, [helper.make_node("MatMul", ["x", "W"], ["y"])],
                      [4000, 40000, 8], [numpy_helper.from_array(np.ones((8, 2), np.float32),
                                                                 "W")])
    return path, "m.onnx", r"input 'x' of shape \(4000, 40000, 8\) needs 9.5 GiB"


def onnx_huge_intermediate(tmp_path):
    """A tiny input expanded to (100000, 100000, 8) by a constant shape."""
    from onnx import helper, numpy_helper
    shape = numpy_helper.from_array(np.array([100000, 100000, 8], np.int64), "s")
    path = _onnx_file(tmp_path, [helper.make_node("Expand", ["x", "s"], ["y"])], [1, 8],
                      [shape])
    return path, "m.onnx", r"tensor 'y' of shape \(100000, 100000, 8\)"


def onnx_random(tmp_path):
    (tmp_path / "m.onnx").write_bytes(np.random.default_rng(1).bytes(300))
    return tmp_path / "m.onnx", "m.onnx", "not an ONNX model"


def onnx_truncated(tmp_path):
    path = onnx_huge_input(tmp_path)[0]
    path.write_bytes(path.read_bytes()[:80])
    return path, "m.onnx", "not an ONNX model"


def onnx_initializer_without_data(tmp_path):
    from onnx import TensorProto, helper
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[100000, 100000])
    path = _onnx_file(tmp_path, [helper.make_node("MatMul", ["x", "W"], ["y"])], [2, 100000],
                      [w])
    return path, "m.onnx", "initializer 'W' .* does not hold the data it declares"


def onnx_external_data_outside(tmp_path):
    from onnx import TensorProto, helper
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[8, 2],
                    data_location=TensorProto.EXTERNAL)
    w.external_data.add(key="location", value="../../../etc/passwd")
    path = _onnx_file(tmp_path, [helper.make_node("MatMul", ["x", "W"], ["y"])], [2, 8], [w])
    return path, "m.onnx", "points outside the directory"


def torchscript_writing_a_file(tmp_path):
    torch = pytest.importorskip("torch")
    from test_from_torch import _evil_torchscript
    path = _evil_torchscript(torch, tmp_path / "evil.pt", tmp_path / "marker")
    return path, "evil.pt", r"TorchScript archive.*trusted=True"


def pt_random(tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "m.pt").write_bytes(np.random.default_rng(2).bytes(1000))
    return tmp_path / "m.pt", "m.pt", "torch.load.weights_only=True. refuses it"


def pt_truncated(tmp_path):
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save(torch.nn.Linear(3, 2).state_dict(), buf)
    (tmp_path / "m.pt").write_bytes(buf.getvalue()[:300])
    return tmp_path / "m.pt", "m.pt", "m.pt"


def pt_zip_bomb(tmp_path):
    """A .pt-looking zip whose two members declare (central directory) 4 GiB each."""
    pytest.importorskip("torch")
    with zipfile.ZipFile(tmp_path / "m.pt", "w") as zf:
        for name in ("archive/data/0", "archive/data/1"):
            _bomb_member(zf, name, b"", 2 ** 20)
    data = bytearray((tmp_path / "m.pt").read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0:  # forge each entry's uncompressed size
        data[at + 24:at + 28] = struct.pack("<I", 2 ** 32 - 16)
        at = data.find(b"PK\x01\x02", at + 4)
    (tmp_path / "m.pt").write_bytes(bytes(data))
    return tmp_path / "m.pt", "m.pt", "needs 8.0 GiB, over memory_limit"


def _bert_folder(tmp_path, weights):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "bert", "hidden_act": "gelu", "num_attention_heads": 2,
         "num_hidden_layers": 1}))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def safetensors_random(tmp_path):
    pytest.importorskip("safetensors")
    folder = _bert_folder(tmp_path, np.random.default_rng(3).bytes(500))
    return folder, "model.safetensors", "not a readable safetensors file"


def safetensors_huge_header(tmp_path):
    """A header length of 2**40 bytes in a 16-byte file."""
    pytest.importorskip("safetensors")
    folder = _bert_folder(tmp_path, struct.pack("<Q", 2 ** 40) + b"{}      ")
    return folder, "model.safetensors", "not a readable safetensors file"


def bert_config_not_a_number(tmp_path):
    pytest.importorskip("safetensors")
    folder = _bert_folder(tmp_path, b"")
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "bert", "hidden_act": "gelu", "num_attention_heads": "two"}))
    (folder / "model.safetensors").unlink()
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(1, np.float32)}, str(folder / "model.safetensors"))
    return folder, "config.json", "'num_attention_heads' must be a number"


CASES = {
    "npz bomb, shape not in model.json": bomb_undeclared_shape,
    "npz bomb, huge shape in model.json": bomb_declared_in_spec,
    "npz bomb, trailing data": bomb_trailing_data,
    "npz random bytes": random_npz,
    "npz truncated": truncated_npz,
    "npz corrupted member": corrupted_npz_member,
    "npz pickled member": pickled_npz_member,
    **SPEC_CASES,
    "onnx huge input": onnx_huge_input,
    "onnx huge intermediate": onnx_huge_intermediate,
    "onnx random bytes": onnx_random,
    "onnx truncated": onnx_truncated,
    "onnx initializer without data": onnx_initializer_without_data,
    "onnx external data outside": onnx_external_data_outside,
    "torchscript writing a file": torchscript_writing_a_file,
    "pt random bytes": pt_random,
    "pt truncated": pt_truncated,
    "pt zip bomb": pt_zip_bomb,
    "safetensors random bytes": safetensors_random,
    "safetensors huge header": safetensors_huge_header,
    "bert config not a number": bert_config_not_a_number,
}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@pytest.mark.parametrize("case", CASES)
def test_hostile_file_gives_one_clear_error(case, tmp_path):
    path, file_name, match = CASES[case](tmp_path)
    rss = _peak_rss()
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises((ValueError, OSError), match=match) as err:
                ep.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert file_name in message, message  # the error names the file
    assert isinstance(err.value, (FileFormatError, UntrustedCodeError, OSError)), err.value
    assert not (tmp_path / "marker").exists()  # no code from the file ran
    assert peak < CAP, f"{peak / 2**20:.0f} MiB traced"
    # the process's peak resident size (also counts torch's and onnx's C++ allocations)
    assert _peak_rss() - rss < CAP


def test_memory_limit_is_a_keyword_and_is_checked(tmp_path):
    folder = _model(tmp_path)
    with pytest.raises(FileFormatError, match=r"weights.npz: reading the 4 arrays model.json "
                                              r"names needs 296 bytes, over memory_limit=200"):
        ep.load(folder, memory_limit=200)
    assert ep.load(folder, memory_limit=296)["fc1"].params["W"].shape == (5, 4)
    with pytest.raises(TypeError, match="memory_limit must be an integer"):
        ep.load(folder, memory_limit="big")
    with pytest.raises(ValueError, match="memory_limit must be an integer in"):
        ep.load(folder, memory_limit=0)


def test_bomb_helpers_build_what_they_claim(tmp_path):
    """The bombs are real: the forged member decompresses to what its header says."""
    folder = bomb_trailing_data(tmp_path)[0]
    with zipfile.ZipFile(folder / "weights.npz") as zf:
        info = zf.getinfo("fc1.W.npy")
        assert info.file_size > 64 * 2 ** 20 > 100 * info.compress_size

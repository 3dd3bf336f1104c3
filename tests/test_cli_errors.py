"""The command line never prints a traceback: bad input is one line and exit code 2, an
exception errprop did not expect is one line saying it is a bug and exit code 1, and
``--traceback`` shows Python's traceback for a bug report (issue 14: C13)."""

import json
import zipfile
import zlib

import numpy as np
import pytest

import errprop as ep
import errprop._cli_analyze as cli_analyze
from errprop.cli import main


@pytest.fixture
def model(tmp_path):
    ep.save(ep.mlp([6, 16, 3], "tanh", seed=4), tmp_path / "model")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((5, 6)))
    return str(tmp_path / "model"), str(tmp_path / "x.npy")


def _one_line(capsys):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_every_hostile_file_is_one_line_through_the_cli(tmp_path, capsys):
    """The hostile-file set (zip bombs, huge shapes, TorchScript writing a file, malformed
    JSON/npz/safetensors/ONNX/.pt) through ``errprop analyze``: one line naming the file."""
    from test_hostile_files import CASES
    np.save(tmp_path / "x.npy", np.zeros((2, 6)))
    for case, make in CASES.items():
        folder = tmp_path / case.replace(" ", "_").replace(",", "")
        folder.mkdir()
        path, file_name, _ = make(folder)
        code = main(["analyze", str(path), "--input", str(tmp_path / "x.npy")])
        line = _one_line(capsys)
        assert code == 2 and line.startswith("errprop: error: ") and file_name in line, \
            (case, line)
        assert not (folder / "marker").exists(), case


def _real(kind, tmp_path):
    """The exception a format library raises for a real malformed file (not wrapped)."""
    if kind == "zip":
        (tmp_path / "w.npz").write_bytes(b"PK\x03\x04" + bytes(40))
        zipfile.ZipFile(tmp_path / "w.npz")
    if kind == "deflate":
        zlib.decompress(b"not deflate data")
    if kind == "safetensors":
        from safetensors.numpy import load_file
        (tmp_path / "m.safetensors").write_bytes(np.random.default_rng(1).bytes(64))
        load_file(tmp_path / "m.safetensors")
    if kind == "protobuf":
        import onnx
        (tmp_path / "m.onnx").write_bytes(np.random.default_rng(2).bytes(200))
        onnx.load(tmp_path / "m.onnx")
    if kind == "onnx":
        import onnx
        onnx.checker.check_model(onnx.ModelProto(ir_version=1))
    if kind == "deep json":
        json.loads("[" * 100_000 + "]" * 100_000)
    if kind == "memory":
        np.empty(2 ** 60, dtype=np.uint8)
    raise AssertionError(f"{kind}: the library did not raise")


@pytest.mark.parametrize("kind, words", [
    ("zip", "cannot read MODEL: BadZipFile"), ("deflate", "cannot read MODEL: error"),
    ("safetensors", "cannot read MODEL: SafetensorError"),
    ("protobuf", "cannot read MODEL: DecodeError"),
    ("onnx", "cannot read MODEL: ValidationError"),
    ("deep json", "nested too deeply"), ("memory", "out of memory")])
def test_format_library_errors_are_one_line_even_unwrapped(kind, words, model, tmp_path,
                                                           monkeypatch, capsys):
    """The safety net under the loaders: a format library's own exception (what the
    loaders raised before they wrapped them) is still one line, exit code 2."""
    folder, x = model
    monkeypatch.setattr(cli_analyze, "load", lambda *a, **k: _real(kind, tmp_path))
    assert main(["analyze", folder, "--input", x]) == 2
    line = _one_line(capsys)
    assert line.startswith("errprop: error: ") and words.replace("MODEL", folder) in line


def test_unexpected_exception_says_bug_and_traceback_shows_it(model, monkeypatch, capsys):
    folder, x = model

    def broken(*args, **kwargs):
        raise KeyError("net")
    monkeypatch.setattr(cli_analyze, "load", broken)
    assert main(["analyze", folder, "--input", x]) == 1
    line = _one_line(capsys)
    assert line.startswith("errprop: internal error: KeyError: 'net'")
    assert "bug" in line and "--traceback" in line
    for argv in (["--traceback", "analyze", folder, "--input", x],
                 ["analyze", folder, "--input", x, "--traceback"]):
        with pytest.raises(KeyError, match="net"):
            main(argv)


def test_bad_input_with_traceback_raises_the_original(model, tmp_path):
    folder, _ = model
    np.save(tmp_path / "bad.npy", np.zeros((4, 5)))
    with pytest.raises(ValueError, match="expects inputs with 6 features"):
        main(["analyze", folder, "--input", str(tmp_path / "bad.npy"), "--traceback"])


def test_non_utf8_sentences_file_is_named(minilm, tmp_path, capsys):
    bad = tmp_path / "sentences.txt"
    bad.write_bytes(b"A man is eating.\nCaf\xe9 au lait\n")
    assert main(["analyze", "minilm", "--sentences-file", str(bad)]) == 2
    line = _one_line(capsys)
    # byte 20, 0-based: 17 bytes of the first line, then "Caf"
    assert str(bad) in line and "not UTF-8" in line and "byte 20" in line


def test_torchscript_needs_trust_code(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from test_from_torch import _evil_torchscript
    path = _evil_torchscript(torch, tmp_path / "evil.pt", tmp_path / "marker")
    np.save(tmp_path / "x.npy", np.zeros((2, 4)))
    for command in (["analyze"], ["budget"], ["allocate", "--target-sqnr", "20"]):
        assert main([*command, str(path), "--input", str(tmp_path / "x.npy")]) == 2
        line = _one_line(capsys)
        assert "TorchScript" in line and "--trust-code" in line
        assert not (tmp_path / "marker").exists()
    main(["analyze", str(path), "--input", str(tmp_path / "x.npy"), "--trust-code"])
    capsys.readouterr()
    assert (tmp_path / "marker").exists()  # trusted: torch ran the archive's code

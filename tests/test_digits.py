"""The shipped digits MLP (``errprop.digits_mlp``) and the files ``errprop demo`` writes.

The oracle for the forward is plain NumPy on the stored weights; the accuracy is the one
``docs/scripts/train_digits_mlp.py`` recorded in ``metadata.json`` when it trained the
network (97.6%, 439 of 450 held-out images).
"""

import json
from pathlib import Path

import numpy as np
import pytest

import errprop as ep
from errprop.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "errprop" / "data" / "digits-mlp"


@pytest.fixture(scope="module")
def shipped():
    return ep.digits_mlp()


@pytest.fixture(scope="module")
def metadata():
    return json.loads((DATA / "metadata.json").read_text(encoding="utf-8"))


def _numpy_forward(x):
    """relu(x W1ᵀ + b1) -> relu(· W2ᵀ + b2) -> softmax(· W3ᵀ + b3), from weights.npz."""
    with np.load(DATA / "weights.npz") as w:
        h = x
        for i in (1, 2, 3):
            h = h @ w[f"fc{i}.W"].T + w[f"fc{i}.b"]
            if i < 3:
                h = np.maximum(h, 0.0)
    z = np.exp(h - h.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def test_forward_matches_numpy_on_the_stored_weights(shipped):
    net, x, labels = shipped
    assert [name for name, _ in net.layers()] == ["fc1", "relu1", "fc2", "relu2", "fc3",
                                                  "softmax1"]
    assert x.shape == (450, 64) and labels.shape == (450,)
    np.testing.assert_allclose(net(x), _numpy_forward(x), rtol=0, atol=1e-14)


def test_inputs_are_normalised_as_in_training(shipped):
    _, x, labels = shipped
    assert x.dtype == np.float64 and x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_array_equal(x * 16, np.round(x * 16))  # pixels 0..16, divided by 16
    assert set(np.unique(labels)) == set(range(10))


def test_accuracy_matches_the_training_script(shipped, metadata):
    net, x, labels = shipped
    correct = int(np.sum(np.argmax(net(x), axis=1) == labels))
    assert correct == metadata["test_correct"] == 439
    assert correct / len(labels) == pytest.approx(metadata["test_accuracy"], abs=1e-12)
    net, x, labels = ep.digits_mlp("calibration")
    assert len(labels) == metadata["calibration_images"] == 270
    assert np.mean(np.argmax(net(x), axis=1) == labels) == pytest.approx(
        metadata["calibration_accuracy"], abs=1e-12)


def test_split_is_checked():
    with pytest.raises(ValueError, match="split must be one of"):
        ep.digits_mlp("train")


def test_data_is_small_and_ships_in_the_wheel():
    files = sorted(p.name for p in DATA.iterdir())
    assert files == ["digits.npz", "metadata.json", "model.json", "weights.npz"]
    assert sum((DATA / f).stat().st_size for f in files) < 200_000
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["errprop"]
    for f in files:
        assert any((DATA / f).relative_to(ROOT / "errprop").match(p) for p in patterns), f


EXPECTED = {"report.md", "report.json", "digits-budget.png", "digits-growth.png",
            "allocation.png"}


def test_demo_writes_the_report_and_figures(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--models", "digits", "--bits", "6", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "injected MSE" in printed and "held-out accuracy" in printed
    assert {p.name for p in out.iterdir()} == EXPECTED  # no temporary files left behind
    for name in EXPECTED - {"report.md", "report.json"}:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "report.json").read_text(encoding="utf-8"))
    digits = doc["models"]["digits"]
    assert digits["float_accuracy"] == pytest.approx(439 / 450)
    assert [r["bits"] for r in digits["runs"]] == [6]
    assert {r["name"] for r in digits["runs"][0]["budget"]["rows"]} == {"fc1", "fc2", "fc3"}
    allocation = digits["allocation"]
    assert allocation["runs"]["allocated"]["held_out_sqnr_db"] >= doc["target_sqnr_db"]
    assert allocation["runs"]["allocated"]["cost"] <= min(
        r["cost"] for r in allocation["runs"].values())
    md = (out / "report.md").read_text(encoding="utf-8")
    for name in EXPECTED - {"report.md", "report.json"}:
        assert f"]({name})" in md


def test_a_failed_figure_leaves_no_partial_file(tmp_path, monkeypatch):
    """PNGs go to a temporary file renamed over the target: a failure while drawing leaves
    the old file (or none) and no temporary file."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "digits-growth.png").write_bytes(b"old")

    def boom(fig, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", boom)
    assert main(["demo", "--quick", "--models", "digits", "--bits", "8", "--out",
                 str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["digits-growth.png"]
    assert (out / "digits-growth.png").read_bytes() == b"old"

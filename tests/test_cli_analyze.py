"""``errprop analyze MODEL``: loads any model source, prints the tables, writes the files."""

import csv
import json

import numpy as np
import pytest

import errprop as ep
from errprop.cli import main


def _fake_quant_rows(W, bits):
    """Symmetric per-output-channel round-to-nearest, written out independently."""
    q = 2 ** (bits - 1) - 1
    s = np.max(np.abs(W), axis=1, keepdims=True) / q
    return np.clip(np.round(W / s), -q, q) * s


@pytest.fixture
def saved(tmp_path, rng):
    net = ep.mlp([6, 16, 3], "relu", seed=4)
    x = rng.standard_normal((20, 6))
    np.save(tmp_path / "x.npy", x)
    return ep.save(net, tmp_path / "model"), tmp_path / "x.npy", net, x


def test_analyze_writes_a_report_that_matches_a_hand_fake_quant(saved, tmp_path, capsys):
    folder, xfile, net, x = saved
    out = tmp_path / "out"
    assert main(["analyze", str(folder), "--weights", "4", "--input", str(xfile),
                 "--mc", "50", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fc1.W" in printed and "tensor SQNR" in printed and "Monte Carlo" in printed
    doc = json.loads((out / "report.json").read_text())
    W1, b1 = net["fc1"].params["W"], net["fc1"].params["b"]
    W2, b2 = net["fc2"].params["W"], net["fc2"].params["b"]
    y = np.maximum(x @ W1.T + b1, 0) @ W2.T + b2
    yq = np.maximum(x @ _fake_quant_rows(W1, 4).T + b1, 0) @ _fake_quant_rows(W2, 4).T + b2
    want = 20 * np.log10(np.linalg.norm(y) / np.linalg.norm(yq - y))
    assert abs(doc["summary"]["output_sqnr_db"] - want) < 1e-9
    assert doc["summary"]["mc_samples"] == 50
    with open(out / "sources.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["source"] for r in rows} == {"fc1.W", "fc2.W"}
    assert abs(sum(float(r["output_share"]) for r in rows) - 1) < 1e-9
    assert (out / "report.md").read_text().startswith("# model: W4 (channel)")
    assert [n["node"] for n in doc["nodes"]] == ["fc1", "relu1", "fc2"]


@pytest.mark.parametrize("args, message", [
    (["--weights", "8"], "--input"),
    (["--weights", "1", "--input", "X"], "bits must be from 2 to 16"),
    (["--sentences", "hello"], "tokenizer.json"),
    (["--mc", "-3", "--input", "X"], "--mc must be"),
])
def test_analyze_bad_input_exits_with_one_line(saved, args, message, capsys):
    folder, xfile, *_ = saved
    args = [str(xfile) if a == "X" else a for a in args]
    with pytest.raises(SystemExit) if "bits" in message else _nothing():
        assert main(["analyze", str(folder), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") <= 2


def test_analyze_wrong_input_shape_and_missing_model(saved, tmp_path, capsys):
    folder, _, _, _ = saved
    np.save(tmp_path / "bad.npy", np.zeros((4, 5)))
    assert main(["analyze", str(folder), "--input", str(tmp_path / "bad.npy")]) == 2
    assert "expects inputs with 6 features" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "nope"), "--input", "x.npy"]) == 2
    assert "no model at" in capsys.readouterr().err


def test_analyze_minilm_sentences(minilm, tmp_path, capsys):
    assert main(["analyze", "minilm", "--sentences", "A man is eating food.", "Hi there",
                 "--weights", "8", "--granularity", "tensor", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["summary"]["batch"].startswith("2 sentences")
    assert doc["sources"][0]["source"].endswith("fc2.W")  # the outlier layers lead
    assert doc["summary"]["output_sqnr_db"] < 20


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_mc_prints_and_writes_the_analytic_prediction_it_checks(tmp_path, capsys):
    """--mc shows the analytic MSE (± its standard error) next to Monte Carlo's, printed and
    in report.json / nodes.csv. For a linear network first order is exact, so the analytic
    MSE of every node must sit inside Monte Carlo's 99% interval (widened by 4 standard
    errors of the probe estimate); at the output it equals the exact statistics."""
    net = ep.mlp([6, 24, 24, 3], "identity", seed=2)
    x = np.random.default_rng(3).standard_normal((40, 6))
    np.save(tmp_path / "x.npy", x)
    ep.save(net, tmp_path / "model")
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "model"), "--weights", "5", "--activations", "6",
                 "--input", str(tmp_path / "x.npy"), "--mc", "400", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(5, granularity="channel"),
                                               activations=ep.Uniform(6)))
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["analytic_mse"] == report.mse and summary["analytic_mse_se"] == 0
    assert summary["analytic_by"] == "exact statistics"
    assert f"analytic prediction {report.mse:.3g} (exact first-order statistics" in printed
    assert "versus Monte Carlo, MSE per node" in printed
    with open(out / "nodes.csv") as f:
        nodes = list(csv.DictReader(f))
    assert [n["node"] for n in nodes] == list(report.nodes)
    for n in nodes:
        a, se = float(n["analytic_mse"]), float(n["analytic_mse_se"])
        lo, hi = float(n["mc_mse_lo"]), float(n["mc_mse_hi"])
        assert lo - 4 * se <= a <= hi + 4 * se, n
        assert (se == 0) == (n["node"] == "fc3") and n["analytic_by"] in ("64 probes",
                                                                          "exact statistics")
    assert float(nodes[-1]["mc_mse"]) == summary["mc_mse"]


def test_mc_probes_must_be_at_least_two(saved, capsys):
    folder, xfile, *_ = saved
    assert main(["analyze", str(folder), "--input", str(xfile), "--mc", "10",
                 "--probes", "1"]) == 2
    assert "--probes must be >= 2" in capsys.readouterr().err

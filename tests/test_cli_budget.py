"""``errprop budget`` and ``errprop allocate`` from the command line."""

import json

import numpy as np
import pytest

import errprop as ep
from errprop.cli import main


@pytest.fixture
def model(tmp_path, rng):
    net = ep.mlp([8, 32, 32, 4], "gelu", seed=2)
    x = rng.standard_normal((64, 8))
    np.save(tmp_path / "x.npy", x)
    return str(ep.save(net, tmp_path / "m")), str(tmp_path / "x.npy"), net, x


def test_budget_json_matches_a_hand_fake_quant(model, tmp_path, capsys):
    folder, xfile, net, x = model
    assert main(["budget", folder, "--input", xfile, "--weights", "5", "--format", "json",
                 "--out", str(tmp_path / "o")]) == 0
    doc = json.loads((tmp_path / "o" / "budget.json").read_text())
    assert [r["name"] for r in doc["rows"]] == sorted(
        (r["name"] for r in doc["rows"]), key=lambda n: -next(
            row["output_mse"] for row in doc["rows"] if row["name"] == n))
    # exact MSE with only fc2 quantized, per-channel symmetric 5-bit, by hand
    W = net["fc2"].params["W"]
    s = np.max(np.abs(W), axis=1, keepdims=True) / 15
    Wq = np.clip(np.round(W / s), -15, 15) * s
    h = net.layers()[1][1].forward(net["fc1"].forward(x))
    y, yq = net["fc2"].forward(h), net["fc2"].forward(h, {"W": Wq})
    rest = ep.Sequential([ep.Activation("gelu"), ep.Linear(net["fc3"].params["W"],
                                                           net["fc3"].params["b"])])
    want = np.mean((rest(yq) - rest(y)) ** 2)
    row = next(r for r in doc["rows"] if r["name"] == "fc2")
    assert row["exact_mse"] == pytest.approx(want, rel=1e-10)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("fmt, marker", [("text", "total predicted output MSE"),
                                         ("markdown", "| layer |"), ("csv", "name,op,params"),
                                         ("latex", r"\toprule")])
def test_budget_formats(model, fmt, marker, capsys):
    folder, xfile, *_ = model
    assert main(["budget", folder, "--input", xfile, "--format", fmt, "--no-exact"]) == 0
    assert marker in capsys.readouterr().out


def test_allocate_meets_its_target_on_the_batch(model, tmp_path, capsys):
    folder, xfile, net, x = model
    assert main(["allocate", folder, "--input", xfile, "--target-sqnr", "30",
                 "--format", "json", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "allocation.json").read_text())
    assert set(doc["bits"]) == {"fc1", "fc2", "fc3"}
    config = ep.QuantConfig(overrides={k: {"weights": ep.Uniform(b, granularity="channel")}
                                       for k, b in doc["bits"].items()})
    assert ep.analyze(net, x, config).sqnr_db == pytest.approx(doc["exact_sqnr_db"])
    assert doc["exact_sqnr_db"] >= 30


@pytest.mark.parametrize("args, message", [
    (["allocate", "M", "--input", "X"], "exactly one of --target-sqnr"),
    (["allocate", "M", "--input", "X", "--target-sqnr", "200", "--candidates", "2", "3"],
     "out of reach"),
    (["budget", "M", "--input", "X", "--sort", "colour"], "invalid choice"),
    (["allocate", "M", "--input", "X", "--target-mse", "-1"], "positive"),
])
def test_bad_input_exits_2_with_one_line(model, args, message, capsys):
    folder, xfile, *_ = model
    args = [folder if a == "M" else xfile if a == "X" else a for a in args]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1

"""``errprop budget`` (with ``--matrix`` and ``--split``) and ``errprop allocate`` from the
command line."""

import csv
import io
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
    (["budget", "M", "--input", "X", "--matrix", "gelu"], "did you mean 'gelu2' or 'gelu1'"),
    (["budget", "M", "--input", "X", "--matrix", "--split"], "not allowed with"),
    (["budget", "M", "--input", "X", "--split", "--probes", "1"], "probes must be"),
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


# --------------------------------------------------------------- --matrix and --split
W5A8 = ["--weights", "5", "--activations", "8", "--probes", "16"]


def api_report(folder, x):
    """The same analysis through the API: the saved model, the batch, W5 per channel, A8."""
    config = ep.QuantConfig(weights=ep.Uniform(5, granularity="channel"),
                            activations=ep.Uniform(8))
    return ep.analyze(ep.load(folder), x, config, seed=0)


def test_budget_matrix_json_holds_the_api_matrix_at_every_node(model, tmp_path, capsys):
    folder, xfile, net, x = model
    assert main(["budget", folder, "--input", xfile, *W5A8, "--matrix", "--by", "source",
                 "--format", "json", "--out", str(tmp_path / "o")]) == 0
    doc = json.loads((tmp_path / "o" / "matrix.json").read_text())
    out = capsys.readouterr().out
    assert json.loads(out[:out.rindex("wrote")]) == doc
    m = ep.budget_matrix(ep.load(folder), x, api_report(folder, x), by="source", probes=16)
    assert doc == json.loads(m.to_json())
    assert doc["nodes"] == ["fc1", "gelu1", "fc2", "gelu2", "fc3"]
    assert {r["node"] for r in doc["records"]} == set(doc["nodes"])
    j = m.sources.index("fc2.W")
    rec = next(r for r in doc["records"] if r["node"] == "fc3" and r["source"] == "fc2.W")
    assert rec["component"] == pytest.approx(np.sqrt(m.variance[-1, j]), rel=1e-12)
    assert rec["sensitivity"] == pytest.approx(rec["component"] / m.uncertainty[j], rel=1e-12)
    assert sum(r["share"] for r in doc["records"] if r["node"] == "fc3") == pytest.approx(1)


@pytest.mark.parametrize("fmt, node", [("text", None), ("text", "gelu1"), ("markdown", "fc2"),
                                       ("latex", None), ("csv", "fc2")])
def test_budget_matrix_formats_at_a_node_are_the_api_tables(model, fmt, node, capsys):
    folder, xfile, net, x = model
    assert main(["budget", folder, "--input", xfile, *W5A8, "--matrix",
                 *([node] if node else []), "--format", fmt]) == 0
    out = capsys.readouterr().out
    m = api_report(folder, x).budget_matrix(by="layer", probes=16)
    want = {"text": lambda: m.table(node), "markdown": lambda: m.to_markdown(node=node),
            "latex": lambda: m.to_latex(node=node), "csv": m.to_csv}[fmt]()
    assert want in out
    if fmt == "text":
        assert f"node {node or 'fc3'}: combined u" in out
    if fmt == "csv":  # every node, whatever NODE
        nodes = {r["node"] for r in csv.DictReader(io.StringIO(out))}
        assert nodes == {"fc1", "gelu1", "fc2", "gelu2", "fc3"}


def test_budget_split_is_the_api_split_with_error_model_columns(model, tmp_path, capsys):
    folder, xfile, net, x = model
    assert main(["budget", folder, "--input", xfile, *W5A8, "--split", "--format", "csv",
                 "--out", str(tmp_path)]) == 0
    text = (tmp_path / "split.csv").read_text()
    report = api_report(folder, x)
    split = report.layer_split(report.budget_matrix(by="layer", probes=16, worst=False))
    assert text == split.to_csv()
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO(text))}
    assert list(rows) == ["fc1", "gelu1", "fc2", "gelu2", "fc3"]  # the network's order
    for field in ("local_mse", "propagated_mse", "gain", "gain_first_order", "gain_model"):
        assert float(rows["fc2"][field]) == pytest.approx(getattr(split["fc2"], field),
                                                          rel=1e-12)
    capsys.readouterr()
    assert main(["budget", folder, "--input", xfile, *W5A8, "--split"]) == 0
    assert split.table() in capsys.readouterr().out


def test_budget_help_explains_matrix_and_split(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["budget", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for words in ("--matrix [NODE]", "--split", "noise gain", "csv and json hold every node",
                  "DIR/matrix.<ext>", "--probes P"):
        assert words in out

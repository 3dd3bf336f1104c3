"""Error budgets: closed forms, additivity, exact per-row runs, and every export format."""

import csv
import io
import json
import math

import numpy as np
import pytest

import errprop as ep


def test_single_linear_gain_is_the_mean_squared_input_norm(rng, free):
    """W-only noise of variance σ² per element gives Var Δy_i = σ² Σ_j x_j² (over the
    elements off the grid: the largest |W| is on it and exact): the output MSE per unit
    injected MSE is the mean of that over σ², and the contribution is σ² times that."""
    W = rng.standard_normal((5, 9))
    x = rng.standard_normal((30, 9))
    net = ep.Sequential([ep.Linear(W)])
    report = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(6)))
    row = report.budget()["fc1"]
    s = np.max(np.abs(W)) / 31  # symmetric 6-bit, levels ±31
    f = free(W, s)
    assert np.count_nonzero(~f) == 1
    injected = s * s / 12 * np.mean(f)
    output = s * s / 12 * np.mean((x * x) @ f.T)
    assert row.injected_mse == pytest.approx(injected, rel=1e-12)
    assert row.gain == pytest.approx(output / injected, rel=1e-10)
    assert row.output_mse == pytest.approx(output, rel=1e-10)
    Wq = np.clip(np.round(W / s), -31, 31) * s
    assert row.exact_mse == pytest.approx(np.mean((x @ (Wq - W).T) ** 2), rel=1e-10)
    assert row.params == W.size and row.bits == "W6" and row.share == 1.0


def test_rows_add_up_and_layer_rows_group_source_rows(mlp_case):
    net, x, report = mlp_case
    by_layer, by_source = report.budget(), report.budget(by="source")
    assert sum(r.output_mse for r in by_layer.rows) == pytest.approx(report.mse, rel=1e-10)
    assert sum(r.share for r in by_source.rows) == pytest.approx(1.0)
    for row in by_layer.rows:
        parts = [by_source[s] for s in row.sources]
        assert row.output_mse == pytest.approx(sum(p.output_mse for p in parts), rel=1e-12)
        assert row.injected_mse == pytest.approx(sum(p.injected_mse for p in parts))
    assert by_layer["fc2"].bits == "W6 A8 b8"
    assert by_layer.method == "statistics"


def test_exact_rows_are_single_layer_fake_quant_runs(mlp_case, rng):
    """exact_mse of a row equals a fresh analysis that quantizes only that layer."""
    net, x, report = mlp_case
    row = report.budget()["fc2"]
    alone = ep.analyze(net, x, ep.QuantConfig(overrides={"fc2": {
        "weights": ep.Uniform(6, granularity="channel"), "activations": ep.Uniform(8),
        "biases": ep.Uniform(8)}}))
    assert row.exact_mse == pytest.approx(alone.exact_mse, rel=1e-12)


def test_budget_falls_back_to_first_order_energy_when_statistics_are_too_large(rng):
    net = ep.mlp([8, 32, 8], seed=0)
    x = rng.standard_normal((16, 8))
    report = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(5)), statistics_work_limit=1)
    b = report.budget(exact=False)
    assert b.method == "first order"
    want = {k: np.mean(c ** 2) for k, c in report.contributions.items()}
    assert b["fc1"].output_mse == pytest.approx(want["fc1.W"])
    assert math.isnan(b["fc1"].worst_case) and math.isnan(b["fc1"].exact_mse)
    with pytest.raises(ep.StatisticsTooLarge, match="node_statistics"):
        report.mse
    assert report.predicted_mse() == (pytest.approx(np.mean(report.first_order ** 2)),
                                      "first order")
    full = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(5)))
    assert full.predicted_mse() == (full.mse, "statistics")
    assert full.predicted_mse_contributions() == (full.mse_contributions, "statistics")


def test_sort_and_lookup(mlp_case):
    _, _, report = mlp_case
    b = report.budget().sort("share")
    shares = [r.share for r in b.rows]
    assert shares == sorted(shares, reverse=True)
    assert [r.name for r in b.sort("name", descending=False).rows] == ["fc1", "fc2", "fc3"]
    with pytest.raises(ValueError, match="unknown column"):
        b.sort("colour")
    with pytest.raises(KeyError, match="fc9"):
        b["fc9"]


def test_exports_parse_back(mlp_case, tmp_path):
    _, _, report = mlp_case
    b = report.budget(by="source")
    rows = list(csv.DictReader(io.StringIO(b.to_csv(tmp_path / "b.csv"))))
    assert (tmp_path / "b.csv").read_text() == b.to_csv()
    assert [r["name"] for r in rows] == [r.name for r in b.rows]
    assert float(rows[0]["output_mse"]) == pytest.approx(b.rows[0].output_mse)
    doc = json.loads(b.to_json())
    assert doc["by"] == "source" and len(doc["rows"]) == len(b.rows)
    md = b.to_markdown().splitlines()
    assert md[0].startswith("| source |") and len(md) == 2 + len(b.rows)
    tex = b.to_latex(caption="Budget of fc_1")
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"fc1.W" in tex
    assert r"Budget of fc\_1" in tex and tex.count(r"\\") == len(b.rows) + 1
    assert "total predicted output MSE" in b.table()


def test_json_writes_null_for_missing_numbers(rng):
    net = ep.mlp([4, 8, 2], seed=0)
    report = ep.analyze(net, rng.standard_normal((8, 4)), ep.QuantConfig(weights=ep.Uniform(6)))
    doc = json.loads(report.budget(exact=False).to_json())
    assert doc["rows"][0]["exact_mse"] is None


def test_bad_arguments(mlp_case):
    net, x, report = mlp_case
    with pytest.raises(ValueError, match="by must be"):
        ep.budget(net, x, report, by="node")

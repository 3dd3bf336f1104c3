"""MLP versus attention sensitivity: noise gain, matched blocks, the CLI and its docs."""

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

import errprop as ep
from errprop._sensitivity import block_params, noise_gain
from errprop.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_linear_gain_is_frobenius_norm_over_fan_in(free):
    # isotropic input noise of variance σ² through y = x Wᵀ + b: E‖Δy‖² = σ²‖W‖_F²
    # per row, against σ² · in injected — the closed form, computed here from W alone.
    # The largest |x| lies on the grid and gets no noise: its row sums over the others.
    rng = np.random.default_rng(0)
    W = rng.standard_normal((5, 7))
    net = ep.Sequential([ep.Linear(W, rng.standard_normal(5))])
    x = rng.standard_normal((64, 7))
    g = noise_gain(net, x, 8, samples=400, seed=1)
    f = free(x, np.max(np.abs(x)) / 127)
    assert np.count_nonzero(~f) == 1
    per_row = (f @ np.sum(W ** 2, axis=0)) / f.sum(axis=1)
    np.testing.assert_allclose(g.first_order, per_row, rtol=1e-12)
    expected = np.sum(f @ np.sum(W ** 2, axis=0)) / f.sum()
    assert g.gain == pytest.approx(expected, rel=1e-12)
    assert g.gain_mc_ci[0] <= expected <= g.gain_mc_ci[1]
    assert g.residual < 1e-12  # a linear map: first order is exact
    # the injected noise is the rounding step's s/sqrt(12)
    step = np.abs(x).max() / 127  # symmetric, restricted range [-127, 127]
    assert g.noise_rms == pytest.approx(step / math.sqrt(12) * math.sqrt(np.mean(f)), rel=1e-9)


@pytest.mark.parametrize("block,scale", [("mlp", 1.0), ("attention", 1.0), ("attention", 4.0)])
def test_first_order_gain_within_monte_carlo_interval_at_small_noise(block, scale):
    # 10-bit input rounding: noise RMS ~1e-3 of the signal, first order is accurate,
    # so the analytic gain must sit inside Monte Carlo's 99% interval, per batch element
    # in the mean as well
    net = ep.sensitivity_network(block, 16, 2, heads=2, logit_scale=scale, seed=3)
    x = np.random.default_rng(5).standard_normal((4, 8, 16))
    g = noise_gain(net, x, 10, samples=600, seed=2)
    lo, hi = g.gain_mc_ci
    assert lo <= g.gain <= hi, (g.gain, g.gain_mc_ci)
    # per sequence: Monte Carlo's relative error is about sqrt(2/samples)·(spread)
    np.testing.assert_allclose(g.monte_carlo, g.first_order, rtol=0.25)
    assert g.residual < 0.05


def test_first_order_breaks_down_for_saturated_attention_at_low_bits():
    # the result the validation section reports: at a large logit scale and 4 bits the
    # real network's gain per input sequence leaves first order far behind (even where
    # the batch averages happen to agree); at 10 bits it does not
    x = np.random.default_rng(5).standard_normal((4, 8, 16))
    net = ep.sensitivity_network("attention", 16, 1, heads=2, logit_scale=16.0, seed=0)
    coarse = noise_gain(net, x, 4, samples=200, seed=0)
    fine = noise_gain(net, x, 10, samples=200, seed=0)
    assert coarse.residual > 0.5
    assert np.max(np.abs(coarse.monte_carlo / coarse.first_order - 1)) > 0.5
    assert fine.residual < 0.05
    assert np.max(np.abs(fine.monte_carlo / fine.first_order - 1)) < 0.2
    assert fine.gain_mc_ci[0] <= fine.gain <= fine.gain_mc_ci[1]
    # the same network's MLP counterpart stays first order at 4 bits
    mlp = noise_gain(ep.sensitivity_network("mlp", 16, 1, seed=0), x, 4, samples=200, seed=0)
    assert mlp.residual < 0.3
    assert np.max(np.abs(mlp.monte_carlo / mlp.first_order - 1)) < 0.1


@pytest.mark.parametrize("d,heads", [(16, 2), (32, 4), (64, 8)])
def test_blocks_have_the_claimed_parameter_counts(d, heads):
    mlp = ep.sensitivity_network("mlp", d, 1, heads=heads, seed=0)
    attn = ep.sensitivity_network("attention", d, 1, heads=heads, seed=0)
    layer_norm = 2 * d
    assert mlp.num_params() == 4 * d * d + 3 * d + layer_norm \
        == block_params("mlp", d) + layer_norm
    assert attn.num_params() == 4 * d * d + 4 * d + layer_norm \
        == block_params("attention", d) + layer_norm
    assert attn.num_params() - mlp.num_params() == d  # matched to within 1/(4d) relative
    fc1 = mlp["block0.mlp.fc1"].params["W"]
    assert fc1.shape == (2 * d, d)  # d_ff = 2d
    deep = ep.sensitivity_network("attention", d, 3, heads=heads, seed=0)
    assert deep.num_params() == 3 * attn.num_params()


def test_logit_scale_multiplies_the_logits_exactly():
    base = ep.sensitivity_network("attention", 16, 2, heads=2, logit_scale=1.0, seed=4)
    hot = ep.sensitivity_network("attention", 16, 2, heads=2, logit_scale=3.0, seed=4)
    for name in ("block0.attn", "block1.attn"):
        p, q = base[name].params, hot[name].params
        np.testing.assert_array_equal(q["Wq"], 3.0 * p["Wq"])
        np.testing.assert_array_equal(q["bq"], 3.0 * p["bq"])
        for key in ("Wk", "Wv", "Wo", "bk", "bv", "bo"):
            np.testing.assert_array_equal(q[key], p[key])
    # logits by hand: q kᵀ / sqrt(head_dim) for head 0, on a LayerNorm'd input
    x = np.random.default_rng(0).standard_normal((1, 5, 16))
    xn = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)

    def logits(net):
        p = net["block0.attn"].params
        q, k = xn @ p["Wq"].T + p["bq"], xn @ p["Wk"].T + p["bk"]
        return q[..., :8] @ np.swapaxes(k[..., :8], -1, -2) / np.sqrt(8)

    np.testing.assert_allclose(logits(hot), 3.0 * logits(base), rtol=1e-12)


def test_compare_blocks_rows_and_exports():
    r = ep.compare_blocks(d_model=8, heads=2, bits=(8,), depth=(1,), logit_scale=(0.5, 8.0),
                          tokens=(4,), seeds=2, batch=3, samples=50)
    assert [(row.block, row.logit_scale) for row in r.rows][1:] == [("attention", 0.5),
                                                                    ("attention", 8.0)]
    assert math.isnan(r.rows[0].logit_scale) and r.rows[0].block == "mlp"
    cool, hot = r.row("attention", logit_scale=0.5), r.row("attention", logit_scale=8.0)
    assert 0.25 <= cool.top_prob < hot.top_prob <= 1.0  # 1/T is uniform attention
    for row in r.rows:
        assert row.gain_mc_lo <= row.gain_mc <= row.gain_mc_hi
        assert row.params == block_params(row.block, 8)
    rows = list(csv.DictReader(r.to_csv().splitlines()))
    assert len(rows) == 3 and float(rows[2]["gain"]) == pytest.approx(hot.gain)
    doc = json.loads(r.to_json())
    assert doc["rows"][0]["logit_scale"] is None and doc["settings"]["seeds"] == [0, 1]
    assert r.table("markdown").splitlines()[1].startswith("|:---|")
    assert "attention" in r.table() and str(r) == r.table()
    with pytest.raises(ValueError, match="format"):
        r.table("latex")


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_model=10, heads=4), "divide"),
    (dict(bits=(1,)), "bits"),
    (dict(logit_scale=(0.0,)), "logit_scale"),
    (dict(tokens=()), "tokens"),
    (dict(samples=1), "samples"),
    (dict(blocks=("conv",)), "blocks"),
    (dict(seeds=0), "seeds"),
])
def test_compare_blocks_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ep.compare_blocks(**kwargs)


def test_cli_compare_runs_and_writes_files(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--d-model", "8", "--heads", "2", "--tokens", "4", "--seeds", "2",
                 "--batch", "2", "--samples", "20", "--logit-scale", "1", "4", "--bits", "6",
                 "8", "--format", "markdown", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert text.startswith("| block | bits |") and "wrote" in text
    rows = list(csv.DictReader((out / "compare.csv").read_text().splitlines()))
    assert len(rows) == 2 * (1 + 2)  # per bits: one MLP row, two attention rows
    doc = json.loads((out / "compare.json").read_text())
    assert doc["settings"]["bits"] == [6, 8] and len(doc["rows"]) == 6
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_cli_compare_csv_format(capsys):
    assert main(["compare", "--d-model", "8", "--heads", "2", "--tokens", "3", "--seeds", "1",
                 "--batch", "2", "--samples", "5", "--logit-scale", "2", "--blocks",
                 "attention", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("block,bits,depth") and len(lines) == 2


@pytest.mark.parametrize("argv", [
    ["--bits", "1"], ["--logit-scale", "-2"], ["--logit-scale", "nan"], ["--tokens", "0"],
    ["--heads", "3"], ["--samples", "1"], ["--format", "latex"], ["--blocks", "conv"],
    ["--depth", "two"],
])
def test_cli_compare_bad_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        code = main(["compare", "--d-model", "8", "--seeds", "1", "--batch", "1",
                     "--samples", "5", "--tokens", "2", *argv])
        raise SystemExit(code)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("errprop") and "\n" not in err


def test_cli_compare_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    for option in ("--bits", "--depth", "--logit-scale", "--tokens", "--d-model", "--heads",
                   "--seeds", "--batch", "--samples", "--blocks", "--format", "--out"):
        assert option in text
    assert "Wq and bq" in text


def test_sensitivity_doc_runs():
    text = (ROOT / "docs" / "sensitivity.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    exec(compile("\n".join(blocks), "docs/sensitivity.md", "exec"), {})  # noqa: S102

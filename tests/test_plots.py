"""errprop.plots: every figure shows the numbers of its input, composes into given Axes,
stays in the paper style, and saves atomically and reproducibly."""

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy import stats  # noqa: E402

import errprop as ep  # noqa: E402
import errprop.plots as epp  # noqa: E402
from errprop._sensitivity import SensitivityRow  # noqa: E402
from errprop._sweep import DEFAULTS  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def mlp_case():
    net = ep.mlp([6, 16, 16, 4], activation="tanh", seed=0)
    x = np.random.default_rng(1).standard_normal((16, 6))
    config = ep.QuantConfig(weights=ep.Uniform(6), activations=ep.Uniform(8),
                            biases=ep.Uniform(8))
    report = ep.analyze(net, x, config)
    mc = ep.monte_carlo(net, x, config, samples=200, seed=0)
    return net, x, config, report, mc


@pytest.fixture(scope="module")
def transformer_report():
    net = ep.transformer(d_model=8, heads=2, d_ff=16, blocks=1, seed=0)
    x = np.random.default_rng(2).standard_normal((2, 4, 8))
    config = ep.QuantConfig(weights=ep.Uniform(6), activations=ep.Uniform(8),
                            biases=ep.Uniform(8), norms=ep.Uniform(8))
    return ep.analyze(net, x, config)


def _labelled(ax):
    assert ax.get_xlabel().strip() and ax.get_ylabel().strip()


def _bars(ax):
    return [c for c in ax.containers if isinstance(c, BarContainer)]


# ------------------------------------------------------------------ budget bars
def test_budget_bars_from_report_are_the_shares_by_layer_and_kind(transformer_report):
    report = transformer_report
    ax = epp.budget_bars(report)
    _labelled(ax)
    expected: dict = {}
    for row in report.budget(by="source", exact=False).rows:
        s = report.sources[row.name]
        key = (s.source.layer or "input", s.kind)
        expected[key] = expected.get(key, 0.0) + 100 * row.share
    layers = [t.get_text() for t in ax.get_yticklabels()]
    assert layers == list(dict.fromkeys(k[0] for k in expected))
    kinds = {label: kind for kind, (label, _) in epp.KINDS.items()}
    drawn = {}
    for bars in _bars(ax):
        kind = kinds[bars.get_label()]
        for layer, patch in zip(layers, bars.patches):
            drawn[(layer, kind)] = patch.get_width()
    assert {k: v for k, v in drawn.items() if v} == pytest.approx(expected, rel=1e-12)
    assert {"weight", "activation", "bias", "norm"} <= {k for _, k in expected}
    assert sum(drawn.values()) == pytest.approx(100.0)


def test_budget_bars_from_budgets(transformer_report):
    report = transformer_report
    by_source = report.budget(by="source", exact=False)
    ax_report, ax_budget = epp.budget_bars(report), epp.budget_bars(by_source)
    widths = [[p.get_width() for p in b.patches] for b in _bars(ax_report)]
    np.testing.assert_allclose([[p.get_width() for p in b.patches] for b in _bars(ax_budget)],
                               widths, rtol=1e-12)
    by_layer = report.budget(by="layer", exact=False)
    ax = epp.budget_bars(by_layer, value="output_mse")
    total = np.sum([[p.get_width() for p in b.patches] for b in _bars(ax)], axis=0)
    assert total == pytest.approx([r.output_mse for r in by_layer.rows], rel=1e-12)
    assert "MSE" in ax.get_xlabel()


# ------------------------------------------------------------------ error growth
def test_error_growth_draws_every_node_and_monte_carlo(mlp_case):
    *_, report, mc = mlp_case
    fig, given = plt.subplots()
    ax = epp.error_growth(report, mc, ax=given)
    assert ax is given
    _labelled(ax)
    names = list(report.nodes)
    assert [t.get_text().rstrip(" *") for t in ax.get_xticklabels()] == names
    lines = {line.get_label(): line for line in ax.get_lines()}
    exact = lines["exact"].get_ydata()
    assert exact == pytest.approx([report.nodes[n].rms_exact for n in names])
    mc_points = ax.containers[0].lines[0].get_ydata()
    assert mc_points == pytest.approx([math.sqrt(mc.nodes[n].mse) for n in names])
    analytic = lines["analytic (noise model)"].get_ydata()
    assert analytic[-1] == pytest.approx(math.sqrt(report.mse))


def test_error_growth_node_subset_and_no_monte_carlo(mlp_case):
    *_, report, _ = mlp_case
    ax = epp.error_growth(report, nodes=["fc2", "fc3"], first_order=False)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fc2", "fc3"]
    assert not ax.containers
    with pytest.raises(ValueError, match="fc9"):
        epp.error_growth(report, nodes=["fc9"])


# ------------------------------------------------------------------ parity
def test_parity_per_node_points_are_analytic_and_monte_carlo(mlp_case):
    *_, report, mc = mlp_case
    ax = epp.parity(report, mc)
    _labelled(ax)
    stats_ = report.node_statistics()
    xs, ys = [], []
    for c in ax.containers:
        xs += list(c.lines[0].get_xdata())
        ys += list(c.lines[0].get_ydata())
    order = np.argsort(xs)
    names = list(report.nodes)
    want_x = [math.sqrt(mc.nodes[n].mse) for n in names]
    want_y = [math.sqrt(stats_[n].mse) for n in names[:-1]] + [math.sqrt(report.mse)]
    back = np.argsort(want_x)
    assert np.array(xs)[order] == pytest.approx(np.array(want_x)[back])
    assert np.array(ys)[order] == pytest.approx(np.array(want_y)[back])
    diagonal = [line for line in ax.get_lines() if line.get_label() == "y = x"][0]
    assert np.all(diagonal.get_xdata() == diagonal.get_ydata())


def test_parity_per_element(mlp_case):
    *_, report, mc = mlp_case
    ax = epp.parity(report, mc, per="element")
    points = ax.get_lines()[0]
    assert points.get_xdata() == pytest.approx(mc.std.ravel())
    assert points.get_ydata() == pytest.approx(report.std.ravel())
    hidden = epp.parity(report, mc, per="element", node="fc2").get_lines()[0]
    assert hidden.get_xdata() == pytest.approx(mc.nodes["fc2"].std.ravel())
    with pytest.raises(ValueError, match="per must be"):
        epp.parity(report, mc, per="layer")


# ------------------------------------------------------------------ bits sweep
def test_bits_sweep_from_reports_with_reference_slope(mlp_case):
    net, x, *_ = mlp_case
    reports = {b: ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(b))) for b in (4, 6, 8)}
    ax = epp.bits_sweep(reports)
    _labelled(ax)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["exact"].get_xdata()) == [4, 6, 8]
    assert lines["exact"].get_ydata() == pytest.approx([reports[b].sqnr_db for b in (4, 6, 8)])
    predicted = [10 * math.log10(np.mean(r.output ** 2) / r.mse) for r in reports.values()]
    assert lines["predicted"].get_ydata() == pytest.approx(predicted)
    ref = lines["6.02 dB/bit reference"]
    slope = np.diff(ref.get_ydata()) / np.diff(ref.get_xdata())
    assert slope == pytest.approx(20 * math.log10(2))
    mse = {line.get_label(): line for line in
           epp.bits_sweep(list(reports.items()), metric="mse").get_lines()}
    assert mse["exact"].get_ydata() == pytest.approx([reports[b].exact_mse for b in (4, 6, 8)])


def test_bits_sweep_from_convergence_and_sweep_result():
    conv = ep.Convergence((ep.ConvergenceRow(6, 0.1, 0.01, 30.0),
                           ep.ConvergenceRow(8, 0.03, 0.01, 42.0)))
    line = epp.bits_sweep(conv).get_lines()[0]
    assert list(line.get_ydata()) == [30.0, 42.0]
    with pytest.raises(ValueError, match="SQNR only"):
        epp.bits_sweep(conv, metric="mse")

    def row(model, seed, bits, sqnr, mse):
        return {"model": model, "seed": seed, **DEFAULTS, "weights": bits, "status": "ok",
                "output_sqnr_db": sqnr, "exact_mse": mse, "predicted_mse": mse * 1.1,
                "predicted_by": "statistics", "first_order_residual": 0.1, "mc_mse": None,
                "mc_mse_lo": None, "mc_mse_hi": None, "seconds": 0.1, "error": None}

    rows = [row("a", 0, 4, 20.0, 1e-2), row("a", 1, 4, 22.0, 1e-2), row("a", 0, 8, 44.0, 1e-4),
            row("b", 0, 4, 10.0, 1e-1), row("b", 0, 8, 35.0, 1e-3)]
    ax = epp.bits_sweep(ep.SweepResult(rows))
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["a: exact"].get_ydata()) == pytest.approx([21.0, 44.0])  # seeds averaged
    assert list(lines["b: exact"].get_xdata()) == [4, 8]
    assert lines["a: exact"].get_color() != lines["b: exact"].get_color()
    assert ax.get_xlabel() == "weights bits"


# ------------------------------------------------------------------ sensitivity
def _sens_row(block, scale, gain, cv=0.1, bits=8):
    return SensitivityRow(
        block=block, bits=bits, depth=1, logit_scale=scale, tokens=8, params=100,
        noise_rms=1e-3, gain=gain, gain_mc=gain * 1.05, gain_mc_lo=gain, gain_mc_hi=gain * 1.1,
        mc_over_first_order=1.05, seeds_outside=0, cv=cv, cv_mc=cv, miss=0.01, residual=0.01,
        second_order_residual=0.001, top_prob=math.nan if block == "mlp" else 0.5,
        logit_std=math.nan if block == "mlp" else 1.0)


def test_sensitivity_lines_and_monte_carlo_points():
    rows = [_sens_row("mlp", math.nan, 0.4)] + \
        [_sens_row("attention", s, g) for s, g in ((1.0, 0.5), (2.0, 1.0), (4.0, 3.0))]
    result = ep.SensitivityResult(tuple(rows), {}, 0.0)
    ax = epp.sensitivity(result)
    _labelled(ax)
    lines = {line.get_label(): line for line in ax.get_lines()}
    attn = lines["attention, first order"]
    assert list(attn.get_xdata()) == [1.0, 2.0, 4.0]
    assert list(attn.get_ydata()) == [0.5, 1.0, 3.0]
    mlp = lines["MLP, first order"]
    assert list(mlp.get_ydata()) == [0.4, 0.4] and list(mlp.get_xdata()) == [1.0, 4.0]
    points = [c for c in ax.containers if c.get_label() == "attention, Monte Carlo"][0]
    assert points.lines[0].get_ydata() == pytest.approx([0.525, 1.05, 3.15])
    cv = epp.sensitivity(result, y="cv")
    assert "CV" in cv.get_ylabel()
    with pytest.raises(ValueError, match="y must be"):
        epp.sensitivity(result, y="speed")
    with pytest.raises(ValueError, match="no rows"):
        epp.sensitivity(result, where={"bits": 4})


def test_sensitivity_one_curve_per_varying_setting():
    rows = [_sens_row("attention", s, s, bits=b) for b in (4, 8) for s in (1.0, 2.0)]
    ax = epp.sensitivity(ep.SensitivityResult(tuple(rows), {}, 0.0), spread=False)
    labels = {line.get_label() for line in ax.get_lines()}
    assert {"attention, bits = 4, first order", "attention, bits = 8, first order"} <= labels


# ------------------------------------------------------------------ histogram
def test_error_histogram_density_and_analytic_mixture(mlp_case):
    *_, report, mc = mlp_case
    ax = epp.error_histogram(mc, report, bins=40)
    _labelled(ax)
    patches = ax.patches
    assert len(patches) == 40
    area = sum(p.get_height() * p.get_width() for p in patches)
    assert area == pytest.approx(1.0)
    curve = ax.get_lines()[0]
    grid = curve.get_xdata()
    mean, std = report.mean.ravel(), report.std.ravel()
    expected = np.mean(stats.norm.pdf(grid[:, None], mean, std), axis=1)
    assert curve.get_ydata() == pytest.approx(expected, rel=1e-9)
    one = epp.error_histogram(mc, report, element=(0, 1), standardize=True)
    assert one.get_lines()[0].get_ydata() == pytest.approx(
        stats.norm.pdf(one.get_lines()[0].get_xdata()))


def test_error_histogram_needs_samples(mlp_case):
    net, x, config, report, _ = mlp_case
    bare = ep.monte_carlo(net, x, config, samples=4, seed=0, quantiles=())
    with pytest.raises(ValueError, match="kept no samples"):
        epp.error_histogram(bare, report)
    with pytest.raises(ValueError, match="element"):
        epp.error_histogram(ep.monte_carlo(net, x, config, samples=4, seed=0), report,
                            element=(99, 0))


# ------------------------------------------------------------------ allocation
def test_bit_allocation_bars_are_bits_and_markers_contributions():
    contributions = {"fc1": {4: 1e-3, 8: 1e-5}, "fc2": {4: 2e-3, 8: 3e-5}}
    plan = ep.Allocation(config=ep.QuantConfig(), bits={"fc1": 4, "fc2": 8},
                         predicted_mse=1e-3 + 3e-5, target_mse=2e-3, cost=100.0,
                         cost_unit="bits", uniform_bits=8, uniform_cost=128.0,
                         contributions=contributions)
    ax = epp.bit_allocation(plan)
    _labelled(ax)
    bars = _bars(ax)
    assert [p.get_height() for p in bars[0].patches] == [4, 8]
    assert [p.get_height() for p in bars[1].patches] == [8, 8]
    twin = [a for a in ax.figure.axes if a is not ax][0]
    markers = [line.get_ydata() for line in twin.get_lines()]
    assert list(markers[0]) == [1e-3, 3e-5] and list(markers[1]) == [1e-5, 3e-5]
    assert twin.get_ylabel()


# ------------------------------------------------------------------ style
def test_style_sizes_and_restores_rcparams(mlp_case):
    *_, report, mc = mlp_case
    before = dict(matplotlib.rcParams)
    ax = epp.error_growth(report, mc)  # no style active: single column
    assert ax.figure.get_size_inches()[0] == pytest.approx(3.5)
    with epp.style("double", height=3.0):
        assert matplotlib.rcParams["figure.figsize"] == [7.16, 3.0]
        ax = epp.budget_bars(report)
    assert tuple(ax.figure.get_size_inches()) == pytest.approx((7.16, 3.0))
    assert dict(matplotlib.rcParams) == before
    params = epp.rcparams("single")
    assert 7 <= params["font.size"] <= 9 and params["axes.labelsize"] >= 8
    assert params["axes.prop_cycle"].by_key()["color"][:2] == ["#0072B2", "#E69F00"]
    with pytest.raises(ValueError, match="column"):
        epp.rcparams("triple")


# ------------------------------------------------------------------ saving
def test_save_is_deterministic(tmp_path, mlp_case):
    *_, report, mc = mlp_case
    ax = epp.error_growth(report, mc)
    first = epp.save(ax, tmp_path / "a" / "growth")
    assert [p.name for p in first] == ["growth.pdf", "growth.png"]
    data = [p.read_bytes() for p in first]
    assert data[0].startswith(b"%PDF") and data[1].startswith(b"\x89PNG")
    assert [p.read_bytes() for p in epp.save(ax.figure, tmp_path / "b" / "growth.pdf",
                                             formats=("pdf", "png"))] == data
    again = epp.save(epp.error_growth(report, mc), tmp_path / "c" / "growth")
    assert [p.read_bytes() for p in again] == data  # a new figure of the same input
    svg = [epp.save(ax, tmp_path / f"g{i}.svg")[0].read_bytes() for i in range(2)]
    assert svg[0] == svg[1]
    assert oct(os.stat(first[0]).st_mode & 0o777) != oct(0o600)


def test_save_is_atomic(tmp_path, monkeypatch, mlp_case):
    *_, report, _ = mlp_case
    ax = epp.budget_bars(report)
    target = tmp_path / "budget.png"
    target.write_bytes(b"old")

    def boom(self, fname, **kwargs):
        Path(fname).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(OSError, match="disk full"):
        epp.save(ax, target)
    assert target.read_bytes() == b"old"
    assert not (tmp_path / "budget.pdf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["budget.png"]


# ------------------------------------------------------------------ wrong input
def test_clear_errors_on_wrong_input(mlp_case):
    *_, report, mc = mlp_case
    with pytest.raises(TypeError, match="Report or Budget"):
        epp.budget_bars(mc)
    with pytest.raises(ValueError, match="value must be"):
        epp.budget_bars(report, value="rms")
    with pytest.raises(TypeError, match="MonteCarloResult"):
        epp.parity(report, None)
    with pytest.raises(TypeError, match="report must be"):
        epp.error_growth(mc)
    with pytest.raises(TypeError, match="ax must be"):
        epp.error_growth(report, ax="left")
    with pytest.raises(TypeError, match="bits_sweep"):
        epp.bits_sweep([report])
    with pytest.raises(TypeError, match="SensitivityResult"):
        epp.sensitivity(report)
    with pytest.raises(TypeError, match="Allocation"):
        epp.bit_allocation(report)
    with pytest.raises(TypeError, match="Figure or Axes"):
        epp.save(report, "x.pdf")
    with pytest.raises(ValueError, match="formats"):
        epp.save(plt.figure(), "x", formats=("jpg",))
    other = ep.analyze(ep.mlp([6, 3], seed=0), np.ones((2, 6)),
                       ep.QuantConfig(weights=ep.Uniform(8)))
    with pytest.raises(ValueError, match="not sampled from the report's setup; network"):
        epp.parity(other, mc)


def test_plot_marks_are_compares_breakdown_flags():
    # the '*' of error_growth / the red points of parity are compare's '!': significance
    # alone (4-bit activations: significant differences of a few percent) is not marked
    net = ep.mlp([12, 48, 48, 6], "tanh", seed=5)
    x = np.random.default_rng(5).standard_normal((32, 12))
    cfg = ep.QuantConfig(activations=ep.Uniform(4))
    report = ep.analyze(net, x, cfg)
    mc = ep.monte_carlo(net, x, cfg, 600, seed=1)
    from errprop.plots._errors import node_rms

    marks = [r.disagrees for r in node_rms(report, mc, probes=64, seed=0)]
    flags = [row.disagrees for row in report.compare(mc, probes=64, seed=0).rows]
    assert marks == flags

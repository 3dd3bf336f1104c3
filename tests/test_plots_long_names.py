"""errprop.plots stays readable for long layer names and many layers: no layout warning
(pytest turns warnings into errors), no two labels overlap, every label lies inside the
figure, and labels stay unique; a figure the plot made grows, a caller's Axes keeps its
size."""

import itertools
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import errprop as ep  # noqa: E402
import errprop.plots as epp  # noqa: E402
from errprop._sensitivity import SensitivityRow  # noqa: E402
from errprop._sweep import DEFAULTS  # noqa: E402
from errprop.plots._labels import (ELLIPSIS, axis_title, common_prefix,  # noqa: E402
                                   middle_ellipsis, short_names)

BLOCKS = 20  # 40 Linear layers, 80 nodes


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _case(net, x):
    config = ep.QuantConfig(weights=ep.Uniform(6), activations=ep.Uniform(8),
                            biases=ep.Uniform(8))
    report = ep.analyze(net, x, config)
    mc = ep.monte_carlo(net, x, config, samples=40, seed=0)
    plan = ep.plan_bits(net, x, target_sqnr_db=30, candidates=range(3, 9))
    return report, mc, plan


@pytest.fixture(scope="module")
def long_case(long_names):
    return _case(long_names(BLOCKS), np.random.default_rng(1).standard_normal((16, 8)))


@pytest.fixture(scope="module")
def short_case():
    net = ep.mlp([6, 16, 16, 4], activation="tanh", seed=0)
    return _case(net, np.random.default_rng(1).standard_normal((16, 6)))


def _sweep(models: int) -> ep.SweepResult:
    rows = []
    for m in range(models):
        for bits in (4, 6, 8):
            mse = 10.0 ** (-bits / 2 - m / 4)
            rows.append({"model": f"examples/models/a_rather_long_model_directory_{m}",
                         "seed": 0, **DEFAULTS, "weights": bits, "status": "ok",
                         "output_sqnr_db": 6.0 * bits, "exact_mse": mse,
                         "predicted_mse": 1.1 * mse, "predicted_by": "statistics",
                         "first_order_residual": 0.1, "mc_mse": 1.05 * mse,
                         "mc_mse_lo": mse, "mc_mse_hi": 1.1 * mse, "seconds": 0.1,
                         "error": None})
    return ep.SweepResult(rows)


def _sensitivity(bits: tuple[int, ...]) -> ep.SensitivityResult:
    rows = []
    for b, tokens, scale in itertools.product(bits, (8, 64), (1.0, 2.0, 4.0)):
        for block in ("mlp", "attention"):
            gain = scale * (2.0 if block == "attention" else 1.0) / b
            rows.append(SensitivityRow(
                block=block, bits=b, depth=1, logit_scale=math.nan if block == "mlp" else scale,
                tokens=tokens, params=100, noise_rms=1e-3, gain=gain, gain_mc=gain * 1.05,
                gain_mc_lo=gain, gain_mc_hi=gain * 1.1, mc_over_first_order=1.05,
                seeds_outside=0, cv=0.1, cv_mc=0.1, miss=0.01, residual=0.01,
                second_order_residual=0.001, top_prob=0.5, logit_std=1.0))
    return ep.SensitivityResult(tuple(rows), {}, 0.0)


def _plots(case, many: bool):
    """Every plot function, with this case's names (and many series where the plot
    has series instead of layers)."""
    report, mc, plan = case
    return {
        "budget_bars": lambda ax: epp.budget_bars(report, ax=ax),
        "budget_bars_layer": lambda ax: epp.budget_bars(report.budget(by="layer", exact=False),
                                                        ax=ax),
        "bit_allocation": lambda ax: epp.bit_allocation(plan, ax=ax),
        "error_growth": lambda ax: epp.error_growth(report, mc, ax=ax),
        "parity": lambda ax: epp.parity(report, mc, ax=ax),
        "parity_element": lambda ax: epp.parity(report, mc, ax=ax, per="element",
                                                node=list(report.nodes)[-3]),
        "error_histogram": lambda ax: epp.error_histogram(mc, report, ax=ax),
        "bits_sweep": lambda ax: epp.bits_sweep(_sweep(6 if many else 1), ax=ax),
        "sensitivity": lambda ax: epp.sensitivity(_sensitivity((4, 6, 8) if many else (8,)),
                                                  ax=ax, x="logit_scale"),
    }


PLOTS = list(_plots((None, None, None), False))


@pytest.mark.parametrize("plot", PLOTS)
@pytest.mark.parametrize("names", ["long", "short"])
def test_every_plot_is_readable_in_the_figure_it_makes(plot, names, long_case, short_case,
                                                       tmp_path, readable):
    case = long_case if names == "long" else short_case
    ax = _plots(case, names == "long")[plot](None)
    epp.save(ax, tmp_path / f"{plot}_{names}.png", dpi=100)
    readable(ax.figure)
    width, height = ax.figure.get_size_inches()
    assert 3.5 <= width <= 10.0 and 2.6 <= height <= 12.0


@pytest.mark.parametrize("plot", PLOTS)
def test_a_callers_axes_keep_their_size_and_labels_stay_readable(plot, long_case, tmp_path,
                                                                  readable):
    fig, given = plt.subplots(figsize=(7.0, 4.0), layout="constrained")
    ax = _plots(long_case, True)[plot](given)
    assert ax is given
    epp.save(fig, tmp_path / f"{plot}.png", dpi=100)
    assert tuple(fig.get_size_inches()) == (7.0, 4.0)
    readable(fig)


def test_long_layer_names_are_shortened_uniquely_and_the_prefix_named(long_case):
    report, mc, plan = long_case
    layers = list(plan.bits)
    ax = epp.bit_allocation(plan)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert ax.get_xlabel() == "layer (in model.layers)"
    assert ["model.layers." + s for s in labels] == layers  # nothing else was cut
    assert len(layers) == 2 * BLOCKS
    growth = epp.error_growth(report, mc)
    shown = [t.get_text() for t in growth.get_xticklabels() if t.get_text()]
    assert len(shown) == len(set(shown)) >= len(report.nodes) // 2
    assert all("model.layers." + s.rstrip(" *") in report.nodes for s in shown)
    assert growth.get_xlabel().startswith("node (execution order, in model.layers")
    bars = epp.budget_bars(report)
    assert ["model.layers." + t.get_text() for t in bars.get_yticklabels()] == layers


def test_a_figure_grows_with_the_layers_and_a_callers_axes_do_not(long_case, short_case):
    long_ax = epp.budget_bars(long_case[0])
    short_ax = epp.budget_bars(short_case[0])
    assert tuple(short_ax.figure.get_size_inches()) == pytest.approx((3.5, 2.6))
    w, h = long_ax.figure.get_size_inches()
    assert w == pytest.approx(3.5) and h > 2.6 * 1.5  # taller, never wider than a column
    pitch = long_ax.get_window_extent().height / len(long_ax.get_yticklabels())
    assert pitch >= 7 * long_ax.figure.dpi / 72  # a 7 pt label per row
    fig, given = plt.subplots(figsize=(3.5, 2.6), layout="constrained")
    epp.budget_bars(long_case[0], ax=given)
    assert tuple(fig.get_size_inches()) == (3.5, 2.6)
    # 40 rows in 2 in cannot all be labelled at 5 pt: every k-th is, and the axis says so
    shown = [t for t in given.get_yticklabels() if t.get_text()]
    assert 0 < len(shown) < 2 * BLOCKS and min(t.get_fontsize() for t in shown) >= 5
    assert "labelled" in given.get_ylabel()


def test_short_names_elide_the_common_prefix_and_stay_unique():
    names = [f"model.layers.{i}.{p}" for i in range(12) for p in ("self_attn.q_proj",
                                                                   "mlp.down_proj")]
    labels, prefix = short_names(names)
    assert prefix == "model.layers." and labels[:2] == ["0.self_attn.q_proj", "0.mlp.down_proj"]
    assert common_prefix(["fc1", "fc2"]) == "" and common_prefix(["a.b"]) == ""
    assert common_prefix(["a.b.c", "a.b"]) == "a."  # each name keeps one part
    assert middle_ellipsis("encoder.block_with_a_long_name.attention.query", 20) == \
        "encoder" + ELLIPSIS + "ention.query"
    assert len(middle_ellipsis("x" * 50, 20)) == 20
    # names that differ only in the middle: the colliding ones get longer until unique
    clash = [f"root.{c}_{'m' * 30}_{i}_{'t' * 20}" for c in ("a", "b") for i in range(3)]
    short, prefix = short_names(clash, 16)
    assert prefix == "root." and len(set(short)) == len(clash)
    assert all(ELLIPSIS in s and len(s) < len(n) - 5 for s, n in zip(short, clash))
    same_tail = ["x.first_branch.out", "x.second_branch.out"]
    assert short_names(same_tail, 8)[0] == [middle_ellipsis("first_branch.out", 8),
                                            middle_ellipsis("second_branch.out", 8)]
    assert axis_title("layer", "") == "layer"
    assert axis_title("node (execution order)", "model.") == "node (execution order, in model)"

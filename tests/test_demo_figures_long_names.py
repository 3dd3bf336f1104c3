"""``errprop demo``'s figures stay readable for long layer names and many layers (issue 14:
E16): 40 Linear layers named as a torch decoder's (``model.layers.12.self_attn.q_proj``)
and the demo's own short-named models, every figure checked for overlapping or clipped
labels, unique tick labels and a bounded size; the names shown rebuild the real ones."""

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from errprop._demo import _allocate, _analyse, _Case, _cases  # noqa: E402
from errprop._demo_figures import (MAX_HEIGHT, MAX_WIDTH, MIN_WIDTH,  # noqa: E402
                                   allocation_figure, budget_figure, growth_figure, save_png)

BLOCKS = 20  # 40 Linear layers, 80 nodes
BITS = (8, 4)


def _results(case):
    """What the demo draws for ``case``: reports, comparisons, its allocation doc."""
    reports, comparisons = {}, {}
    for bits in BITS:
        reports[bits], comparisons[bits], _, _ = _analyse(case, bits, 40, 8, 0)
    _, plan_doc, _ = _allocate(case, 25.0, 0)
    return reports, comparisons, plan_doc


@pytest.fixture(scope="module")
def long_case(long_names):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 8))
    case = _Case("long", "40-layer tanh MLP with torch names", "model.layers.N.*",
                 long_names(BLOCKS), x, x, rng.standard_normal((64, 8)))
    return case, _results(case)


@pytest.fixture(scope="module")
def short_cases():
    return {case.key: (case, _results(case))
            for case in _cases(["mlp", "transformer", "digits"], 0)}


def _figures(case, results, others=()):
    reports, comparisons, plan = results
    plans = {case.key: plan, **{c.key: r[2] for c, r in others}}
    return {"budget": budget_figure(case.title, case.detail, reports),
            "growth": growth_figure(case.title, case.detail, comparisons),
            "allocation": allocation_figure(plans, 25.0)}


def _shown(ax, axis):
    ticks = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text() for t in ticks if t.get_visible() and t.get_text()]


def test_the_long_case_has_the_names_of_a_torch_decoder(long_case):
    case, (reports, _, plan) = long_case
    layers = list(plan["bits"])
    assert len(layers) == 2 * BLOCKS
    assert layers[24] == "model.layers.12.self_attn.q_proj"
    assert "model.layers.12.mlp.act" in reports[8].nodes


@pytest.mark.parametrize("which", ["long", "mlp", "transformer", "digits", "all four"])
def test_every_demo_figure_is_readable(which, long_case, short_cases, readable, tmp_path):
    if which == "long":
        figures = _figures(*long_case)
    elif which == "all four":  # the allocation panels of every model side by side
        figures = _figures(*long_case, others=list(short_cases.values()))
    else:
        figures = _figures(*short_cases[which])
    for name, fig in figures.items():
        save_png(fig, tmp_path / f"{which}-{name}.png")
        readable(fig)
        width, height = fig.get_size_inches()
        assert MIN_WIDTH <= width <= MAX_WIDTH and 2.6 <= height <= MAX_HEIGHT, name
        assert (tmp_path / f"{which}-{name}.png").stat().st_size > 10_000


def test_long_names_are_shortened_and_the_prefix_named_once(long_case):
    case, (reports, comparisons, plan) = long_case
    figures = _figures(case, (reports, comparisons, plan))
    layers = list(plan["bits"])
    budget = figures["budget"].axes
    assert ["model.layers." + s for s in _shown(budget[0], "y")] == layers
    assert budget[0].get_ylabel() == "layer (in model.layers)"
    assert _shown(budget[1], "y") == [] and budget[1].get_ylabel() == ""  # shared rows
    growth = figures["growth"].axes
    shown = _shown(growth[-1], "x")
    nodes = reports[8].nodes
    assert len(shown) == len(set(shown)) >= len(nodes) // 3
    assert all("model.layers." + s in nodes for s in shown)
    assert growth[-1].get_xlabel().startswith("node (execution order, in model.layers)")
    assert all(_shown(ax, "x") == [] for ax in growth[:-1])  # node names once, at the foot
    allocation = figures["allocation"].axes[0]
    shown = _shown(allocation, "x")
    assert set("model.layers." + s for s in shown) <= set(layers) and len(shown) >= 10


def test_nodes_where_first_order_breaks_down_are_ringed_and_explained(short_cases):
    """The digits MLP at W4A4: the softmax output is flagged (as in report.md)."""
    case, (reports, comparisons, plan) = short_cases["digits"]
    assert comparisons[4].flagged == ["softmax1"] and not comparisons[8].flagged
    fig = growth_figure(case.title, case.detail, comparisons)
    w4 = fig.axes[1]
    assert w4.get_title() == "W4A4: first order off Monte Carlo at 1 node (!)"
    rings = [line for line in w4.get_lines() if line.get_marker() == "o"
             and line.get_markerfacecolor() == "none"]
    (ring,) = [line for line in rings if len(line.get_xdata())]
    assert list(ring.get_xdata()) == [list(reports[4].nodes).index("softmax1")]
    (legend,) = fig.legends
    assert any(t.get_text().startswith("! first order off Monte Carlo") for t in
               legend.get_texts())


def test_figures_grow_with_the_layers_up_to_the_cap(long_case, short_cases):
    long = _figures(*long_case)
    short = _figures(*short_cases["mlp"])
    assert long["budget"].get_size_inches()[1] > 1.5 * short["budget"].get_size_inches()[1]
    assert long["growth"].get_size_inches()[0] == pytest.approx(MAX_WIDTH)
    assert short["growth"].get_size_inches()[0] == pytest.approx(MIN_WIDTH)

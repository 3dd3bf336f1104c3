"""analyze's and Uniform's arguments: wrong types and values are refused where they are
given, with the owner, the argument and the value in the message (issue 14, B8 and D14)."""

import numpy as np
import pytest

import errprop as ep


@pytest.fixture
def small():
    return ep.mlp([4, 4], seed=0), np.ones((2, 4)), ep.QuantConfig(weights=ep.Uniform(8))


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed="abc"), ValueError, "seed"),
    (dict(seed=1.5), ValueError, "seed"),
    (dict(seed=True), ValueError, "seed"),
    (dict(rng="x"), TypeError, "rng"),
    (dict(memory_limit="big"), TypeError, "memory_limit"),
    (dict(memory_limit=0), ValueError, "memory_limit"),
    (dict(memory_limit=-5), ValueError, "memory_limit"),
    (dict(statistics_work_limit=float("nan")), ValueError, "statistics_work_limit"),
    (dict(statistics_work_limit="x"), TypeError, "statistics_work_limit"),
    (dict(statistics_work_limit=-1), ValueError, "statistics_work_limit"),
])
def test_analyze_refuses_bad_arguments(small, kwargs, error, words):
    net, x, cfg = small
    with pytest.raises(error, match=f"analyze: {words}"):
        ep.analyze(net, x, cfg, **kwargs)


def test_analyze_accepts_what_users_write(small):
    net, x, cfg = small
    a = ep.analyze(net, x, cfg, memory_limit=1e9, statistics_work_limit=float("inf"),
                   rng=np.random.default_rng(0), seed=np.int64(3))
    b = ep.analyze(net, x, cfg)
    np.testing.assert_array_equal(a.exact, b.exact)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(symmetric="no"), TypeError, "symmetric must be True or False"),
    (dict(symmetric=1), TypeError, "symmetric"),
    (dict(restricted_range="false"), TypeError, "restricted_range"),
    (dict(percentile="99"), TypeError, "percentile"),
    (dict(percentile=float("nan")), ValueError, "percentile"),
    (dict(percentile=0), ValueError, "percentile"),
    (dict(bits="8"), ValueError, "bits"),
    (dict(bits=True), ValueError, "bits"),
])
def test_uniform_refuses_truthy_strings_and_wrong_types(kwargs, error, words):
    args = {"bits": 8, **kwargs}
    with pytest.raises(error, match=f"Uniform: {words}"):
        ep.Uniform(**args)


def test_uniform_symmetric_false_is_really_asymmetric():
    x = np.array([0.0, 1.0, 3.0])
    assert ep.Uniform(8, symmetric=False).fit(x).zero_point.ravel()[0] == 0
    assert ep.Uniform(8, symmetric=np.False_).fit(x).qmin == 0


def test_mask_of_the_wrong_shape_is_named_not_blamed_on_padding():
    W = np.random.default_rng(0).standard_normal((10, 8))
    net = ep.mask_padding(ep.Sequential([ep.Embedding(W, pad_id=0), ep.MeanPool()]),
                          np.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"padding mask has shape \(2, 4\).*ids have shape "
                                         r"\(2, 3\)"):
        net(np.ones((2, 3)))


def test_file_errors_are_public():
    assert issubclass(ep.FileFormatError, ValueError)
    assert issubclass(ep.UntrustedCodeError, ValueError)

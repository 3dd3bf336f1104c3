"""errprop.from_sklearn: the converted MLP computes sklearn's predict_proba / predict.

The oracle is scikit-learn itself (float64, to 1e-10), on the digits data set shipped
with scikit-learn; the exact weight-quantization error of the converted network equals
the change of ``predict_proba`` when sklearn's own ``coefs_`` are quantized.
"""

import copy
import warnings

import numpy as np
import pytest

import errprop as ep

sk = pytest.importorskip("sklearn")
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.neural_network import MLPClassifier, MLPRegressor  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X / 16.0, y


def _fit(model, X, y):
    # a few iterations keep the tests fast; the model need not converge to be a real one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X, y)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("activation", ["relu", "tanh", "logistic", "identity"])
def test_multiclass_digits(activation, seed, digits):
    X, y = digits
    model = _fit(MLPClassifier((24, 16), activation=activation, max_iter=40,
                               random_state=seed), X, y)
    assert model.score(X, y) > 0.5  # a real, trained classifier
    net = ep.from_sklearn(model)
    expected_act = {"relu": ["relu"], "tanh": ["tanh"], "logistic": ["sigmoid"],
                    "identity": []}[activation]
    kinds = [op.describe() for _, op in net.layers() if isinstance(op, ep.Activation)]
    assert kinds == expected_act * 2
    assert [n for n, _ in net.layers()][-1] == "softmax1"
    np.testing.assert_allclose(net(X), model.predict_proba(X), rtol=0, atol=1e-10)
    np.testing.assert_array_equal(net["fc1"].params["W"], model.coefs_[0].T)


def test_binary_is_the_probability_of_the_second_class(digits):
    X, y = digits
    model = _fit(MLPClassifier((16,), max_iter=20, random_state=0), X, y == 3)
    net = ep.from_sklearn(model)
    assert [n for n, _ in net.layers()] == ["fc1", "relu1", "fc2", "sigmoid1"]
    proba = model.predict_proba(X)
    assert net(X).shape == (len(X), 1)
    np.testing.assert_allclose(net(X), proba[:, 1:], rtol=0, atol=1e-10)
    np.testing.assert_allclose(1.0 - net(X)[:, 0], proba[:, 0], rtol=0, atol=1e-10)


def test_multilabel(digits):
    X, y = digits
    Y = np.stack([y % 2 == 0, y > 4, y == 7], axis=1).astype(int)
    model = _fit(MLPClassifier((16,), activation="tanh", max_iter=20, random_state=0), X, Y)
    net = ep.from_sklearn(model)
    np.testing.assert_allclose(net(X), model.predict_proba(X), rtol=0, atol=1e-10)


@pytest.mark.parametrize("outputs", [1, 3])
def test_regressor(outputs, digits):
    X, y = digits
    Y = np.stack([np.sin(y + k) for k in range(outputs)], axis=1)
    model = _fit(MLPRegressor(hidden_layer_sizes=(20,), activation="tanh", max_iter=30, random_state=0),
                 X, Y[:, 0] if outputs == 1 else Y)
    net = ep.from_sklearn(model)
    assert [n for n, _ in net.layers()] == ["fc1", "tanh1", "fc2"]  # identity output
    got = net(X)
    assert got.shape == (len(X), outputs)
    np.testing.assert_allclose(got, model.predict(X).reshape(len(X), outputs), rtol=0,
                               atol=1e-10)


def test_float32_training(digits):
    X, y = digits
    model = _fit(MLPClassifier((16,), max_iter=15, random_state=0), X.astype(np.float32), y)
    assert model.coefs_[0].dtype == np.float32
    net = ep.from_sklearn(model)
    ref = model.predict_proba(X.astype(np.float32))
    assert np.max(np.abs(net(X.astype(np.float32)) - ref)) < 1e-5 * np.max(np.abs(ref))


def test_exact_weight_error_equals_sklearn_with_quantized_coefs(digits):
    X, y = digits
    model = _fit(MLPClassifier((32,), activation="tanh", max_iter=30, random_state=0), X, y)
    net = ep.from_sklearn(model)
    report = ep.analyze(net, X[:200], ep.QuantConfig(weights=ep.Uniform(6,
                                                                          granularity="channel")))
    # the same quantizer, written independently, applied to sklearn's (in, out) coefs:
    # one scale per *output* unit is a column here
    quantized = copy.deepcopy(model)
    for i, W in enumerate(model.coefs_):
        s = np.max(np.abs(W), axis=0, keepdims=True) / 31
        quantized.coefs_[i] = np.clip(np.rint(W / s), -31, 31) * s
    expected = quantized.predict_proba(X[:200]) - model.predict_proba(X[:200])
    np.testing.assert_allclose(report.exact, expected, rtol=0, atol=1e-12)
    # and first order predicts it through tanh and softmax
    rel = np.linalg.norm(report.first_order - report.exact) / np.linalg.norm(report.exact)
    assert rel < 0.1


def test_errors(digits):
    with pytest.raises(ValueError, match="not fitted yet"):
        ep.from_sklearn(MLPClassifier())
    X, y = digits
    with pytest.raises(TypeError, match="MLPClassifier and MLPRegressor, got LogisticRegression"):
        ep.from_sklearn(LogisticRegression())
    model = _fit(MLPClassifier((4,), max_iter=2, random_state=0), X, y)
    model.activation = "softplus"
    with pytest.raises(ValueError, match="activation 'softplus'"):
        ep.from_sklearn(model)
    # the Poisson loss has an exp output, which errprop has no op for
    poisson = _fit(MLPRegressor(loss="poisson", hidden_layer_sizes=(4,), max_iter=2,
                                random_state=0), X, y)
    with pytest.raises(ValueError, match="output activation 'exp' not supported"):
        ep.from_sklearn(poisson)

"""Import scikit-learn MLPs: ``from_sklearn(model)`` -> an errprop ``Sequential``.

scikit-learn is imported lazily; it is an optional extra (``pip install "errprop[sklearn]"``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._optional import optional
from ._activation import Activation, Softmax
from ._graph import Sequential
from ._linear import Linear
from ._op import Op

#: sklearn's activation names -> errprop's
_HIDDEN = {"relu": "relu", "tanh": "tanh", "logistic": "sigmoid", "identity": None}
_OUTPUT = {"softmax": "softmax", "logistic": "sigmoid", "identity": None}


def _import_sklearn() -> Any:
    return optional("sklearn.neural_network", feature="errprop.from_sklearn",
                    extra="sklearn", package="scikit-learn")


def from_sklearn(model: Any) -> Sequential:
    """Convert a fitted ``MLPClassifier`` or ``MLPRegressor`` to an errprop network.

    Parameters
    ----------
    model : a fitted ``sklearn.neural_network.MLPClassifier`` or ``MLPRegressor``.

    Returns
    -------
    Sequential
        ``fc1, <act>1, fc2, <act>2, ..., fcL`` and the output activation; ``fc{i+1}``
        holds ``coefs_[i].T`` (sklearn stores ``(in, out)``, errprop's ``Linear`` takes
        ``(out, in)``) and ``intercepts_[i]``. Hidden activations map
        ``relu -> relu``, ``tanh -> tanh``, ``logistic -> sigmoid``, ``identity`` -> no
        node. The output activation is the model's ``out_activation_``: ``softmax``
        (multiclass; node ``softmax1``), ``logistic`` (binary and multilabel; node
        ``sigmoid<L>``) or ``identity`` (regression; no node).

        ``net(X)`` equals:

        * multiclass classifier: ``predict_proba(X)``, shape ``(n, n_classes)``;
        * binary classifier: ``predict_proba(X)[:, 1:]``, the probability of
          ``classes_[1]``, shape ``(n, 1)``. sklearn's first column is ``1 - p``; errprop
          keeps only ``p``, the network's real output (the error of ``1 - p`` is minus
          its error);
        * multilabel classifier: ``predict_proba(X)``, shape ``(n, n_labels)``;
        * regressor: ``predict(X)``, as ``(n, n_outputs)`` (sklearn returns ``(n,)`` for
          one output).

    Raises
    ------
    ImportError
        scikit-learn is not installed.
    TypeError, ValueError
        Not an MLP, or not fitted.
    """
    nn = _import_sklearn()
    if not isinstance(model, (nn.MLPClassifier, nn.MLPRegressor)):
        raise TypeError(f"from_sklearn supports fitted sklearn.neural_network.MLPClassifier "
                        f"and MLPRegressor, got {type(model).__name__}")
    what = type(model).__name__
    if not hasattr(model, "coefs_"):
        raise ValueError(f"from_sklearn: this {what} is not fitted yet; call model.fit(X, y) "
                         f"first")
    hidden = _HIDDEN.get(model.activation, "?")
    output = _OUTPUT.get(model.out_activation_, "?")
    if hidden == "?" or output == "?":
        raise ValueError(f"from_sklearn: {what} activation {model.activation!r} / output "
                         f"activation {model.out_activation_!r} not supported; expected "
                         f"{sorted(_HIDDEN)} / {sorted(_OUTPUT)}")
    layers: list[Op] = []
    count = len(model.coefs_)
    for i, (W, b) in enumerate(zip(model.coefs_, model.intercepts_)):
        layers.append(Linear(np.asarray(W, dtype=np.float64).T, np.asarray(b, np.float64)))
        last = i == count - 1
        kind = output if last else hidden
        if kind == "softmax":
            layers.append(Softmax())
        elif kind is not None:
            layers.append(Activation(kind))
    return Sequential(layers)

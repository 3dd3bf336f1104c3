"""GPFQ and SPFQ: data-driven, layer-by-layer weight quantization by path following.

For one output neuron ``w ∈ R^N`` (a row of a Linear weight ``W: (out, N)``), calibration
inputs ``X: (m, N)`` of the float network and ``X̃: (m, N)`` of the quantized network
(the same layer's input with the earlier layers already quantized), walk the input
coordinates ``t = 1..N`` carrying the running error of the layer output
``u_t = Σ_{j≤t} (w_j X_j - q_j X̃_j) ∈ R^m`` (``X_t`` the t-th column):

    u_0 = 0,
    q_t = Q( ⟨X̃_t, u_{t-1} + w_t X_t⟩ / ‖X̃_t‖² ),
    u_t = u_{t-1} + w_t X_t - q_t X̃_t.

``q_t`` is the alphabet value whose column best cancels the error so far: without the
alphabet constraint it would make ``u_t`` orthogonal to ``X̃_t``. ``u_N = X w - X̃ q`` is
the neuron's output error on the calibration batch.

* **GPFQ** (Lybrand & Saab 2021; Zhang, Zhou & Saab 2023): ``Q`` rounds to the nearest
  alphabet value.
* **SPFQ** (Zhang & Saab 2023): ``Q`` rounds stochastically (up with probability equal
  to the fractional position between the two neighbouring levels; unbiased), then
  saturates at the alphabet's ends.

Alphabet: symmetric uniform, ``A = {k·δ : k = -K..K}`` with ``K = 2^(bits-1) - 1`` (the
restricted range of ``Uniform(bits)``: at 2 bits the ternary ``{-δ, 0, δ}``). The step
is ``δ = scale · max|w| / K``, the max taken per output row (``granularity="channel"``)
or over the whole matrix (``"tensor"``); ``scale=1`` is exactly round-to-nearest's grid
(``Uniform(bits, granularity=...)``), so the methods compare on one alphabet. A
``scale < 1`` shrinks the step and saturates the largest weights, which path following
compensates (the papers use ``δ`` proportional to a percentile or the median of ``|W|``).

Where ``X̃_t = 0`` (a dead input) the data say nothing about ``q_t``; it is the nearest
alphabet value of ``w_t`` (SPFQ: its stochastic rounding).

All output neurons run together: the loop is over the ``N`` input coordinates only, each
step one matrix-vector product ``U X̃_t`` with ``U: (out, m)``: ``O(out·m·N)`` in all,
the cost of one ``X Wᵀ``.

References
----------
E. Lybrand, R. Saab. A greedy algorithm for quantizing neural networks. JMLR 22 (2021).
J. Zhang, Y. Zhou, R. Saab. Post-training quantization for neural networks with
provable guarantees. SIAM J. Math. Data Sci. 5 (2023).
J. Zhang, R. Saab. SPFQ: a stochastic algorithm and its error analysis for neural
network quantization. arXiv:2309.10975 (2023).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import check_choice, check_real, check_rng, check_seed, real_array
from ._config import QuantConfig
from ._graph import check_input, walk
from ._linear import Linear
from ._merge import Merge
from ._network import Network
from ._op import Array, Op
from ._fixed import Fixed

_GRANULARITIES = ("channel", "tensor")
_METHODS = ("gpfq", "spfq")


# ---------------------------------------------------------------- checks
def _check_bits(bits: object, who: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 16:
        raise ValueError(f"{who}: bits must be an integer from 2 to 16, got {bits!r}")
    return int(bits)


def _check_layer(W: object, X: object, X_tilde: object, who: str
                 ) -> tuple[Array, Array, Array]:
    W = real_array(W, who, "W")
    X = real_array(X, who, "X")
    if W.ndim != 2:
        raise ValueError(f"{who}: W must be a matrix (out, in) in the Linear convention, "
                         f"got shape {W.shape}")
    if X.ndim != 2 or X.shape[1] != W.shape[1] or X.shape[0] == 0:
        raise ValueError(f"{who}: X must be calibration inputs (samples, in) with in = "
                         f"{W.shape[1]} (W is {W.shape}), got shape {X.shape}")
    Xt = X if X_tilde is None else real_array(X_tilde, who, "X_tilde")
    if Xt.shape != X.shape:
        raise ValueError(f"{who}: X_tilde (the quantized network's inputs) must have X's "
                         f"shape {X.shape}, got {Xt.shape}")
    for name, a in (("W", W), ("X", X), ("X_tilde", Xt)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{who}: {name} contains NaN/Inf")
    return W, X, Xt


def alphabet_step(W: object, bits: int, *, granularity: str = "channel",
                  scale: float = 1.0) -> Array:
    """The step ``δ = scale · max|w| / (2^(bits-1) - 1)`` of the GPFQ/SPFQ alphabet.

    Returns ``(out, 1)`` for ``granularity="channel"`` (one step per output row),
    ``(1, 1)`` for ``"tensor"``. An all-zero row gets step 1 (any step represents it).
    """
    return _alphabet_step(W, bits, granularity, scale, "alphabet_step")


def _alphabet_step(W: object, bits: object, granularity: object, scale: object,
                   who: str) -> Array:
    W = real_array(W, who, "W")
    bits = _check_bits(bits, who)
    check_choice(granularity, who, "granularity", _GRANULARITIES)
    scale = check_real(scale, who, "scale", positive=True)
    axis = 1 if granularity == "channel" else None
    amax = np.max(np.abs(W), axis=axis, keepdims=True) if W.size else np.zeros((1, 1))
    step = scale * amax.reshape(-1, 1) / (2 ** (bits - 1) - 1)
    return np.where(step > 0, step, 1.0)


# ---------------------------------------------------------------- one layer
def _path_following(W: Array, X: Array, Xt: Array, step: Array, K: int,
                    rng: np.random.Generator | None) -> Array:
    """The integer levels ``k`` (``Q = k·δ``) of every row of ``W``, all rows at once."""
    out, N = W.shape
    step = np.broadcast_to(step, (out, 1))[:, 0]
    norms = np.einsum("ij,ij->j", Xt, Xt)
    cross = np.einsum("ij,ij->j", Xt, X)  # ⟨X̃_t, X_t⟩
    U = np.zeros((out, X.shape[0]))  # row a: neuron a's running error u ∈ R^m
    k = np.zeros((out, N))
    for t in range(N):
        if norms[t] > 0:
            # ⟨X̃_t, u_{t-1} + w_t X_t⟩ / ‖X̃_t‖², for every neuron
            z = (U @ Xt[:, t] + W[:, t] * cross[t]) / norms[t]
        else:
            z = W[:, t].copy()
        z /= step
        if rng is None:
            kt = np.rint(z)  # half to even, as Uniform's round-to-nearest
        else:
            kt = np.floor(z + rng.random(out))
        np.clip(kt, -K, K, out=kt)
        k[:, t] = kt
        U += np.outer(W[:, t], X[:, t]) - np.outer(kt * step, Xt[:, t])
    return k


def _quantize_layer(W: object, X: object, bits: object, X_tilde: object, granularity: str,
                    scale: float, step: object, rng: np.random.Generator | None,
                    who: str) -> tuple[Array, Array]:
    W, X, Xt = _check_layer(W, X, X_tilde, who)
    bits = _check_bits(bits, who)
    if step is None:
        delta = _alphabet_step(W, bits, granularity, scale, who)
    else:
        delta = real_array(step, who, "step")
        if delta.ndim == 0:
            delta = delta.reshape(1, 1)
        if delta.shape not in ((1, 1), (W.shape[0], 1)) or not np.all(delta > 0):
            raise ValueError(f"{who}: step must be a positive number or an (out, 1) array of "
                             f"them (out = {W.shape[0]}), got {np.asarray(step)!r}")
    k = _path_following(W, X, Xt, delta, 2 ** (bits - 1) - 1, rng)
    return k * delta, delta


def gpfq(W: object, X: object, bits: int, *, X_tilde: object = None,
         granularity: str = "channel", scale: float = 1.0, step: object = None) -> Array:
    """Greedy path-following quantization (GPFQ) of a Linear weight.

    Parameters
    ----------
    W : (out, in), the weight in the ``Linear`` convention (``y = x Wᵀ + b``).
    X : (samples, in), calibration inputs of the layer in the float network.
    bits : int, 2..16: the alphabet ``{k·δ : |k| ≤ 2^(bits-1) - 1}``.
    X_tilde : (samples, in) or None: the same inputs in the quantized network
        (earlier layers quantized); None means ``X`` (a single layer).
    granularity : ``"channel"`` (one step per output row, default) or ``"tensor"``.
    scale : float > 0, ``δ = scale · max|w| / (2^(bits-1) - 1)`` (1: round-to-nearest's
        grid, ``Uniform(bits, granularity=...)``).
    step : None, a number, or ``(out, 1)``: the step ``δ`` itself (overrides the rule).

    Returns
    -------
    Q : (out, in) float64, on the alphabet: ``Q / δ`` are integers in ``[-K, K]``.

    Notes
    -----
    Row by row, ``q_t = Q_A(⟨X̃_t, u_{t-1} + w_t X_t⟩ / ‖X̃_t‖²)``,
    ``u_t = u_{t-1} + w_t X_t - q_t X̃_t`` (``Q_A`` nearest, ties to even); the layer's
    output error on the calibration batch is ``X Wᵀ - X̃ Qᵀ = Uᵀ``. See the module
    docstring for the references.
    """
    return _quantize_layer(W, X, bits, X_tilde, granularity, scale, step, None, "gpfq")[0]


def spfq(W: object, X: object, bits: int, *, seed: int | None = 0,
         rng: np.random.Generator | None = None, X_tilde: object = None,
         granularity: str = "channel", scale: float = 1.0, step: object = None) -> Array:
    """Stochastic path-following quantization (SPFQ, Zhang & Saab 2023).

    As :func:`gpfq`, with stochastic rounding in the step:
    ``q_t = δ·clip(⌊z/δ + ξ⌋, -K, K)``, ``z = ⟨X̃_t, u_{t-1} + w_t X_t⟩ / ‖X̃_t‖²``,
    ``ξ ~ U(0, 1)`` (unbiased inside the alphabet's range). ``seed`` (or ``rng``, which
    wins) makes it reproducible: one uniform per output neuron and input coordinate,
    drawn in coordinate order.
    """
    if check_rng(rng, "spfq") is None:
        rng = np.random.default_rng(check_seed(seed, "spfq"))
    return _quantize_layer(W, X, bits, X_tilde, granularity, scale, step, rng, "spfq")[0]


# ---------------------------------------------------------------- a network
@dataclass(frozen=True, eq=False)
class _Pair:
    x: Array  # float network
    xq: Array  # network with the weights quantized so far


class _FollowQuantized:
    """Interpreter: float and quantized forwards together; each Linear weight is quantized
    on its float input ``X`` and the quantized network's input ``X̃`` when reached."""

    def __init__(self, layers: set[str], quantize) -> None:
        self.layers = layers
        self.quantize = quantize
        self.results: dict[str, tuple[Array, Array]] = {}

    def leaf(self, name: str, op: Op, s: _Pair) -> _Pair:
        y = op.forward(s.x)
        if name not in self.layers:
            return _Pair(y, op.forward(s.xq))
        W = op.params["W"]
        X = s.x.reshape(-1, W.shape[1])
        Xt = s.xq.reshape(-1, W.shape[1])
        Q, delta = self.quantize(name, W, X, Xt)
        self.results[name] = (Q, delta)
        return _Pair(y, op.forward(s.xq, {**op.params, "W": Q}))

    def merge(self, name: str, op: Merge, states: list[_Pair]) -> _Pair:
        return _Pair(op.forward([s.x for s in states]), op.forward([s.xq for s in states]))


def gpfq_config(net: Network, x: object, bits: int, *, method: str = "gpfq",
                seed: int | None = 0, layers: str | list[str] = "all",
                granularity: str = "channel", scale: float = 1.0,
                base: QuantConfig | None = None) -> QuantConfig:
    """Quantize the Linear weights of ``net`` with GPFQ or SPFQ, layer by layer, and
    return a :class:`QuantConfig` that applies those matrices.

    Layers are visited in execution order. Each Linear's weight is quantized on its
    input in the float network (``X``) and in the network whose earlier weights are
    already quantized (``X̃``), as the papers do, so later layers correct the error of
    earlier ones. Batch and token axes are flattened into samples. Any graph works:
    merges (residual joins, ``Mul``, ``Concat``, ``MatMul``) combine the float and the
    quantized values separately, so each Linear of a gated MLP or of a decomposed
    attention sees its own ``X`` and ``X̃``.

    Parameters
    ----------
    net : Sequential or Graph
    x : the calibration batch, ``(batch, features)`` or ``(batch, tokens, features)``.
    bits : int, 2..16 (see :func:`gpfq` for the alphabet).
    method : ``"gpfq"`` or ``"spfq"``.
    seed : SPFQ's randomness (one generator for the whole network, used in layer order).
    layers : ``"all"`` (every Linear) or a list of Linear layer names.
    granularity, scale : the alphabet step rule, as in :func:`gpfq`.
    base : a QuantConfig whose other settings (biases, activations, other layers'
        weights, overrides) are kept; the GPFQ layers' weights are added as the last
        overrides. ``X̃`` follows the weight quantization only.

    Returns
    -------
    QuantConfig
        ``overrides={layer: {"weights": Fixed(Q, step)}}``: :func:`errprop.analyze` and
        :func:`errprop.monte_carlo` apply exactly these matrices, with the deterministic
        error model ``mean = Q - W``, ``var = 0``.
    """
    check_choice(method, "gpfq_config", "method", _METHODS)
    check_choice(granularity, "gpfq_config", "granularity", _GRANULARITIES)
    scale = check_real(scale, "gpfq_config", "scale", positive=True)
    seed = check_seed(seed, "gpfq_config")
    if base is not None and not isinstance(base, QuantConfig):
        raise TypeError(f"gpfq_config: base must be a QuantConfig or None, "
                        f"got {type(base).__name__}")
    bits = _check_bits(bits, "gpfq_config")
    x = check_input(net, x)
    linear = [name for name, op in net.layers() if isinstance(op, Linear)]
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"gpfq_config: layers must be 'all' or a list of Linear layer "
                             f"names, got {layers!r}")
        chosen = set(linear)
    else:
        if not all(isinstance(name, str) for name in layers):
            raise TypeError(f"gpfq_config: layers must be 'all' or a list of Linear layer "
                            f"names (strings), got {layers!r}")
        chosen = set(layers)
        unknown = sorted(chosen - set(linear))
        if unknown:
            raise ValueError(f"gpfq_config: {unknown} are not Linear layers of the network; "
                             f"Linear layers: {linear}")
    rng = np.random.default_rng(seed) if method == "spfq" else None

    def quantize(name: str, W: Array, X: Array, Xt: Array) -> tuple[Array, Array]:
        return _quantize_layer(W, X, bits, Xt, granularity, scale, None, rng,
                               f"gpfq_config ({method}, layer {name!r})")

    interp = _FollowQuantized(chosen, quantize)
    walk(net, _Pair(x, x), interp)
    overrides = {} if base is None else dict(base.overrides)
    for name in linear:
        if name in interp.results:
            Q, delta = interp.results[name]
            spec = dict(overrides.pop(name, {}))
            spec["weights"] = Fixed(Q, delta)
            overrides[name] = spec
    if base is None:
        return QuantConfig(overrides=overrides)
    return QuantConfig(weights=base.weights, biases=base.biases, activations=base.activations,
                       input=base.input, norms=base.norms, embeddings=base.embeddings,
                       hardware=base.hardware, overrides=overrides)

"""Hardware-gap sources: what an integer-only kernel does that a float fake-quant simulation
does not, each as its own error source (its own budget line).

A float simulation (``QuantConfig(weights=Uniform(8, ...), activations=Uniform(8))``)
rounds a layer's input with ``s·rint(u/s)``, multiplies in float and adds a float bias.
An integer kernel (gemmlowp / TFLite) computes ``acc = Σ x_int·W_int + b_int`` in a
``k``-bit register and *requantizes* the accumulator into the next layer's int8 input
with a fixed-point multiplier ``M ≈ M0·2^-(31+n)`` of ``M = s_x·s_W / s_out``, rounding
half away from zero. ``QuantConfig(hardware=IntegerKernel(...))`` adds, per quantized
``Linear`` ``L`` (one whose input and weights are quantized with ``Uniform`` grids):

* ``L.acc`` — the accumulator: the bias converted to the accumulator's unit
  ``s_x·s_W`` (int32 bias) and overflow of the ``k``-bit register (wrap-around or
  saturation), injected at the input of the op that consumes ``L``'s output;
* ``L.in.rescale`` — the integer rescaling that produced ``L``'s input from the previous
  Linear's accumulator (fixed-point multiplier + shift, or a power-of-two shift):
  ``R(u) − A_k(u)``, where ``A_k`` is ``L``'s input grid with the kernel's rounding mode;
* ``L.in.rounding`` — the rounding mode of that requantization, ``A_k(u) − A(u)``
  (half away from zero versus the simulation's half to even; nonzero only at ties).

Each is a deterministic function of the value it acts on, injected as an input-side
("activation") source, so the exact run, first-order propagation, statistics, bounds
and budgets handle it without knowing what it is. The three telescope: the exact run
with them equals the integer kernel, and their first-order rows sum, with ``L.in``'s,
to ``R(x) − x``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ._graph import Sequential
from ._network import INPUT
from ._op import Array
from ._quant import ErrorModel, Quantizer, Uniform, UniformGrid

OVERFLOWS = ("wrap", "saturate")
KERNEL_ROUNDINGS = ("half_away", "half_even")
MULTIPLIERS = ("fixed", "pow2")


def accumulator_bits(bits_x: int, bits_w: int, fan_in: int) -> int:
    """Accumulator width that cannot overflow: ``k_x + k_w − 1 + ⌈log2 fan_in⌉`` (WAGE).

    A product of a ``k_x``-bit and a ``k_w``-bit signed integer in the restricted
    (symmetric) range needs ``k_x + k_w − 1`` bits; a sum of ``fan_in`` of them
    ``⌈log2 fan_in⌉`` more (Wu et al., "Training and inference with integers in deep
    neural networks", ICLR 2018).
    """
    return int(bits_x + bits_w - 1 + math.ceil(math.log2(max(1, fan_in))))


def round_half_away(u: Array) -> Array:
    """Round to nearest, ties away from zero (C ``round``), exactly: the fractional part
    ``u − trunc(u)`` is exact in floating point."""
    t = np.trunc(u)
    return np.where(np.abs(u - t) == 0.5, t + np.sign(u), np.rint(u))


def _round(u: Array, mode: str) -> Array:
    return np.rint(u) if mode == "half_even" else round_half_away(u)


def quantize_multiplier(M: Array) -> tuple[Array, Array]:
    """TFLite's ``QuantizeMultiplier``: ``M = M0·2^(shift−31)``, ``M0`` in ``[2^30, 2^31)``
    (``M0 = round(frac·2^31)``, half away from zero, as ``std::round``)."""
    frac, shift = np.frexp(np.asarray(M, dtype=np.float64))
    M0 = np.floor(frac * 2.0 ** 31 + 0.5).astype(np.int64)
    carry = M0 == 2 ** 31
    return np.where(carry, 2 ** 30, M0), np.where(carry, shift + 1, shift).astype(np.int64)


def _rounding_divide_by_pot(x: Array, exponent: Array) -> Array:
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded half away from zero."""
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(acc: Array, M0: Array, shift: Array,
                                     rounding: str = "half_away") -> Array:
    """``acc · M0 · 2^(shift−31)`` rounded to an integer, in int64 arithmetic.

    ``"half_away"``: TFLite's reference ``MultiplyByQuantizedMultiplier`` — gemmlowp's
    ``SaturatingRoundingDoublingHighMul`` (rounds ``acc·M0 / 2^31`` half away from
    zero) then ``RoundingDivideByPOT`` (again half away): two roundings.
    ``"half_even"``: one exact rounding of ``acc·M0 / 2^(31−shift)``, ties to even.
    """
    acc = np.asarray(acc, dtype=np.int64)
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    x = acc << left
    if rounding == "half_away":
        ab = x * M0
        nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
        num = ab + nudge
        high = np.where(num >= 0, num >> 31, -((-num) >> 31))  # C division truncates
        return _rounding_divide_by_pot(high, right)
    d = 31 + right
    num = x * M0
    q = num >> d
    rem = num - (q << d)
    half = np.int64(1) << (d - 1)
    return q + ((rem > half) | ((rem == half) & (q % 2 == 1)))


def _wrap(a: Array, bits: int, overflow: str) -> Array:
    lo, hi = -2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1
    if overflow == "saturate":
        return np.clip(a, lo, hi)
    return np.mod(a - lo, 2.0 ** bits) + lo


def _deterministic(e: Array) -> ErrorModel:
    """A gap is a deterministic function of the value: mean = the error, no variance."""
    z = np.zeros(e.shape)
    return ErrorModel(max_abs=np.abs(e), mean=e, var=z, clipped=np.zeros(e.shape, bool),
                      width=z)


@dataclass(frozen=True, eq=False)
class GapGrid:
    """A fitted hardware-gap source: ``quantize(v) = v + gap(v)``.

    ``kind`` is ``"acc"``, ``"rescale"`` or ``"rounding"``. ``acc_scale`` is the
    accumulator's unit ``s_x·s_W`` of the producing Linear (per output channel),
    ``bias`` the bias the simulation adds (or None), ``grid`` the consuming layer's
    input grid (rescale, rounding).
    """

    kind: str
    kernel: IntegerKernel
    acc_scale: Array | None = None
    bias: Array | None = None
    grid: UniformGrid | None = None

    @property
    def scale(self) -> Array:
        return self.grid.scale if self.grid is not None else self.acc_scale

    def _acc_gap(self, v: Array) -> Array:
        s = self.acc_scale
        b = 0.0 if self.bias is None else self.bias
        acc = np.rint((v - b) / s)
        b_int = np.rint(b / s)
        total = acc + b_int
        k = self.kernel
        return (_wrap(total, k.accumulator_bits, k.overflow) - total) * s + (b_int * s - b)

    def _requant(self, v: Array, mode: str) -> Array:
        """The input grid with the kernel's rounding mode."""
        g = self.grid
        q = np.clip(_round(v / g.scale, mode) + g.zero_point, g.qmin, g.qmax)
        return (q - g.zero_point) * g.scale

    def gap(self, v: Array) -> Array:
        """The error this source adds to ``v``."""
        k = self.kernel
        if self.kind == "acc":
            return self._acc_gap(v)
        if self.kind == "rounding":
            return self._requant(v, k.rounding) - self._requant(v, "half_even")
        g = self.grid
        acc = np.rint(v / self.acc_scale)
        M = np.broadcast_to(self.acc_scale / np.ravel(g.scale)[0], v.shape[-1:])
        if k.multiplier == "fixed":
            M0, shift = quantize_multiplier(M)
            q = multiply_by_quantized_multiplier(acc.astype(np.int64), M0, shift,
                                                 k.rounding).astype(np.float64)
        else:
            q = _round(acc * np.exp2(np.rint(np.log2(M))), k.rounding)
        q = np.clip(q + g.zero_point, g.qmin, g.qmax)
        return (q - g.zero_point) * g.scale - self._requant(v, k.rounding)

    def quantize(self, x: Array, *, rng: np.random.Generator | None = None) -> Array:
        """``x + gap(x)``; where a requantization gap (rescale, rounding) is nonzero, the
        kernel's grid value itself. Half-even rounding is not shift-invariant at ties
        (``rint(k + ½ + 1) ≠ rint(k + ½) + 1``), so the input grid that rounds next
        must receive a value already on the grid (it leaves those unchanged)."""
        x = np.asarray(x, dtype=np.float64)
        gap = self.gap(x)
        if self.kind == "acc":
            return x + gap
        base = self._requant(x, self.kernel.rounding if self.kind == "rescale" else "half_even")
        return np.where(gap != 0, base + gap, x)

    def error_model(self, x: Array) -> ErrorModel:
        return _deterministic(self.quantize(x) - x)


class _Gap(Quantizer):
    """The quantizer of one hardware-gap source; fitted only inside an analysis, where the
    grids of the producing Linear are known."""

    def __init__(self, kind: str, kernel: IntegerKernel, producer: str | None,
                 consumer_input: Uniform | None, bias: Array | None, bits: int) -> None:
        self.kind, self.kernel, self.producer = kind, kernel, producer
        self.consumer_input, self.bias, self.bits = consumer_input, bias, bits

    def fit(self, x: Array, *, channel_axis: int = 0, what: str = "tensor") -> GapGrid:
        raise ValueError(f"IntegerKernel: the {self.kind} source of {what} is fitted inside "
                         f"errprop.analyze or errprop.monte_carlo (it needs the grids of the "
                         f"producing layer)")

    def fit_in_context(self, x: Array, *, what: str,
                       fitted: Mapping[str, object]) -> GapGrid:
        x = np.asarray(x, dtype=np.float64)
        grid = None
        if self.consumer_input is not None:
            grid = self.consumer_input.fit(x, channel_axis=-1, what=what)
        if self.kind == "rounding":
            return GapGrid("rounding", self.kernel, grid=grid)
        p = self.producer
        s_x = fitted[f"{p}.in"].grid.scale
        s_w = fitted[f"{p}.W"].grid.scale
        acc_scale = np.asarray(s_x, dtype=np.float64).reshape(()) * np.ravel(s_w)
        bias = self.bias
        if f"{p}.b" in fitted:
            bias = fitted[f"{p}.b"].value + fitted[f"{p}.b"].error
        return GapGrid(self.kind, self.kernel, acc_scale, bias, grid)

    def __repr__(self) -> str:
        return f"{self.kernel!r}.{self.kind}"


class IntegerKernel:
    """The integer-only kernel a quantized network is deployed with (gemmlowp/TFLite style).

    Parameters
    ----------
    accumulator_bits : int or None, default 32. Width of the signed accumulator of every
        quantized Linear; None leaves accumulators out (no ``L.acc`` sources).
    overflow : ``"wrap"`` (two's complement wrap-around; exact whatever the order of the
        partial sums) or ``"saturate"`` (clamped; applied to the final sum — a kernel that
        saturates every partial sum can differ when partial sums leave the range and
        come back).
    rounding : ``"half_away"`` (gemmlowp, TFLite, C ``round``) or ``"half_even"``
        (NumPy, PyTorch) for the requantization. With ``"half_even"`` there is no
        ``L.in.rounding`` source (it would be zero).
    multiplier : ``"fixed"`` (a 32-bit fixed-point multiplier ``M0`` and a shift, TFLite's
        ``QuantizeMultiplier`` + ``MultiplyByQuantizedMultiplier``) or ``"pow2"`` (the
        multiplier rounded to the nearest power of two: a shift only).

    Notes
    -----
    Requirements, checked when the sources are built: the Linear's input grid is a
    per-tensor ``Uniform`` (a per-feature input scale cannot be factored out of the dot
    product), its weight grid a per-tensor or per-channel ``Uniform``. ``L.acc`` enters
    at the input of the op that consumes ``L``'s output, which must be the one layer
    reading it (not a merge such as a residual join or ``Mul``, not several readers, not
    the network output: append ``Activation("identity")`` after ``L``). ``L.in.rescale``
    exists when ``L``'s input is the output of a quantized Linear, possibly through
    ReLU/identity activations (which commute with requantization); otherwise (the network
    input, a merge) the input is quantized from float and only its rounding mode differs.
    """

    def __init__(self, accumulator_bits: int | None = 32, overflow: str = "wrap",
                 rounding: str = "half_away", multiplier: str = "fixed") -> None:
        if accumulator_bits is not None and (
                isinstance(accumulator_bits, bool)
                or not isinstance(accumulator_bits, (int, np.integer))
                or not 2 <= accumulator_bits <= 32):
            raise ValueError(f"IntegerKernel: accumulator_bits must be an integer from 2 to 32 "
                             f"or None, got {accumulator_bits!r}")
        for name, value, allowed in (("overflow", overflow, OVERFLOWS),
                                     ("rounding", rounding, KERNEL_ROUNDINGS),
                                     ("multiplier", multiplier, MULTIPLIERS)):
            if value not in allowed:
                raise ValueError(f"IntegerKernel: {name} must be one of "
                                 f"{', '.join(map(repr, allowed))}, got {value!r}")
        self.accumulator_bits = None if accumulator_bits is None else int(accumulator_bits)
        self.overflow, self.rounding, self.multiplier = overflow, rounding, multiplier

    def __repr__(self) -> str:
        return (f"IntegerKernel({self.accumulator_bits}, overflow={self.overflow!r}, "
                f"rounding={self.rounding!r}, multiplier={self.multiplier!r})")

    # ------------------------------------------------------------ sources
    def sources(self, net: Sequential, out: list) -> list:
        """``out`` (the config's sources, execution order) with the gap sources inserted.

        The graph is read along its edges: ``L.in.rescale`` needs ``L``'s input to be a
        quantized Linear's output (through ops that commute with requantization, never
        through a merge), and ``L.acc`` enters at the input of the one layer that reads
        ``L``'s output; a merge, several readers or the network output there are refused
        with an error naming the node."""
        from ._config import Source

        by_name = {s.name: s for s in out}
        layers = net.layers()
        ops = dict(layers)
        dag = {node.name: node for node in net.dag()}
        readers: dict[str, list[str]] = {}
        for node in dag.values():
            for k in dict.fromkeys(node.inputs):
                readers.setdefault(k, []).append(node.name)
        before: dict[str, list] = {}

        def integer(name: str) -> bool:
            op = ops[name]
            if not op.integer_matmul or f"{name}.in" not in by_name \
                    or f"{name}.W" not in by_name:
                return False
            a, w = by_name[f"{name}.in"].quantizer, by_name[f"{name}.W"].quantizer
            if not isinstance(a, Uniform) or a.granularity != "tensor" \
                    or a.arithmetic != "float64" or a.rounding != "nearest":
                raise ValueError(f"IntegerKernel: the input of {name!r} must be quantized "
                                 f"per tensor with round-to-nearest (a float64 Uniform), "
                                 f"got {a!r}")
            if not isinstance(w, Uniform) or w.granularity == "group":
                raise ValueError(f"IntegerKernel: the weights of {name!r} must use a "
                                 f"per-tensor or per-channel Uniform, got {w!r}")
            return True

        def producer(name: str) -> str | None:
            """The quantized Linear whose requantized accumulator is ``name``'s input."""
            k = dag[name].inputs[0]
            while k != INPUT and len(dag[k].inputs) == 1:
                if integer(k):
                    return k
                if not dag[k].op.commutes_with_requantization:
                    return None
                k = dag[k].inputs[0]
            return None  # the network input or a merge: quantized from float

        for name, _ in layers:
            if not integer(name):
                continue
            act = by_name[f"{name}.in"].quantizer
            prev = producer(name)
            if prev is not None:
                before.setdefault(name, []).append(Source(
                    f"{name}.in.rescale", name, "activation", None,
                    _Gap("rescale", self, prev, act, None, act.bits)))
            if self.rounding != "half_even":
                before.setdefault(name, []).append(Source(
                    f"{name}.in.rounding", name, "activation", None,
                    _Gap("rounding", self, None, act, None, act.bits)))
            if self.accumulator_bits is not None:
                user = self._accumulator_reader(name, readers.get(name, []), dag)
                b = ops[name].params.get("b")
                before.setdefault(user, []).insert(0, Source(
                    f"{name}.acc", user, "activation", None,
                    _Gap("acc", self, name, None, b, self.accumulator_bits)))
        result = [s for s in out if s.layer is None]
        for name, _ in layers:
            result += before.get(name, []) + [s for s in out if s.layer == name]
        return result

    @staticmethod
    def _accumulator_reader(name: str, users: list[str], dag: Mapping) -> str:
        """The one layer that reads ``name``'s output (where ``name.acc`` enters)."""
        fix = ("append Activation('identity') after it (the accumulator error then enters "
               "there, before the value is shared), or use IntegerKernel(accumulator_bits=None)")
        if len(users) > 1:
            raise ValueError(f"IntegerKernel: the accumulator of {name!r} is read by "
                             f"{len(users)} nodes ({', '.join(map(repr, users))}); its error "
                             f"can enter as a source at one layer only; {fix}")
        if not users or len(dag[users[0]].inputs) > 1:
            where = "the network's output" if not users else \
                f"the {dag[users[0]].op.kind} node {users[0]!r}"
            raise ValueError(f"IntegerKernel: the accumulator of {name!r} feeds {where}, "
                             f"not a layer, so its overflow cannot enter as a source; {fix}")
        return users[0]



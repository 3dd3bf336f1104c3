"""Mixed-precision bit allocation from the additive per-layer error model.

At first order the output error is a sum over sources, and with independent rounding the
output MSE is the sum of the sources' contributions. A layer's contribution depends only
on its own quantizer, so one analysis per candidate bit width ``b`` (every layer at ``b``)
measures every layer's contribution ``m_l(b)`` with the actual error model at ``b`` (not
an extrapolated ``4^-b``). Choosing one ``b_l`` per layer to minimise the cost
``Σ_l cost_l(b_l)`` subject to ``Σ_l m_l(b_l) ≤ target`` is then a small multiple-choice
knapsack, solved exactly as an integer program (``scipy.optimize.milp``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ._checks import check_bool
from scipy import optimize

from ._analysis import analyze
from ._config import QuantConfig
from ._graph import Sequential, check_input
from ._network import float_values
from ._op import Array, Op
from ._quant import Uniform
from ._report import Report

#: re-plans when the calibration batch's exact error misses the target
_VERIFY_ROUNDS = 3
COSTS = ("params", "bitops")


@dataclass(frozen=True)
class Allocation:
    """Bits per layer and what the additive model predicts for them.

    Attributes
    ----------
    config : the QuantConfig with these bits (``overrides`` per layer).
    bits : layer -> weight bits.
    predicted_mse : predicted output MSE (weights + the fixed activation part).
    target_mse : the target it was planned for (after ``margin``), or NaN.
    cost : total cost (bits·parameters or bit-operations per input).
    cost_unit : ``"bits"`` or ``"bitops"``.
    uniform_bits, uniform_cost : the cheapest single bit width meeting the same target
        and its cost (None / NaN when none does).
    contributions : layer -> bits -> predicted output MSE (the model behind the plan).
    fixed_cost : the part of ``cost`` that does not depend on the weight bits: with
        ``"bitops"``, the products of two activations (``Mul``, ``MatMul`` nodes),
        ``MACs·a_bits²`` each; 0 otherwise.
    macs : with ``"bitops"``, node -> multiply-adds per input of the weighted layers and
        of the product nodes (the counts behind the cost); empty otherwise.
    """

    config: QuantConfig
    bits: dict[str, int]
    predicted_mse: float
    target_mse: float
    cost: float
    cost_unit: str
    uniform_bits: int | None
    uniform_cost: float
    contributions: dict[str, dict[int, float]]
    fixed_cost: float = 0.0
    macs: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        rows = [(layer, str(b), f"{self.contributions[layer][b]:.3g}")
                for layer, b in self.bits.items()]
        head = ("layer", "bits", "predicted output MSE")
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(3)]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(r, widths))) for r in (head, *rows)]
        lines.insert(1, "  ".join("-" * w for w in widths))
        summary = f"predicted output MSE {self.predicted_mse:.3g}"
        if not math.isnan(self.target_mse):
            summary += f" (target {self.target_mse:.3g})"
        summary += f"; cost {self.cost:.4g} {self.cost_unit}"
        if self.fixed_cost:
            summary += f" ({self.fixed_cost:.4g} of it for products of activations)"
        if self.uniform_bits is not None:
            summary += f"; uniform {self.uniform_bits} bits costs {self.uniform_cost:.4g}"
        lines.append(summary)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def macs_per_input(net: Sequential, x: Array, layers: Iterable[str]) -> dict[str, float]:
    """Multiply-adds per batch element of the weighted ``layers`` and of every merge that
    multiplies (``Mul``, ``MatMul``: ``Merge.macs`` > 0), on the batch ``x``."""
    wanted = set(layers)
    forward = float_values(net, x)
    out: dict[str, float] = {}
    for node in net.dag():
        xs, _ = forward[node.name]
        if node.name in wanted:
            out[node.name] = node.op.macs(xs.shape) / xs.shape[0]
        elif len(node.inputs) > 1:  # a merge: the shapes of its inputs
            macs = node.op.macs([v.shape for v in xs])
            if macs:
                out[node.name] = macs / xs[0].shape[0]
    return out


def _prepare(net: Sequential, x: object, weights: Uniform, activations: Uniform | None,
             candidates: Iterable[int], seed: int):
    cands = sorted({int(b) for b in candidates})
    if not cands or cands[0] < 2 or cands[-1] > 16:
        raise ValueError(f"candidates must be bit widths from 2 to 16, got {list(candidates)}")
    if not isinstance(weights, Uniform):
        raise TypeError(f"weights must be a Uniform quantizer recipe, got "
                        f"{type(weights).__name__}")
    x = check_input(net, x)
    table: dict[str, dict[int, float]] = {}
    fixed = 0.0
    reports: dict[int, Report] = {}
    for b in cands:
        report = analyze(net, x, QuantConfig(weights=weights.with_bits(b),
                                             activations=activations), seed=seed)
        reports[b] = report
        contrib, _ = report.predicted_mse_contributions()
        for s in report.sources.values():
            if s.kind == "weight":
                table.setdefault(s.source.layer, {})[b] = \
                    table.get(s.source.layer, {}).get(b, 0.0) + contrib[s.name]
            elif b == cands[-1]:
                fixed += contrib[s.name]  # activations: independent of the weight bits
    if not table:
        raise ValueError("the network has no weights to allocate bits to")
    return x, cands, table, fixed, reports


def _costs(net: Sequential, x: Array, report: Report, layers: list[str], cands: list[int],
           cost: str, activations: Uniform | None
           ) -> tuple[dict[str, dict[int, float]], str, float, dict[str, float]]:
    """Per layer and bit width its cost, the unit, the fixed cost of the products without
    weights (merges: ``MACs·a_bits²``) and the MACs per input behind ``"bitops"``."""
    if cost == "params":
        size = {l: sum(s.error.size for s in report.sources.values()
                       if s.source.layer == l and s.kind == "weight") for l in layers}
        return {l: {b: float(size[l] * b) for b in cands} for l in layers}, "bits", 0.0, {}
    a_bits = activations.bits if activations is not None else 32
    macs = macs_per_input(net, x, layers)
    weighted = set(layers)
    fixed = sum(m * a_bits * a_bits for k, m in macs.items() if k not in weighted)
    return ({l: {b: macs[l] * b * a_bits for b in cands} for l in layers}, "bitops",
            float(fixed), macs)


def _target(report: Report, target_mse: float | None, target_sqnr_db: float | None) -> float:
    if (target_mse is None) == (target_sqnr_db is None):
        raise ValueError("give exactly one of target_mse and target_sqnr_db")
    if target_mse is not None:
        if not (isinstance(target_mse, (int, float)) and target_mse > 0):
            raise ValueError(f"target_mse must be a positive number, got {target_mse!r}")
        return float(target_mse)
    if not (isinstance(target_sqnr_db, (int, float)) and math.isfinite(target_sqnr_db)):
        raise ValueError(f"target_sqnr_db must be a finite number, got {target_sqnr_db!r}")
    # SQNR = 20 log10(‖y‖/‖Δy‖)  <=>  MSE = mean(y²) · 10^(-SQNR/10)
    return float(np.mean(report.output ** 2) * 10.0 ** (-target_sqnr_db / 10.0))


def _config(bits: dict[str, int], weights: Uniform, activations: Uniform | None) -> QuantConfig:
    return QuantConfig(activations=activations,
                       overrides={l: {"weights": weights.with_bits(b)} for l, b in bits.items()})


def allocate_bits(net: Sequential, x: object, *, target_mse: float | None = None,
                  target_sqnr_db: float | None = None, max_cost: float | None = None,
                  candidates: Iterable[int] = range(2, 9), cost: str = "params",
                  weights: Uniform | None = None, activations: Uniform | None = None,
                  margin: float = 0.8, seed: int = 0) -> QuantConfig:
    """Per-layer weight bits: the QuantConfig of :func:`plan_bits` (same arguments), which
    also reports the prediction, the cost and the cheapest uniform width for comparison."""
    return plan_bits(net, x, target_mse=target_mse, target_sqnr_db=target_sqnr_db,
                     max_cost=max_cost, candidates=candidates, cost=cost, weights=weights,
                     activations=activations, margin=margin, seed=seed).config


def _solve(c: Array, m: Array, n: int, k: int, *, cap: float, minimize: str) -> Array:
    """One binary per (layer, bits), one choice per layer; minimise the cost under an MSE cap
    (``minimize="cost"``) or the MSE under a cost cap (``"mse"``). Returns the choices."""
    one = np.kron(np.eye(n), np.ones(k))
    objective, limited = (c, m) if minimize == "cost" else (m, c)
    res = optimize.milp(objective / (objective.max() or 1.0), integrality=np.ones(n * k),
                        bounds=optimize.Bounds(0, 1),
                        constraints=[optimize.LinearConstraint(one, 1, 1),
                                     optimize.LinearConstraint(limited[None] / cap, -np.inf,
                                                               1 + 1e-12)])
    if not res.success:  # pragma: no cover - feasible by the callers' checks
        raise RuntimeError(f"bit allocation failed: {res.message}")
    return np.round(res.x).reshape(n, k).argmax(axis=1)


def plan_bits(net: Sequential, x: object, *, target_mse: float | None = None,
              target_sqnr_db: float | None = None, max_cost: float | None = None,
              candidates: Iterable[int] = range(2, 9), cost: str = "params",
              weights: Uniform | None = None, activations: Uniform | None = None,
              margin: float = 0.8, seed: int = 0, verify: bool = True) -> Allocation:
    """Per-layer weight bits: least cost meeting an error target, or least error within a
    cost.

    Parameters
    ----------
    net, x : the network and a calibration batch.
    target_mse, target_sqnr_db, max_cost : exactly one: the output MSE to stay under, the
        output SQNR (``20·log10(‖y‖/‖Δy‖)`` dB) to stay above, or a cost not to exceed
        (then the predicted MSE is minimised: the comparison with uniform bits at equal
        cost).
    candidates : bit widths to choose from (2..16).
    cost : ``"params"`` (Σ bits·weights: model size) or ``"bitops"`` (Σ MACs·w_bits·a_bits
        per input over the weighted layers, plus MACs·a_bits² of every product of two
        activations — ``Mul``/``MatMul`` nodes, a fixed part; a_bits = the activation
        quantizer's bits, 32 if unquantized).
    weights : the weight quantizer recipe whose bits vary (default
        ``Uniform(8, granularity="channel")``).
    activations : a fixed activation quantizer (its error is part of the target).
    margin : plan for ``margin · target``, so that fresh inputs (whose exact error
        fluctuates around the prediction; ``tests/test_allocate.py``) meet the target too.
    verify : with a target, check the plan by an exact run on ``x``: where the exact
        error misses the target, the plan is tightened by the miss and solved again (up to
        3 times), so the calibration batch meets it unless the widest bits cannot. False
        returns the integer program's optimum for the predicted MSE alone.

    Returns
    -------
    Allocation — ``.config`` is the QuantConfig to use; ``.uniform_bits`` /
    ``.uniform_cost`` the cheapest uniform width that meets the same target.
    """
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    if not (isinstance(margin, (int, float)) and 0 < margin <= 1):
        raise ValueError(f"margin must be in (0, 1], got {margin!r}")
    given = sum(v is not None for v in (target_mse, target_sqnr_db, max_cost))
    if given != 1:
        raise ValueError("give exactly one of target_mse, target_sqnr_db and max_cost")
    weights = Uniform(8, granularity="channel") if weights is None else weights
    x, cands, table, fixed, reports = _prepare(net, x, weights, activations, candidates, seed)
    layers = list(table)
    costs, unit, fixed_cost, macs = _costs(net, x, reports[cands[-1]], layers, cands, cost,
                                           activations)
    n, k = len(layers), len(cands)
    c = np.array([costs[l][b] for l in layers for b in cands])
    m = np.array([table[l][b] for l in layers for b in cands])
    if max_cost is not None:
        cheapest = sum(costs[l][cands[0]] for l in layers) + fixed_cost
        if not (isinstance(max_cost, (int, float)) and max_cost >= cheapest):
            raise ValueError(f"max_cost {max_cost!r} is below the cheapest assignment "
                             f"({cands[0]} bits everywhere: {cheapest:.4g} {unit}"
                             + (f", of which {fixed_cost:.4g} for products of activations"
                                if fixed_cost else "") + ")")
        target = math.nan
        choice = _solve(c, m, n, k, cap=float(max_cost) - fixed_cost, minimize="mse")
        budget = math.inf
    else:
        target = _target(reports[cands[-1]], target_mse, target_sqnr_db) * margin
        budget = target - fixed
        best = sum(table[l][cands[-1]] for l in layers)
        if budget <= 0 or best > budget:
            raise ValueError(f"the target is out of reach: even {cands[-1]} bits everywhere "
                             f"give a predicted output MSE of {fixed + best:.3g} (activations "
                             f"{fixed:.3g}) against a target of {target:.3g} (after margin "
                             f"{margin}); allow more bits or a looser target")
        choice = _solve(c, m, n, k, cap=budget, minimize="cost")
        # the exact error of one batch fluctuates around the model (±25% for small nets):
        # where it misses the target on the calibration batch itself, plan tighter
        goal = target / margin
        for attempt in range(_VERIFY_ROUNDS + 1 if check_bool(verify, "plan_bits",
                                                              "verify") else 0):
            config = _config({l: cands[j] for l, j in zip(layers, choice)}, weights,
                             activations)
            exact = float(np.mean(analyze(net, x, config, seed=seed).exact ** 2))
            if exact <= goal or attempt == _VERIFY_ROUNDS or np.all(np.asarray(choice) == k - 1):
                break
            budget = max(budget * goal / exact, best)
            choice = _solve(c, m, n, k, cap=budget, minimize="cost")
    bits = {l: cands[j] for l, j in zip(layers, choice)}
    uniform = [b for b in cands if sum(table[l][b] for l in layers) <= budget]
    ub = uniform[0] if uniform and max_cost is None else None
    return Allocation(
        config=_config(bits, weights, activations), bits=bits,
        predicted_mse=fixed + sum(table[l][b] for l, b in bits.items()), target_mse=target,
        cost=sum(costs[l][b] for l, b in bits.items()) + fixed_cost, cost_unit=unit,
        uniform_bits=ub, uniform_cost=sum(costs[l][ub] for l in layers) + fixed_cost
        if ub is not None else math.nan, contributions=table, fixed_cost=fixed_cost,
        macs=macs)


def bits_for_share(net: Sequential, x: object, max_share: float, *,
                   target_mse: float | None = None, target_sqnr_db: float | None = None,
                   candidates: Iterable[int] = range(2, 9), weights: Uniform | None = None,
                   activations: Uniform | None = None, seed: int = 0) -> Allocation:
    """Budget inversion: the fewest bits per layer such that no layer carries more than
    ``max_share`` of the output error.

    With a target (``target_mse`` or ``target_sqnr_db``) each layer gets the fewest bits
    whose predicted contribution is at most ``max_share · target`` — a per-layer error
    budget. Without one, the share is of the predicted total, and the layer with the
    largest share is raised one width at a time until none exceeds ``max_share``.
    """
    if not (isinstance(max_share, (int, float)) and 0 < max_share <= 1):
        raise ValueError(f"max_share must be in (0, 1], got {max_share!r}")
    weights = Uniform(8, granularity="channel") if weights is None else weights
    x, cands, table, fixed, reports = _prepare(net, x, weights, activations, candidates, seed)
    layers = list(table)
    target = math.nan
    if target_mse is not None or target_sqnr_db is not None:
        target = _target(reports[cands[-1]], target_mse, target_sqnr_db)
        limit = max_share * target
        bits = {}
        for l in layers:
            ok = [b for b in cands if table[l][b] <= limit]
            if not ok:
                raise ValueError(f"layer {l!r} contributes {table[l][cands[-1]]:.3g} to the "
                                 f"output MSE even at {cands[-1]} bits, above its budget "
                                 f"{limit:.3g} ({max_share:.0%} of {target:.3g})")
            bits[l] = ok[0]
    else:
        if max_share * len(layers) < 1:
            raise ValueError(f"max_share {max_share} is below 1/{len(layers)}: {len(layers)} "
                             f"layers cannot each carry less than that")
        level = {l: 0 for l in layers}
        while True:
            part = {l: table[l][cands[level[l]]] for l in layers}
            total = fixed + sum(part.values())
            worst = max(part, key=part.get)
            if part[worst] <= max_share * total:
                break
            if level[worst] == len(cands) - 1:
                raise ValueError(f"layer {worst!r} carries {part[worst] / total:.1%} of the "
                                 f"output MSE even at {cands[-1]} bits (max_share {max_share})")
            level[worst] += 1
        bits = {l: cands[level[l]] for l in layers}
    costs, unit, _, _ = _costs(net, x, reports[cands[-1]], layers, cands, "params",
                               activations)
    return Allocation(
        config=_config(bits, weights, activations), bits=bits,
        predicted_mse=fixed + sum(table[l][b] for l, b in bits.items()), target_mse=target,
        cost=sum(costs[l][b] for l, b in bits.items()), cost_unit=unit,
        uniform_bits=None, uniform_cost=math.nan, contributions=table)

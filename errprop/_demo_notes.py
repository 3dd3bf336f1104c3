"""What ``errprop demo``'s report.md says about its own tables: a glossary of every column,
and where a worst-case bound is vacuous.

A bound is **vacuous** when it exceeds :data:`VACUOUS` times the largest exact error where
it is given, or that tensor's own largest ``|value|``: it is still a valid first-order
bound, but it says nothing about the quantized network there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._budget import Budget
from ._compare import Comparison
from ._report import Report

#: a bound above this many times the largest exact error (or above the largest |value|)
#: is reported as vacuous
VACUOUS = 100.0


def _vacuous(bound: float, exact: np.ndarray, value: np.ndarray) -> dict[str, Any]:
    largest = float(np.max(np.abs(exact))) if exact.size else 0.0
    scale = float(np.max(np.abs(value))) if value.size else 0.0
    return {"worst_case": float(bound), "max_abs_exact": largest, "max_abs_value": scale,
            "vacuous": bool(bound > VACUOUS * largest or bound > scale)}


def node_bounds(report: Report, comparison: Comparison) -> dict[str, dict[str, Any]]:
    """Per node of ``comparison``: its largest first-order worst case ("max worst"), the
    largest exact error and value there, and whether the bound is vacuous."""
    return {r.name: _vacuous(r.worst_case, report.nodes[r.name].exact,
                             report.nodes[r.name].value) for r in comparison.rows}


def budget_bounds(report: Report, budget: Budget) -> dict[str, dict[str, Any]]:
    """Per budget row: its first-order worst case at the output against the output's
    largest exact error and value."""
    return {r.name: _vacuous(r.worst_case, report.exact, report.output) for r in budget.rows}


def vacuous_line(bounds: dict[str, dict[str, Any]], what: str) -> str | None:
    """One sentence naming the vacuous bounds (None when there are none)."""
    bad = {k: v for k, v in bounds.items() if v["vacuous"]}
    if not bad:
        return None
    worst = max(bad, key=lambda k: bad[k]["worst_case"])
    b = bad[worst]
    return (f"Vacuous {what} (above {VACUOUS:g}× the largest exact error or the largest "
            f"|value| there; see the glossary) at {len(bad)} of {len(bounds)}: "
            f"{', '.join(bad)}. Largest: {b['worst_case']:.3g} at {worst}, where the exact "
            f"error is at most {b['max_abs_exact']:.3g} and |value| at most "
            f"{b['max_abs_value']:.3g}.")


GLOSSARY = f"""\
## Glossary

**Budget tables** (one row per layer, its sources quantized together; weights per channel,
activations per tensor):

- **layer**, **op**: the layer's node name and op type.
- **params**: the layer's parameter count.
- **bits**: its quantizers: W weight bits, A bits of the activation at its input.
- **injected MSE**: mean square of the error the layer's quantizers put into their tensors,
  under their error model (round to nearest with step s: s²/12 per element; zero for values
  already on the grid).
- **output MSE**: the layer's contribution to the output's mean square error, by
  first-order statistics (sources independent, so the rows add up to the total).
- **share**: output MSE over the total predicted output MSE.
- **gain**: output MSE over injected MSE: how much the network amplifies (> 1) or damps
  (< 1) this layer's error on its way to the output.
- **first-order worst case**: the largest |output error| over output elements when every
  error of the layer sits at the edge of its rounding box with the worst sign: the exact
  maximum of the first-order model, far above the RMS because all errors aligning is
  improbable. Not a certified bound on the real network (errprop's rigorous mode,
  `Report.rigorous_worst_case`, is).
- **exact MSE**: output MSE of the real fake-quantized network with only this layer
  quantized.
- The line under a table: the total predicted output MSE (how it was obtained), the exact
  output MSE with everything quantized, and the output SQNR = 20·log10(‖y‖/‖Δy‖) dB.

**Allocation tables**: bits per layer of the allocation and of the cheapest uniform width
that meets the target on the calibration batch; **cost (bits)**: Σ bits × weights;
**held-out SQNR dB** and **held-out accuracy**: exact fake-quant runs on inputs the plan
never saw.

**Per-node tables** (every node in execution order; RMS = root mean square over the node's
elements):

- **node**, **kind**: the node's name and op type (`Residual` for a join).
- **rms exact**: RMS of the exact error, fake-quantized minus float.
- **1st order**, **2nd order**: RMS of the first- and second-order predictions of that same
  error (the same rounding).
- **analytic ±se**: RMS error under the noise model, first order, from random probes with
  its standard error ("exact" at the output, from the exact statistics).
- **max worst (1st order)**: the largest first-order worst case at the node: exact at the output;
  elsewhere an interval bound (each layer's box pushed through |J|), which compounds layer
  by layer and loosens quickly in deep networks.
- **Monte Carlo [99% CI]**: RMS error of the real, nonlinear network under sampled noise,
  with its 99% confidence interval; **MSE vs MC**: (analytic − Monte Carlo) / Monte Carlo
  MSE; **!**, **~**: see the legend under each table.
- **notes**: where first order may be unreliable (size of the second-order terms, kinks
  within reach, saturated softmax).

**Vacuous bounds.** A worst case (budget) or max worst (per node) is marked vacuous when it
exceeds {VACUOUS:g}× the largest exact error there, or the largest |value| of the tensor it
bounds: it is still a valid first-order bound, but it says nothing useful about the
quantized network. report.json lists every bound with `max_abs_exact`, `max_abs_value`
and `vacuous`.
"""

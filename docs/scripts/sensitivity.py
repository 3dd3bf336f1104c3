"""Regenerate the MLP-versus-attention section of docs/validation.md and its figure.

    python docs/scripts/sensitivity.py            # tables on stdout, docs/figures/sensitivity.png

Blocks of width 32 (attention: 4 heads), 4 seeds x 8 input sequences, 200 Monte Carlo
samples per seed and setting (see docs/sensitivity.md for the method). Three sweeps:
logit scale at 16 tokens (input rounded to 8 and to 4 bits), sequence length at logit
scales 1 and 8, and depth at logit scales 1 and 8. A few minutes on 2 cores.
"""

import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import errprop as ep  # noqa: E402

FIGURE = Path(__file__).resolve().parents[1] / "figures" / "sensitivity.png"
COMMON = dict(d_model=32, heads=4, seeds=4, batch=8, samples=200)
SCALES = (0.25, 0.5, 1, 2, 4, 8, 16, 32)
# Okabe-Ito, safe for the common colour-vision deficiencies
BLUE, VERMILION, GREEN, ORANGE, PURPLE = "#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7"

COLUMNS = (("block", "block", "{}"), ("bits", "bits", "{}"), ("depth", "depth", "{}"),
           ("logit_scale", "logit scale", "{:g}"), ("tokens", "tokens", "{}"),
           ("top_prob", "top prob", "{:.2f}"), ("gain", "gain, 1st order", "{:.3g}"),
           ("gain_mc", "gain, MC", "{:.3g}"), ("mc_over_first_order", "MC / 1st", "{:.2f}"),
           ("cv", "CV, 1st", "{:.3f}"), ("cv_mc", "CV, MC", "{:.3f}"),
           ("miss", "miss per input", "{:.3f}"), ("residual", "resid 1st", "{:.2g}"),
           ("second_order_residual", "resid 2nd", "{:.2g}"))


def markdown(rows) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"]
    for r in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            v = getattr(r, key)
            cells.append("–" if isinstance(v, float) and v != v else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    start = time.perf_counter()
    by_scale = ep.compare_blocks(bits=(8, 4), depth=(1,), logit_scale=SCALES, tokens=(16,),
                                 **COMMON)
    print("## logit scale (16 tokens, depth 1)\n")
    print(markdown(by_scale.rows), flush=True)
    by_tokens = ep.compare_blocks(bits=(8,), depth=(1,), logit_scale=(1, 8),
                                  tokens=(4, 8, 16, 32), **COMMON)
    print("\n## sequence length (8 bits, depth 1)\n")
    print(markdown(by_tokens.rows), flush=True)
    by_depth = ep.compare_blocks(bits=(8,), depth=(1, 2, 4), logit_scale=(1, 8), tokens=(16,),
                                 **COMMON)
    print("\n## depth (8 bits, 16 tokens)\n")
    print(markdown(by_depth.rows), flush=True)
    plot(by_scale, by_tokens)
    print(f"\nwrote {FIGURE} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)


def plot(by_scale, by_tokens) -> None:
    def attn(result, bits, key, **match):
        rows = [r for r in result.rows if r.block == "attention" and r.bits == bits
                and all(getattr(r, k) == v for k, v in match.items())]
        return [r.logit_scale for r in rows], [getattr(r, key) for r in rows]

    def mlp(result, bits, key):
        return result.row("mlp", bits=bits, depth=1, tokens=16).__getattribute__(key)

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.6), constrained_layout=True)
    ax = axes[0, 0]
    s, g = attn(by_scale, 8, "gain")
    ax.plot(s, g, "-", color=BLUE, label="attention, first order")
    ax.plot(*attn(by_scale, 8, "gain_mc"), "o", color=BLUE, mfc="none",
            label="attention, Monte Carlo, 8 bits")
    ax.plot(*attn(by_scale, 4, "gain_mc"), "s", color=VERMILION, mfc="none",
            label="attention, Monte Carlo, 4 bits")
    ax.axhline(mlp(by_scale, 8, "gain"), color=GREEN, ls="--", label="MLP (first order = MC)")
    ax.set(xscale="log", yscale="log", xlabel="logit scale τ (factor on Wq, bq; dimensionless)",
           ylabel="noise gain (output / injected\nerror energy; dimensionless)",
           title="(a) gain grows with the logit scale")
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[0, 1]
    ax.plot(*attn(by_scale, 8, "cv"), "-", color=BLUE, label="attention, first order")
    ax.plot(*attn(by_scale, 8, "cv_mc"), "o", color=BLUE, mfc="none",
            label="attention, Monte Carlo, 8 bits")
    ax.plot(*attn(by_scale, 4, "cv_mc"), "s", color=VERMILION, mfc="none",
            label="attention, Monte Carlo, 4 bits")
    ax.axhline(mlp(by_scale, 8, "cv"), color=GREEN, ls="--", label="MLP, 8 bits")
    ax.axhline(mlp(by_scale, 4, "cv_mc"), color=ORANGE, ls=":", label="MLP, Monte Carlo, 4 bits")
    ax.set(xscale="log", xlabel="logit scale τ (factor on Wq, bq; dimensionless)",
           ylabel="CV of the gain over inputs\n(std / mean; dimensionless)",
           title="(b) unpredictability across inputs and seeds")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[1, 0]
    for bits, color, marker in ((8, BLUE, "o"), (4, VERMILION, "s")):
        ax.plot(*attn(by_scale, bits, "miss"), "-" + marker, color=color,
                label=f"attention, {bits} bits")
        ax.axhline(mlp(by_scale, bits, "miss"), color=color, ls="--", lw=1,
                   label=f"MLP, {bits} bits")
    ax.set(xscale="log", yscale="log", xlabel="logit scale τ (factor on Wq, bq; dimensionless)",
           ylabel="first-order miss per input\n(RMS of MC / 1st − 1; dimensionless)",
           title="(c) where first order breaks down")
    ax.legend(fontsize=8, loc="upper left", ncol=2)

    ax = axes[1, 1]
    tokens = sorted({r.tokens for r in by_tokens.rows})
    ax.plot(tokens, [by_tokens.row("mlp", tokens=t).cv for t in tokens], "--", color=GREEN,
            marker="^", label="MLP")
    for scale, color, marker in ((1.0, PURPLE, "o"), (8.0, BLUE, "s")):
        ax.plot(tokens, [by_tokens.row("attention", tokens=t, logit_scale=scale).cv
                         for t in tokens], "-" + marker, color=color,
                label=f"attention, τ = {scale:g}")
    ax.set(xscale="log", xlabel="sequence length (tokens)",
           ylabel="CV of the gain over inputs\n(std / mean; dimensionless)",
           title="(d) unpredictability versus sequence length (8 bits)")
    ax.set_xticks(tokens, [str(t) for t in tokens])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

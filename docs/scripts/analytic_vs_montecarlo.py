"""Regenerate the analytic-versus-Monte-Carlo table of docs/validation.md.

    python docs/scripts/analytic_vs_montecarlo.py

For a deep tanh MLP and a 2-block transformer at W8, W8A8 and W4A4 (weights per
channel, activations per tensor): the output MSE predicted analytically (first
order, exact reverse mode), by Monte Carlo of the real network in noise mode (99%
interval) and in quantize mode (real rounding with dither), the exact fake-quant
MSE, and the first- and second-order residuals of the exact error.
"""

import time

import numpy as np

import errprop as ep

MODELS = {
    "MLP tanh 16-64x6-8": (lambda: ep.mlp([16] + [64] * 6 + [8], "tanh", seed=0), (64, 16)),
    "transformer d16 2 blocks": (lambda: ep.transformer(16, 2, 32, 2, seed=0), (4, 6, 16)),
}


def config(w: int, a: int | None) -> ep.QuantConfig:
    return ep.QuantConfig(weights=ep.Uniform(w, granularity="channel"),
                          activations=None if a is None else ep.Uniform(a))


def main() -> None:
    start = time.perf_counter()
    print("| model | config | analytic MSE | Monte Carlo MSE [99% CI] | quantize-mode MSE "
          "[99% CI] | exact MSE | 1st-order resid | 2nd-order resid |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, (make, shape) in MODELS.items():
        net = make()
        x = np.random.default_rng(5).standard_normal(shape)
        for label, cfg in (("W8", config(8, None)), ("W8A8", config(8, 8)),
                           ("W4A4", config(4, 4))):
            r = ep.analyze(net, x, cfg)
            mc = ep.monte_carlo(net, x, cfg, samples=2000, seed=11, quantiles=())
            mq = ep.monte_carlo(net, x, cfg, samples=2000, seed=11, mode="quantize",
                                quantiles=())
            print(f"| {name} | {label} | {r.mse:.4g} | {mc.mse:.4g} [{mc.mse_ci[0]:.4g}, "
                  f"{mc.mse_ci[1]:.4g}] | {mq.mse:.4g} [{mq.mse_ci[0]:.4g}, {mq.mse_ci[1]:.4g}] "
                  f"| {r.exact_mse:.4g} | {r.residual:.3g} | {r.second_order_residual:.3g} |")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

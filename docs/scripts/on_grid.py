"""Values on the grid: what the grid-aware error model predicts against the exact run.

Prints, for the shipped digits MLP at 8-bit activations (each activation source alone, on
its 450 held-out images), the fraction of exact zeros, the exact output MSE and the
predicted one; and the issue-14 cases (zero bias, LayerNorm beta = 0, zero input into
RMSNorm). Run: python docs/scripts/on_grid.py
"""

import numpy as np

import errprop as ep


def main() -> None:
    net, X, _ = ep.digits_mlp()
    layers = ["fc1", "fc2", "fc3"]
    print("digits MLP, Uniform(8) activations, one source at a time")
    print(f"{'source':<8} {'zeros':>6} {'exact MSE':>10} {'predicted':>10} {'ratio':>6}")
    for layer in layers:
        cfg = ep.QuantConfig(activations=ep.Uniform(8),
                             overrides={k: {"activations": None} for k in layers if k != layer})
        r = ep.analyze(net, X, cfg)
        exact = float(np.mean(r.exact ** 2))
        zeros = float(np.mean(r.sources[f"{layer}.in"].value == 0))
        print(f"{layer + '.in':<8} {zeros:>6.1%} {exact:>10.3g} {r.mse:>10.3g} "
              f"{r.mse / exact:>6.2f}")
    rng = np.random.default_rng(0)
    W, x = rng.standard_normal((4, 16)), rng.standard_normal((64, 16))
    cases = {
        "Linear, zero bias, W8 b8": (ep.Sequential([ep.Linear(W, np.zeros(4))]), x,
                                     ep.QuantConfig(weights=ep.Uniform(8),
                                                    biases=ep.Uniform(8))),
        "LayerNorm beta=0 gamma=1, norms=8": (
            ep.Sequential([ep.Linear(rng.standard_normal((32, 16))),
                           ep.LayerNorm(np.ones(32), np.zeros(32))]), x,
            ep.QuantConfig(norms=ep.Uniform(8))),
        "zero input into RMSNorm, input=8": (ep.Sequential([ep.RMSNorm(np.ones(8))]),
                                             np.zeros((4, 8)),
                                             ep.QuantConfig(input=ep.Uniform(8))),
    }
    print()
    for name, (n, xi, cfg) in cases.items():
        r = ep.analyze(n, xi, cfg)
        print(f"{name:<36} exact {np.mean(r.exact ** 2):.3g}  predicted {r.mse:.3g}")


if __name__ == "__main__":
    main()

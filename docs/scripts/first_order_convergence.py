"""Regenerate the first-order convergence table of docs/validation.md.

    python docs/scripts/first_order_convergence.py

Weight-only round-to-nearest quantization (per tensor), bits 6..12. Each
column is one seeded network; each cell the relative residual
‖exact − first_order‖ / ‖exact‖ at the output. The same setups are asserted
in tests/test_convergence.py.
"""

import time

import numpy as np

import errprop as ep

BITS = range(6, 13)


def main() -> None:
    start = time.perf_counter()
    x_mlp = np.random.default_rng(100).standard_normal((256, 32))
    x_tf = np.random.default_rng(7).standard_normal((8, 16, 64))
    tf_config = lambda b: ep.QuantConfig(weights=ep.Uniform(b), biases=ep.Uniform(b),  # noqa: E731
                                         norms=ep.Uniform(b))
    columns = {
        "MLP tanh": ep.convergence(ep.mlp([32] + [256] * 8 + [10], "tanh", seed=0), x_mlp, BITS),
        "MLP GELU": ep.convergence(ep.mlp([32] + [256] * 8 + [10], "gelu", seed=0), x_mlp, BITS),
        "MLP SiLU": ep.convergence(ep.mlp([32] + [256] * 8 + [10], "silu", seed=0), x_mlp, BITS),
        "MLP ReLU": ep.convergence(ep.mlp([32] + [256] * 8 + [10], "relu", seed=0), x_mlp, BITS),
        "transformer pre-norm": ep.convergence(
            ep.transformer(64, 4, 256, 2, norm="pre", seed=3), x_tf, BITS, config=tf_config),
        "transformer post-norm": ep.convergence(
            ep.transformer(64, 4, 256, 2, norm="post", seed=3), x_tf, BITS, config=tf_config),
    }
    names = list(columns)
    print("| bits | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for i, b in enumerate(BITS):
        print(f"| {b} | " + " | ".join(f"{columns[n].rows[i].residual:.2e}" for n in names) + " |")
    print("| **factor per bit** | " + " | ".join(f"**{columns[n].factor_per_bit:.2f}**"
                                              for n in names) + " |")
    print("| RMS mismatch at 8 bits | " + " | ".join(
        f"{columns[n].rows[2].rms_residual:.1e}" for n in names) + " |")
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()

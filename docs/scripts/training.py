"""Numbers of docs/validation.md, "Training-time arithmetic and bit robustness".

    python docs/scripts/training.py        (about a minute)

WAGE gradient error (analytic vs Monte Carlo), unbiasedness of stochastic rounding, the
bit curve of the digits MLP, the quantization penalty (value, gradient check, a short
penalized fine-tune) and the near-threshold weights of the digits MLP.
"""

import time

import numpy as np

import errprop as ep


def wage_tables() -> None:
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((32, 6)), rng.standard_normal((32, 4))
    labels = np.random.default_rng(5).integers(0, 4, 32)
    net = ep.mlp([6, 16, 12, 4], "tanh", seed=0)
    print("## WAGE: tanh MLP 6-16-12-4, batch 32, 2000 Monte Carlo backward passes\n")
    for config, reference in [(ep.WAGE(shift="ceil"), "ste"), (ep.WAGE(), "ste"),
                              (ep.WAGE(bits_e=6, bits_g=6, shift="ceil"), "ste"),
                              (ep.WAGE(bits_w=2), "float_operands")]:
        for loss, target in [("mse", t), ("cross_entropy", labels)]:
            res = ep.gradient_error(net, x, target, config, loss=loss, samples=2000, seed=1,
                                    reference=reference)
            print(f"{config.bits_w}-{config.bits_a}-{config.bits_g}-{config.bits_e}, "
                  f"shift={config.shift}, reference={reference}, {loss}")
            print(res.table(), "\n")
    digits, xd, yd = ep.digits_mlp()
    print("## WAGE 8-8-8-8 on the digits MLP (128 test images, cross-entropy, 300 passes)\n")
    for smooth in (True, False):
        res = ep.gradient_error(digits, xd[:128], yd[:128], ep.WAGE(shift="ceil"),
                                loss="cross_entropy", samples=300, seed=0, smooth=smooth)
        print(f"smooth={smooth}")
        print(res.table(), "\n")


def unbiased() -> None:
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((32, 6)), rng.standard_normal((32, 4))
    net = ep.mlp([6, 16, 12, 4], "relu", seed=2)
    S = 800
    print("## Stochastic rounding is unbiased: mean z² of the per-element mean gradient "
          "error (1 ± sqrt(2/n) if unbiased)\n")
    res = ep.gradient_error(net, x, t, ep.WAGE(bits_e=6, bits_g=6, shift="ceil"),
                            samples=S, seed=7)
    parts = []
    for row in res.rows:
        live = res.mc_var[row.layer] > 0
        z2 = res.mc_mean[row.layer][live] ** 2 / (res.mc_var[row.layer][live] / S)
        parts.append(f"{row.layer} {np.mean(z2):.3g} (n={z2.size})")
    print("stochastic: " + ", ".join(parts))
    floor = ep.gradient_error(net, x, t, ep.WAGE(bits_e=6, bits_g=6, shift="ceil",
                                                 rounding_e="floor", rounding_g="floor"),
                              samples=50, seed=7)
    print("floor, share of the gradient MSE that is bias (measured / analytic): " + ", ".join(
        f"{r.layer} {r.bias_mc / r.mse_mc:.3f} / {r.bias_analytic / r.mse_analytic:.3f}"
        for r in floor.rows))
    print()


def curve() -> None:
    net, x, _ = ep.digits_mlp()
    print("## Bit curve: digits MLP, per-channel weights, 450 test images, 300 samples\n")
    print(ep.bit_curve(net, x, samples=300, seed=0).table(), "\n")


def _logits(net: ep.Sequential) -> ep.Sequential:
    return ep.Sequential([op for _, op in net.layers() if not isinstance(op, ep.Softmax)])


def penalty() -> None:
    net, x, _ = ep.digits_mlp()
    xcal = ep.digits_mlp("calibration")[1]
    logits = _logits(net)
    q = ep.Uniform(4, granularity="channel")
    pen = ep.QuantizationPenalty(logits, xcal, q)
    value, grads = pen.value_and_grad()
    rep = ep.analyze(logits, xcal, ep.QuantConfig(weights=q))
    W = [w.copy() for w in pen.weights]
    biases = [op.params["b"] for _, op in logits.layers() if isinstance(op, ep.Linear)]
    worst = 0.0
    rng = np.random.default_rng(0)
    for l, Wl in enumerate(W):
        for _ in range(5):
            i, j = (int(rng.integers(0, n)) for n in Wl.shape)
            up, dn = [w.copy() for w in W], [w.copy() for w in W]
            up[l][i, j] += 1e-6
            dn[l][i, j] -= 1e-6
            fd = (pen.value(*up) - pen.value(*dn)) / 2e-6
            floor = 1e-3 * np.abs(grads[l]).max()
            worst = max(worst, abs(fd - grads[l][i, j]) / max(abs(fd), floor))
    print("## Quantization penalty, digits MLP logits, W4 per channel, 270 calibration "
          "images\n")
    print(f"R(W) = {value:.6g}, analyze(...).mse = {rep.mse:.6g}, relative difference "
          f"{abs(value / rep.mse - 1):.1e}; gradient vs central differences (15 entries): "
          f"max relative error {worst:.1e}\n")
    # fine-tune: distillation to the float logits on the calibration images + λ R, Adam
    t0 = time.perf_counter()
    lam, steps = 0.2, 150
    y0c = logits(xcal)
    Ws = [w.copy() for w in W]
    m1 = [np.zeros_like(w) for w in Ws]
    m2 = [np.zeros_like(w) for w in Ws]
    for it in range(1, steps + 1):
        _, gd = _distill(Ws, biases, xcal, y0c)
        _, gr = pen.value_and_grad(*Ws)
        for k, (a, b) in enumerate(zip(gd, gr)):
            g = a + lam * b
            m1[k] = 0.9 * m1[k] + 0.1 * g
            m2[k] = 0.999 * m2[k] + 0.001 * g * g
            Ws[k] = Ws[k] - 1e-3 * (m1[k] / (1 - 0.9 ** it)) / (
                np.sqrt(m2[k] / (1 - 0.999 ** it)) + 1e-12)
    labels = ep.digits_mlp()[2]
    print(f"Fine-tuning on the calibration images with distillation + {lam}·R ({steps} Adam "
          f"steps, {time.perf_counter() - t0:.1f} s); test images, W4 per channel:\n")
    print("| weights | first-order MSE / mean y² | exact MSE / mean y² | float accuracy | "
          "W4 accuracy |\n|---|---|---|---|---|")
    for label, weights in (("original", W), ("fine-tuned", Ws)):
        model = _relu_mlp(weights, biases)
        rep = ep.analyze(model, x, ep.QuantConfig(weights=q))
        y = model(x)
        sig = float(np.mean(y * y))
        print(f"| {label} | {rep.mse / sig:.4f} | {rep.exact_mse / sig:.4f} | "
              f"{np.mean(np.argmax(y, 1) == labels):.1%} | "
              f"{np.mean(np.argmax(y + rep.exact, 1) == labels):.1%} |")
    print()


def _relu_mlp(Ws: list, bs: list) -> ep.Sequential:
    layers: list = []
    for W, b in zip(Ws, bs):
        layers += [ep.Linear(W, b), ep.Activation("relu")]
    return ep.Sequential(layers[:-1])


def _distill(Ws: list, bs: list, x: np.ndarray, y0: np.ndarray) -> tuple[float, list]:
    """``mean((f_W(x) - y0)²)`` of a ReLU MLP and its gradient by backpropagation."""
    a, zs = [x], []
    for l, (W, b) in enumerate(zip(Ws, bs)):
        z = a[-1] @ W.T + b
        zs.append(z)
        a.append(np.maximum(z, 0.0) if l < len(Ws) - 1 else z)
    r = a[-1] - y0
    g, grads = 2 * r / r.size, [None] * len(Ws)
    for l in range(len(Ws) - 1, -1, -1):
        grads[l] = g.T @ a[l]
        g = g @ Ws[l]
        if l:
            g = g * (zs[l - 1] > 0)
    return float(np.mean(r * r)), grads


def thresholds() -> None:
    net, x, _ = ep.digits_mlp()
    print("## Near-threshold weights: digits MLP, eps = 0.05 step\n")
    for bits in (4, 8):
        tw = ep.threshold_weights(net, x, ep.Uniform(bits, granularity="channel"), eps=0.05)
        print(f"W{bits} per channel: output MSE first order {tw.mse:.3g}, exact "
              f"{tw.exact_mse:.3g}")
        print(tw.table(), "\n")


if __name__ == "__main__":
    start = time.perf_counter()
    wage_tables()
    unbiased()
    curve()
    penalty()
    thresholds()
    print(f"total {time.perf_counter() - start:.1f} s")

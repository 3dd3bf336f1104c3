"""Command-line interface: ``errprop demo`` (more commands arrive with later features)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np

from ._analysis import analyze
from ._builders import mlp, transformer
from ._config import QuantConfig
from ._quant import Uniform


def _demo(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    models = [
        ("6-layer GELU MLP, 64 -> 256 x5 -> 10, batch 128",
         mlp([64, 256, 256, 256, 256, 256, 10], "gelu", seed=args.seed),
         rng.standard_normal((128, 64))),
        ("2-block pre-norm transformer, d_model 64, 4 heads, d_ff 256, batch 8 x 16 tokens",
         transformer(64, 4, 256, 2, seed=args.seed),
         rng.standard_normal((8, 16, 64))),
    ]
    for title, net, x in models:
        for bits in args.bits:
            for label, config in (
                    (f"W{bits} (weights only, per-channel)",
                     QuantConfig(weights=Uniform(bits, granularity="channel"))),
                    (f"W{bits}A{bits} (weights per-channel, activations per-tensor)",
                     QuantConfig(weights=Uniform(bits, granularity="channel"),
                                 activations=Uniform(bits)))):
                start = time.perf_counter()
                report = analyze(net, x, config, seed=args.seed)
                took = time.perf_counter() - start
                print(f"\n== {title}\n== {label}: output SQNR {report.sqnr_db:.1f} dB, "
                      f"first-order residual {report.residual:.3g} ({took * 1e3:.0f} ms)\n")
                print(report.table())
    return 0


def _bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer, got {text!r}") from None
    if not 2 <= value <= 16:
        raise argparse.ArgumentTypeError(f"bits must be from 2 to 16, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="errprop",
        description="Simulate how quantization error enters a neural network and propagates "
                    "through its layers: exact (fake-quant) and first-order, per node and source.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="analyse built-in seeded models (an MLP and a transformer)",
        description="Build a seeded 6-layer MLP and a 2-block transformer, quantize weights "
                    "(and weights + activations) at each bit width, and print the exact "
                    "versus first-order error at every node.")
    demo.add_argument("--bits", type=_bits, nargs="+", default=[8, 4], metavar="B",
                      help="bit widths to analyse (default: 8 4)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed for the models, the inputs and stochastic rounding (default 0)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:
        print(f"errprop: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

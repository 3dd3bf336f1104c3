"""Command-line interface: ``errprop demo``, ``errprop analyze MODEL``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

import numpy as np

from . import _cli_analyze, _cli_budget, _cli_compare
from ._analysis import analyze
from ._builders import mlp, transformer
from ._config import QuantConfig
from ._montecarlo import monte_carlo
from ._quant import Uniform


def _demo(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    models = [
        ("6-layer GELU MLP, 64 -> 256 x5 -> 10, batch 128",
         mlp([64, 256, 256, 256, 256, 256, 10], "gelu", seed=args.seed),
         rng.standard_normal((128, 64))),
        ("2-block pre-norm transformer, d_model 32, 4 heads, d_ff 128, batch 4 x 8 tokens",
         transformer(32, 4, 128, 2, seed=args.seed),
         rng.standard_normal((4, 8, 32))),
    ]
    for title, net, x in models:
        for bits in args.bits:
            weights = Uniform(bits, granularity="channel")
            start = time.perf_counter()
            w_only = analyze(net, x, QuantConfig(weights=weights), seed=args.seed)
            config = QuantConfig(weights=weights, activations=Uniform(bits))
            report = analyze(net, x, config, seed=args.seed)
            mc = monte_carlo(net, x, config, samples=args.samples, seed=args.seed,
                             quantiles=())
            comparison = report.compare(mc, seed=args.seed)
            took = time.perf_counter() - start
            print(f"\n== {title}")
            print(f"== W{bits} (weights per channel): output SQNR {w_only.sqnr_db:.1f} dB; "
                  f"residual of the exact error: first order {w_only.residual:.3g}, "
                  f"second order {w_only.second_order_residual:.3g}")
            print(f"== W{bits}A{bits} (+ activations per tensor): output SQNR "
                  f"{report.sqnr_db:.1f} dB; output MSE exact {report.exact_mse:.3g}, "
                  f"analytic {report.mse:.3g}, Monte Carlo {mc.mse:.3g} "
                  f"[{mc.mse_ci[0]:.3g}, {mc.mse_ci[1]:.3g}] ({took:.1f} s)\n")
            print(comparison.table())
            if comparison.flagged:
                print(f"first order breaks down at: {', '.join(comparison.flagged)}")
    return 0


def _bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer, got {text!r}") from None
    if not 2 <= value <= 16:
        raise argparse.ArgumentTypeError(f"bits must be from 2 to 16, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """Bad command lines get one line on stderr (and the pointer to --help), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="errprop",
        description="Simulate how quantization error enters a neural network and propagates "
                    "through its layers: exact (fake-quant) and first-order, per node and source.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="analyse built-in seeded models (an MLP and a transformer)",
        description="Build a seeded 6-layer MLP and a 2-block transformer, quantize weights "
                    "and activations at each bit width, and print per node the exact error, "
                    "its first- and second-order predictions, the analytic (noise-model) "
                    "RMS, Monte Carlo with its 99%% interval, and where first order breaks "
                    "down.")
    demo.add_argument("--bits", type=_bits, nargs="+", default=[8, 4], metavar="B",
                      help="bit widths to analyse (default: 8 4)")
    demo.add_argument("--samples", type=int, default=300,
                      help="Monte Carlo samples per configuration (default 300)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed for the models, the inputs and stochastic rounding (default 0)")
    demo.set_defaults(func=_demo)
    _cli_analyze.add_parser(sub, _bits)
    _cli_budget.add_parsers(sub, _bits)
    _cli_compare.add_parser(sub, _bits)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, ImportError, OSError) as exc:
        print(f"errprop: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``errprop budget MODEL`` and ``errprop allocate MODEL``: the error budget table (or, with
``--matrix`` / ``--split``, the source × node uncertainty budget or the local / propagated
split) and a mixed-precision bit allocation, from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._cli_types import number
from ._allocate import COSTS, plan_bits
from ._analysis import analyze
from ._budget import COLUMNS
from ._cli_analyze import add_model_arguments, load_model
from ._config import QuantConfig
from ._files import write_text
from ._graph import unknown_name_message
from ._quant import Uniform

FORMATS = ("text", "markdown", "csv", "json", "latex")

BUDGET = """\
Quantize MODEL and print its error budget: per layer (or per source) the parameter count,
bits, the mean square error the quantizer injects (under its noise model), the layer's
contribution to the output MSE (first-order statistics; the actual rounding's first-order
energy for models too large for exact statistics), its share, the gain (output MSE per
unit injected MSE), the first-order worst case, and the exact output MSE with only that
row quantized. SQNR is 20*log10(||y|| / ||y - y_q||) dB, as PyTorch's numeric suite and
ONNX Runtime define it.

--matrix [NODE] prints instead the uncertainty budget (GUM) at the output node, or at NODE:
per source (per layer with --by layer) its standard uncertainty u(x_s), the sensitivity
coefficient c_s, the component u_s, its share of the node's variance with a standard error
(from --probes random probes), the measured share for the actual rounding and the
interval worst case. csv and json hold every (node, source) record, whatever NODE.

--split prints instead, per layer, the error made there (local: the layer's own sources
quantized, float input) versus the error arriving from upstream (propagated: the float
layer on the quantized network's input), their interaction, and the layer's noise gain
(sum of propagated^2 / sum of input error^2), measured, first order and under the error
model. See docs/budgets.md.
"""

ALLOCATE = """\
Choose per-layer weight bits for MODEL: the least cost (model bits, or bit-operations)
whose predicted output error meets --target-sqnr / --target-mse, or the least error within
--max-cost. Each layer's contribution is measured at every candidate width (one analysis
per width), and the choice is an exact integer program. Prints the bits, the predicted
error, the cost, the cheapest uniform width for comparison, and the exact SQNR of both on
the given batch.
"""


def _emit(text: str, args: argparse.Namespace, name: str) -> None:
    print(text, end="" if text.endswith("\n") else "\n")
    if args.out is not None:
        path = write_text(Path(args.out) / name, text if text.endswith("\n") else text + "\n")
        print(f"wrote {path}")


def _config(args: argparse.Namespace) -> QuantConfig:
    return QuantConfig(
        weights=Uniform(args.weights, granularity=args.granularity),
        activations=None if args.activations is None else Uniform(args.activations),
        embeddings=None if args.embeddings is None else Uniform(args.embeddings,
                                                                granularity="channel"))


def _render(table: Any, fmt: str, **node: str | None) -> str:
    """``table`` (a Budget, BudgetMatrix or LayerSplit) in format ``fmt``; ``node`` goes to
    the one-node views of a BudgetMatrix (text, markdown, latex)."""
    return {"text": lambda: table.table(**node), "markdown": lambda: table.to_markdown(**node),
            "latex": lambda: table.to_latex(**node), "csv": table.to_csv,
            "json": table.to_json}[fmt]()


def run_budget(args: argparse.Namespace) -> int:
    _, net, x, what = load_model(args)
    report = analyze(net, x, _config(args), seed=args.seed)
    if args.matrix is not None:
        node = args.matrix or None  # a bare --matrix: the output node
        if node is not None and node not in report.nodes:  # before the probe passes
            raise ValueError(f"--matrix: {unknown_name_message('node', node, list(report.nodes))}")
        matrix = report.budget_matrix(by=args.by, probes=args.probes, seed=args.seed)
        name, text = "matrix", _render(matrix, args.format, node=node)
    elif args.split:
        # the matrix only feeds the error-model columns (variances): no worst-case passes
        model = report.budget_matrix(by=args.by, probes=args.probes, seed=args.seed,
                                     worst=False)
        name, text = "split", _render(report.layer_split(model), args.format)
    else:
        budget = report.budget(by=args.by, exact=not args.no_exact).sort(
            args.sort, descending=args.sort != "name")
        name, text = "budget", _render(budget, args.format)
    if args.format == "text":
        text = f"== {what}\n{text}"
    suffix = {"text": "txt", "markdown": "md", "csv": "csv", "json": "json", "latex": "tex"}
    _emit(text, args, f"{name}.{suffix[args.format]}")
    return 0


def run_allocate(args: argparse.Namespace) -> int:
    targets = [v is not None for v in (args.target_sqnr, args.target_mse, args.max_cost)]
    if sum(targets) != 1:
        raise ValueError("give exactly one of --target-sqnr, --target-mse and --max-cost")
    _, net, x, what = load_model(args)
    weights = Uniform(8, granularity=args.granularity)
    activations = None if args.activations is None else Uniform(args.activations)
    plan = plan_bits(net, x, target_mse=args.target_mse, target_sqnr_db=args.target_sqnr,
                     max_cost=args.max_cost, candidates=args.candidates, cost=args.cost,
                     weights=weights, activations=activations, margin=args.margin,
                     seed=args.seed)
    allocated = analyze(net, x, plan.config, seed=args.seed)
    lines = [f"== {what}", plan.table(),
             f"exact on this batch: allocation {allocated.sqnr_db:.1f} dB SQNR"]
    if plan.uniform_bits is not None:
        uniform = analyze(net, x, QuantConfig(weights=weights.with_bits(plan.uniform_bits),
                                              activations=activations), seed=args.seed)
        lines[-1] += f", uniform {plan.uniform_bits} bits {uniform.sqnr_db:.1f} dB SQNR"
    if args.format == "json":
        import json
        text = json.dumps({"bits": plan.bits, "predicted_mse": plan.predicted_mse,
                           "target_mse": None if plan.target_mse != plan.target_mse
                           else plan.target_mse, "cost": plan.cost, "cost_unit": plan.cost_unit,
                           "uniform_bits": plan.uniform_bits,
                           "exact_sqnr_db": allocated.sqnr_db}, indent=1) + "\n"
    elif args.format == "csv":
        text = "layer,bits,predicted_output_mse\n" + "".join(
            f"{l},{b},{plan.contributions[l][b]!r}\n" for l, b in plan.bits.items())
    else:
        text = "\n".join(lines) + "\n"
    _emit(text, args, {"text": "allocation.txt", "json": "allocation.json",
                       "csv": "allocation.csv"}[args.format])
    return 0


_positive = number(float, low=0, above=True, what="a positive number")


def add_parsers(sub: Any, bits_type: Any) -> None:
    p = sub.add_parser("budget", help="per-layer (or per-source) error budget table",
                       description=BUDGET, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, bits_type)
    table = p.add_mutually_exclusive_group()
    table.add_argument("--matrix", nargs="?", const="", default=None, metavar="NODE",
                       help="instead of the budget table: the source x node uncertainty "
                            "budget at the output, or at NODE (text, markdown, latex); csv "
                            "and json hold every node. Put it after MODEL")
    table.add_argument("--split", action="store_true",
                       help="instead of the budget table: per layer, local versus "
                            "propagated error and the noise gain")
    p.add_argument("--by", choices=("layer", "source"), default="layer",
                   help="one row per layer (its sources together) or per source; for "
                        "--matrix the columns (default layer)")
    p.add_argument("--sort", choices=COLUMNS, default="output_mse",
                   help="column to sort the budget table by, largest first (default "
                        "output_mse); --matrix sorts by component, --split keeps the "
                        "network's order")
    p.add_argument("--probes", type=int, default=64, metavar="P",
                   help="random probes per column of --matrix / --split (default 64; "
                        "standard error about sqrt(2/P))")
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="table format: text (terminal), markdown, csv, json, latex (booktabs)")
    p.add_argument("--no-exact", action="store_true",
                   help="skip the exact single-row fake-quant runs of the budget table "
                        "(faster on big models)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="also write the table to DIR/budget.<ext> (DIR/matrix.<ext>, "
                        "DIR/split.<ext>), written whole or not at all")
    p.set_defaults(func=run_budget)

    a = sub.add_parser("allocate", help="per-layer weight bits for a target error or cost",
                       description=ALLOCATE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(a, bits_type, weights_default=None)
    a.add_argument("--target-sqnr", type=float, metavar="DB",
                   help="output SQNR to stay above, in dB")
    a.add_argument("--target-mse", type=_positive, metavar="MSE",
                   help="output mean squared error to stay under")
    a.add_argument("--max-cost", type=_positive, metavar="C",
                   help="cost not to exceed (in the --cost unit); minimises the error")
    a.add_argument("--candidates", type=bits_type, nargs="+", default=list(range(2, 9)),
                   metavar="B", help="bit widths to choose from (default 2 3 4 5 6 7 8)")
    a.add_argument("--cost", choices=COSTS, default="params",
                   help="params: bits x weights (model size); bitops: MACs x weight bits x "
                        "activation bits per input (default params)")
    a.add_argument("--margin", type=float, default=0.8,
                   help="plan for margin x target so fresh inputs meet it too (default 0.8)")
    a.add_argument("--format", choices=("text", "json", "csv"), default="text",
                   help="output format (default text)")
    a.add_argument("--out", type=Path, metavar="DIR",
                   help="also write the result to DIR/allocation.<ext>")
    a.set_defaults(func=run_allocate)

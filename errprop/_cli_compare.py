"""``errprop compare``: MLP versus attention blocks, noise gain side by side."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._cli_types import number
from ._files import write_text
from ._sensitivity import BLOCKS, FORMATS, compare_blocks

DESCRIPTION = """\
Build stacks of MLP blocks (LayerNorm -> Linear(d, 2d) -> GELU -> Linear(2d, d)) and of
attention blocks (LayerNorm -> multi-head self-attention) at the same width and depth,
with matched parameter counts (4d²+3d against 4d²+4d per block), from the same seeds and
on the same Gaussian inputs. Inject input noise by rounding the input to B bits
(symmetric, per tensor, step s = max|x|/(2^(B-1)-1), round to nearest: variance s²/12)
and report, per block type and setting, the noise gain (output error energy per unit
injected error energy) by first order (exact reverse-mode statistics) and by Monte Carlo
of the real network, the ratio of the two, the coefficient of variation of the gain over
input sequences and seeds, how far first order misses each input's gain, and the
first- and second-order residuals of the exact rounding error. Every combination of the
listed values is run. The logit scale multiplies the attention's Wq and bq, so the
logits are multiplied by it exactly (softmax temperature 1/scale).

columns: block, bits, L (depth), scale (logit scale), T (tokens), top p (mean largest
attention probability, first block), gain 1st / gain MC, MC/1st, CV 1st / CV MC, miss,
resid 1st / resid 2nd. --out writes every column (CSV and JSON).
"""


_positive_int = number(int, low=1, what="a positive integer")
_positive_float = number(float, low=0, above=True, what="a positive number")


def add_parser(sub: Any, bits_type: Any) -> None:
    p = sub.add_parser("compare", help="MLP versus attention: noise gain and its spread",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=bits_type, nargs="+", default=[8], metavar="B",
                   help="input rounding bits; the injected noise has RMS step/sqrt(12) "
                        "(default: 8)")
    p.add_argument("--depth", type=_positive_int, nargs="+", default=[1], metavar="L",
                   help="blocks per stack (default: 1)")
    p.add_argument("--logit-scale", type=_positive_float, nargs="+",
                   default=[0.5, 1.0, 2.0, 4.0, 8.0], metavar="S",
                   help="factors on the attention's Wq and bq; the logits' spread within a "
                        "row is about S (default: 0.5 1 2 4 8)")
    p.add_argument("--tokens", type=_positive_int, nargs="+", default=[16], metavar="T",
                   help="sequence lengths (default: 16)")
    p.add_argument("--d-model", type=_positive_int, default=32, metavar="D",
                   help="width d of every block (default: 32)")
    p.add_argument("--heads", type=_positive_int, default=4, metavar="H",
                   help="attention heads, must divide --d-model (default: 4)")
    p.add_argument("--seeds", type=_positive_int, default=4, metavar="N",
                   help="seeds 0..N-1; each draws new weights, inputs and noise (default: 4)")
    p.add_argument("--batch", type=_positive_int, default=8, metavar="N",
                   help="input sequences per seed (default: 8)")
    p.add_argument("--samples", type=_positive_int, default=200, metavar="N",
                   help="Monte Carlo samples per seed and setting, at least 2 (default: 200)")
    p.add_argument("--blocks", choices=BLOCKS, nargs="+", default=list(BLOCKS),
                   help="block types to run (default: both)")
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="terminal table: aligned text, Markdown or CSV (default: text)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="also write compare.csv and compare.json (every column, the "
                        "settings) into DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = compare_blocks(d_model=args.d_model, heads=args.heads, bits=args.bits,
                            depth=args.depth, logit_scale=args.logit_scale,
                            tokens=args.tokens, seeds=args.seeds, batch=args.batch,
                            samples=args.samples, blocks=args.blocks)
    print(result.table(args.format).rstrip("\n"))
    if args.format != "csv":
        print(f"({result.seconds:.1f} s; gain = output error energy / injected error energy)")
    if args.out is not None:
        write_text(args.out / "compare.csv", result.to_csv())
        write_text(args.out / "compare.json", result.to_json())
        if args.format != "csv":
            print(f"wrote {args.out}/compare.csv, compare.json")
    return 0

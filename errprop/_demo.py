"""``errprop demo``: budgets, bit allocation, a report and figures on three built-in models.

The models: a seeded GELU MLP, a seeded 2-block transformer, and a real ReLU MLP trained
on scikit-learn's digits (shipped in ``errprop/data/digits-mlp``, see
``docs/scripts/train_digits_mlp.py`` and :func:`digits_mlp`). For each, at every bit
width: the error budget per layer (weights per channel, activations per tensor), exact
versus first order versus Monte Carlo at every node, and a per-layer weight-bit allocation
for a target SQNR, planned on one batch and verified by exact fake-quant runs on held-out
inputs against the cheapest uniform width (plus classification accuracy for the digits).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ._export import json_text
from ._cli_types import number
from ._allocate import Allocation, plan_bits
from ._analysis import analyze
from ._builders import mlp, transformer
from ._compare import Comparison
from ._config import QuantConfig
from ._demo_figures import allocation_figure, budget_figure, growth_figure, save_png
from ._demo_notes import GLOSSARY, budget_bounds, node_bounds, vacuous_line
from ._files import write_text
from ._graph import Sequential
from ._io import load
from ._montecarlo import monte_carlo
from ._quant import Uniform
from ._report import Report

MODELS = ("mlp", "transformer", "digits")
SPLITS = ("test", "calibration")
CANDIDATES = range(3, 9)  # no 2-bit candidate: one exact-statistics analysis fewer each
def digits_mlp(split: str = "test") -> tuple[Sequential, np.ndarray, np.ndarray]:
    """The shipped digits classifier and a held-out batch: ``(net, x, labels)``.

    A 64-64-32-10 ReLU MLP with a softmax output, trained by scikit-learn's
    ``MLPClassifier`` on 60% of ``sklearn.datasets.load_digits`` and imported with
    :func:`from_sklearn` (``docs/scripts/train_digits_mlp.py``). ``net(x)`` are the class
    probabilities, ``(batch, 10)``.

    Parameters
    ----------
    split : ``"test"`` (450 images; test accuracy 97.6%) or ``"calibration"`` (270 images
        for fitting quantizers); neither was seen in training.

    Returns
    -------
    net, x : the network and the images ``x: (batch, 64)``, pixels / 16 in [0, 1] (as
        in training); labels : ``(batch,)`` integer classes 0..9.
    """
    if split not in SPLITS:
        raise ValueError(f"digits_mlp: split must be one of {SPLITS}, got {split!r}")
    root = resources.files("errprop") / "data" / "digits-mlp"
    if isinstance(root, Path):
        net = load(root)
    else:  # a zipped install: copy the two files out for load()
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("model.json", "weights.npz"):
                (Path(tmp) / name).write_bytes((root / name).read_bytes())
            net = load(tmp)
    with (root / "digits.npz").open("rb") as f, np.load(f) as data:
        key = "test" if split == "test" else "calib"
        x = data[f"x_{key}"].astype(np.float64) / 16.0
        labels = data[f"y_{key}"].astype(np.int64)
    return net, x, labels


@dataclass(frozen=True)
class _Case:
    key: str
    title: str  # short, for figures
    detail: str
    net: Sequential
    x: np.ndarray  # analysed batch (budget, Monte Carlo)
    calib: np.ndarray  # the allocation is planned here ...
    held_out: np.ndarray  # ... and verified here
    labels: np.ndarray | None = None  # classes of held_out


def _cases(names: list[str], seed: int) -> list[_Case]:
    cases = []
    if "mlp" in names:
        rng = np.random.default_rng([seed, 1])  # one stream per model: --models selects
        x = rng.standard_normal((32, 64))
        cases.append(_Case("mlp", "seeded GELU MLP 64-128x4-10", "Gaussian inputs",
                           mlp([64, 128, 128, 128, 128, 10], "gelu", seed=seed), x, x,
                           rng.standard_normal((256, 64))))
    if "transformer" in names:
        rng = np.random.default_rng([seed, 2])
        x = rng.standard_normal((2, 8, 32))
        cases.append(_Case("transformer", "seeded 2-block pre-norm transformer",
                           "d_model 32, 4 heads, d_ff 128, 8 tokens, Gaussian inputs",
                           transformer(32, 4, 128, 2, seed=seed), x, x,
                           rng.standard_normal((16, 8, 32))))
    if "digits" in names:
        net, x_test, labels = digits_mlp("test")
        _, x_calib, _ = digits_mlp("calibration")
        cases.append(_Case("digits", "digits MLP 64-64-32-10 ReLU + softmax",
                           "trained by scikit-learn; 270 held-out calibration images", net,
                           x_calib, x_calib, x_test, labels))
    return cases


def _accuracy(y: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(y, axis=-1) == labels))


# ------------------------------------------------------------------------ analysis
#: what the analyses say, rendered twice (terminal and Markdown): ("head", text),
#: ("line", text), ("table", rows with a header row first) or ("budget", Budget)
Blocks = list[tuple[str, Any]]


def _render(blocks: Blocks, markdown: bool) -> list[str]:
    out: list[str] = []
    for kind, item in blocks:
        if kind == "head":
            out += ["", f"### {item}", ""] if markdown else ["", f"-- {item}"]
        elif kind == "line":
            out += [item, ""] if markdown else [item]
        elif kind == "budget":
            table = item.table()
            out += ([item.to_markdown().rstrip(), "", table.splitlines()[-1], ""] if markdown
                    else ["", table])
        elif markdown:
            out += ["| " + " | ".join(r) + " |" for r in item[:1]]
            out += ["|---|" + "---:|" * (len(item[0]) - 1)]
            out += ["| " + " | ".join(r) + " |" for r in item[1:]] + [""]
        else:
            widths = [max(len(r[i]) for r in item) for i in range(len(item[0]))]
            rows = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths))) for r in item]
            out += [rows[0], "  ".join("-" * w for w in widths), *rows[1:]]
    return out


def _analyse(case: _Case, bits: int, samples: int, probes: int,
             seed: int) -> tuple[Report, Comparison, dict[str, Any], Blocks]:
    config = QuantConfig(weights=Uniform(bits, granularity="channel"),
                         activations=Uniform(bits))
    report = analyze(case.net, case.x, config, seed=seed)
    mc = monte_carlo(case.net, case.x, config, samples=samples, seed=seed, quantiles=())
    comparison = report.compare(mc, probes=probes, seed=seed)
    budget = report.budget()
    doc: dict[str, Any] = {
        "bits": bits, "config": f"W{bits} per channel, A{bits} per tensor",
        "output_sqnr_db": report.sqnr_db, "exact_mse": report.exact_mse,
        "analytic_mse": report.mse, "mc_mse": mc.mse, "mc_mse_ci99": list(mc.mse_ci),
        "mc_samples": samples, "first_order_residual": report.residual,
        "flagged_nodes": comparison.flagged, "budget": json.loads(budget.to_json()),
        "budget_worst_case_bounds": budget_bounds(report, budget),
        "nodes": [{"node": r.name, "kind": r.kind, "rms_exact": r.rms_exact,
                   "rms_first_order": r.rms_first_order, "rms_analytic": r.rms_analytic,
                   "rms_mc": r.rms_mc, "rms_mc_ci99": r.rms_mc_ci, "flagged": r.disagrees,
                   "worst_case_bound": bound}
                  for r, bound in zip(comparison.rows,
                                      node_bounds(report, comparison).values())]}
    blocks: Blocks = [
        ("head", f"W{bits}A{bits} (weights per channel, activations per tensor)"),
        ("line", f"output SQNR {report.sqnr_db:.1f} dB; output MSE exact "
                 f"{report.exact_mse:.3g}, analytic {report.mse:.3g}, Monte Carlo {mc.mse:.3g} "
                 f"[{mc.mse_ci[0]:.3g}, {mc.mse_ci[1]:.3g}] (99%, {samples} samples)"),
        ("budget", budget)]
    vacuous = vacuous_line(doc["budget_worst_case_bounds"], "first-order worst cases")
    if vacuous:
        blocks.append(("line", vacuous))
    if comparison.flagged:
        blocks.append(("line", f"first order has broken down (outside the Monte Carlo "
                               f"interval and the MSE more than {comparison.tolerance:.0%} "
                               f"off) at: {', '.join(comparison.flagged)}"))
    if comparison.significant:
        blocks.append(("line", f"significant but within {comparison.tolerance:.0%} at: "
                               f"{', '.join(comparison.significant)}"))
    if case.labels is not None:  # on the test images, quantized the same way
        test = analyze(case.net, case.held_out, config, seed=seed)
        doc["accuracy"] = _accuracy(test.output + test.exact, case.labels)
        blocks.append(("line", f"digits accuracy on {len(case.labels)} held-out test images: "
                               f"float {100 * _accuracy(test.output, case.labels):.1f}%, "
                               f"W{bits}A{bits} {100 * doc['accuracy']:.1f}%"))
    return report, comparison, doc, blocks


def _allocate(case: _Case, target: float,
              seed: int) -> tuple[Allocation | None, dict[str, Any], Blocks]:
    blocks: Blocks = [("head", f"weight bits per layer for output SQNR >= {target:g} dB "
                               f"(activations float)")]
    try:
        plan = plan_bits(case.net, case.calib, target_sqnr_db=target, candidates=CANDIDATES,
                         seed=seed)
    except ValueError as exc:  # out of reach with these candidates: say so, carry on
        return None, {"target_sqnr_db": target, "error": str(exc)}, [*blocks,
                                                                     ("line", str(exc))]
    weights = Uniform(8, granularity="channel")
    runs = {"allocated": (plan.config, plan.cost, list(plan.bits.values()))}
    if plan.uniform_bits is not None:
        runs[f"uniform {plan.uniform_bits}"] = (
            QuantConfig(weights=weights.with_bits(plan.uniform_bits)), plan.uniform_cost,
            [plan.uniform_bits] * len(plan.bits))
    doc: dict[str, Any] = {"target_sqnr_db": target, "bits": plan.bits,
                           "predicted_mse": plan.predicted_mse, "cost_unit": plan.cost_unit,
                           "calibration_batch": list(case.calib.shape),
                           "held_out_batch": list(case.held_out.shape), "runs": {}}
    for name, (config, cost, bits) in runs.items():
        r = analyze(case.net, case.held_out, config, seed=seed)
        doc["runs"][name] = {"bits": bits, "cost": cost, "held_out_sqnr_db": r.sqnr_db,
                             "meets_target": bool(r.sqnr_db >= target)}
        if case.labels is not None:
            doc["runs"][name]["accuracy"] = _accuracy(r.output + r.exact, case.labels)
    done = doc["runs"].values()
    table = [["layer", *runs],
             *([layer, *(str(d["bits"][i]) for d in done)] for i, layer in enumerate(plan.bits)),
             [f"cost ({plan.cost_unit})", *(f"{d['cost']:,.0f}" for d in done)],
             ["held-out SQNR dB", *(f"{d['held_out_sqnr_db']:.1f}" for d in done)]]
    if case.labels is not None:
        table.append(["held-out accuracy", *(f"{100 * d['accuracy']:.1f}%" for d in done)])
    blocks += [("line", f"planned on a {'x'.join(map(str, case.calib.shape))} calibration "
                        f"batch, verified on a {'x'.join(map(str, case.held_out.shape))} "
                        f"held-out batch"), ("table", table)]
    if case.labels is not None:
        doc["float_accuracy"] = _accuracy(case.net(case.held_out), case.labels)
        blocks.append(("line", f"float accuracy {100 * doc['float_accuracy']:.1f}%"))
    if plan.uniform_bits is not None:
        doc["saving_vs_uniform"] = saved = 1 - plan.cost / plan.uniform_cost
        blocks.append(("line", f"the allocation costs {100 * saved:.0f}% fewer weight bits "
                               f"than uniform {plan.uniform_bits} bits"))
    return plan, doc, blocks


# ------------------------------------------------------------------------ the command
def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    bits = list(dict.fromkeys(args.bits))
    samples = args.samples if args.samples is not None else (50 if args.quick else 200)
    probes = 16 if args.quick else 64
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    cases = _cases(list(dict.fromkeys(args.models)), args.seed)
    doc: dict[str, Any] = {"seed": args.seed, "bits": bits, "samples": samples,
                           "target_sqnr_db": args.target_sqnr, "models": {}}
    md = ["# errprop demo", "",
          f"Seed {args.seed}; weights per channel and activations per tensor at "
          f"{', '.join(map(str, bits))} bits; Monte Carlo {samples} samples; weight bits "
          f"allocated for output SQNR >= {args.target_sqnr:g} dB, verified on held-out "
          f"inputs. SQNR = 20·log10(‖y‖/‖Δy‖). Activation errors are noise: compare them "
          f"statistically (analytic, Monte Carlo), not pointwise. Every column is defined "
          f"in the [glossary](#glossary) at the end.", ""]
    plans: dict[str, dict[str, Any]] = {}
    files = []
    for case in cases:
        head = (f"{case.title} ({case.detail}): {case.net.num_params():,} parameters, "
                f"analysed on a {'x'.join(map(str, case.x.shape))} batch")
        model: dict[str, Any] = {"title": case.title, "detail": case.detail,
                                 "parameters": case.net.num_params(),
                                 "batch": list(case.x.shape), "runs": []}
        if case.labels is not None:
            model["float_accuracy"] = _accuracy(case.net(case.held_out), case.labels)
        reports, comparisons, blocks = {}, {}, []
        for b in bits:
            reports[b], comparisons[b], run_doc, more = _analyse(
                case, b, samples, probes, args.seed)
            model["runs"].append(run_doc)
            blocks += more
        plan, model["allocation"], more = _allocate(case, args.target_sqnr, args.seed)
        blocks += more
        if plan is not None:
            plans[case.key] = model["allocation"]
        print("\n".join([f"== {head}", *_render(blocks, markdown=False)]) + "\n", flush=True)
        names = [f"{case.key}-budget.png", f"{case.key}-growth.png"]
        save_png(budget_figure(case.title, case.detail, reports), out / names[0])
        save_png(growth_figure(case.title, case.detail, comparisons), out / names[1])
        files += names
        model["figures"] = names
        doc["models"][case.key] = model
        md += [f"## {case.key}", "", head, "", *(f"![{n}]({n})" for n in names),
               *_render(blocks, markdown=True)]
        for b, comparison in comparisons.items():
            md += [f"Per node at W{b}A{b}: exact, first and second order, analytic (noise "
                   f"model) and Monte Carlo RMS error; max worst is the first-order worst "
                   f"case:", "", "```", comparison.table(), "```", ""]
            vacuous = vacuous_line(node_bounds(reports[b], comparison),
                                   "first-order max worst bounds")
            md += [vacuous, ""] if vacuous else []
    if plans:
        save_png(allocation_figure(plans, args.target_sqnr), out / "allocation.png")
        files.append("allocation.png")
        md += ["## allocation", "", "![allocation.png](allocation.png)", ""]
    md.append(GLOSSARY)
    doc["seconds"] = time.perf_counter() - start
    write_text(out / "report.json", json_text(doc))
    write_text(out / "report.md", "\n".join(md))
    print(f"wrote {out}/: report.md, report.json, {', '.join(files)} "
          f"({doc['seconds']:.1f} s)")
    return 0


_positive = number(int, low=2, what="a whole number of Monte Carlo samples >= 2")
_seed = number(int, low=0, what="a seed: a whole number >= 0")
_sqnr = number(float, low=0, high=100, above=True, what="a target SQNR in (0, 100] dB")


DESCRIPTION = """\
Run errprop on three built-in models: a seeded GELU MLP, a seeded 2-block transformer and
a real MLP trained on scikit-learn's digits (shipped with errprop). For each, print the
error budget per layer (injected MSE, share of the output MSE, gain, first-order worst
case, exact MSE with only that layer quantized), where first order breaks down (outside the
Monte Carlo interval and more than 10% off), and a per-layer weight-bit allocation for a target SQNR next to the cheapest
uniform width (cost, exact SQNR on held-out inputs, and the digits' classification
accuracy). Write report.md (with a glossary of every column, and the worst-case bounds
that are vacuous: above 100x the largest exact error or the values' own scale),
report.json and figures (budget per layer by source kind, error growth across nodes: exact
/ first order / Monte Carlo, bits per layer) into --out.
"""


def add_parser(sub: Any, bits_type: Any) -> None:
    p = sub.add_parser("demo", help="the showcase: budgets, bit allocation, report and "
                                    "figures on built-in models",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=bits_type, nargs="+", default=[8, 4], metavar="B",
                   help="bit widths for the budget and the error growth: weights per "
                        "channel and activations per tensor, each width in turn (default: "
                        "8 4)")
    p.add_argument("--target-sqnr", type=_sqnr, default=25.0, metavar="DB",
                   help="output SQNR in dB, 20·log10(‖y‖/‖Δy‖), that the per-layer "
                        "weight-bit allocation must reach (default 25)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                   metavar="MODEL", help="which built-in models to run: mlp, transformer, "
                                         "digits (default: all three)")
    p.add_argument("--samples", type=_positive, default=None, metavar="N",
                   help="Monte Carlo samples per model and bit width (default 200, or 50 "
                        "with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="fewer Monte Carlo samples and random probes: a fast smoke run")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed for the random models, their inputs, stochastic rounding and "
                        "Monte Carlo (default 0)")
    p.add_argument("--out", type=Path, default=Path("errprop-out"), metavar="DIR",
                   help="folder for report.md, report.json and the PNG figures (default "
                        "./errprop-out); files are replaced atomically")
    p.set_defaults(func=run)

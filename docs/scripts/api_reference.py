"""Write docs/api.md, the API reference, from errprop's docstrings.

    python docs/scripts/api_reference.py            # rewrite docs/api.md
    python docs/scripts/api_reference.py --check    # exit 1 if docs/api.md is stale

Every name in ``errprop.__all__`` (and in ``errprop.testing``, ``errprop.plots`` and
``errprop.symbolic``, when importable) with its signature and the first paragraph of its
docstring, grouped by topic. Names that no group lists go under "Other", so a new public
name appears without editing this script; ``tests/test_reference_docs.py`` compares the
committed file with this script's output, so the reference cannot drift.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "api.md"
COMMAND = "python docs/scripts/api_reference.py"

#: section title -> names of ``errprop`` in that section (in this order)
GROUPS: dict[str, list[str]] = {
    "Graph and layers": [
        "Sequential", "Residual", "NodeInfo", "Linear", "Activation", "ACTIVATIONS",
        "Softmax", "Attention", "LayerNorm", "RMSNorm", "Embedding", "MeanPool",
        "L2Normalize", "Op"],
    "Builders": ["mlp", "transformer", "transformer_block", "sensitivity_network"],
    "Quantizers and configuration": [
        "QuantConfig", "Source", "Quantizer", "Uniform", "UniformGrid", "Fixed", "FixedGrid",
        "ErrorModel", "FloatFormat", "MXFormat", "ShiftQuantizer"],
    "Analysis and reports": [
        "analyze", "Report", "NodeResult", "SourceResult", "sqnr_db", "relative_residual",
        "OutputStatistics", "NodeStatistics", "convergence", "Convergence",
        "ConvergenceRow"],
    "Monte Carlo": ["monte_carlo", "MonteCarloResult", "NodeStats", "Comparison",
                    "ComparisonRow"],
    "Budgets and bit allocation": [
        "budget", "Budget", "BudgetRow", "budget_matrix", "BudgetMatrix", "layer_split",
        "LayerSplit", "SplitRow", "plan_bits", "allocate_bits", "bits_for_share",
        "Allocation"],
    "Sensitivity: MLP versus attention": [
        "compare_blocks", "noise_gain", "NoiseGain", "SensitivityResult", "SensitivityRow"],
    "Real models": [
        "load", "save", "load_bert", "minilm_path", "tokenize", "encode", "mask_padding",
        "from_torch", "from_onnx", "from_sklearn", "digits_mlp"],
    "Post-training quantization (GPFQ, SPFQ)": [
        "gpfq", "spfq", "gpfq_config", "alphabet_step"],
    "Integer hardware": ["IntegerKernel", "accumulator_bits"],
    "Training and robustness": [
        "bit_curve", "BitCurve", "BitCurveRow", "threshold_weights", "ThresholdWeights",
        "ThresholdRow", "QuantizationPenalty", "WAGE", "gradient_error", "GradientError",
        "GradientErrorRow", "smoothed_sr_variance"],
    "Sweeps": ["sweep", "SweepResult"],
}

#: submodules documented after errprop itself: module -> one-line introduction
SUBMODULES = {
    "errprop.testing": "For people who add ops: the shared rule checker "
                       "(see [adding-an-op.md](adding-an-op.md)).",
    "errprop.plots": "Paper figures: each function takes `ax=None` and returns the Axes "
                     "(see [gallery.md](gallery.md)).",
    "errprop.symbolic": "Symbolic rules, recursions and mean-field theory (sympy).",
}


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def _first_paragraph(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    if isinstance(obj, (dict, list, tuple, str, int, float, frozenset, set)) or not doc:
        return ""
    paragraph = doc.strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def _signature(name: str, obj: object) -> str:
    if isinstance(obj, dict):
        keys = ", ".join(repr(k) for k in obj)
        return f"{name}: dict  # keys {keys}"
    if isinstance(obj, (list, tuple, frozenset, set)):
        return f"{name}: {type(obj).__name__}  # {len(obj)} entries"
    if not callable(obj):
        return f"{name}: {type(obj).__name__}"
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        sig = "(...)"
    sig = re.sub(r" at 0x[0-9a-fA-F]+", "", sig)  # reprs of default objects
    sig = re.sub(r"(: |-> )'([^']*)'", r"\1\2", sig)  # postponed annotations, unquoted
    kind = "class " if inspect.isclass(obj) else ""
    if kind:
        sig = re.sub(r" -> None$", "", sig)
    return f"{kind}{name}{sig}"


def _entry(module: str, name: str, obj: object) -> list[str]:
    lines = [f"### `{module}.{name}`", "", "```python", _signature(name, obj), "```", ""]
    summary = _first_paragraph(obj)
    if isinstance(obj, dict) and not summary:
        summary = f"A table of {len(obj)} entries, keyed by name."
    if summary:
        lines += [summary, ""]
    return lines


def _public(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return list(names)


def render() -> str:
    """The text of docs/api.md."""
    import errprop

    names = _public(errprop)
    listed = [n for group in GROUPS.values() for n in group]
    sections: list[tuple[str, str, list[str]]] = []
    for title, group in GROUPS.items():
        present = [n for n in group if n in names]
        if present:
            sections.append((title, "errprop", present))
    other = sorted(n for n in names if n not in listed)
    if other:
        sections.append(("Other", "errprop", other))
    intros: dict[str, str] = {}
    for module_name, intro in SUBMODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        sections.append((f"`{module_name}`", module_name, _public(module)))
        intros[module_name] = intro

    lines = [
        "# API reference", "",
        f"<!-- Generated by `{COMMAND}` from the docstrings. Do not edit by hand:",
        "change the docstring, then rerun the script (tests/test_reference_docs.py fails",
        "while this file is stale). -->", "",
        "Every public name with its signature and the first paragraph of its docstring;",
        "`help(errprop.NAME)` shows the whole docstring (parameters, returns, notes with the",
        "formula). The user guide ([guide.md](guide.md)) shows them in use.", "",
    ]
    lines += [f"* [{title}](#{_anchor(title)})" for title, _, _ in sections]
    lines.append("")
    for title, module_name, members in sections:
        module = importlib.import_module(module_name)
        lines += [f"## {title}", ""]
        if module_name in intros:
            lines += [intros[module_name], ""]
        for name in members:
            lines += _entry(module_name, name, getattr(module, name))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale")
    check = args.parse_args(argv).check
    text = render()
    if check:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print(f"docs/api.md is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

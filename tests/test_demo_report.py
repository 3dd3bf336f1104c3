"""``errprop demo``'s report.md defines every column it shows, labels the worst case as
first order and says where a bound is vacuous, checked against an independent analysis
(issue 14: E18)."""

import json
import re

import numpy as np
import pytest

import errprop as ep
from errprop._demo_notes import VACUOUS
from errprop.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--models", "transformer", "--bits", "4", "--samples",
                 "20", "--out", str(out)]) == 0
    return (out / "report.md").read_text(encoding="utf-8"), \
        json.loads((out / "report.json").read_text(encoding="utf-8"))


def _columns(md):
    """Every column header of report.md: Markdown tables and the fixed-width per-node
    tables (headers split on two or more spaces)."""
    heads = set()
    for table_head in re.findall(r"^\| (.*) \|\n\|[-:| ]+\|$", md, flags=re.M):
        heads |= {h.strip() for h in table_head.split(" | ")}
    for block in re.findall(r"```\n(.*?)\n", md):
        heads |= set(re.split(r"\s{2,}", block.strip()))
    return heads


def test_every_column_is_in_the_glossary(demo):
    md, _ = demo
    body, glossary = md.split("## Glossary")
    defined = set(re.findall(r"\*\*(.+?)\*\*", glossary))
    # model-specific first columns (allocation runs) are explained in the glossary's prose
    columns = _columns(body) - {"allocated"} - {c for c in _columns(body)
                                                 if c.startswith("uniform ")}
    assert "injected MSE" in columns and "max worst (1st order)" in columns
    missing = columns - defined - {""}
    assert not missing, missing
    assert "| worst case |" not in body and "| first-order worst case |" in body


def test_vacuous_bounds_are_marked_against_an_independent_analysis(demo):
    _, doc = demo
    run = doc["models"]["transformer"]["runs"][0]
    net = ep.transformer(32, 4, 128, 2, seed=0)
    x = np.random.default_rng([0, 2]).standard_normal((2, 8, 32))
    report = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(4, granularity="channel"),
                                               activations=ep.Uniform(4)))
    assert run["exact_mse"] == report.exact_mse  # the same model, input and config
    marked = []
    for node in run["nodes"]:
        b, n = node["worst_case_bound"], report.nodes[node["node"]]
        largest, scale = np.max(np.abs(n.exact)), np.max(np.abs(n.value))
        assert b["max_abs_exact"] == largest and b["max_abs_value"] == scale
        assert b["vacuous"] == (b["worst_case"] > VACUOUS * largest or b["worst_case"] > scale)
        marked += [node["node"]] * b["vacuous"]
    # the interval bounds compound through two blocks: deep nodes are vacuous
    assert "block1.res2" in marked and run["nodes"][-1]["node"] == "ln_f"
    budget = run["budget_worst_case_bounds"]
    assert set(budget) == {r["name"] for r in run["budget"]["rows"]}


def test_report_names_the_vacuous_bounds(demo):
    md, doc = demo
    run = doc["models"]["transformer"]["runs"][0]
    vacuous = [n["node"] for n in run["nodes"] if n["worst_case_bound"]["vacuous"]]
    line = next(l for l in md.splitlines() if l.startswith("Vacuous first-order max worst"))
    assert f"at {len(vacuous)} of {len(run['nodes'])}: {', '.join(vacuous)}." in line

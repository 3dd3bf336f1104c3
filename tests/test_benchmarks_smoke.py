"""Smoke tests of the benchmark scripts: each runs at tiny sizes in a subprocess, exits
cleanly and prints its tables of ratios. No timing is asserted (timings of a smoke run
on a shared machine mean nothing); the figures live in benchmarks/RESULTS.md."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{script} {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_bench_analytic_quick_mlp():
    """The MLP with its exact statistics measured directly."""
    out = run("bench_analytic.py", "--quick", "--repeats", "1", "--cases", "mlp")
    assert "## mlp(" in out
    for step in ("float64 forward", "float32 forward", "`analyze`", "exact statistics",
                 "interval_nodes", "norm_bound", "node_statistics(2)", "node_statistics(4)"):
        assert step in out, step
    assert "refused" not in out
    # ratios to the forward pass, and the verdict on the 10-forward-pass target
    assert "× fwd64" in out and "× fwd32" in out
    assert re.search(r"\| 1 +\|", out), "the unit row's ratio"
    assert "**Target (≤ 10 float64 forward passes, mlp)" in out


def test_bench_analytic_quick_transformer_refused():
    """When the exact statistics refuse, they are measured on a reduced input, extrapolated,
    and the probe estimator is checked against them."""
    out = run("bench_analytic.py", "--quick", "--repeats", "1", "--cases", "transformer",
              "--work-limit", "1e4")
    assert "## transformer(" in out
    assert "| refused" in out and "extrapolated" in out
    assert "Probe estimator vs exact statistics" in out
    assert "Refusal message: exact output statistics need one reverse sweep" in out
    assert "**Target (≤ 10 float64 forward passes, transformer)" in out


def test_bench_montecarlo_quick():
    out = run("bench_montecarlo.py", "--quick", "--repeats", "1", "--no-profile",
              "--no-env-compare")
    assert "samples·inputs/s" in out
    assert re.search(r"\d\.\d\d×", out), "ratios against torch"


def test_bench_versions_quick():
    """Two versions of the package timed round-robin; the table has one ratio per workload."""
    out = run("bench_versions.py", "--quick", "--repeats", "1", "--base", "HEAD")
    assert "current / base" in out
    for workload in ("mlp analyze", "mlp statistics", "mlp monte_carlo",
                     "transformer analyze", "transformer monte_carlo"):
        assert re.search(rf"\| {workload} +\| [0-9.e-]+ +\| [0-9.e-]+ +\| \d\.\d{{3}}", out), \
            workload

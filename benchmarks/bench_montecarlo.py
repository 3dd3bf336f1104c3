"""Monte Carlo throughput: errprop vs the same math in PyTorch, a naive loop, and GEMM peak.

Network: ``errprop.mlp([1024] * 13, "relu", seed=0)`` (12 Linear layers, width 1024)
on 256 inputs; 8-bit per-channel weights and 8-bit per-tensor activations
(the input of every Linear), noise mode: every sample draws uniform errors
``U(-s/2, s/2)`` for each weight (per-row step) and each activation (per-tensor
step) and runs the real network.

Measured, in float32 and float64, in one run (round-robin repeats, medians):

* errprop: ``errprop.monte_carlo(net, x, config, samples=S, dtype=...)``, end to
  end (its setup included) and "sampling only" (setup subtracted, from an extra
  2-sample run), in three variants: ``default settings`` (nothing else passed:
  what a user gets), ``errprop`` (``quantiles=()``: statistics at every node, no
  quantiles) and ``nodes=()`` (also ``quantiles=()``: the output only, as the
  torch reference);
* torch: the same math written here in PyTorch CPU, batched over the sample
  axis (``torch.rand`` noise on the weights with the same per-row steps and on
  the activations, none where the float value is on its grid — ReLU zeros, each grid's
  maximum — as in errprop's error model; ``torch.baddbmm``, ReLU), the same samples and
  chunk size,
  with the output error's mean, variance and per-sample MSE accumulated in
  float64 (torch only at the output);
* naive: one sample at a time in NumPy (SFC64 ``Generator.random`` draws);
* GEMM peak: numpy ``n×n @ n×n`` at n = 1024 and 2048, the best median.

FLOPs of a run: ``2 · samples · inputs · Σ in·out``.

Usage::

    python benchmarks/bench_montecarlo.py            # the full benchmark (~3-5 min)
    python benchmarks/bench_montecarlo.py --quick    # tiny configuration, a few seconds

When ``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` are set, the errprop, torch and
GEMM figures are measured again in a subprocess with both unset.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import errprop as ep  # noqa: E402
from errprop import Linear  # noqa: E402

try:
    import torch
except ImportError:  # torch is optional for users; the column is left out
    torch = None


@dataclass
class Problem:
    net: ep.Sequential
    x: np.ndarray
    config: ep.QuantConfig
    W: list[np.ndarray]  # (out, in) per Linear, float64
    b: list[np.ndarray | None]
    w_step: list[np.ndarray]  # (out, 1): per-row weight step
    a_step: list[float]  # per-tensor step of each Linear's input
    relu_after: list[bool]
    # 1 where the float value is off its grid and draws noise, 0 on the grid (ReLU zeros,
    # each grid's maximum): errprop's error model (UniformGrid.on_grid), the same law here
    a_free: list[np.ndarray]  # (inputs, in) per Linear
    w_free: list[np.ndarray]  # (out, in) per Linear
    y_ref: np.ndarray  # float64 output
    flops_per_sample: float  # 2 · inputs · Σ in·out


def make_problem(widths: list[int], inputs: int) -> Problem:
    net = ep.mlp(widths, "relu", seed=0)
    x = np.random.default_rng(0).standard_normal((inputs, widths[0]))
    config = ep.QuantConfig(weights=ep.Uniform(8, granularity="channel"),
                            activations=ep.Uniform(8))
    layers = net.layers()
    W, b, w_step, a_step, relu_after = [], [], [], [], []
    a_free, w_free = [], []
    h = x
    for i, (name, op) in enumerate(layers):
        if isinstance(op, Linear):
            # the grids errprop fits: weights per output row, activations per tensor on
            # the float activation (see docs/montecarlo.md)
            a_grid = config.activations.fit(h, channel_axis=-1, what=f"the input of {name!r}")
            w_grid = config.weights.fit(op.params["W"], channel_axis=0, what=f"{name}.W")
            for grid, value in ((a_grid, h), (w_grid, op.params["W"])):
                if grid.error_model(value).clipped.any():
                    raise RuntimeError(f"{name}: clipped elements; the torch reference "
                                       f"does not model their deterministic error")
            a_free.append((~a_grid.on_grid(h)[0]).astype(np.float64))
            w_free.append((~w_grid.on_grid(op.params["W"])[0]).astype(np.float64))
            a_step.append(float(np.asarray(a_grid.scale).reshape(-1)[0]))
            assert np.size(a_grid.scale) == 1, "per-tensor activation step expected"
            w_step.append(np.broadcast_to(w_grid.scale, (op.params["W"].shape[0], 1)).copy())
            W.append(op.params["W"])
            b.append(op.params.get("b"))
            nxt = layers[i + 1][1] if i + 1 < len(layers) else None
            relu_after.append(nxt is not None and not isinstance(nxt, Linear))
        h = op.forward(h)
    flops = 2.0 * inputs * sum(w.size for w in W)
    return Problem(net, x, config, W, b, w_step, a_step, relu_after, a_free, w_free, net(x),
                   flops)


# ---------------------------------------------------------------- errprop
#: errprop variants measured: label -> extra keyword arguments of ``monte_carlo``
#: (``defaults=True``: monte_carlo's own defaults; otherwise ``quantiles=()``)
VARIANTS = {"errprop, default settings": {"defaults": True}, "errprop": {},
            "errprop, nodes=()": {"nodes": ()}}


def run_errprop(p: Problem, samples: int, dtype: type, defaults: bool = False,
                **kw: object) -> ep.MonteCarloResult:
    if not defaults:
        kw.setdefault("quantiles", ())
    return ep.monte_carlo(p.net, p.x, p.config, samples=samples, seed=0, dtype=dtype,
                          progress=False, **kw)


# ---------------------------------------------------------------- torch reference
class TorchReference:
    """The same noise-mode Monte Carlo in PyTorch, batched over samples, with timers."""

    def __init__(self, p: Problem, dtype: type) -> None:
        td = torch.float32 if dtype == np.float32 else torch.float64
        self.td, self.p = td, p
        self.W = [torch.from_numpy(w.astype(dtype)) for w in p.W]
        self.b = [None if b is None else torch.from_numpy(b.astype(dtype)).reshape(1, 1, -1)
                  for b in p.b]
        self.ws = [torch.from_numpy(s.astype(dtype)) for s in p.w_step]
        self.af = [torch.from_numpy(m.astype(dtype)) for m in p.a_free]
        self.wf = [torch.from_numpy(m.astype(dtype)) for m in p.w_free]
        self.x = torch.from_numpy(p.x.astype(dtype))
        self.x64 = torch.from_numpy(p.x)
        self.W64 = [torch.from_numpy(w) for w in p.W]
        self.b64 = [None if b is None else torch.from_numpy(b) for b in p.b]
        self.parts = {"rng+noise": 0.0, "matmul": 0.0, "stats": 0.0, "other": 0.0}

    def reference(self) -> torch.Tensor:
        """The float64 network output (computed once per run, as errprop does)."""
        h = self.x64
        for W, b, relu in zip(self.W64, self.b64, self.p.relu_after):
            h = h @ W.T if b is None else torch.addmm(b, h, W.T)
            if relu:
                h = torch.relu(h)
        return h

    def run(self, samples: int, chunk: int, seed: int = 0) -> tuple[float, float]:
        """Output MSE and its 99% CI half width; ``self.parts`` collects the time split."""
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        y_ref = self.reference()
        total = torch.zeros_like(y_ref)
        total_sq = torch.zeros_like(y_ref)
        mse = torch.empty(samples, dtype=torch.float64)
        t_rng = t_mm = t_stats = 0.0
        N = self.x.shape[0]
        for start in range(0, samples, chunk):
            c = min(chunk, samples - start)
            h = self.x.expand(c, *self.x.shape)
            for W, b, ws, s_act, relu, af, wf in zip(self.W, self.b, self.ws, self.p.a_step,
                                                     self.p.relu_after, self.af, self.wf):
                t1 = time.perf_counter()
                # activation noise U(-s/2, s/2) added to the sample's actual input (none
                # where the float activation is on the grid)
                u = torch.rand((c, N, W.shape[1]), generator=gen, dtype=self.td)
                h = u.sub_(0.5).mul_(af).mul_(s_act).add_(h)
                # weight noise U(-s_a/2, s_a/2) per row a, one weight matrix per sample
                dW = torch.rand((c, *W.shape), generator=gen, dtype=self.td)
                Ws = dW.sub_(0.5).mul_(wf).mul_(ws).add_(W)
                t2 = time.perf_counter()
                h = torch.bmm(h, Ws.transpose(1, 2)) if b is None else \
                    torch.baddbmm(b, h, Ws.transpose(1, 2))
                if relu:
                    h.relu_()
                t3 = time.perf_counter()
                t_rng += t2 - t1
                t_mm += t3 - t2
            t4 = time.perf_counter()
            err = h.to(torch.float64) - y_ref
            mse[start:start + c] = err.square().mean(dim=(1, 2))
            total += err.sum(dim=0)
            total_sq += err.square_().sum(dim=0)
            t_stats += time.perf_counter() - t4
        half = C_Z99 * float(mse.std()) / np.sqrt(samples)
        elapsed = time.perf_counter() - t0
        self.parts = {"rng+noise": t_rng, "matmul": t_mm, "stats": t_stats,
                      "other": elapsed - t_rng - t_mm - t_stats}
        return float(mse.mean()), half


C_Z99 = 2.5758293035489004


# ---------------------------------------------------------------- naive NumPy loop
def run_naive(p: Problem, samples: int, dtype: type) -> tuple[float, dict[str, float]]:
    """One sample at a time; returns the output MSE and the time split."""
    t0 = time.perf_counter()
    gen = np.random.Generator(np.random.SFC64(0))
    W = [w.astype(dtype) for w in p.W]
    b = [None if v is None else v.astype(dtype) for v in p.b]
    ws = [s.astype(dtype) for s in p.w_step]
    af = [m.astype(dtype) for m in p.a_free]
    wf = [m.astype(dtype) for m in p.w_free]
    x = p.x.astype(dtype)
    mse = np.empty(samples)
    total = np.zeros_like(p.y_ref)
    total_sq = np.zeros_like(p.y_ref)
    t_rng = t_mm = t_stats = 0.0
    for s in range(samples):
        h = x
        for Wl, bl, wl, al, relu, afl, wfl in zip(W, b, ws, p.a_step, p.relu_after, af, wf):
            t1 = time.perf_counter()
            u = gen.random(h.shape, dtype=dtype)
            u -= 0.5
            u *= afl
            u *= dtype(al)
            u += h
            h = u
            dW = gen.random(Wl.shape, dtype=dtype)
            dW -= 0.5
            dW *= wfl
            dW *= wl
            dW += Wl
            t2 = time.perf_counter()
            h = h @ dW.T
            if bl is not None:
                h += bl
            if relu:
                np.maximum(h, 0, out=h)
            t3 = time.perf_counter()
            t_rng += t2 - t1
            t_mm += t3 - t2
        t4 = time.perf_counter()
        err = h - p.y_ref
        mse[s] = np.mean(err * err)
        total += err
        total_sq += err * err
        t_stats += time.perf_counter() - t4
    elapsed = time.perf_counter() - t0
    return float(mse.mean()), {"rng+noise": t_rng, "matmul": t_mm, "stats": t_stats,
                               "other": elapsed - t_rng - t_mm - t_stats}


# ---------------------------------------------------------------- profile of errprop
def _key(fn: object) -> tuple[str, int, str]:
    code = fn.__code__  # type: ignore[attr-defined]
    return code.co_filename, code.co_firstlineno, code.co_name


def profile_errprop(p: Problem, samples: int, dtype: type) -> tuple[float, dict[str, float]]:
    """One errprop run (every node recorded) under cProfile: wall time and seconds per
    category.

    Reads errprop's private functions (read only) to attribute the time:
    setup is the reference pass (float64 forward + the forward traced by
    tracemalloc that sizes the chunks) and the plan (grid fits, error models);
    in the sampling phase, the time of ``Linear.forward`` called by the
    sampling interpreter is split between the batched matmul and the bias add
    in the ratio of their own times over the whole run. cProfile sees the main
    thread only: work on the sampling threads (draws, noise, statistics tiles)
    is counted where the main thread waits for it.
    """
    from errprop import _activation, _linear, _mc_passes as mp, _sampling as smp

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    run_errprop(p, samples, dtype)
    prof.disable()
    elapsed = time.perf_counter() - t0
    st = pstats.Stats(prof).stats  # type: ignore[attr-defined]

    def cum(fn: object) -> float:
        return st.get(_key(fn), (0, 0, 0.0, 0.0, {}))[3]

    def own(fn: object) -> float:
        return st.get(_key(fn), (0, 0, 0.0, 0.0, {}))[2]

    def cum_from(fn: object, caller: object) -> float:
        callers = st.get(_key(fn), (0, 0, 0.0, 0.0, {}))[4]
        return callers.get(_key(caller), (0, 0, 0.0, 0.0))[3]

    linear = cum_from(_linear.Linear.forward, mp._Sample.leaf)
    share = own(_linear._matmul_t) / max(cum(_linear.Linear.forward), 1e-12)
    act = cum_from(_activation.Activation.forward, mp._Sample.leaf)
    parts = {
        "noise: 16-bit draws + c·k + (W + offset), threaded": cum(smp._Sampler.perturb),
        "matmul (batched, per-sample weights)": linear * share,
        "bias add (new array)": linear * (1 - share),
        "relu": act,
        "per-node error stats (float64 tiles, every node)": cum(mp._Sample._record)
        + cum(mp._Moments.stats),
        "setup: reference passes + grids + plan": cum(mp._Reference.leaf) + cum(mp._make_plan)
        + cum(mp._bytes_per_sample),
    }
    parts["other (python, dtype casts, allocation)"] = max(0.0, elapsed - sum(parts.values()))
    return elapsed, parts


# ---------------------------------------------------------------- CPU time, one thread
def cpu_seconds(p: Problem, samples: int, dtype: type, chunk: int) -> dict[str, float]:
    """Process CPU seconds (all threads) of errprop (``nodes=()`` and every node) and of
    the torch reference at the same chunk, with numpy's BLAS and torch on one thread
    each: a comparison that a busy machine distorts far less than wall time (waiting
    BLAS threads spin). errprop's own sampling threads still run, and count."""
    from threadpoolctl import threadpool_limits

    out = {}
    before = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(1):
        if torch is not None:
            torch.set_num_threads(1)
        try:
            for label, kw in (("errprop, nodes=()", {"nodes": ()}), ("errprop", {}),
                              ("errprop, default settings", {"defaults": True})):
                t0 = time.process_time()
                run_errprop(p, samples, dtype, chunk_size=chunk, **kw)
                out[label] = time.process_time() - t0
            if torch is not None:
                ref = TorchReference(p, dtype)
                ref.run(2, 2)
                t0 = time.process_time()
                ref.run(samples, chunk)
                out["torch"] = time.process_time() - t0
        finally:
            if torch is not None:
                torch.set_num_threads(before)
    return out


# ---------------------------------------------------------------- RNG bound
def rng_rate(dtype: type, repeats: int = 5) -> float:
    """Uniform draws per second of one thread, including the noise transform
    ``(u − ½)·s + v``, on a cache-sized block (4 Mi elements): the best case for
    the per-sample weight noise."""
    gen = np.random.Generator(np.random.SFC64(0))
    n = 1 << 20
    u = np.empty(n, dtype)
    v = np.ones(n, dtype)
    s = dtype(0.01)

    def draw() -> None:
        gen.random(out=u, dtype=dtype)
        np.subtract(u, 0.5, out=u)
        np.multiply(u, s, out=u)
        np.add(u, v, out=u)

    return n / C.measure(draw, repeats, warmup=1).median


def draws_per_sample(p: Problem) -> int:
    """Uniform draws of one sample: every weight and every activation of every Linear."""
    return sum(w.size for w in p.W) + sum(p.x.shape[0] * w.shape[1] for w in p.W)


# ---------------------------------------------------------------- the benchmark
def measure_dtype(p: Problem, dtype: type, samples: int, naive_samples: int, repeats: int,
                  full: bool) -> dict:
    """Round-robin repeats of errprop (S and 2 samples), torch (chunk 1 and, when
    ``full``, errprop's chunk) and (when ``full``) the naive loop."""
    out: dict = {"dtype": np.dtype(dtype).name, "samples": samples,
                 "naive_samples": naive_samples, "mse": {}, "parts": {}, "chunks": {}}
    mse, parts, chunks = out["mse"], out["parts"], out["chunks"]

    def errprop_full(label: str, kw: dict) -> None:
        r = run_errprop(p, samples, dtype, **kw)
        chunks[label] = r.chunk_size
        lo, hi = r.mse_ci
        mse[label] = (r.mse, (hi - lo) / 2)

    fns = {}
    for label, kw in VARIANTS.items():
        fns[f"{label} (2 samples)"] = lambda kw=kw: run_errprop(p, 2, dtype, **kw)
        fns[label] = lambda label=label, kw=kw: errprop_full(label, kw)
    if torch is not None:
        ref = TorchReference(p, dtype)
        ref.run(2, 2)  # first-call initialisation of torch's kernels

        def torch_run(key: str, chunk: int | None) -> None:
            chunks[key] = chunk or chunks["errprop"]
            mse[key] = ref.run(samples, chunks[key])
            parts[key] = dict(ref.parts)

        fns["torch, chunk 1"] = lambda: torch_run("torch, chunk 1", 1)
        if full:
            fns["torch, errprop's chunk"] = lambda: torch_run("torch, errprop's chunk", None)
    if full:
        def naive_run() -> None:
            m, naive_parts = run_naive(p, naive_samples, dtype)
            mse["naive loop"] = (m, float("nan"))
            parts["naive loop"] = naive_parts
            chunks["naive loop"] = 1

        fns["naive loop"] = naive_run
    with C.Contention() as busy:
        times = C.measure_interleaved(fns, repeats)
    out["times"] = {k: t.times for k, t in times.items()}
    out["contention"] = busy.others
    return out


def summarize(p: Problem, m: dict, peak: float) -> list[dict]:
    """One row per method: throughput, GFLOP/s, fraction of GEMM peak, ratio to the best torch."""
    N, S = p.x.shape[0], m["samples"]
    t = {k: C.Timing(v) for k, v in m["times"].items()}
    per_sample, setup = {}, {}
    for label in VARIANTS:
        t_full, t_two = t[label].median, t[f"{label} (2 samples)"].median
        per_sample[label] = (t_full - t_two) / (S - 2)
        if not per_sample[label] > 0:  # too few samples or too noisy to separate the setup
            per_sample[label] = float("nan")
        setup[label] = max(0.0, t_two - 2 * per_sample[label])
    torch_keys = [k for k in t if k.startswith("torch")]
    best_torch = max((S * N / t[k].median for k in torch_keys), default=float("nan"))
    rows = []
    errprop_keys = [k for label in VARIANTS for k in (label, f"{label}, sampling only")]
    for key in (*errprop_keys, *torch_keys, "naive loop"):
        if key.endswith(", sampling only"):
            label = key[:-len(", sampling only")]
            samples, seconds, spread = 1, per_sample[label], float("nan")
        elif key in t:
            samples = m["naive_samples"] if key == "naive loop" else S
            seconds, spread = t[key].median, t[key].spread
        else:
            continue
        thr = samples * N / seconds
        gflops = samples * p.flops_per_sample / seconds / 1e9
        rows.append({"method": key, "dtype": m["dtype"], "samples": samples if key in t else S,
                     "chunk": m["chunks"].get(key, m["chunks"].get("errprop")),
                     "seconds": seconds if key in t else setup[key[:-len(", sampling only")]],
                     "spread": spread,
                     "throughput": thr, "gflops": gflops, "of_peak": gflops / peak,
                     "vs_torch": thr / best_torch,
                     "mse": m["mse"].get(key, (float("nan"), float("nan")))})
    return rows


def _num(v: float) -> str:
    return "-" if v != v else f"{v:.0f}"


def _pct(v: float) -> str:
    return "-" if v != v else f"{100 * v:.0f}%"


def _times(v: float) -> str:
    return "-" if v != v else f"{v:.2f}×"


def _peak(payload: dict, dtype: str) -> float:
    return C.peak_of({int(k): v for k, v in payload["peaks"][dtype].items()})


def print_results(p: Problem, payload: dict) -> list[dict]:
    rows_out, cells = [], []
    for m in payload["measured"]:
        rows = summarize(p, m, _peak(payload, m["dtype"]))
        rows_out.extend(rows)
        for r in rows:
            only = r["method"].endswith(", sampling only")
            mse, ci = r["mse"]
            cells.append([
                r["method"], r["dtype"], r["samples"], r["chunk"],
                f"(setup {C.fmt(r['seconds'])})" if only else C.fmt(r["seconds"]),
                "" if only else _pct(r["spread"]),
                _num(r["throughput"]), _num(r["gflops"]), _pct(r["of_peak"]),
                _times(r["vs_torch"]),
                "" if mse != mse else f"{mse:.4g}" + ("" if ci != ci else f" ± {ci:.2g}")])
    print(C.table(["method", "dtype", "samples", "chunk", "median s", "spread",
                   "samples·inputs/s", "GFLOP/s", "of numpy GEMM peak", "vs best torch",
                   "output MSE ± 99% CI"], cells))
    print()
    print("spread = (max − min)/median over the repeats. `..., sampling only` = "
          "(T(S) − T(2))/(S − 2) per sample; its `median s` cell is the setup T(2) − 2·that.")
    print("`errprop, default settings` = monte_carlo with nothing but samples, seed and dtype "
          "passed; `errprop` = quantiles=() (every node's statistics); `errprop, nodes=()` = "
          "quantiles=(), nodes=() (the output only, as torch).")
    for m in payload["measured"]:
        e, ts = m["mse"].get("errprop"), [m["mse"][k] for k in m["mse"] if k.startswith("torch")]
        agree = all(abs(e[0] - t[0]) <= np.hypot(e[1], t[1]) for t in ts) if e and ts else None
        print(f"{m['dtype']}: other processes used {100 * m['contention']:.0f}% of the CPUs "
              f"meanwhile" + ("  ← busy machine, figures unreliable"
                              if m["contention"] > 0.05 else "")
              + ("" if agree is None else f"; errprop and torch output MSE agree within "
                 f"their CIs: {'yes' if agree else 'NO'}"))
    print()
    return rows_out


def print_gemm(payload: dict) -> None:
    rows = []
    for lib, pk in (("numpy", payload["peaks"]), ("torch", payload["torch_peaks"])):
        for dt, by_size in (pk or {}).items():
            rows.append([lib, dt, *(f"{v:.0f}" for v in by_size.values())])
    sizes = list(next(iter(payload["peaks"].values())).keys())
    print(C.table(["GEMM", "dtype", *(f"n={n} GFLOP/s" for n in sizes)], rows))
    print()


def print_split(title: str, parts: dict[str, float]) -> None:
    total = sum(parts.values())
    print(C.table([title, "seconds", "share"],
                  [[k, C.fmt(v), f"{100 * v / total:.0f}%"] for k, v in parts.items()]
                  + [["total", C.fmt(total), "100%"]]))
    print()


def print_targets(rows: list[dict]) -> None:
    print("Targets (float32, against the faster torch variant of the same run):")
    for r in rows:
        if r["dtype"] != "float32" or not r["method"].startswith("errprop") \
                or r["vs_torch"] != r["vs_torch"]:
            continue
        vs, of = r["vs_torch"], r["of_peak"]
        print(f"  {r['method']}: {vs:.2f}× torch throughput (target ≥ 0.9×: "
              f"{'MET' if vs >= 0.9 else f'MISSED by {100 * (1 - vs / 0.9):.0f}%'}); "
              f"{100 * of:.0f}% of the numpy GEMM peak (target ≥ 60%: "
              f"{'MET' if of >= 0.6 else f'MISSED, {0.6 / of:.1f}× short'})")
    print()


def print_bound(p: Problem, payload: dict) -> None:
    """How much of the GEMM peak is reachable while one thread draws every uniform."""
    D = draws_per_sample(p)
    rows = []
    for dt, rate in payload["rng_rates"].items():
        peak = _peak(payload, dt)
        t_gemm = p.flops_per_sample / (peak * 1e9)
        t_rng = D / rate
        rows.append([dt, f"{D / 1e6:.1f} M", f"{rate / 1e6:.0f} M/s", f"{1e3 * t_rng:.1f}",
                     f"{1e3 * t_gemm:.1f}", f"{100 * t_gemm / (t_gemm + t_rng):.0f}%"])
    print(C.table(["dtype", "uniform draws per sample", "one thread: draw + (u−½)s+v",
                   "ms per sample: draws", "ms per sample: GEMM at peak",
                   "ceiling: GEMM/(GEMM + draws)"], rows))
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny configuration (smoke test)")
    ap.add_argument("--samples", type=int, help="Monte Carlo samples per timed run")
    ap.add_argument("--naive-samples", type=int, help="samples of the naive loop")
    ap.add_argument("--repeats", type=int, help="repeats per measurement (median)")
    ap.add_argument("--no-env-compare", action="store_true",
                    help="do not re-measure with OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile run")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="first wait up to SECONDS for other processes to leave the CPUs")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    if args.quick:
        widths, inputs, samples, naive_samples, repeats = [128] * 4, 32, 8, 4, 3
        sizes, gemm_repeats = (256, 512), 3
    else:
        widths, inputs, samples, naive_samples, repeats = [1024] * 13, 256, 64, 16, 3
        sizes, gemm_repeats = (1024, 2048), 5
    samples = args.samples or samples
    naive_samples = args.naive_samples or naive_samples
    repeats = args.repeats or repeats
    if samples < 3 or repeats < 1:
        ap.error("--samples must be ≥ 3 and --repeats ≥ 1")

    if not args.child:
        print(f"# Monte Carlo throughput: mlp([{widths[0]}] * {len(widths)}, relu) "
              f"({len(widths) - 1} Linear layers), {inputs} inputs, 8-bit per-channel weights "
              f"+ 8-bit activations, noise mode\n")
        print("Command: python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]) + "\n")
        C.print_machine(C.machine())
    p = make_problem(widths, inputs)
    if args.wait_idle > 0:
        waited = C.wait_for_idle(args.wait_idle)
        if not args.child:
            print(f"(waited {waited:.0f} s for an idle machine)\n")
    with C.Contention() as busy:
        peaks = C.gemm_peak(sizes=sizes, repeats=gemm_repeats)
        torch_peaks = C.gemm_peak(sizes=sizes, repeats=gemm_repeats, library="torch") \
            if torch is not None else None
        rates = {np.dtype(dt).name: rng_rate(dt) for dt in (np.float32, np.float64)}
    payload = {"blas": C.blas_kernel(), "env": C.blas_env_set(), "peaks": peaks,
               "torch_peaks": torch_peaks, "rng_rates": rates, "gemm_contention": busy.others,
               "measured": [measure_dtype(p, dt, samples, naive_samples, repeats,
                                          full=not args.child)
                            for dt in (np.float32, np.float64)]}
    if args.child:
        C.emit_json(payload)
        return 0

    print(f"## GEMM peak: numpy and torch, n×n @ n×n, median of {gemm_repeats} "
          f"({busy.describe()})\n")
    print_gemm(payload)
    print(f"## Throughput: {repeats} round-robin repeats, medians; "
          f"{p.flops_per_sample * samples / 1e9:.0f} GFLOP per {samples}-sample run\n")
    rows = print_results(p, payload)
    print_targets(rows)

    print("## Where the time goes\n")
    print("Ceiling set by the random numbers alone (numpy SFC64, one thread, cache-sized "
          "blocks; the matmuls run at the numpy GEMM peak on all cores):\n")
    print_bound(p, payload)
    if torch is not None:
        S_cpu = min(samples, 16)
        chunk = payload["measured"][0]["chunks"].get("errprop", S_cpu)
        with C.Contention() as busy:
            cpu = cpu_seconds(p, S_cpu, np.float32, min(chunk, S_cpu))
        print(f"CPU seconds, float32, {S_cpu} samples, numpy BLAS and torch on one thread "
              f"(setup included; {busy.describe()}):\n")
        print(C.table(["run", "CPU s", "samples·inputs per CPU s", "vs torch"],
                      [[k, C.fmt(v), _num(S_cpu * p.x.shape[0] / v),
                        _times(cpu["torch"] / v)] for k, v in cpu.items()]))
        print()
    if not args.no_profile:
        with C.Contention() as busy:
            elapsed, parts = profile_errprop(p, samples, np.float32)
        print(f"errprop, float32, {samples} samples, cProfile ({elapsed:.2f} s; "
              f"{busy.describe()}):\n")
        print_split("errprop part", parts)
    for m in payload["measured"]:
        for key, split in m["parts"].items():
            n = m["naive_samples"] if key == "naive loop" else samples
            print(f"{key}, {m['dtype']}, {n} samples (timers, last repeat):\n")
            print_split("part", split)

    env = C.blas_env_set()
    if env and not args.no_env_compare:
        print("## OpenBLAS environment: as set vs both unset (subprocess)\n")
        child_args = ["--child", "--samples", str(samples), "--repeats", str(repeats),
                      "--wait-idle", str(args.wait_idle), *(["--quick"] if args.quick else [])]
        there, err = C.run_without_blas_env(os.path.abspath(__file__), child_args)
        if there is None:
            print(f"(the subprocess failed: {err.strip().splitlines()[-1] if err else '?'})\n")
        else:
            print_env_comparison(p, payload, there)
    elif not env:
        print("(OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE are not set: no comparison run)\n")
    print(f"Total benchmark time: {time.perf_counter() - t_start:.0f} s")
    return 0


def print_env_comparison(p: Problem, here: dict, there: dict) -> None:
    rows = []
    for label, payload in (("as set: " + ", ".join(f"{k}={v}" for k, v in here["env"].items()),
                            here), ("both unset", there)):
        for m in payload["measured"]:
            by = {r["method"]: r for r in summarize(p, m, _peak(payload, m["dtype"]))}
            e, s = by["errprop"], by["errprop, sampling only"]
            t = by.get("torch, chunk 1")
            rows.append([label, payload["blas"].split(",")[0], m["dtype"],
                         _num(_peak(payload, m["dtype"])),
                         _num(e["throughput"]), _num(s["throughput"]),
                         "-" if t is None else _num(t["throughput"]),
                         _times(e["throughput"] / t["throughput"]) if t else "-",
                         _times(s["throughput"] / t["throughput"]) if t else "-",
                         _pct(e["of_peak"]), _pct(s["of_peak"]),
                         f"{100 * m['contention']:.0f}%"])
    print(C.table(["OpenBLAS environment", "numpy BLAS", "dtype", "numpy GEMM peak GFLOP/s",
                   "errprop samples·inputs/s", "errprop sampling only",
                   "torch chunk 1", "errprop vs torch", "sampling only vs torch",
                   "errprop of peak", "sampling only of peak", "others' CPU"], rows))
    print()
    print("GEMM with both unset:\n")
    print_gemm(there)


if __name__ == "__main__":
    sys.exit(main())

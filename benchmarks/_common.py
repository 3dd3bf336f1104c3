"""Shared helpers for the benchmarks: timing with medians, GEMM peak, machine description.

Nothing here imports errprop; the benchmark scripts put this directory on
``sys.path`` (they are run as ``python benchmarks/bench_*.py``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

#: OpenBLAS variables that select the kernel / cache blocking; the benchmarks report
#: figures with and without them, tests and CI leave them alone
BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
#: marker of the machine-readable line a child run prints for its parent
JSON_MARK = "BENCH_JSON:"


# ---------------------------------------------------------------- timing
@dataclass
class Timing:
    """Wall times of repeated runs of one thing, in seconds."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def min(self) -> float:
        return min(self.times) if self.times else float("nan")

    @property
    def spread(self) -> float:
        """``(max − min) / median``: how noisy the repeats were."""
        if len(self.times) < 2:
            return 0.0
        return (max(self.times) - min(self.times)) / self.median


def wall(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    """Median-ready wall times of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    return Timing([wall(fn) for _ in range(repeats)])


def measure_interleaved(fns: Mapping[str, Callable[[], object]], repeats: int,
                        warmup: int = 0) -> dict[str, Timing]:
    """Time several things round-robin (``a b c a b c ...``), so a slow phase of the
    machine hits all of them alike and the same-run ratios stay meaningful."""
    out = {name: Timing() for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].times.append(wall(fn))
    return out


# ---------------------------------------------------------------- contention
class Contention:
    """CPU time used by *other* processes while a block runs, as a fraction of the machine.

    Reads ``/proc/stat`` (all CPUs) and this process's own CPU time (``os.times``,
    children included). Benchmarks on a shared machine are only meaningful when
    this stays near 0; a busy neighbour with its own BLAS threads can slow
    OpenBLAS down several-fold (its threads spin and get preempted).
    """

    def __init__(self) -> None:
        self.others = float("nan")
        self.steal = float("nan")

    @staticmethod
    def _proc_stat() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [float(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
        steal = fields[7] if len(fields) > 7 else 0.0
        return (sum(fields[:8]) - idle - steal) / tick, steal / tick, time.perf_counter()

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> Contention:
        self._start = self._proc_stat()
        self._own0 = self._own()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._proc_stat()
        if self._start is None or end is None:
            return
        elapsed = end[2] - self._start[2]
        cpus = os.cpu_count() or 1
        if elapsed <= 0:
            return
        busy = end[0] - self._start[0]
        own = self._own() - self._own0
        self.others = max(0.0, (busy - own) / (elapsed * cpus))
        self.steal = (end[1] - self._start[1]) / (elapsed * cpus)

    def describe(self) -> str:
        if self.others != self.others:  # nan
            return "contention: unknown (no /proc/stat)"
        note = "" if self.others < 0.05 else "  ← machine busy, figures unreliable"
        return (f"other processes used {100 * self.others:.0f}% of the CPUs, "
                f"hypervisor steal {100 * self.steal:.0f}%{note}")


def wait_for_idle(max_wait: float, threshold: float = 0.05, window: float = 2.0) -> float:
    """Wait (up to ``max_wait`` seconds) until other processes use less than
    ``threshold`` of the CPUs over a ``window``; returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        with Contention() as c:
            time.sleep(window)
        if not c.others >= threshold:  # also stops when /proc/stat is unavailable
            break
    return time.perf_counter() - t0


# ---------------------------------------------------------------- GEMM peak
def gemm_peak(dtypes: Sequence[type] = (np.float32, np.float64),
              sizes: Sequence[int] = (1024, 2048), repeats: int = 5,
              library: str = "numpy") -> dict[str, dict[int, float]]:
    """GFLOP/s of one square ``n×n @ n×n`` product per dtype and size: the median of
    ``repeats`` runs after a warm-up, ``2n³`` flops each. ``library`` is ``"numpy"``
    or ``"torch"`` (the torch product runs on torch's own BLAS)."""
    rng = np.random.default_rng(0)
    out: dict[str, dict[int, float]] = {}
    for dt in dtypes:
        name = np.dtype(dt).name
        out[name] = {}
        for n in sizes:
            a = rng.standard_normal((n, n)).astype(dt)
            b = rng.standard_normal((n, n)).astype(dt)
            if library == "torch":
                import torch

                ta, tb = torch.from_numpy(a), torch.from_numpy(b)
                fn: Callable[[], object] = lambda: torch.mm(ta, tb)  # noqa: E731
            else:
                fn = lambda: a @ b  # noqa: E731
            t = measure(fn, repeats, warmup=1)
            out[name][n] = 2.0 * n ** 3 / t.median / 1e9
    return out


def peak_of(gflops: Mapping[int, float]) -> float:
    """The machine's peak for one dtype: the best size's median GFLOP/s."""
    return max(gflops.values())


# ---------------------------------------------------------------- machine
def cpu_model() -> str:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    key, value = (s.strip() for s in line.split(":", 1))
                    info.setdefault(key, value)
    except OSError:
        return platform.processor() or platform.machine()
    model = info.get("model name", platform.machine())
    extra = []
    if "cpu family" in info:
        extra.append(f"family {info['cpu family']} model {info.get('model', '?')}")
    flags = info.get("flags", "").split()
    simd = [f for f in ("avx2", "fma", "avx512f") if f in flags]
    if simd:
        extra.append("+".join(simd))
    if "hypervisor" in flags:
        extra.append("virtual machine")
    return f"{model} ({', '.join(extra)})" if extra else model


def blas_info() -> list[dict[str, object]]:
    """The thread pools threadpoolctl sees (BLAS kernel = ``architecture``), or numpy's
    build configuration when threadpoolctl is not installed."""
    try:
        import threadpoolctl
    except ImportError:
        try:
            cfg = np.show_config(mode="dicts")  # type: ignore[call-arg]
            blas = cfg["Build Dependencies"]["blas"]
            return [{"source": "numpy.show_config", "name": blas.get("name"),
                     "version": blas.get("version"),
                     "configuration": blas.get("openblas configuration")}]
        except Exception:  # noqa: BLE001 - best effort, old numpy
            return [{"source": "unknown"}]
    keep = ("internal_api", "version", "architecture", "num_threads", "threading_layer")
    out = []
    for p in threadpoolctl.threadpool_info():
        info = {k: p.get(k) for k in keep if p.get(k) is not None}
        # which package shipped the library: numpy.libs, scipy.libs, torch/lib, ...
        parts = str(p.get("filepath", "")).replace("\\", "/").split("/")
        owner = next((d for d in reversed(parts[:-1]) if d.split(".")[0] in
                      ("numpy", "scipy", "torch", "sklearn")), parts[-1] if parts else "?")
        out.append({"owner": owner.split(".")[0], **info})
    return out


def blas_kernel() -> str:
    """One line: numpy's BLAS and the kernel it picked on this CPU."""
    pools = blas_info()
    for p in sorted(pools, key=lambda p: p.get("owner") != "numpy"):
        if p.get("internal_api") in ("openblas", "mkl", "blis"):
            return (f"{p['internal_api']} {p.get('version', '')} kernel "
                    f"{p.get('architecture', '?')}, {p.get('num_threads', '?')} threads")
    p = pools[0]
    return f"{p.get('name', '?')} {p.get('version', '')} (threadpoolctl not installed)"


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    out: dict[str, object] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_blas": blas_kernel(),
        "all_thread_pools": "; ".join(
            f"{p.get('owner', '?')}: {p.get('internal_api', p.get('name', '?'))} "
            f"{p.get('version', '')} {p.get('architecture', '')}".strip()
            for p in blas_info()),
        "blas_env": {k: os.environ[k] for k in BLAS_ENV if k in os.environ},
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                  "MKL_NUM_THREADS") if k in os.environ},
    }
    try:
        import torch

        out["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads, BLAS " \
                       f"{'MKL' if torch.backends.mkl.is_available() else 'other'})"
    except ImportError:
        out["torch"] = "not installed"
    try:
        import errprop

        out["errprop"] = errprop.__version__
    except ImportError:
        pass
    return out


def print_machine(info: Mapping[str, object]) -> None:
    print("Machine:")
    for key, value in info.items():
        print(f"  {key}: {value if value not in ({}, None) else '-'}")
    print()


# ---------------------------------------------------------------- output
def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (numbers already formatted by the caller)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def fmt(value: float, digits: int = 3) -> str:
    if value != value:
        return "-"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return f"{value:.{digits - 1}e}"


def emit_json(payload: object) -> None:
    """The line a child run prints for its parent (see :func:`run_without_blas_env`)."""
    print(JSON_MARK + json.dumps(payload), flush=True)


def run_without_blas_env(script: str, args: Sequence[str],
                         timeout: float = 600.0) -> tuple[dict | None, str]:
    """Run ``script args`` in a subprocess with every variable of :data:`BLAS_ENV`
    unset (together), and return the JSON payload it emitted and its stderr tail."""
    env = {k: v for k, v in os.environ.items() if k not in BLAS_ENV}
    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    payload = None
    for line in proc.stdout.splitlines():
        if line.startswith(JSON_MARK):
            payload = json.loads(line[len(JSON_MARK):])
    err = "" if proc.returncode == 0 else proc.stderr[-2000:]
    return payload, err


def blas_env_set() -> dict[str, str]:
    return {k: os.environ[k] for k in BLAS_ENV if k in os.environ}

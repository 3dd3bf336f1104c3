"""Sweeps: a grid of models x quantizer settings x seeds on any ``concurrent.futures``
executor, every finished row stored at once, so that an interrupted sweep resumes where it
stopped.

Storage in ``out``: ``cache/<key>.json`` per row (written atomically; the truth), ``rows.csv``
(one fully-formed line appended and fsynced per finished row, rewritten atomically in grid
order at the start and the end of every run), ``log.txt`` (one ``done`` line per stored row)
and, on request, ``rows.parquet``. ``key`` is a hash of everything that determines the row.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import importlib
import inspect
import io
import itertools
import json
import math
import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._files import write_text

#: grid axes and their defaults; the bits axes take an int, or None / "none" / 0 for "not
#: quantized". ``granularity`` and ``group_size`` apply to the weights; ``symmetric``,
#: ``rounding``, ``clip`` and ``scale`` to every quantizer; ``mc_samples`` 0 means no Monte Carlo.
DEFAULTS: dict[str, Any] = {
    "weights": 8, "granularity": "channel", "group_size": None, "activations": None,
    "biases": None, "input": None, "norms": None, "embeddings": None, "symmetric": True,
    "rounding": "nearest", "clip": "minmax", "scale": "float", "mc_samples": 0}
BITS = ("weights", "activations", "biases", "input", "norms", "embeddings")
RESULTS = ("status", "output_sqnr_db", "exact_mse", "predicted_mse", "predicted_by",
           "first_order_residual", "mc_mse", "mc_mse_lo", "mc_mse_hi", "seconds", "error")
COLUMNS = ("model", "seed", *DEFAULTS, *RESULTS, "key")
BUILDERS = ("mlp", "transformer", "transformer_block")
_MODEL_KEYS = {"builder", "args", "path", "options", "input"}
_INPUT_KEYS = {"shape", "scale", "file", "sentences", "max_length"}
_SCHEMA = 1


@dataclass
class SweepResult:
    """The rows of a sweep in grid order (models, then configurations, then seeds).

    ``computed`` and ``cached`` list the keys computed by this call and those taken from the
    cache; ``failed`` the keys whose worker was lost (not stored: the next run computes them).
    """

    rows: list[dict[str, Any]]
    computed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    out: Path | None = None

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Rows whose configuration raised (``status == "error"``) or whose worker was lost."""
        return [r for r in self.rows if r["status"] != "ok"]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def table(self) -> str:
        """One line per row: model, seed, the axes that vary, SQNR and MSEs (or the error)."""
        vary = [k for k in DEFAULTS if len({repr(r[k]) for r in self.rows}) > 1]
        lines = []
        for r in self.rows:
            what = " ".join([r["model"], f"seed={r['seed']}"] + [f"{k}={r[k]}" for k in vary])
            if r["status"] == "ok":
                mc = "" if r["mc_mse"] is None else f", MC {r['mc_mse']:.3g}"
                lines.append(f"{what}: {r['output_sqnr_db']:.2f} dB, MSE exact "
                             f"{r['exact_mse']:.3g}, {r['predicted_by']} "
                             f"{r['predicted_mse']:.3g}{mc}")
            else:
                lines.append(f"{what}: {r['status']}: {r['error']}")
        return "\n".join(lines)


def sweep(models: Mapping[str, Mapping[str, Any] | str],
          grid: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None, *,
          seeds: Sequence[int] = (0,), out: str | os.PathLike | None = None,
          executor: cf.Executor | None = None, workers: int | None = None,
          root: str | os.PathLike | None = None, mse_work_limit: float = 1e10,
          retry_errors: bool = False, parquet: bool = False,
          on_row: Callable[[dict[str, Any]], None] | None = None) -> SweepResult:
    """Run ``analyze`` (and optionally ``monte_carlo``) over models x grid x seeds.

    Parameters
    ----------
    models : mapping name -> spec. A spec is a path (errprop folder, BERT folder, .onnx,
        .pt, or ``"minilm"``) or a dict with ``builder`` (``"mlp"``, ``"transformer"``,
        ``"transformer_block"`` or ``"module:function"``) and ``args``, or ``path`` and
        ``options`` (for :func:`errprop.load`); and ``input``: ``{"shape": [...], "scale": s}``
        (Gaussian, drawn from the row's seed), ``{"file": "x.npy"}`` or
        ``{"sentences": [...], "max_length": n}`` (BERT folders). Builders get the row's seed
        unless ``args`` fix one; mlp and transformers have a default input shape. Workers
        rebuild each model from its spec and keep the last two per process.
    grid : mapping axis -> value or list of values (their product), or a list of such
        mappings (the union). Axes and defaults: :data:`DEFAULTS`.
    seeds : one row per seed: it seeds the builder, the input draw, stochastic rounding and
        Monte Carlo.
    out : folder for the cache, ``rows.csv``, ``log.txt`` (None: keep nothing).
    executor : any ``concurrent.futures.Executor``, e.g. ``Client(...).get_executor()`` of
        dask.distributed; default a spawn ``ProcessPoolExecutor`` with ``workers`` processes
        (``workers=1``: in this process). Workers must import errprop and see the paths.
    root : folder that relative paths in the specs are relative to (default: the current one).
    mse_work_limit : ``predicted_mse`` is the analytic first-order MSE when it costs at most
        this many multiply-adds, else the energy of the first-order error (``predicted_by``).
    retry_errors : recompute stored error rows instead of reusing them.
    parquet : also write ``rows.parquet`` (needs pyarrow).
    on_row : called with each row as it is stored (or taken from the cache).

    Returns
    -------
    SweepResult
        Rows with the model, the seed, every axis of :data:`DEFAULTS` and the results
        :data:`RESULTS`. A configuration that raises becomes a row with ``status="error"``
        and the message; the sweep goes on.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ValueError(f"sweep: workers must be a positive int, got {workers!r}")
    if parquet:
        importlib.import_module("pyarrow")  # fail now, not after the sweep
    tasks = _tasks(models, grid, seeds, mse_work_limit, Path(root or os.getcwd()).resolve())
    store = _Store(Path(out), list(tasks)) if out is not None else None
    result = SweepResult(rows=[], out=store.folder if store else None)
    done: dict[str, dict[str, Any]] = {}
    try:
        for key, task in tasks.items():
            row = store.cached(key, task) if store else None
            if row is not None and not (retry_errors and row["status"] == "error"):
                done[key] = row
                result.cached.append(key)
                if on_row:
                    on_row(row)
        pending = [(k, t) for k, t in tasks.items() if k not in done]
        if store:
            store.begin(done, len(tasks), len(pending))

        def finish(key: str, row: dict[str, Any]) -> None:
            done[key] = row
            if row["status"] == "failed":
                result.failed.append(key)
            else:
                result.computed.append(key)
                if store:
                    store.add(key, tasks[key], row)
            if on_row:
                on_row(row)

        if executor is None and workers == 1:
            for key, task in pending:
                finish(key, _compute(task))
        elif pending:
            own = executor is None
            pool = executor or cf.ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
            futures = {pool.submit(_compute, task): key for key, task in pending}
            try:
                for fut in cf.as_completed(futures):
                    key = futures[fut]
                    try:
                        row = fut.result()
                    except Exception as exc:  # the worker was lost, not the configuration
                        row = _row(tasks[key], status="failed", error=_message(exc))
                    finish(key, row)
            finally:
                for fut in futures:
                    fut.cancel()
                if own:
                    pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if store:
            store.close(done, parquet)
    result.rows = [done[k] for k in tasks if k in done]
    return result


# ---- the grid ---------------------------------------------------------------------------

def _tasks(models: Mapping[str, Any], grid: Any, seeds: Sequence[int], mse_work_limit: float,
           root: Path) -> dict[str, dict[str, Any]]:
    if not isinstance(models, Mapping) or not models:
        raise TypeError(f"sweep: models must be a non-empty mapping name -> spec, got "
                        f"{type(models).__name__}")
    specs = {str(name): _model_spec(name, spec) for name, spec in models.items()}
    seeds = [seeds] if isinstance(seeds, (int, np.integer)) else list(seeds)
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise TypeError(f"sweep: seeds must be non-negative ints, got {s!r}")
    points = list(_points(grid))
    tasks: dict[str, dict[str, Any]] = {}
    for name, spec in specs.items():
        for point in points:
            for seed in seeds:
                task = {"schema": _SCHEMA, "model": name, "spec": spec, "seed": int(seed),
                        "config": point, "mse_work_limit": float(mse_work_limit)}
                key = hashlib.sha256(_canonical(task).encode()).hexdigest()[:20]
                tasks.setdefault(key, {**task, "root": str(root), "key": key})
    return tasks


def _hashed(task: dict[str, Any]) -> dict[str, Any]:
    """What the key is a hash of: not where the paths are relative to, nor the key."""
    return {k: v for k, v in task.items() if k not in ("root", "key")}


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_plain)


def _plain(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, np.ndarray)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"sweep: specs hold plain values (numbers, strings, lists, dicts), got "
                    f"{type(obj).__name__}")


def _model_spec(name: Any, spec: Any) -> dict[str, Any]:
    if isinstance(spec, (str, os.PathLike)):
        spec = {"path": os.fspath(spec)}
    if not isinstance(spec, Mapping):
        raise TypeError(f"sweep: model {name!r} must be a path or a mapping, got "
                        f"{type(spec).__name__}")
    spec = json.loads(_canonical(dict(spec)))
    unknown = set(spec) - _MODEL_KEYS
    if unknown:
        raise ValueError(f"sweep: model {name!r} has unknown keys {sorted(unknown)}; "
                         f"expected {sorted(_MODEL_KEYS)}")
    if ("builder" in spec) == ("path" in spec):
        raise ValueError(f"sweep: model {name!r} needs exactly one of 'builder' or 'path'")
    if "builder" in spec:
        _builder(spec["builder"])  # an unknown builder is a mistake in the spec: say so now
    if not isinstance(spec.get("input", {}), Mapping) or set(spec.get("input", {})) - _INPUT_KEYS:
        raise ValueError(f"sweep: model {name!r}: input must be a mapping with keys from "
                         f"{sorted(_INPUT_KEYS)}, got {spec['input']!r}")
    return spec


def _points(grid: Any) -> Iterator[dict[str, Any]]:
    grids = [grid or {}] if grid is None or isinstance(grid, Mapping) else list(grid)
    for g in grids:
        if not isinstance(g, Mapping):
            raise TypeError(f"sweep: grid must be a mapping axis -> values or a list of them, "
                            f"got {type(g).__name__}")
        unknown = set(g) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"sweep: unknown grid axes {sorted(unknown)}; the axes are "
                             f"{list(DEFAULTS)}")
        axes = [[(k, v) for v in (g[k] if isinstance(g[k], (list, tuple)) else [g[k]])]
                for k in g]
        for combo in itertools.product(*axes):
            point = {**DEFAULTS, **dict(combo)}
            for k in BITS:
                if point[k] is None or point[k] is False or point[k] == 0 \
                        or (isinstance(point[k], str) and point[k].lower() == "none"):
                    point[k] = None
            yield json.loads(_canonical(point))


# ---- one row, in a worker ---------------------------------------------------------------

_NETS: OrderedDict[str, Any] = OrderedDict()
_NETS_LOCK = threading.Lock()


def _builder(name: str) -> Callable[..., Any]:
    if name in BUILDERS:
        from . import _builders
        return getattr(_builders, name)
    module, sep, attr = str(name).partition(":")
    if not sep:
        raise ValueError(f"sweep: unknown builder {name!r}; use one of {list(BUILDERS)} or "
                         f"'module:function'")
    return getattr(importlib.import_module(module), attr)


def _resolve(path: str, root: str) -> Path:
    if path == "minilm" and not (Path(root) / path).exists():
        from ._bert import minilm_path
        return minilm_path()
    return Path(root) / path


def _network(task: dict[str, Any]) -> Any:
    spec, seed = task["spec"], task["seed"]
    args = dict(spec.get("args", {}))
    if "builder" in spec:
        fn = _builder(spec["builder"])
        if "seed" not in args and "seed" in inspect.signature(fn).parameters:
            args["seed"] = seed
    key = _canonical([spec.get("builder"), spec.get("path"), args, spec.get("options"),
                      task["root"]])
    with _NETS_LOCK:
        if key in _NETS:
            _NETS.move_to_end(key)
            return _NETS[key]
    if "builder" in spec:
        net = fn(**args)
    else:
        from ._io import load
        net = load(_resolve(spec["path"], task["root"]), **spec.get("options", {}))
    with _NETS_LOCK:
        _NETS[key] = net
        while len(_NETS) > 2:
            _NETS.popitem(last=False)
    return net


def _input(task: dict[str, Any], net: Any) -> tuple[Any, np.ndarray]:
    spec, seed = task["spec"], task["seed"]
    given = spec.get("input")
    if not given:
        args = spec.get("args", {})
        if spec.get("builder") == "mlp":
            given = {"shape": [64, args["widths"][0]]}
        elif spec.get("builder") in ("transformer", "transformer_block"):
            given = {"shape": [4, 8, args["d_model"]]}
        else:
            raise ValueError(f"model {task['model']!r}: give an input (shape, file or "
                             f"sentences)")
    if "file" in given:
        return net, np.load(Path(task["root"]) / given["file"], allow_pickle=False)
    if "sentences" in given:
        from ._bert import encode
        return encode(net, _resolve(spec["path"], task["root"]), given["sentences"],
                      max_length=given.get("max_length", 128))
    # a stream of its own, so the input is independent of weights drawn from the same seed
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    return net, given.get("scale", 1.0) * rng.standard_normal(tuple(given["shape"]))


def _quant_config(point: dict[str, Any]) -> Any:
    from ._config import QuantConfig
    from ._quant import Uniform
    common = {k: point[k] for k in ("symmetric", "rounding", "clip", "scale")}

    def q(bits: int | None, **kw: Any) -> Any:
        return None if bits is None else Uniform(bits, **common, **kw)
    return QuantConfig(
        weights=q(point["weights"], granularity=point["granularity"],
                  group_size=point["group_size"]),
        biases=q(point["biases"]), activations=q(point["activations"]),
        input=q(point["input"]), norms=q(point["norms"]),
        embeddings=q(point["embeddings"], granularity="channel"))


def _row(task: dict[str, Any], **results: Any) -> dict[str, Any]:
    row = {"model": task["model"], "seed": task["seed"], **task["config"]}
    row.update({k: None for k in RESULTS})
    row.update(results, key=task["key"])
    return row


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def _compute(task: dict[str, Any]) -> dict[str, Any]:
    """One row: never raises for a failing configuration (it becomes an error row)."""
    from ._analysis import analyze
    from ._montecarlo import monte_carlo
    start = time.perf_counter()
    seed, samples = task["seed"], task["config"]["mc_samples"]
    try:
        net, x = _input(task, _network(task))
        config = _quant_config(task["config"])
        report = analyze(net, x, config, seed=seed,
                         statistics_work_limit=task["mse_work_limit"])
        predicted, method = report.predicted_mse()
        by = {"statistics": "analytic", "first order": "first_order_energy"}[method]
        results = {"status": "ok", "output_sqnr_db": report.sqnr_db,
                   "exact_mse": report.exact_mse, "predicted_mse": predicted,
                   "predicted_by": by, "first_order_residual": report.residual}
        if samples:
            mc = monte_carlo(net, x, config, samples=samples, seed=seed, quantiles=(),
                             progress=False, nodes=())
            results.update(mc_mse=mc.mse, mc_mse_lo=mc.mse_ci[0], mc_mse_hi=mc.mse_ci[1])
    except Exception as exc:
        results = {"status": "error", "error": _message(exc)}
    results = {k: float(v) if isinstance(v, (float, np.floating)) else v
               for k, v in results.items()}
    return _row(task, **results, seconds=time.perf_counter() - start)


# ---- storage ----------------------------------------------------------------------------

def _encode(row: dict[str, Any]) -> dict[str, Any]:
    # strict JSON: non-finite floats become the strings "nan", "inf", "-inf"
    return {k: repr(v) if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in row.items()}


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    return {k: float(v) if isinstance(v, str) and v in ("nan", "inf", "-inf")
            and k in RESULTS else v for k, v in row.items()}


def _csv_line(row: dict[str, Any] | None) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS if row is None else
                    ["" if row[c] is None else row[c] for c in COLUMNS])
    return buf.getvalue()


class _Store:
    """``out``: the cache (one JSON per row), rows.csv, log.txt; one sweep at a time."""

    def __init__(self, folder: Path, keys: list[str]) -> None:
        self.folder, self.keys = folder, keys
        self.cache = folder / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.csv = folder / "rows.csv"
        self._lock = open(folder / ".lock", "a")  # noqa: SIM115 - held until close()
        try:
            import fcntl
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - Windows: no lock
            pass
        except OSError:
            self._lock.close()
            raise RuntimeError(f"another sweep is writing to {folder}") from None
        self._fd: int | None = None

    def cached(self, key: str, task: dict[str, Any]) -> dict[str, Any] | None:
        """The stored row, or None when absent, unreadable or for another task."""
        try:
            doc = json.loads((self.cache / f"{key}.json").read_text(encoding="utf-8"))
            stored = _hashed(task)
            return _decode(doc["row"]) if doc["task"] == stored else None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a torn or foreign file: compute the row again

    def _rewrite(self, done: dict[str, dict[str, Any]]) -> None:
        rows = [done[k] for k in self.keys if k in done and done[k]["status"] != "failed"]
        write_text(self.csv, _csv_line(None) + "".join(_csv_line(r) for r in rows))

    def _log(self, text: str) -> None:
        with open(self.folder / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")

    def begin(self, done: dict[str, dict[str, Any]], total: int, pending: int) -> None:
        self._rewrite(done)  # drops a line torn by a crash of the machine and foreign rows
        self._fd = os.open(self.csv, os.O_WRONLY | os.O_APPEND)
        self._log(f"start {total} rows: {total - pending} stored, {pending} to compute")

    def add(self, key: str, task: dict[str, Any], row: dict[str, Any]) -> None:
        stored = _hashed(task)
        write_text(self.cache / f"{key}.json",
                   json.dumps({"task": stored, "row": _encode(row)}, indent=1) + "\n")
        assert self._fd is not None
        os.write(self._fd, _csv_line(row).encode("utf-8"))  # one whole line per write
        os.fsync(self._fd)
        self._log(f"done {key} {row['status']} {row['seconds']:.3f}s")

    def close(self, done: dict[str, dict[str, Any]], parquet: bool) -> None:
        try:
            if self._fd is not None:
                os.close(self._fd)
                self._rewrite(done)
                self._log(f"end {sum(k in done for k in self.keys)} of {len(self.keys)} rows")
                if parquet:
                    self._parquet(done)
        finally:
            self._lock.close()

    def _parquet(self, done: dict[str, dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        rows = [done[k] for k in self.keys if k in done and done[k]["status"] != "failed"]
        table = pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows])
        tmp = self.folder / f".rows.parquet.{os.getpid()}"
        pq.write_table(table, tmp)
        os.replace(tmp, self.folder / "rows.parquet")

"""Sweeps: a grid of models x quantizer settings x seeds on any ``concurrent.futures``
executor, every finished row stored at once, so that an interrupted sweep resumes where it
stopped.

Storage in ``out``: see :mod:`errprop._sweep_store`. ``key`` is a hash of everything that
determines the row.

A spec is code: a builder ``"module:function"`` is imported and called. Only errprop's own
builders (:data:`BUILDERS`) run unless the caller passes ``trusted=True``.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import importlib
import inspect
import itertools
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._checks import check_bool, check_real
from ._sweep_store import Store
from ._sweep_worker import BUILDERS, RESULTS, builder, canonical, compute, make_row, message

#: grid axes and their defaults; the bits axes take an int, or None / "none" / 0 for "not
#: quantized". ``granularity`` and ``group_size`` apply to the weights; ``symmetric``,
#: ``rounding``, ``clip`` and ``scale`` to every quantizer; ``mc_samples`` 0 means no Monte Carlo.
DEFAULTS: dict[str, Any] = {
    "weights": 8, "granularity": "channel", "group_size": None, "activations": None,
    "biases": None, "input": None, "norms": None, "embeddings": None, "symmetric": True,
    "rounding": "nearest", "clip": "minmax", "scale": "float", "mc_samples": 0}
BITS = ("weights", "activations", "biases", "input", "norms", "embeddings")
__all__ = ["BUILDERS", "COLUMNS", "DEFAULTS", "RESULTS", "SweepResult", "sweep"]
COLUMNS = ("model", "seed", "seed_independent", *DEFAULTS, *RESULTS, "key")
_MODEL_KEYS = {"builder", "args", "path", "options", "input"}
_INPUT_KEYS = {"shape", "scale", "file", "sentences", "max_length"}
_SCHEMA = 1


@dataclass
class SweepResult:
    """The rows of a sweep in grid order (models, then configurations, then seeds).

    A row that no seed can change (a loaded model on a given input with deterministic
    rounding and no Monte Carlo) is computed once: ``seed`` None, ``seed_independent`` True.

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
            what = " ".join([r["model"], f"seed={seed_label(r)}"]
                            + [f"{k}={r[k]}" for k in vary])
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
          retry_errors: bool = False, parquet: bool = False, trusted: bool = False,
          on_row: Callable[[dict[str, Any]], None] | None = None) -> SweepResult:
    """Run ``analyze`` (and optionally ``monte_carlo``) over models x grid x seeds.

    Parameters
    ----------
    models : mapping name -> spec. A spec is a path (errprop folder, BERT folder, .onnx,
        .pt, or ``"minilm"``) or a dict with ``builder`` (``"mlp"``, ``"transformer"``,
        ``"transformer_block"``, or ``"module:function"`` with ``trusted=True``) and
        ``args``, or ``path`` and
        ``options`` (for :func:`errprop.load`); and ``input``: ``{"shape": [...], "scale": s}``
        (Gaussian, drawn from the row's seed), ``{"file": "x.npy"}`` or
        ``{"sentences": [...], "max_length": n}`` (BERT folders). Builders get the row's seed
        unless ``args`` fix one; mlp and transformers have a default input shape. Workers
        rebuild each model from its spec and keep the last two per process.
    grid : mapping axis -> value or list of values (their product), or a list of such
        mappings (the union). Axes and defaults: :data:`DEFAULTS`.
    seeds : one row per seed: it seeds the builder, the input draw, stochastic rounding and
        Monte Carlo. Where none of these is in play (a loaded model on an input file or
        sentences, rounding not stochastic, no Monte Carlo) the seeds cannot change the row:
        it is computed once and marked ``seed_independent`` (``seed`` None).
    out : folder for the cache, ``rows.csv``, ``log.txt`` (None: keep nothing).
    executor : any ``concurrent.futures.Executor``, e.g. ``Client(...).get_executor()`` of
        dask.distributed; default a spawn ``ProcessPoolExecutor`` with ``workers`` processes
        (``workers=1``: in this process). Workers must import errprop and see the paths.
    root : folder that relative paths in the specs are relative to (default: the current one).
    mse_work_limit : ``predicted_mse`` is the analytic first-order MSE when it costs at most
        this many multiply-adds, else the energy of the first-order error (``predicted_by``).
    retry_errors : recompute stored error rows instead of reusing them.
    parquet : also write ``rows.parquet`` (needs pyarrow).
    trusted : run any ``"module:function"`` builder the spec names, and load model files
        that run code (TorchScript; ``errprop.load(..., trusted=True)``). A spec that may
        name other code must be trusted like a script. Default False: only :data:`BUILDERS`.
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
    trusted = check_bool(trusted, "sweep", "trusted")
    retry_errors = check_bool(retry_errors, "sweep", "retry_errors")
    parquet = check_bool(parquet, "sweep", "parquet")
    mse_work_limit = check_real(mse_work_limit, "sweep", "mse_work_limit", positive=True,
                                finite=False)
    if parquet:
        importlib.import_module("pyarrow")  # fail now, not after the sweep
    tasks = _tasks(models, grid, seeds, mse_work_limit, Path(root or os.getcwd()).resolve(),
                   trusted)
    store = Store(Path(out), list(tasks), COLUMNS, RESULTS) if out is not None else None
    result = SweepResult(rows=[], out=store.folder if store else None)
    done: dict[str, dict[str, Any]] = {}
    try:
        for key, task in tasks.items():
            row = store.cached(key, _hashed(task)) if store else None
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
                    store.add(key, _hashed(tasks[key]), row)
            if on_row:
                on_row(row)

        if executor is None and workers == 1:
            for key, task in pending:
                finish(key, compute(task))
        elif pending:
            own = executor is None
            pool = executor or cf.ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
            futures = {pool.submit(compute, task): key for key, task in pending}
            try:
                for fut in cf.as_completed(futures):
                    key = futures[fut]
                    try:
                        row = fut.result()
                    except Exception as exc:  # the worker was lost, not the configuration
                        row = make_row(tasks[key], status="failed", error=message(exc))
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
           root: Path, trusted: bool = False) -> dict[str, dict[str, Any]]:
    if not isinstance(models, Mapping) or not models:
        raise TypeError(f"sweep: models must be a non-empty mapping name -> spec, got "
                        f"{type(models).__name__}")
    specs = {str(name): _model_spec(name, spec, trusted) for name, spec in models.items()}
    seeds = [seeds] if isinstance(seeds, (int, np.integer)) else list(seeds)
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise TypeError(f"sweep: seeds must be non-negative ints, got {s!r}")
    points = list(_points(grid))
    tasks: dict[str, dict[str, Any]] = {}
    for name, spec in specs.items():
        for point in points:
            row_seeds = ([int(s) for s in seeds] if _seed_matters(spec, point, trusted)
                         else [None] if seeds else [])
            for seed in row_seeds:
                task = {"schema": _SCHEMA, "model": name, "spec": spec, "seed": seed,
                        "config": point, "mse_work_limit": float(mse_work_limit)}
                key = hashlib.sha256(canonical(task).encode()).hexdigest()[:20]
                tasks.setdefault(key, {**task, "root": str(root), "trusted": trusted,
                                       "key": key})
    return tasks


def _seed_matters(spec: dict[str, Any], point: dict[str, Any], trusted: bool) -> bool:
    """Whether a row's seed can change it: it seeds a builder, a Gaussian input draw,
    stochastic rounding and Monte Carlo, and nothing else."""
    if point["mc_samples"] or point["rounding"] == "stochastic":
        return True
    given = spec.get("input") or {}
    if "file" not in given and "sentences" not in given:
        return True  # a Gaussian draw (the builders' default input too)
    if "builder" in spec and "seed" not in spec.get("args", {}):
        return "seed" in inspect.signature(builder(spec["builder"], trusted)).parameters
    return False


def seed_label(row: dict[str, Any]) -> str:
    """The row's seed, or ``any`` for a row no seed can change."""
    return "any" if row.get("seed_independent") else str(row["seed"])


def _hashed(task: dict[str, Any]) -> dict[str, Any]:
    """What the key is a hash of: not where the paths are relative to, whether the caller
    trusts the spec, nor the key."""
    return {k: v for k, v in task.items() if k not in ("root", "trusted", "key")}


def _model_spec(name: Any, spec: Any, trusted: bool) -> dict[str, Any]:
    if isinstance(spec, (str, os.PathLike)):
        spec = {"path": os.fspath(spec)}
    if not isinstance(spec, Mapping):
        raise TypeError(f"sweep: model {name!r} must be a path or a mapping, got "
                        f"{type(spec).__name__}")
    spec = json.loads(canonical(dict(spec)))
    unknown = set(spec) - _MODEL_KEYS
    if unknown:
        raise ValueError(f"sweep: model {name!r} has unknown keys {sorted(unknown)}; "
                         f"expected {sorted(_MODEL_KEYS)}")
    if ("builder" in spec) == ("path" in spec):
        raise ValueError(f"sweep: model {name!r} needs exactly one of 'builder' or 'path'")
    if "builder" in spec:
        builder(spec["builder"], trusted, name)  # a mistake in the spec: say so now
        own = str(spec["builder"]).partition("errprop:")
        if not own[0] and own[2] in BUILDERS:
            spec["builder"] = own[2]  # "errprop:mlp" is "mlp": the same rows, the same keys
    if "trusted" in (spec.get("options") or {}):
        raise ValueError(f"sweep: model {name!r}: a spec cannot declare itself trusted "
                         f"(options.trusted); the caller passes trusted=True (--trust-code)")
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
            yield json.loads(canonical(point))

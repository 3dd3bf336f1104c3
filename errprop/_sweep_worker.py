"""One row of a sweep, computed in a worker process: rebuild the model from its spec (the
last two per process are kept), draw or read its input, ``analyze`` and optionally
``monte_carlo``. A configuration that raises becomes an error row."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ._graph import suggest

#: the builders a spec may name without ``trusted=True`` (also as ``"errprop:NAME"``)
BUILDERS = ("mlp", "transformer", "transformer_block")
RESULTS = ("status", "output_sqnr_db", "exact_mse", "predicted_mse", "predicted_by",
           "first_order_residual", "mc_mse", "mc_mse_lo", "mc_mse_hi", "seconds", "error")


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=plain)


def plain(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, np.ndarray)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"sweep: specs hold plain values (numbers, strings, lists, dicts), got "
                    f"{type(obj).__name__}")


_NETS: OrderedDict[str, Any] = OrderedDict()
_NETS_LOCK = threading.Lock()


def builder(name: Any, trusted: bool, model: Any = None) -> Callable[..., Any]:
    """The function a spec's ``builder`` names: one of :data:`BUILDERS` (``"mlp"`` or
    ``"errprop:mlp"``), or with ``trusted`` any ``"module:function"``."""
    who = "sweep: " + ("" if model is None else f"model {model!r}: ")
    text = str(name)
    module, sep, attr = text.partition(":")
    own = attr if sep and module == "errprop" else text if not sep else None
    if own is not None:
        if own not in BUILDERS:
            hint = suggest(own, list(BUILDERS))
            raise ValueError(f"{who}unknown builder {text!r}"
                             f"{hint if hint.startswith('; did you mean') else ''}; "
                             f"errprop's builders are {', '.join(BUILDERS)}"
                             + ("" if sep else ", or 'module:function' (trusted specs only)"))
        from . import _builders
        return getattr(_builders, own)
    if not trusted:
        raise ValueError(f"{who}builder {text!r} is not an errprop builder: a spec that names "
                         f"other code runs it, so it must be trusted like a script; pass "
                         f"trusted=True (errprop sweep --trust-code) if it is, or use one of "
                         f"{', '.join(BUILDERS)}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise ValueError(f"{who}builder {text!r}: cannot import {module!r} ({exc})") from None
    except AttributeError:
        raise ValueError(f"{who}builder {text!r}: module {module!r} has no {attr!r}") from None
    if not callable(fn):
        raise ValueError(f"{who}builder {text!r} is not a function")
    return fn


def _resolve(path: str, root: str) -> Path:
    if path == "minilm" and not (Path(root) / path).exists():
        from ._bert import minilm_path
        return minilm_path()
    return Path(root) / path


def _network(task: dict[str, Any]) -> Any:
    spec, seed = task["spec"], task["seed"]
    args = dict(spec.get("args", {}))
    if "builder" in spec:
        fn = builder(spec["builder"], task["trusted"])
        if "seed" not in args and "seed" in inspect.signature(fn).parameters:
            args["seed"] = seed
    key = canonical([spec.get("builder"), spec.get("path"), args, spec.get("options"),
                      task["root"]])
    with _NETS_LOCK:
        if key in _NETS:
            _NETS.move_to_end(key)
            return _NETS[key]
    if "builder" in spec:
        net = fn(**args)
    else:
        from ._io import load
        trust = {"trusted": True} if task["trusted"] else {}  # the loaders refuse code
        net = load(_resolve(spec["path"], task["root"]), **spec.get("options", {}), **trust)
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


def make_row(task: dict[str, Any], **results: Any) -> dict[str, Any]:
    row = {"model": task["model"], "seed": task["seed"],
           "seed_independent": task["seed"] is None, **task["config"]}
    row.update({k: None for k in RESULTS})
    row.update(results, key=task["key"])
    return row


def message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def compute(task: dict[str, Any]) -> dict[str, Any]:
    """One row: never raises for a failing configuration (it becomes an error row)."""
    from ._analysis import analyze
    from ._montecarlo import monte_carlo
    start = time.perf_counter()
    seed, samples = task["seed"] or 0, task["config"]["mc_samples"]  # None: no seed used
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
        results = {"status": "error", "error": message(exc)}
    results = {k: float(v) if isinstance(v, (float, np.floating)) else v
               for k, v in results.items()}
    return make_row(task, **results, seconds=time.perf_counter() - start)

"""``errprop sweep SPEC.toml``: a grid of models x quantizers x seeds, resumable."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from ._files import read_text
from ._sweep import DEFAULTS, seed_label, sweep

DESCRIPTION = """\
Run errprop.analyze (and Monte Carlo when the grid asks for it) over every model x grid point
x seed of SPEC.toml, on local worker processes or a Dask cluster. Every finished row is
stored at once in DIR (cache/<key>.json, rows.csv, log.txt): run the same command again after
an interruption and only the missing rows are computed. A configuration that fails becomes a
row with status 'error' and its message. Rows that no seed can change (a loaded model on
an input file or sentences, deterministic rounding, no Monte Carlo) are computed once
(seed=any). A spec is code: only errprop's builders run, and model files that would run
code are refused, unless --trust-code. See docs/sweeps.md for the SPEC format.

SPEC keys: seeds, out, mse_work_limit, retry_errors, parquet; tables [models.NAME] (builder +
args, or path + options; input) and [grid] (or [[grid]] for a union of grids) with the axes
""" + textwrap.fill(", ".join(DEFAULTS) + ".", 92)

_TOP_KEYS = {"models", "grid", "seeds", "out", "mse_work_limit", "retry_errors", "parquet"}


def add_parser(sub: Any, bits_type: Any) -> None:
    del bits_type  # bits come from the spec, checked per row
    p = sub.add_parser("sweep", help="run a resumable grid of models, quantizers and seeds",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", type=Path, metavar="SPEC.toml", help="the sweep (see docs/sweeps.md)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes (default: one per CPU; 1 runs in this process); "
                        "with --dask local, the cluster's workers")
    p.add_argument("--dask", metavar="ADDRESS",
                   help="run on the dask.distributed scheduler at ADDRESS (e.g. "
                        "tcp://host:8786), or 'local' for a LocalCluster on this machine")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where rows are stored (default: the spec's 'out', else "
                        "SPEC-sweep/ next to SPEC)")
    p.add_argument("--retry-errors", action="store_true",
                   help="recompute stored error rows instead of reusing them")
    p.add_argument("--parquet", action="store_true", help="also write rows.parquet (pyarrow)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument("--trust-code", action="store_true",
                   help="run builders the spec names outside errprop ('module:function') "
                        "and load model files that run code (TorchScript); only for a spec "
                        "you would run as a script")
    p.set_defaults(func=run)


def read_spec(path: Path) -> dict[str, Any]:
    """The TOML spec as a dict; unknown top-level keys are an error."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ImportError("reading SPEC.toml on Python 3.10 needs tomli: pip install "
                              "tomli (Python >= 3.11 has tomllib)") from None
    try:
        spec = tomllib.loads(read_text(path, "sweep spec"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    unknown = set(spec) - _TOP_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(_TOP_KEYS)}")
    if "models" not in spec:
        raise ValueError(f"{path} has no [models.NAME] table")
    return spec


def _label(row: dict[str, Any]) -> str:
    bits = " ".join(f"{k[0].upper()}{row[k]}" for k in ("weights", "activations", "biases",
                                                          "input", "norms", "embeddings")
                    if row[k] is not None)
    other = "".join(f" {k}={row[k]}" for k in ("group_size", "symmetric", "rounding", "clip",
                                                 "scale") if row[k] != DEFAULTS[k])
    mc = f" mc={row['mc_samples']}" if row["mc_samples"] else ""
    return (f"{row['model']} {bits or 'float'} {row['granularity']}{other}{mc} "
            f"seed={seed_label(row)}")


def run(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    spec = read_spec(args.spec)
    root = args.spec.resolve().parent
    out = args.out or (root / spec["out"] if "out" in spec
                       else root / f"{args.spec.stem}-sweep")
    count = [0]

    def on_row(row: dict[str, Any]) -> None:
        count[0] += 1
        if args.quiet:
            return
        what = (f"{row['output_sqnr_db']:.2f} dB, exact MSE {row['exact_mse']:.3g}"
                if row["status"] == "ok" else f"{row['status']}: {row['error']}")
        took = "" if row["seconds"] is None else f" ({row['seconds']:.2f} s)"
        print(f"[{count[0]}] {_label(row)}: {what}{took}", flush=True)

    options = dict(models=spec["models"], grid=spec.get("grid"), seeds=spec.get("seeds", [0]),
                   out=out, root=root, mse_work_limit=spec.get("mse_work_limit", 1e10),
                   retry_errors=args.retry_errors or spec.get("retry_errors", False),
                   parquet=args.parquet or spec.get("parquet", False),
                   trusted=args.trust_code, on_row=on_row)
    if args.dask is None:
        result = sweep(**options, workers=args.workers)
    else:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise ImportError("--dask needs dask.distributed: pip install "
                              "'dask[distributed]'") from None
        if args.dask == "local":
            cluster = LocalCluster(n_workers=args.workers or os.cpu_count(),
                                   threads_per_worker=1, dashboard_address=":0")
            with cluster, Client(cluster) as client:
                result = sweep(**options, executor=client.get_executor())
        else:
            with Client(args.dask) as client:
                result = sweep(**options, executor=client.get_executor())
    errors = sum(r["status"] == "error" for r in result.rows)
    print(f"{len(result)} rows: {len(result.computed)} computed, {len(result.cached)} from the "
          f"cache, {errors} errors, {len(result.failed)} lost; stored in {out}/rows.csv")
    if result.failed:
        print(f"errprop: {len(result.failed)} rows were lost with their worker; run the same "
              f"command again to compute them", file=sys.stderr)
        return 1
    return 0

"""Sweeps: the same rows serially, on a process pool and on a Dask cluster; stored as they
finish; killed midway and resumed without recomputing or losing a row; failures as rows."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import errprop as ep
from errprop._sweep import COLUMNS, DEFAULTS
from errprop.cli import main

MODELS = {
    "mlp": {"builder": "mlp", "args": {"widths": [12, 32, 32, 4], "activation": "gelu"}},
    "tf": {"builder": "transformer", "args": {"d_model": 8, "heads": 2, "d_ff": 16, "blocks": 1},
           "input": {"shape": [2, 4, 8], "scale": 2.0}},
}
GRID = {"weights": [8, 4], "granularity": ["channel", "tensor"], "activations": ["none", 8]}
SEEDS = [0, 1]
N_ROWS = 2 * 8 * 2

# slow enough (Monte Carlo) to be killed midway
SLOW_MODELS = {"m": {"builder": "mlp", "args": {"widths": [16, 64, 64, 4], "activation": "tanh"},
                     "input": {"shape": [32, 16]}}}
SLOW_GRID = {"weights": [8, 6, 4], "activations": ["none", 8], "mc_samples": 400}
SLOW_SEEDS = [0, 1, 2]


def _strip(rows):
    """Rows without the wall-clock time, the only field that differs between runs."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _csv_rows(path):
    """rows.csv parsed strictly: every line ends with a newline and has every column."""
    text = Path(path).read_text(encoding="utf-8")
    assert text.endswith("\n")
    lines = list(csv.reader(text.splitlines()))
    assert lines[0] == list(COLUMNS)
    assert all(len(line) == len(COLUMNS) for line in lines)
    return [{k: v for k, v in zip(COLUMNS, line) if k != "seconds"} for line in lines[1:]]


def _done_keys(out):
    return [line.split()[2] for line in (Path(out) / "log.txt").read_text().splitlines()
            if line.split()[1] == "done"]


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    return ep.sweep(MODELS, GRID, seeds=SEEDS, out=out, workers=1)


def test_rows_are_analyze_results(serial):
    """A row holds what analyze says for its model, input draw, config and seed."""
    assert len(serial) == N_ROWS and not serial.errors and len(serial.computed) == N_ROWS
    row = next(r for r in serial.rows if r["model"] == "tf" and r["seed"] == 1
               and r["weights"] == 4 and r["granularity"] == "tensor"
               and r["activations"] == 8)
    net = ep.transformer(8, 2, 16, 1, seed=1)
    x = 2.0 * np.random.default_rng(np.random.SeedSequence(1, spawn_key=(1,))).standard_normal(
        (2, 4, 8))
    config = ep.QuantConfig(weights=ep.Uniform(4, granularity="tensor"),
                            activations=ep.Uniform(8))
    report = ep.analyze(net, x, config, seed=1)
    assert row["output_sqnr_db"] == report.sqnr_db
    assert row["exact_mse"] == report.exact_mse
    assert row["first_order_residual"] == report.residual
    assert row["predicted_mse"] == report.mse and row["predicted_by"] == "analytic"
    assert row["mc_mse"] is None and row["status"] == "ok" and row["error"] is None


def test_process_pool_matches_serial(serial, tmp_path):
    pooled = ep.sweep(MODELS, GRID, seeds=SEEDS, out=tmp_path, workers=2)
    assert _strip(pooled.rows) == _strip(serial.rows)
    assert _csv_rows(tmp_path / "rows.csv") == _csv_rows(serial.out / "rows.csv")
    assert sorted(_done_keys(tmp_path)) == sorted(r["key"] for r in serial.rows)


def _need_distributed():
    try:
        import distributed
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("dask.distributed is required under CI: pip install -e '.[test]'")
        pytest.skip("dask.distributed not installed (pip install 'dask[distributed]')")
    return distributed


@pytest.fixture
def dask_client():
    distributed = _need_distributed()
    # ":0": any free port, so a dashboard already on 8787 (another cluster) is no conflict
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        yield client


# a busy machine makes dask say so; any other warning still fails the test
@pytest.mark.filterwarnings(
    "ignore:Creating scratch directories is taking a surprisingly long time:UserWarning")
def test_dask_cluster_matches_serial(serial, dask_client, tmp_path):
    on_dask = ep.sweep(MODELS, GRID, seeds=SEEDS, out=tmp_path,
                       executor=dask_client.get_executor())
    assert _strip(on_dask.rows) == _strip(serial.rows)
    assert _csv_rows(tmp_path / "rows.csv") == _csv_rows(serial.out / "rows.csv")


KILLED_SCRIPT = """\
import errprop as ep
if __name__ == "__main__":
    ep.sweep({models!r}, {grid!r}, seeds={seeds!r}, out={out!r}, workers=2)
"""


def test_kill_midway_and_resume(tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "run.py"
    script.write_text(KILLED_SCRIPT.format(models=SLOW_MODELS, grid=SLOW_GRID,
                                           seeds=SLOW_SEEDS, out=str(out)))
    # its own process group: the kill takes the sweep and its workers down at once, like a crash
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    try:
        # no deadline (a loaded machine is slow): the sweep's work is finite, so the loop
        # ends when two rows are stored or, failing, when the sweep ends
        while not ((out / "log.txt").exists() and len(_done_keys(out)) >= 2):
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.01)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group is gone already: the assertion above says why
            pass
        proc.wait()
    stored = {p.stem: (p.stat().st_ino, p.stat().st_mtime_ns)
              for p in (out / "cache").glob("*.json")}
    first = _done_keys(out)
    print(f"killed after {len(first)} stored rows")
    # the kill may land between a row's cache file and its log line: the cache is the truth
    assert set(first) <= set(stored) and len(first) == len(set(first))
    n_rows = 3 * 2 * len(SLOW_SEEDS)
    assert 2 <= len(stored) < n_rows
    csv_keys = {r["key"] for r in _csv_rows(out / "rows.csv")}
    assert set(first) <= csv_keys <= set(stored)  # no torn line, nothing stored is lost

    resumed = ep.sweep(SLOW_MODELS, SLOW_GRID, seeds=SLOW_SEEDS, out=out, workers=1)
    assert sorted(resumed.cached) == sorted(stored)  # every stored row reused
    assert not set(resumed.computed) & set(stored)  # none recomputed
    assert len(resumed.computed) + len(stored) == n_rows
    # every row was computed exactly once over the two runs
    done = _done_keys(out)
    assert len(done) == len(set(done))
    assert set(done) | set(stored) == {r["key"] for r in resumed.rows}
    assert len(resumed.rows) == n_rows
    assert {k: (p.stat().st_ino, p.stat().st_mtime_ns) for k, p in
            ((k, out / "cache" / f"{k}.json") for k in stored)} == stored

    whole = ep.sweep(SLOW_MODELS, SLOW_GRID, seeds=SLOW_SEEDS, out=tmp_path / "whole",
                     workers=1)
    assert _strip(resumed.rows) == _strip(whole.rows)
    assert _csv_rows(out / "rows.csv") == _csv_rows(tmp_path / "whole" / "rows.csv")


def test_failing_configuration_is_an_error_row(tmp_path):
    models = {"mlp": MODELS["mlp"], "missing": {"path": "no-such-model.onnx",
                                                "input": {"shape": [2, 3]}}}
    grid = [{"weights": [8, 1]}, {"granularity": "group", "group_size": 5}]
    result = ep.sweep(models, grid, out=tmp_path, workers=1, root=tmp_path)
    assert len(result) == 6
    by = {(r["model"], r["weights"], r["granularity"]): r for r in result.rows}
    assert by["mlp", 8, "channel"]["status"] == "ok"
    assert by["mlp", 1, "channel"]["status"] == "error"
    assert "bits must be an integer from 2 to 16" in by["mlp", 1, "channel"]["error"]
    assert "group_size" in by["mlp", 8, "group"]["error"]
    assert all(r["status"] == "error" and "FileNotFoundError" in r["error"]
               and r["output_sqnr_db"] is None for r in result.rows if r["model"] == "missing")
    assert len(result.errors) == 5
    assert [r["status"] for r in _csv_rows(tmp_path / "rows.csv")] == \
        [r["status"] for r in result.rows]
    again = ep.sweep(models, grid, out=tmp_path, workers=1, root=tmp_path)
    assert len(again.cached) == 6 and not again.computed
    retried = ep.sweep(models, grid, out=tmp_path, workers=1, root=tmp_path, retry_errors=True)
    assert len(retried.computed) == 5 and _strip(retried.rows) == _strip(result.rows)


def test_torn_csv_and_cache_files_are_repaired(tmp_path):
    out = tmp_path / "out"
    first = ep.sweep({"mlp": MODELS["mlp"]}, GRID, out=out, workers=1)
    (tmp_path / "clean.csv").write_text((out / "rows.csv").read_text())
    with open(out / "rows.csv", "a") as f:  # what a power cut could leave
        f.write("mlp,0,8,chan")
    keys = [r["key"] for r in first.rows]
    (out / "cache" / f"{keys[0]}.json").write_text('{"task": {"sch')
    (out / "cache" / f"{keys[1]}.json").unlink()
    again = ep.sweep({"mlp": MODELS["mlp"]}, GRID, out=out, workers=1)
    assert sorted(again.computed) == sorted(keys[:2])
    assert _strip(again.rows) == _strip(first.rows)
    assert _csv_rows(out / "rows.csv") == _csv_rows(tmp_path / "clean.csv")


def test_cache_key_and_validation(tmp_path):
    base = ep.sweep({"mlp": MODELS["mlp"]}, {"weights": 4}, out=tmp_path, workers=1)
    # spelling out a default, or naming "no quantizer" differently, is the same row
    same = ep.sweep({"mlp": MODELS["mlp"]}, {"weights": 4, "rounding": "nearest",
                                             "activations": 0}, out=tmp_path, workers=1)
    assert same.cached == base.computed and not same.computed
    doc = json.loads((tmp_path / "cache" / f"{base.computed[0]}.json").read_text())
    assert doc["task"]["config"] == {**DEFAULTS, "weights": 4}
    with pytest.raises(ValueError, match="unknown grid axes.*'bits'"):
        ep.sweep({"mlp": MODELS["mlp"]}, {"bits": [4]}, workers=1)
    with pytest.raises(ValueError, match="unknown builder 'mpl'; did you mean 'mlp'"):
        ep.sweep({"m": {"builder": "mpl"}}, workers=1)
    with pytest.raises(ValueError, match="exactly one of 'builder' or 'path'"):
        ep.sweep({"m": {"args": {}}}, workers=1)
    with pytest.raises(ValueError, match="workers must be a positive int, got 0"):
        ep.sweep({"mlp": MODELS["mlp"]}, workers=0)
    import fcntl
    with open(tmp_path / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another sweep"):
            ep.sweep({"mlp": MODELS["mlp"]}, out=tmp_path, workers=1)


def test_predicted_falls_back_to_first_order_energy():
    result = ep.sweep({"mlp": MODELS["mlp"]}, {"weights": 6}, workers=1, mse_work_limit=1.0)
    row = result.rows[0]
    net = ep.mlp([12, 32, 32, 4], "gelu", seed=0)
    x = np.random.default_rng(np.random.SeedSequence(0, spawn_key=(1,))).standard_normal(
        (64, 12))
    report = ep.analyze(net, x, ep.QuantConfig(weights=ep.Uniform(6, granularity="channel")))
    assert row["predicted_by"] == "first_order_energy"
    assert row["predicted_mse"] == float(np.mean(report.first_order ** 2))


SPEC = """\
seeds = [0, 1]
out = "results"

[models.mlp]
builder = "mlp"
args = {{ widths = [12, 32, 32, 4], activation = "gelu" }}

[models.tf]
builder = "transformer"
args = {{ d_model = 8, heads = 2, d_ff = 16, blocks = 1 }}
input = {{ shape = [2, 4, 8], scale = 2.0 }}

[grid]
weights = [8, 4]
granularity = ["channel", "tensor"]
activations = ["none", 8]
"""


def test_cli_sweep(serial, tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format())
    assert main(["sweep", str(spec), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"{N_ROWS} rows: {N_ROWS} computed, 0 from the cache, 0 errors" in printed
    assert _csv_rows(tmp_path / "results" / "rows.csv") == _csv_rows(serial.out / "rows.csv")
    assert main(["sweep", str(spec), "--workers", "1", "--quiet",
                 "--out", str(tmp_path / "results")]) == 0
    assert f"0 computed, {N_ROWS} from the cache" in capsys.readouterr().out
    spec.write_text("bits = 3\n" + SPEC.format())
    assert main(["sweep", str(spec)]) == 2
    assert "unknown keys ['bits']" in capsys.readouterr().err
    spec.write_text(SPEC.format() + "bits = 3\n")  # inside [grid]
    assert main(["sweep", str(spec)]) == 2
    assert "unknown grid axes ['bits']" in capsys.readouterr().err


def test_no_output_folder_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = ep.sweep({"mlp": MODELS["mlp"]}, {"weights": [8, 4]}, workers=1)
    assert len(result) == 2 and result.out is None and not list(tmp_path.iterdir())
    assert "mlp seed=0 weights=4" in result.table()


def dying_builder(**args):
    """A model whose construction kills the worker process (a stand-in for the OOM killer)."""
    os._exit(3)


def test_lost_worker_is_not_stored(tmp_path):
    models = {"dies": {"builder": "test_sweep:dying_builder", "input": {"shape": [2, 3]}}}
    result = ep.sweep(models, {"weights": 8}, out=tmp_path, workers=2, trusted=True)
    (row,) = result.rows
    assert row["status"] == "failed" and "BrokenProcessPool" in row["error"]
    assert result.failed == [row["key"]] and not result.computed
    assert not list((tmp_path / "cache").iterdir())  # the next run computes it
    assert _csv_rows(tmp_path / "rows.csv") == []


def test_docs_specs_run_and_minilm_rows_are_seed_independent(tmp_path):
    """The TOML specs in docs/sweeps.md read and expand to the rows the text says; the first
    runs without an error row (one seed here, to keep the suite quick); the MiniLM spec's
    three seeds give one seed-independent row per grid point (expanded, not run)."""
    import re

    from errprop._cli_sweep import read_spec
    from errprop._sweep import _tasks
    doc = (Path(__file__).resolve().parents[1] / "docs" / "sweeps.md").read_text()
    small, real = re.findall(r"```toml\n(.*?)```", doc, flags=re.S)
    (tmp_path / "small.toml").write_text(small)
    spec = read_spec(tmp_path / "small.toml")
    tasks = _tasks(spec["models"], spec["grid"], spec["seeds"], spec["mse_work_limit"],
                   tmp_path)
    assert len(tasks) == 2 * (2 * 2 + 2) * 2 == 24
    result = ep.sweep(spec["models"], spec["grid"], seeds=spec["seeds"][:1], workers=1)
    assert len(result) == 12 and not result.errors
    assert all(r["mc_mse"] is not None for r in result.rows if r["mc_samples"])
    (tmp_path / "real.toml").write_text(real)
    spec = read_spec(tmp_path / "real.toml")
    tasks = _tasks(spec["models"], spec["grid"], spec["seeds"], 1e10, tmp_path)
    assert len(spec["seeds"]) == 3 and len(tasks) == 2
    assert all(t["seed"] is None for t in tasks.values())


def test_parquet(tmp_path):
    """rows.parquet holds the CSV's rows; without pyarrow the sweep refuses before running."""
    models = {"mlp": MODELS["mlp"]}
    try:
        import pyarrow.parquet as pq
    except ImportError:
        with pytest.raises(ImportError, match="pyarrow"):
            ep.sweep(models, {"weights": [8, 4]}, out=tmp_path / "out", workers=1, parquet=True)
        assert not (tmp_path / "out").exists()
        return
    result = ep.sweep(models, {"weights": [8, 4]}, out=tmp_path, workers=1, parquet=True)
    table = pq.read_table(tmp_path / "rows.parquet").to_pylist()
    assert _strip(table) == _strip(result.rows)

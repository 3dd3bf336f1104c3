"""Sweeps refuse what they must not run or cannot store, with one clear message, and never
repeat a row that no seed can change (issue 14: C11, C14, E19)."""

import csv
import fcntl

import numpy as np
import pytest

import errprop as ep
from errprop._sweep_store import SweepBusyError
from errprop.cli import main

MLP = {"builder": "mlp", "args": {"widths": [6, 16, 3], "activation": "tanh"}}


def touching_builder(marker, widths):
    """Foreign code a spec may name: it leaves a file behind when it runs."""
    open(marker, "w").close()
    return ep.mlp(widths, "relu", seed=0)


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


# ---- C11: a spec is code ----------------------------------------------------------------

def test_foreign_builder_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "ran"
    spec = {"builder": "os:system", "args": {"command": f"touch {marker}"},
            "input": {"shape": [2, 3]}}
    with pytest.raises(ValueError, match=r"'os:system' is not an errprop builder.*trusted=True"):
        ep.sweep({"m": spec}, workers=1)
    assert not marker.exists()
    other = {"builder": "test_sweep_safety:touching_builder",
             "args": {"marker": str(marker), "widths": [3, 4, 2]}, "input": {"shape": [2, 3]}}
    with pytest.raises(ValueError, match="trusted like a script"):
        ep.sweep({"m": other}, workers=1)
    assert not marker.exists()
    result = ep.sweep({"m": other}, workers=1, trusted=True)  # the caller vouches for it
    assert marker.exists() and not result.errors


def test_cli_refuses_foreign_builder_unless_trust_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    spec = tmp_path / "spec.toml"
    spec.write_text(f'[models.m]\nbuilder = "os:system"\nargs = {{ command = "touch {marker}" }}\n'
                    f'input = {{ shape = [2, 3] }}\n')
    assert main(["sweep", str(spec), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trust-code" in err[0] and not marker.exists()
    spec.write_text('[models.m]\nbuilder = "test_sweep_safety:touching_builder"\n'
                    f'args = {{ marker = "{marker}", widths = [3, 4, 2] }}\n'
                    'input = { shape = [2, 3] }\n')
    assert main(["sweep", str(spec), "--workers", "1", "--trust-code", "--quiet"]) == 0
    assert marker.exists()


def test_errprop_builders_by_name_and_unknown_ones_with_a_suggestion(tmp_path):
    plain = ep.sweep({"m": MLP}, {"weights": 4}, workers=1)
    spelled = ep.sweep({"m": {**MLP, "builder": "errprop:mlp"}}, {"weights": 4}, workers=1)
    assert _strip(spelled.rows) == _strip(plain.rows)  # the same row, the same key
    with pytest.raises(ValueError, match=r"unknown builder 'errprop:transfromer'; did you mean "
                                         r"'transformer'.*; errprop's builders are mlp"):
        ep.sweep({"m": {"builder": "errprop:transfromer"}}, workers=1)
    with pytest.raises(ValueError, match="unknown builder 'errprop:nope'; errprop's builders"):
        ep.sweep({"m": {"builder": "errprop:nope"}}, workers=1)
    with pytest.raises(ValueError, match=r"cannot import 'no_such_module_xyz'"):
        ep.sweep({"m": {"builder": "no_such_module_xyz:f"}}, workers=1, trusted=True)
    with pytest.raises(ValueError, match=r"module 'os' has no 'nope'"):
        ep.sweep({"m": {"builder": "os:nope"}}, workers=1, trusted=True)
    with pytest.raises(ValueError, match="cannot declare itself trusted"):
        ep.sweep({"m": {"path": "m.pt", "options": {"trusted": True}}}, workers=1)
    with pytest.raises(TypeError, match="sweep: trusted must be True or False"):
        ep.sweep({"m": MLP}, workers=1, trusted="yes")


# ---- C14: what cannot be stored or read -------------------------------------------------

def test_out_that_is_a_file_is_named(tmp_path):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(ValueError, match=f"out={out} (is a file|lies inside the file)"):
            ep.sweep({"m": MLP}, out=out, workers=1)
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("limit, error, message", [
    ("x", TypeError, "sweep: mse_work_limit must be a real number, got 'x'"),
    (0, ValueError, "sweep: mse_work_limit must be positive"),
    (float("nan"), ValueError, "mse_work_limit must be a (finite )?number")])
def test_mse_work_limit_is_checked(limit, error, message):
    with pytest.raises(error, match=message):
        ep.sweep({"m": MLP}, mse_work_limit=limit, workers=1)


def test_cli_spec_errors_are_one_line_naming_the_file(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_bytes(b'seeds = [0]\n# caf\xe9\n[models.m]\nbuilder = "mlp"\n')
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(spec) in err[0] and "not UTF-8" in err[0]
    spec.write_text('mse_work_limit = "x"\n[models.m]\nbuilder = "mlp"\n'
                    'args = { widths = [3, 4] }\n')
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mse_work_limit must be a real number, got 'x'" in err[0]


def test_busy_out_folder_is_a_one_line_error_saying_what_to_do(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text('[models.m]\nbuilder = "mlp"\nargs = { widths = [3, 4] }\n')
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(SweepBusyError, match="another sweep is writing to .*wait for it "
                                                 "to finish"):
            ep.sweep({"m": MLP}, out=out, workers=1)
        assert main(["sweep", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("errprop: error: another sweep is writing to")
    assert "--out DIR" in err[0] and "Traceback" not in err[0]


# ---- E19: seeds that cannot change a row ------------------------------------------------

@pytest.fixture
def loaded(tmp_path):
    net = ep.mlp([6, 16, 3], "gelu", seed=3)
    x = np.random.default_rng(5).standard_normal((20, 6))
    ep.save(net, tmp_path / "model")
    np.save(tmp_path / "x.npy", x)
    return {"path": "model", "input": {"file": "x.npy"}}, net, x


def test_loaded_model_rows_are_computed_once_and_marked(loaded, tmp_path):
    spec, net, x = loaded
    grid = [{"weights": [8, 4]}, {"weights": 4, "rounding": "stochastic"},
            {"weights": 4, "mc_samples": 20}]
    result = ep.sweep({"saved": spec, "built": MLP}, grid, seeds=[0, 1, 2], out=tmp_path / "o",
                      workers=1, root=tmp_path)
    saved = [r for r in result.rows if r["model"] == "saved"]
    once = [r for r in saved if r["rounding"] == "nearest" and not r["mc_samples"]]
    assert [(r["weights"], r["seed"], r["seed_independent"]) for r in once] == \
        [(8, None, True), (4, None, True)]
    # stochastic rounding, Monte Carlo and a seeded builder: one row per seed
    assert [r["seed"] for r in saved if r["rounding"] == "stochastic"] == [0, 1, 2]
    assert [r["seed"] for r in saved if r["mc_samples"]] == [0, 1, 2]
    assert len([r for r in result.rows if r["model"] == "built"]) == 4 * 3
    assert not result.errors and len(result) == 2 + 3 + 3 + 12
    # honest: the row is what analyze gives for any seed
    config = ep.QuantConfig(weights=ep.Uniform(4, granularity="channel"))
    for seed in (0, 7):
        report = ep.analyze(net, x, config, seed=seed)
        assert once[1]["exact_mse"] == report.exact_mse
        assert once[1]["predicted_mse"] == report.mse
    with open(tmp_path / "o" / "rows.csv") as f:
        stored = [r for r in csv.DictReader(f) if r["model"] == "saved"][:2]
    assert [(r["seed"], r["seed_independent"]) for r in stored] == [("", "True")] * 2
    assert "saved seed=any weights=4" in result.table()


def test_cli_prints_seed_any(loaded, tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text('seeds = [0, 1]\n[models.saved]\npath = "model"\n'
                    'input = { file = "x.npy" }\n')
    assert main(["sweep", str(spec), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "saved W8 channel seed=any:" in out and "1 rows: 1 computed" in out

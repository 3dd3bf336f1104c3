"""The command line: `errprop demo`, `python -m errprop`, errors as one line and exit 2."""

import json
import subprocess
import sys

import pytest

from errprop.cli import main


def test_demo_prints_budgets_and_allocations(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--bits", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for expected in ("GELU MLP", "transformer", "digits MLP", "W6A6", "injected MSE",
                     "output MSE", "share", "gain", "exact MSE", "fc1", "block0.attn",
                     "block1.mlp.fc2", "weight bits per layer for output SQNR >= 25 dB",
                     "allocated", "uniform", "cost (bits)", "held-out SQNR dB",
                     "held-out accuracy", "float accuracy", f"wrote {out}"):
        assert expected in printed, expected
    assert {p.name for p in out.iterdir()} == {
        "report.md", "report.json", "allocation.png",
        *(f"{m}-{kind}.png" for m in ("mlp", "transformer", "digits")
          for kind in ("budget", "growth"))}
    doc = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert list(doc["models"]) == ["mlp", "transformer", "digits"]
    for model in doc["models"].values():
        allocation = model["allocation"]
        runs = allocation["runs"]
        # verified, not trusted: held-out inputs meet the target, never above uniform cost
        assert runs["allocated"]["held_out_sqnr_db"] >= allocation["target_sqnr_db"]
        uniform = [r for name, r in runs.items() if name.startswith("uniform")]
        assert uniform and runs["allocated"]["cost"] <= uniform[0]["cost"]
        nodes = model["runs"][0]["nodes"]
        assert nodes and all(n["rms_mc"] is not None for n in nodes)


def test_python_dash_m_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "errprop", "demo", "--quick", "--models",
                           "digits", "--bits", "8", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "W8A8" in proc.stdout and (tmp_path / "report.md").is_file()


def test_unreachable_target_is_reported_not_fatal(tmp_path, capsys):
    assert main(["demo", "--quick", "--models", "digits", "--bits", "8", "--target-sqnr",
                 "90", "--out", str(tmp_path)]) == 0
    assert "the target is out of reach" in capsys.readouterr().out
    doc = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert "error" in doc["models"]["digits"]["allocation"]


@pytest.mark.parametrize("argv, word", [
    (["--bits", "1"], "bits"), (["--bits", "17"], "bits"), (["--bits", "eight"], "bits"),
    (["--samples", "1"], "samples"), (["--samples", "many"], "samples"),
    (["--target-sqnr", "-3"], "target-sqnr"), (["--target-sqnr", "nan"], "target-sqnr"),
    (["--models", "resnet"], "models"), (["--seed", "-1"], "seed"),
])
def test_bad_options_are_a_one_line_error(argv, word, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0]


def test_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--models", "digits", "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a folder" in err[0]


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for option in ("--bits", "--target-sqnr", "--models", "--samples", "--quick", "--seed",
                   "--out", "report.md", "errprop-out"):
        assert option in text


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out

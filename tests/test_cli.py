"""The command line: `errprop demo`, `python -m errprop`, errors as one line and exit 2."""

import subprocess
import sys

import pytest

from errprop.cli import main


def test_demo_prints_per_layer_tables(capsys):
    assert main(["demo", "--bits", "6", "--samples", "50"]) == 0
    out = capsys.readouterr().out
    for expected in ("MLP", "transformer", "W6A6", "fc1", "block0.attn", "block1.mlp.fc2",
                     "ln_f", "rms exact", "1st order", "2nd order", "Monte Carlo [99% CI]"):
        assert expected in out


def test_python_dash_m_runs():
    proc = subprocess.run([sys.executable, "-m", "errprop", "demo", "--bits", "8",
                           "--samples", "20"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "W8A8" in proc.stdout


@pytest.mark.parametrize("bits", ["1", "17", "eight"])
def test_bad_bits_is_a_one_line_error(bits, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--bits", bits])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "bits" in err.splitlines()[-1]


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out

"""Figure and parquet writers go through errprop._files.atomic_file: a temporary a killed
writer left is removed by the next write into that folder, a failed write leaves neither
a partial target nor a temporary; text files are read by one decoder (issue 14: C15)."""

import json
import os
import re
import subprocess
import sys
import time
import types

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

import errprop.plots as epp  # noqa: E402
from errprop._files import FileFormatError, read_json, read_text  # noqa: E402
from errprop._sweep_store import Store  # noqa: E402

#: the temporary names of errprop's writers, written out here (not errprop's pattern)
TEMP = r"^\.{name}\.tmp{pid}-[a-z0-9_]{{8}}{suffix}$"


def _dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def _stale(folder, name, suffix, age=120.0):
    """A temporary of a writer that died ``age`` seconds ago."""
    path = folder / f".{name}.tmp{_dead_pid()}-k1lled00{suffix}"
    path.write_bytes(b"partial")
    then = time.time() - age
    os.utime(path, (then, then))
    return path


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_a_killed_figure_writers_temporary_is_cleaned_on_the_next_save(tmp_path, mlp_case):
    _, _, report = mlp_case
    stale = [_stale(tmp_path, "budget.png", ".png"), _stale(tmp_path, "budget.pdf", ".pdf")]
    young = _stale(tmp_path, "growth.png", ".png", age=5.0)  # its writer may be finishing
    epp.save(epp.budget_bars(report), tmp_path / "budget")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["budget.pdf", "budget.png", young.name])
    assert not any(p.exists() for p in stale)


def test_figure_temporaries_are_named_for_the_cleaner_and_removed_on_failure(
        tmp_path, monkeypatch, mlp_case):
    _, _, report = mlp_case
    ax = epp.budget_bars(report)
    seen = []
    from matplotlib.figure import Figure
    real = Figure.savefig

    def spy(self, fname, *args, **kwargs):
        seen.append(os.path.basename(fname))
        real(self, fname, *args, **kwargs)
        if len(seen) == 2:
            raise KeyboardInterrupt  # killed after writing the second temporary whole

    monkeypatch.setattr(Figure, "savefig", spy)
    with pytest.raises(KeyboardInterrupt):
        epp.save(ax, tmp_path / "fig", formats=("png", "svg"))
    pid = os.getpid()
    assert re.match(TEMP.format(name=r"fig\.png", pid=pid, suffix=r"\.png"), seen[0])
    assert re.match(TEMP.format(name=r"fig\.svg", pid=pid, suffix=r"\.svg"), seen[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]


class _FakeParquet:
    """Stands in for pyarrow (not a dependency): records where the table is written."""

    def __init__(self, fail=False):
        self.paths, self.fail = [], fail
        self.Table = types.SimpleNamespace(from_pylist=lambda rows: rows)

    def write_table(self, table, where):
        self.paths.append(str(where))
        with open(where, "w", encoding="utf-8") as f:
            json.dump(table, f)
            if self.fail:
                raise KeyboardInterrupt  # killed mid-write


def _store_with_rows(folder, fake, monkeypatch):
    pa = types.ModuleType("pyarrow")
    pa.Table = fake.Table
    pq = types.ModuleType("pyarrow.parquet")
    pq.write_table = fake.write_table
    pa.parquet = pq
    monkeypatch.setitem(sys.modules, "pyarrow", pa)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", pq)
    store = Store(folder, ["k0"], ("a", "status"), ("a",))
    done = {"k0": {"a": 1.5, "status": "ok"}}
    store.begin(done, 1, 0)
    return store, done


def test_rows_parquet_is_written_atomically_and_stale_temps_cleaned(tmp_path, monkeypatch):
    stale = _stale(tmp_path, "rows.parquet", ".parquet")
    fake = _FakeParquet()
    store, done = _store_with_rows(tmp_path, fake, monkeypatch)
    store.close(done, parquet=True)
    (where,) = fake.paths
    assert os.path.dirname(where) == str(tmp_path)
    assert re.match(TEMP.format(name=r"rows\.parquet", pid=os.getpid(), suffix=r"\.parquet"),
                    os.path.basename(where))
    assert json.loads((tmp_path / "rows.parquet").read_text()) == [{"a": 1.5, "status": "ok"}]
    assert not stale.exists() and not os.path.exists(where)
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "rows.parquet").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_failed_parquet_write_leaves_no_temporary(tmp_path, monkeypatch):
    store, done = _store_with_rows(tmp_path, _FakeParquet(fail=True), monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        store.close(done, parquet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "cache", "log.txt",
                                                          "rows.csv"]


def test_read_text_names_the_file_and_read_json_shares_its_message(tmp_path):
    bad = tmp_path / "spec.toml"
    bad.write_bytes("name = 'caf\u00e9'\n".encode("latin-1"))
    with pytest.raises(FileFormatError) as text_error:
        read_text(bad, "sweep spec")
    # written out here: file, what it is, the offset and value of the first bad byte
    assert str(text_error.value) == (f"{bad}: the sweep spec is not UTF-8 text (byte 11: "
                                     f"b'\\xe9'); save it as UTF-8")
    with pytest.raises(FileFormatError) as json_error:
        read_json(bad, "sweep spec")
    assert str(json_error.value) == str(text_error.value)
    good = tmp_path / "ok.txt"
    good.write_text("é\n", encoding="utf-8")
    assert read_text(good, "sentences file") == "é\n"
    with pytest.raises(FileNotFoundError):
        read_text(tmp_path / "missing.txt", "sentences file")


def test_the_command_line_reads_text_files_through_read_text():
    from errprop import _cli_analyze, _cli_sweep, _cli_types
    assert _cli_analyze.read_text is read_text and _cli_sweep.read_text is read_text
    assert not hasattr(_cli_types, "read_utf8")


def test_the_demo_figures_clean_a_killed_writers_temporary(tmp_path, mlp_case):
    from errprop._demo_figures import budget_figure, save_png
    _, _, report = mlp_case
    stale = _stale(tmp_path, "mlp-budget.png", ".png")
    save_png(budget_figure("mlp", "test", {6: report}), tmp_path / "mlp-budget.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp-budget.png"]
    assert not stale.exists()

"""A sweep's ``out`` folder: ``cache/<key>.json`` per row (the truth), ``rows.csv`` (one
whole line appended and fsynced per stored row, rewritten atomically in grid order at the
start and the end of every run), ``log.txt``, ``rows.parquet`` on request; one sweep at a
time (a lock file)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ._files import atomic_file, write_text


class SweepBusyError(RuntimeError):
    """Another sweep holds the lock of the ``out`` folder."""


def _encode(row: dict[str, Any]) -> dict[str, Any]:
    # strict JSON: non-finite floats become the strings "nan", "inf", "-inf"
    return {k: repr(v) if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in row.items()}


def _decode(row: dict[str, Any], results: tuple[str, ...]) -> dict[str, Any]:
    row = {k: float(v) if isinstance(v, str) and v in ("nan", "inf", "-inf")
           and k in results else v for k, v in row.items()}
    row.setdefault("seed_independent", False)  # rows stored before the column existed
    return row


def check_folder(folder: Path) -> None:
    """Refuse an ``out`` that is (or lies inside) a file, before anything is written."""
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == folder else f"lies inside the file {p}"
                raise ValueError(f"sweep: out={folder} {where}, not a folder: give a folder "
                                 f"for the rows (it is created if missing)")
            return


class Store:
    """``out``: the cache (one JSON per row), rows.csv, log.txt; one sweep at a time."""

    def __init__(self, folder: Path, keys: list[str], columns: tuple[str, ...],
                 results: tuple[str, ...]) -> None:
        check_folder(folder)
        self.folder, self.keys, self.columns, self.results = folder, keys, columns, results
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
            raise SweepBusyError(
                f"another sweep is writing to {folder} (it holds {folder / '.lock'}): wait "
                f"for it to finish, or store the rows elsewhere (out=..., --out DIR)") from None
        self._fd: int | None = None

    def csv_line(self, row: dict[str, Any] | None) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns if row is None else
                        ["" if row[c] is None else row[c] for c in self.columns])
        return buf.getvalue()

    def cached(self, key: str, task: dict[str, Any]) -> dict[str, Any] | None:
        """The stored row, or None when absent, unreadable or for another task."""
        try:
            doc = json.loads((self.cache / f"{key}.json").read_text(encoding="utf-8"))
            return _decode(doc["row"], self.results) if doc["task"] == task else None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a torn or foreign file: compute the row again

    def _stored(self, done: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        return [done[k] for k in self.keys if k in done and done[k]["status"] != "failed"]

    def _rewrite(self, done: dict[str, dict[str, Any]]) -> None:
        write_text(self.csv, self.csv_line(None)
                   + "".join(self.csv_line(r) for r in self._stored(done)))

    def _log(self, text: str) -> None:
        with open(self.folder / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")

    def begin(self, done: dict[str, dict[str, Any]], total: int, pending: int) -> None:
        self._rewrite(done)  # drops a line torn by a crash of the machine and foreign rows
        self._fd = os.open(self.csv, os.O_WRONLY | os.O_APPEND)
        self._log(f"start {total} rows: {total - pending} stored, {pending} to compute")

    def add(self, key: str, task: dict[str, Any], row: dict[str, Any]) -> None:
        write_text(self.cache / f"{key}.json",
                   json.dumps({"task": task, "row": _encode(row)}, indent=1) + "\n")
        if self._fd is None:
            raise RuntimeError("Store.add before Store.begin")
        os.write(self._fd, self.csv_line(row).encode("utf-8"))  # one whole line per write
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
        table = pa.Table.from_pylist([{c: r[c] for c in self.columns}
                                      for r in self._stored(done)])
        with atomic_file(self.folder / "rows.parquet", ".parquet") as tmp:
            pq.write_table(table, tmp)

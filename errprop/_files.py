"""Files errprop writes and reads.

Writing: whole or not at all. A temporary file (or folder) next to the target, named
``.NAME.tmp<pid>-XXXXXXXX[suffix]``, then an atomic rename over the target. A writer that
is killed leaves its temporary behind; the next write into that folder removes it when
its writer process is gone (and it is a minute old) or when it is an hour old.

Reading: :class:`FileFormatError` (a ``ValueError``) names the file and what is wrong in
it; :func:`read_text` and :func:`read_json` decode UTF-8 text and JSON with such errors; :func:`check_bytes` compares a
declared size with a memory limit *before* anything is allocated.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: default cap, in bytes, on what a loader may allocate for one file's declared contents
MEMORY_LIMIT = 4 * 2 ** 30
#: a temporary whose writer process is gone is removed after this many seconds ...
STALE_DEAD = 60.0
#: ... and any temporary after this many (a process id may have been reused)
STALE_ANY = 3600.0

_TEMP = re.compile(r"^\..+\.tmp(?P<pid>\d+)-[a-z0-9_]{8}(\.[A-Za-z0-9]+)?$")


class FileFormatError(ValueError):
    """A file errprop cannot read: ``str(exc)`` is ``"<file>: <what is wrong>"``."""

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {what}")


class UntrustedCodeError(ValueError):
    """Loading the file would run code stored in it; the caller did not say it is trusted."""


# ------------------------------------------------------------------ reading
def read_text(path: str | os.PathLike, what: str) -> str:
    """The text of ``path`` (UTF-8); a file that is not UTF-8 is a :class:`FileFormatError`
    naming the file, ``what`` it is and the first bad byte (Python's own message names
    neither)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(path, f"the {what} is not UTF-8 text (byte {exc.start}: "
                              f"{data[exc.start:exc.start + 1]!r}); save it as UTF-8"
                              ) from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The parsed JSON in ``path`` (UTF-8), or a :class:`FileFormatError` saying why not."""
    path = Path(path)
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(path, f"the {what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise FileFormatError(path, f"the {what} is nested too deeply to parse") from None


def check_bytes(nbytes: int, limit: int, path: str | os.PathLike, what: str) -> None:
    """Refuse ``what`` (declared in ``path``) if it needs more than ``limit`` bytes."""
    if nbytes > limit:
        raise FileFormatError(path, f"{what} needs {_size(nbytes)}, over memory_limit="
                              f"{limit} ({_size(limit)}); pass a larger memory_limit if the "
                              f"file is what you expect")


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


# ------------------------------------------------------------------ writing
def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (readers see the old file or the new one)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary file next to ``path`` to write into; on success it replaces ``path``
    (with the permissions of a normally created file), on error it is removed.
    ``suffix`` (e.g. ``".png"``) lets writers that look at the extension work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(**temp_name(path, suffix))
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temp_name(path: Path, suffix: str = "") -> dict[str, Any]:
    """``mkstemp``/``mkdtemp`` keywords for a temporary standing in for ``path``; first
    removes stale temporaries left in that folder by killed writers."""
    clean_stale_temps(path.parent)
    return {"prefix": f".{path.name}.tmp{os.getpid()}-", "suffix": suffix, "dir": path.parent}


def make_readable(path: str | os.PathLike) -> None:
    """Give a temporary file (or folder) the permissions of a normally created one
    (``mkstemp``/``mkdtemp`` make it private, 0600/0700) before it is moved into place."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def clean_stale_temps(folder: str | os.PathLike, *, now: float | None = None) -> list[Path]:
    """Remove the temporaries killed writers left in ``folder`` (see the module docstring);
    returns what was removed."""
    folder = Path(folder)
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        pid = int(m["pid"])
        if age > STALE_ANY or (age > STALE_DEAD and pid != os.getpid() and not _alive(pid)):
            remove(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


def remove(path: Path) -> None:
    """Remove a file or a folder tree; a missing one is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process, or a platform without signals: keep it
    return True

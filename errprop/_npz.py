"""Reading ``.npz`` archives that may be hostile: sizes are checked before anything is
decompressed or allocated.

Each member ``NAME.npy`` starts with a small header (``np.lib.format``) declaring its
dtype and shape. :func:`read_npz` reads only those headers first, checks each declared
shape against the one the caller expects and the total against ``memory_limit``, checks
that the member holds exactly the bytes its header declares (a deflate bomb's member
does not), and only then reads the arrays. Every problem is a
:class:`~errprop._files.FileFormatError` naming the file and the member.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ._files import FileFormatError, check_bytes

_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError,
               zipfile.LargeZipFile)
_KINDS = "biuf"  # bool, signed and unsigned integers, floats: what errprop stores


def read_npz(path: Path, expected: Mapping[str, tuple[int, ...] | None], *,
             memory_limit: int) -> dict[str, np.ndarray]:
    """The arrays ``expected`` names (``name -> declared shape``, ``None``: any shape)."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = {info.filename: info for info in zf.infolist()}
            headers = {}
            for name, shape in expected.items():
                info = members.get(f"{name}.npy")
                if info is None:
                    raise FileFormatError(path, f"lacks the array {name!r} that model.json "
                                          f"names")
                headers[name] = _header(zf, info, path, name, shape, memory_limit)
            check_bytes(sum(h[2] for h in headers.values()), memory_limit, path,
                        f"reading the {len(headers)} arrays model.json names")
            out = {}
            for name in expected:
                with zf.open(members[f"{name}.npy"]) as f:
                    out[name] = np.lib.format.read_array(f, allow_pickle=False)
            return out
    except _ZIP_ERRORS as exc:
        raise FileFormatError(path, f"is not a readable .npz (zip) archive: "
                              f"{exc or type(exc).__name__}") from None
    except ValueError as exc:
        if isinstance(exc, FileFormatError):
            raise
        raise FileFormatError(path, f"holds a damaged array: {exc}") from None


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, name: str,
            shape: tuple[int, ...] | None, memory_limit: int
            ) -> tuple[tuple[int, ...], np.dtype, int]:
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                got, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                got, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"format version {version}")
        except ValueError as exc:
            raise FileFormatError(path, f"member {name!r} is not a NumPy array ({exc})"
                                  ) from None
        offset = f.tell()
    if dtype.hasobject or dtype.kind not in _KINDS or dtype.fields is not None:
        raise FileFormatError(path, f"array {name!r} has dtype {dtype}; errprop stores only "
                              f"numbers (bool, integers, floats), never objects")
    nbytes = math.prod(got) * dtype.itemsize
    if shape is not None and tuple(got) != tuple(shape):
        raise FileFormatError(path, f"array {name!r} has shape {tuple(got)}, but model.json "
                              f"declares {tuple(shape)}")
    check_bytes(nbytes, memory_limit, path, f"array {name!r} of shape {tuple(got)}")
    if info.file_size != offset + nbytes:
        raise FileFormatError(path, f"array {name!r} declares shape {tuple(got)} ({nbytes} "
                              f"bytes of data) but its member holds {info.file_size - offset} "
                              f"bytes: the archive is damaged or forged")
    return tuple(got), dtype, nbytes

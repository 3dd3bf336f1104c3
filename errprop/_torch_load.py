"""Reading ``.pt``/``.pth`` files for :func:`errprop.from_torch`, treating them as untrusted.

* Nothing is unpickled: a plain ``torch.save`` file goes through
  ``torch.load(weights_only=True)`` only, which refuses pickled modules and yields at most
  a ``state_dict`` (weights without an architecture, refused with what to do instead).
* A TorchScript archive (``torch.jit.save``) runs the code stored in it when
  ``torch.jit.load`` reads it: its ``__setstate__`` and the methods it calls are executed,
  and TorchScript can read and write files (``torch.from_file``). It is refused unless the
  caller passes ``trusted=True``.
* The sizes the zip archive declares are checked against ``memory_limit`` before torch
  reads it; a damaged archive raises a :class:`~errprop._files.FileFormatError`.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

from ._files import FileFormatError, UntrustedCodeError, check_bytes


def _zip_names(path: Path, memory_limit: int) -> list[str] | None:
    """The member names of a zip archive (None: not a zip), after the size check."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise FileFormatError(path, f"is a damaged zip archive: {exc}") from None
    check_bytes(sum(i.file_size for i in infos), memory_limit, path,
                "unpacking the archive's members")
    return [i.filename for i in infos]


def load_torch_file(torch: Any, path: Path, *, trusted: bool, memory_limit: int) -> Any:
    """The module stored in ``path`` (see the module docstring)."""
    if not path.is_file():
        raise FileNotFoundError(f"from_torch: no such file: {path}")
    names = _zip_names(path, memory_limit)
    if names is not None and any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        if not trusted:
            raise UntrustedCodeError(
                f"{path} is a TorchScript archive: loading it runs the TorchScript code "
                f"stored in it (torch.jit.load executes its __setstate__ and the methods "
                f"they call, and TorchScript can read and write files), so errprop refuses "
                f"it by default. If you trust the file (you made it, or know who did), pass "
                f"trusted=True (errprop.load / errprop.from_torch) or --trust-code "
                f"(command line); otherwise export the model to ONNX, which errprop reads "
                f"without running code")
        # torch 2.13 deprecates TorchScript; reading existing archives still works
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated",
                                    category=DeprecationWarning)
            try:
                return torch.jit.load(str(path), map_location="cpu")
            except RuntimeError as exc:
                raise FileFormatError(path, f"torch.jit.load cannot read this TorchScript "
                                      f"archive: {_first_line(exc)}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise FileFormatError(
            path, f"is not a TorchScript archive, and torch.load(weights_only=True) "
            f"refuses it ({_first_line(exc)}). A pickled nn.Module can run arbitrary code "
            f"when it is unpickled, so errprop does not load it. Save the model as "
            f"TorchScript (torch.jit.save(torch.jit.script(model), path)), export it to ONNX, "
            f"or build the module in Python and pass it to from_torch") from None
    if isinstance(obj, dict):
        keys = ", ".join(list(map(str, obj))[:5]) + (" ..." if len(obj) > 5 else "")
        raise FileFormatError(
            path, f"holds a state_dict ({len(obj)} entries: {keys}), weights without an "
            f"architecture. Build the module in Python, call module.load_state_dict("
            f"torch.load(path, weights_only=True)) and pass the module to from_torch")
    raise FileFormatError(path, f"holds a {type(obj).__name__}, not a module; save the model "
                          f"with torch.jit.save(torch.jit.script(model), path)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]

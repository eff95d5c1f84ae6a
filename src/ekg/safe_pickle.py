"""A restricted unpickler for files made of plain containers and numpy arrays.

CIFAR's python batches and the original EKG release's TensorFlow weights are pickles. A normal
``pickle.load`` can run arbitrary code; this one resolves only the handful of globals that numpy
arrays need and refuses everything else, so a malicious file fails with a clear error instead.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from .errors import EkgError

# (module, name) pairs that numpy arrays and scalars pickle through, numpy 1.x and 2.x spellings.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise RefusedGlobal(f"refusing to load global {module}.{name}")


def load(path: str | Path, *, encoding: str = "ASCII") -> Any:
    """Load a pickle that may contain only containers, strings, numbers and numpy arrays.

    Raises :class:`EkgError` naming the file if it is truncated, not a pickle, or asks for
    anything outside the allow-list.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EkgError(f"cannot read {path}: {e.strerror or e}") from None
    return loads(data, source=str(path), encoding=encoding)


def loads(data: bytes, *, source: str = "<bytes>", encoding: str = "ASCII") -> Any:
    """Like :func:`load`, for bytes already in memory (``source`` names them in errors)."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except RefusedGlobal as e:
        raise EkgError(f"{source} is not a safe data pickle ({e})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        raise EkgError(
            f"{source} is truncated or corrupt and could not be unpickled ({type(e).__name__}: {e})"
        ) from None

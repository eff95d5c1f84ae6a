"""Small file helpers: atomic writes (never a half-written output), output checks, damaged-file
messages and checksums.

Every writer goes through :func:`atomic_path`: a failed write (read-only file system, no space
left, a folder in the way) is one :class:`OutputError` line naming the *target* (never the hidden
temporary file) and the cause, and leaves the target as it was. :func:`check_output_folder` and
:func:`check_output_file` say the same before any work. :func:`save_torch` serialises to memory
first, so a full disk is the operating system's "no space left" and not torch's
``enforce fail``. :func:`load_torch` reads a run directory's own files with ``weights_only=True``
and names a damaged one with what to do about it (never "use weights_only=False").
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import EkgError


class OutputError(EkgError):
    """An output that cannot be written (named, with the cause)."""


# the fix for a failed write; {what} is "it" or the folder
_CAUSES = {
    errno.EROFS: ("is on a read-only file system", "choose an `out` on a writable disk"),
    errno.EACCES: ("is not writable (permission denied)", "choose an `out` you can write to"),
    errno.EPERM: ("is not writable (operation not permitted)", "choose an `out` you can write to"),
    errno.ENOSPC: ("cannot be written: no space left on the device",
                   "free some space and run the same command again (finished work is kept)"),
    errno.EDQUOT: ("cannot be written: the disk quota is exceeded",
                   "free some space and run the same command again (finished work is kept)"),
    errno.EISDIR: ("is a folder", "give a file name"),
    errno.ENOTDIR: ("cannot be created: a part of its path is a file, not a folder", "choose another `out`"),
    errno.ENOENT: ("cannot be created there (no such place)", "choose an `out` on a normal disk"),
    errno.EEXIST: ("cannot be created: something of that name is in the way", "choose another `out`"),
}


def os_cause(e: OSError) -> tuple[str, str]:
    """``(what is wrong, how to fix it)`` of a failed write, in words."""
    return _CAUSES.get(e.errno, (f"cannot be written ({e.strerror or e})", "choose another `out`"))


def output_error(target: str | os.PathLike, e: OSError) -> OutputError:
    """The one-line error for a failed write of ``target``."""
    cause, fix = os_cause(e)
    return OutputError(f"{target} {cause}; {fix}")


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it replaces ``dest`` atomically.

    On any exception (including KeyboardInterrupt) the temporary file is removed and ``dest``
    is left as it was, so a crash never leaves a half-written output behind.
    """
    dest = Path(dest)
    if dest.is_dir():
        raise OutputError(f"{dest} is a folder; give a file name (or move the folder away)")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as e:
        raise output_error(dest, e) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes it 0600; a file gets what the umask allows
        yield tmp_path
        os.replace(tmp_path, dest)
    except OSError as e:
        _remove(tmp_path)
        raise output_error(dest, e) from None
    except BaseException:
        _remove(tmp_path)
        raise


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(dest: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_bytes(dest, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_bytes(dest: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write ``data`` to ``dest``, atomically."""
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # a full disk shows here, not later


def append_line(dest: str | os.PathLike, line: str) -> None:
    """Append one line to a log file (a failed write is one :class:`OutputError` naming it)."""
    try:
        with open(dest, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise output_error(dest, e) from None


def save_torch(obj: Any, dest: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``dest``, atomically (serialised in memory first; see the module doc)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(dest, buffer.getbuffer())


def load_torch(path: str | os.PathLike, remedy: str, *, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` of a file ekg wrote; a damaged one (truncated, not a
    torch file, or holding what ekg never writes) is one :class:`EkgError` naming it, then ``remedy``."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        if not os.access(path, os.R_OK) or path.is_dir():
            raise EkgError(f"{path} cannot be read ({e.strerror or e}); {remedy}") from None
        raise EkgError(f"{path} is damaged ({damage(path, e)}); {remedy}") from None  # torch's reader, on a cut file
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError,
            IndexError, TypeError, AttributeError, ImportError) as e:
        raise EkgError(f"{path} is damaged ({damage(path, e)}); {remedy}") from None


def damage(path: Path, e: BaseException) -> str:
    """What is wrong with a file torch could not load, in words."""
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        return "it is empty"
    text = str(e)
    if isinstance(e, (EOFError, OSError)) or "central directory" in text or "failed reading" in text:
        return f"truncated: {size} bytes, cut short"
    if "weights_only" in text or "Unsupported global" in text:
        return "it holds objects ekg never writes"
    return "not a torch file ekg wrote"


def read_json(path: str | os.PathLike, remedy: str) -> Any:
    """A JSON file ekg wrote; a damaged one is one :class:`EkgError` naming it, then ``remedy``."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise EkgError(f"{path} cannot be read ({e.strerror or e}); {remedy}") from None
    except ValueError as e:
        raise EkgError(f"{path} is damaged (not valid JSON: {e}); {remedy}") from None


def check_output_folder(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output folder that cannot be written: an existing file, a path
    through a file, or a place where no folder can be made or written (read-only, /proc, no
    permission). Probes with a temporary folder or file, removed at once: nothing is left."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} is a file, not a folder; give `out` a folder (a new one, or an earlier run's)")
    _probe(path, folder=True)


def check_output_file(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output file path that cannot be written (see :func:`check_output_folder`)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name (or move the folder away)")
    _probe(path.parent, folder=False, target=path)


def _probe(path: Path, *, folder: bool, target: Path | None = None) -> None:
    target = target or path
    base = path
    while not base.exists():
        if base.parent == base:
            break
        base = base.parent
    if base.exists() and not base.is_dir():
        raise OutputError(f"{target} cannot be created: {base} is a file, not a folder; choose another `out`")
    try:
        times = os.stat(base)
        if folder:
            os.rmdir(tempfile.mkdtemp(prefix=".ekg-probe.", dir=base))
        else:
            fd, tmp = tempfile.mkstemp(prefix=".ekg-probe.", dir=base)
            os.close(fd)
            os.unlink(tmp)
        os.utime(base, ns=(times.st_atime_ns, times.st_mtime_ns))  # the probe leaves no trace, not even a time
    except OSError as e:
        raise output_error(target, e) from None


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()

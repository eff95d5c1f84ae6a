"""``ekg.lock``: one process at a time in a run directory.

:func:`hold` takes an OS file lock (``fcntl.flock``) on ``FOLDER/.ekg.lock`` for the duration of a
``with`` block. A second process on the same folder is refused at once, with one line naming the
holder's PID and host (the file's content). The kernel drops the lock when its process dies, so the
lock of a killed process is stale the moment it dies: the next process takes it over (and rewrites
the file) without anyone deleting anything. The file is removed when the lock is let go, and so is
the folder if taking the lock created it and nothing else was written into it.

Within one process the lock is re-entrant: ``ekg.run`` holds its run directory while
:func:`ekg.prune` and the memory bank take the same folder's lock. The locks a process holds are
kept in :data:`_HELD`, the one piece of process state in ekg: it mirrors what the kernel keeps per
open file (a second ``flock`` through a new descriptor in the same process would refuse itself).

Under torchrun the ranks of one job share the lock: rank 0 takes it (the file names the job's
``TORCHELASTIC_RUN_ID``, so the other ranks' early :func:`check_free` sees their own job) and tells
the others whether it could (a refusal is raised on every rank, so none waits on a barrier for a
rank that gave up).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .errors import EkgError
from .io import output_error

if TYPE_CHECKING:
    from .distributed import Dist

LOCK_NAME = ".ekg.lock"

# resolved lock path -> [descriptor, depth, folder created by the lock]
_HELD: dict[str, list] = {}


@contextlib.contextmanager
def hold(folder: str | os.PathLike, dist: "Dist | None" = None) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block (created if missing; see the module doc)."""
    folder = Path(folder)
    is_main = dist is None or dist.is_main
    key = None
    refusal = None
    if is_main:
        try:
            key = _acquire(folder)
        except EkgError as e:
            refusal = e
    if dist is not None and dist.enabled:
        _agree(dist, refusal)
    if refusal is not None:
        raise refusal
    try:
        yield folder
    finally:
        if key is not None:
            _release(key)


def check_free(folder: str | os.PathLike) -> None:
    """Refuse at once (before loading anything) a folder another process holds; :func:`hold` is the
    authoritative check, this only says it early."""
    who = holder(folder)
    if who is not None:
        raise EkgError(in_use(folder, who))


def in_use(folder: str | os.PathLike, who: str) -> str:
    return f"{folder} is in use by another ekg process ({who}); wait for it to finish, or choose another `out`"


def holder(folder: str | os.PathLike) -> str | None:
    """Who else holds ``folder``'s lock ("PID 123 on host"), or None when no other process does."""
    path = Path(folder) / LOCK_NAME
    with contextlib.suppress(OSError):
        if str(path.resolve()) in _HELD:
            return None
    who = _locked_by(path)
    job = _job()
    if who is not None and job and job in who:
        return None  # rank 0 of this torchrun job holds it for every rank
    return who


def _locked_by(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _who(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _acquire(folder: Path) -> str:
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(folder, e) from None
    path = folder / LOCK_NAME
    key = str(path.resolve())
    if key in _HELD:  # this process holds it already (ekg.run -> ekg.prune)
        _HELD[key][1] += 1
        return key
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise output_error(path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _who(fd)
            os.close(fd)
            raise EkgError(in_use(folder, who)) from None
        # a holder that let go may have removed the file between our open and our lock: lock the current one
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    job = _job()
    os.write(fd, (f"PID {os.getpid()} on {socket.gethostname()}" + (f", torchrun job {job}" if job else "") + "\n").encode())
    _HELD[key] = [fd, 1, folder if created else None]
    return key


def _release(key: str) -> None:
    entry = _HELD[key]
    entry[1] -= 1
    if entry[1]:
        return
    del _HELD[key]
    fd, _, created = entry
    with contextlib.suppress(FileNotFoundError):
        os.unlink(key)  # while still locked: a process waiting on this file finds it gone and retries
    os.close(fd)
    if created is not None:
        with contextlib.suppress(OSError):
            created.rmdir()  # only if empty: a refusal before any work leaves no folder behind


def _job() -> str | None:
    """The id torchrun gives every process of one job (None outside torchrun)."""
    return os.environ.get("TORCHELASTIC_RUN_ID") if os.environ.get("WORLD_SIZE", "1") != "1" else None


def _who(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "PID unknown"


def _agree(dist: "Dist", refusal: EkgError | None) -> None:
    """Rank 0's outcome on every rank: its refusal is raised everywhere."""
    import torch

    device = torch.device("cuda", dist.local_rank) if dist.backend == "nccl" else torch.device("cpu")
    flag = dist.all_reduce_sum(torch.tensor([1.0 if (dist.is_main and refusal is not None) else 0.0], device=device))
    if float(flag) > 0 and refusal is None:
        raise EkgError("the run directory is in use by another ekg process (rank 0 could not lock it)")

"""User-facing errors.

Everything that a user can cause (a bad path, a corrupt file, a checkpoint that does not fit, an
out-of-range option) is raised as :class:`EkgError` with one sentence saying what is wrong and
how to fix it. The CLI prints it as one line and exits non-zero; no traceback.
"""

from __future__ import annotations


class EkgError(Exception):
    """An error caused by the user's input, with a message meant for humans."""


class DataError(EkgError):
    """Missing, malformed or mismatching data (layout, checksum, shapes)."""


class CheckpointError(EkgError):
    """A file that is not a checkpoint, or one that does not fit the requested model."""


SEED_MAX = 2**32 - 1  # numpy's seeds are 0..2**32-1


def check_finite(name: str, value: float | None) -> None:
    """``value`` (the argument ``name``) is a finite number, or None."""
    import math

    if value is not None and not math.isfinite(value):
        raise EkgError(f"`{name}` must be a finite number, got {value}")


def check_seed(name: str, value: int) -> None:
    """``value`` (the argument ``name``) is a seed numpy and torch take."""
    if not 0 <= value <= SEED_MAX:
        raise EkgError(f"`{name}` must be a whole number from 0 to 2**32-1, got {value}")


def one_line(e: BaseException | str) -> str:
    """An exception's message on one line (some, like tarfile's, span several)."""
    return " ".join(str(e).split())

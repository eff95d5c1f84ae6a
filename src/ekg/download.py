"""The one download and cache helper: where ekg keeps and looks for files (``$EKG_CACHE``,
``$EKG_DATA``) and a checksum-verified download that never leaves a partial file."""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Union

from tqdm import tqdm

from .errors import DataError, one_line
from .io import atomic_path, md5sum

PathLike = Union[str, os.PathLike]


def default_cache_dir() -> Path:
    """``$EKG_CACHE`` if set, else ``~/.cache/ekg``."""
    return Path(os.environ.get("EKG_CACHE") or "~/.cache/ekg").expanduser()


def data_root() -> Path | None:
    """``$EKG_DATA`` (a folder laid out like the project's shared data), or None."""
    root = os.environ.get("EKG_DATA")
    return Path(root).expanduser() if root else None


def download(url: str, dest: PathLike, md5: str, *, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` and check its MD5; return ``dest``.

    If ``dest`` already exists with the right MD5 nothing is downloaded. The file is streamed to a
    temporary file beside ``dest`` that replaces it only once complete and verified, so a failed or
    corrupt download never leaves a file behind. Raises :class:`DataError` if the URL cannot be
    reached or the MD5 does not match.
    """
    dest = Path(dest).expanduser()
    md5 = md5.lower()
    if dest.is_file() and md5sum(dest) == md5:
        return dest
    try:
        with atomic_path(dest) as tmp:
            actual = _fetch(url, tmp, progress=progress, desc=dest.name)
            if actual != md5:
                raise DataError(f"the download of {url} has md5 {actual}, expected {md5}: it is corrupt or the file "
                                f"has changed, so nothing was saved to {dest}")
    except OSError as e:  # local: creating the folder or writing the file
        raise DataError(f"cannot write {dest} ({one_line(e.strerror or e)}): choose a writable cache folder") from None
    return dest


def _fetch(url: str, path: Path, *, progress: bool, desc: str) -> str:
    """Stream ``url`` into ``path`` with a progress bar; return the hex MD5 of what was written."""
    hint = "download it by hand and pass its path as `data`"
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(f"{url} could not be reached ({one_line(reason)}): {hint}") from None
    digest = hashlib.md5()
    with response, open(path, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False) as bar:
            while True:
                try:
                    block = response.read(1 << 20)
                except (http.client.HTTPException, OSError) as e:
                    raise DataError(f"the download of {url} was interrupted ({one_line(e)}): "
                                    f"try again, or {hint}") from None
                if not block:
                    break
                out.write(block)
                digest.update(block)
                bar.update(len(block))
    return digest.hexdigest()

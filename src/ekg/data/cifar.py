"""The official CIFAR-10/100 python layouts, as a folder or straight from the official ``.tar.gz``
(read in one streaming pass, never extracted), parsed with the restricted unpickler."""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from .. import safe_pickle
from ..download import data_root, download
from ..errors import DataError, EkgError, one_line
from .sets import DataSplits, ImageSet

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"


@dataclass(frozen=True)
class _CifarFormat:
    """What one official CIFAR python release looks like."""

    name: str
    title: str
    folder: str
    tarball: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    other_folders: tuple[str, ...]  # further places under a data root to look for ``folder``

    @property
    def layout(self) -> str:
        """The expected layout, for error messages."""
        files = ", ".join(self.train_files + self.test_files + (self.meta_file,))
        return f"the official {self.title} python layout is {self.folder}/ holding {files}"

    def candidates(self, root: Path) -> list[Path]:
        """Where under ``root`` this dataset may live, in lookup order."""
        return [root / self.folder, *(root / f for f in self.other_folders), root / self.tarball]


CIFAR_FORMATS: dict[str, _CifarFormat] = {
    "cifar10": _CifarFormat(
        name="cifar10", title="CIFAR-10", folder="cifar-10-batches-py", tarball="cifar-10-python.tar.gz",
        url=CIFAR10_URL, md5=CIFAR10_MD5, train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",), meta_file="batches.meta", label_key="labels", names_key="label_names",
        other_folders=("cifar10/exact-subset/cifar-10-batches-py",)),
    "cifar100": _CifarFormat(
        name="cifar100", title="CIFAR-100", folder="cifar-100-python", tarball="cifar-100-python.tar.gz",
        url=CIFAR100_URL, md5=CIFAR100_MD5, train_files=("train",), test_files=("test",), meta_file="meta",
        label_key="fine_labels", names_key="fine_label_names", other_folders=()),
}


def load_named(fmt: _CifarFormat, cache_root: Path, allow_download: bool, progress: bool) -> DataSplits:
    """Find ``fmt`` under ``$EKG_DATA`` and the cache folder, or download it if allowed."""
    root = data_root()
    roots = [root] if root is not None else []
    roots += [cache_root] if cache_root not in roots else []
    candidates = [c for root in roots for c in fmt.candidates(root)]
    for candidate in candidates:
        if candidate.is_dir():
            return load_cifar_folder(candidate.resolve(), fmt)
        if candidate.is_file():
            return load_cifar_tarball(candidate.resolve())
    if allow_download:
        return load_cifar_tarball(download(fmt.url, cache_root / fmt.tarball, fmt.md5, progress=progress))
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(f"no {fmt.title} data found (looked for {looked}): pass `data` the path of a folder or tarball, "
                    f"set EKG_DATA to a folder holding {fmt.folder}/ or {fmt.tarball}, or add `download=True` "
                    f"to fetch it into {cache_root}")


def load_cifar_folder(folder: Path, fmt: _CifarFormat) -> DataSplits:
    """Read an extracted official layout such as ``cifar-10-batches-py/``."""

    def read(name: str) -> bytes:
        path = folder / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path} is missing: {fmt.layout}") from None
        except OSError as e:
            raise DataError(f"cannot read {path} ({one_line(e.strerror or e)}): {fmt.layout}") from None

    train, test = _read_cifar(fmt, read, str(folder))
    return DataSplits(fmt.name, train, test, f"{fmt.title} python batches in {folder}")


def load_cifar_tarball(path: Path) -> DataSplits:
    """Read the official ``.tar.gz`` in one streaming pass, without extracting it."""
    members = _read_tar_members(path)
    found = {folder for folder, _ in members}
    fmt = next((f for f in CIFAR_FORMATS.values() if f.folder in found), None)
    if fmt is None:
        raise DataError(f"{path} holds neither cifar-10-batches-py/ nor cifar-100-python/: expected the official "
                        "cifar-10-python.tar.gz or cifar-100-python.tar.gz")

    def read(name: str) -> bytes:
        try:
            return members[(fmt.folder, name)]
        except KeyError:
            raise DataError(f"{path} has no member {fmt.folder}/{name}: {fmt.layout}") from None

    train, test = _read_cifar(fmt, read, f"{path}:{fmt.folder}")
    return DataSplits(fmt.name, train, test, f"{fmt.title} tarball {path}")


def _read_tar_members(path: Path) -> dict[tuple[str, str], bytes]:
    """``{(folder, file): bytes}`` for every regular file directly inside a CIFAR folder of the tarball."""
    wanted = {f.folder: set(f.train_files + f.test_files + (f.meta_file,)) for f in CIFAR_FORMATS.values()}
    members: dict[tuple[str, str], bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for info in tar:
                parts = PurePosixPath(info.name).parts
                if info.isfile() and len(parts) >= 2 and parts[-1] in wanted.get(parts[-2], ()):
                    members[(parts[-2], parts[-1])] = tar.extractfile(info).read()  # type: ignore[union-attr]
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path} is truncated or not a readable .tar.gz ({type(e).__name__}: {one_line(e)}): "
                        "expected the official cifar-10-python.tar.gz or cifar-100-python.tar.gz") from None
    return members


def _read_cifar(fmt: _CifarFormat, read: Callable[[str], bytes], where: str) -> tuple[ImageSet, ImageSet]:
    """Parse and check the meta file and every batch; ``read(name)`` returns a file's bytes."""
    meta = _unpickle(read(fmt.meta_file), f"{where}/{fmt.meta_file}", fmt)
    classes = _class_names(meta, f"{where}/{fmt.meta_file}", fmt)

    def split(files: tuple[str, ...]) -> ImageSet:
        parts = [_parse_batch(read(f), f"{where}/{f}", fmt, len(classes)) for f in files]
        images = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
        return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), list(classes))

    return split(fmt.train_files), split(fmt.test_files)


def _unpickle(data: bytes, source: str, fmt: _CifarFormat) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys, via the restricted unpickler."""
    try:
        obj = safe_pickle.loads(data, source=source, encoding="bytes")
    except EkgError as e:
        detail = e.__context__ if e.__context__ is not None else e
        raise DataError(f"{source} is truncated, corrupt or not a CIFAR python batch ({one_line(detail)}): "
                        f"{fmt.layout}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{source} holds a {type(obj).__name__}, not the dict of a CIFAR python batch: {fmt.layout}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _class_names(meta: dict[str, Any], source: str, fmt: _CifarFormat) -> list[str]:
    names = meta.get(fmt.names_key)
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"{source} has no '{fmt.names_key}' list of class names: {fmt.layout}")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _parse_batch(data: bytes, source: str, fmt: _CifarFormat, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 3072), labels int64 (N,))`` of one batch file, with shapes and ranges checked."""
    batch = _unpickle(data, source, fmt)
    if "data" not in batch or fmt.label_key not in batch:
        raise DataError(f"{source} lacks 'data' or '{fmt.label_key}' (keys: {', '.join(sorted(batch))}): {fmt.layout}")
    images, labels = batch["data"], np.asarray(batch[fmt.label_key])
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"{source}: 'data' must be a uint8 array of shape (N, 3072), got {got}")
    if labels.ndim != 1 or len(labels) != len(images) or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{source}: '{fmt.label_key}' must hold {len(images)} integer labels, got {labels.dtype} "
                        f"{labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{source}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    return images, labels.astype(np.int64)

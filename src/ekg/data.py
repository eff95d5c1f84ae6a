"""Datasets, normalisation, batched augmentation, batch iteration and EKG's search-set carving.

Whole splits are held in memory as uint8 ``(N, 3, H, W)`` tensors (CIFAR-10 is 150 MB), so they
can live on the training device; augmentation then runs on whole batches there, with no Python
loop over images. Every random draw comes from an explicit :class:`torch.Generator`, so a seeded
generator reproduces the same batches exactly.

Readers (see :func:`load_data`):

* the official CIFAR-10/100 python layouts, as a folder or straight from the official ``.tar.gz``;
* class-per-folder image trees (``train/<class>/*.jpg``, ``test/<class>/...``) as a folder, a zip,
  or a folder holding a ``*train*.zip`` and a ``*test*.zip``; their decoded pixels are cached as
  an ``.npz`` in the cache folder so the images are decoded only once;
* ImageNet-style trees (``train/<class>/*.JPEG``, ``val/<class>/...``, images of any size) are not
  held in memory: they are *streamed* from disk (:class:`ekg.folder.FolderSet`, torchvision's
  transforms in DataLoader workers); every function here that takes an ``ImageSet`` also takes one;
* the names ``cifar10`` / ``cifar100``, looked up in ``$EKG_DATA`` and the cache folder, and
  optionally downloaded (:func:`download`).

Every problem with the data is raised as :class:`~ekg.errors.DataError` naming the path.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import multiprocessing
import os
import sys
import tarfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from . import safe_pickle
from .errors import DataError, EkgError
from .io import atomic_path, md5sum

if TYPE_CHECKING:
    from .folder import FolderSet, StreamConfig

__all__ = [
    "ImageSet", "DataSplits", "load_data", "download", "Normalization", "NORMALIZATIONS",
    "get_normalization", "AugmentConfig", "augment", "iterate_batches", "iterate_index_batches",
    "carve_search_sets", "default_cache_dir", "DATA_MODES", "CIFAR10_URL", "CIFAR10_MD5", "CIFAR100_URL",
    "CIFAR100_MD5",
]

PathLike = Union[str, os.PathLike]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_SPLITS = ("train", "test")
DATA_MODES = ("auto", "memory", "stream")
_CACHE_VERSION = 1
_PARALLEL_MIN_IMAGES = 4096  # below this, decoding in-process beats starting workers
_DECODE_CHUNK = 1024


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """One split held in memory: uint8 RGB images ``(N, 3, H, W)``, int64 labels ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        im, lab = self.images, self.labels
        if im.dtype != torch.uint8 or im.dim() != 4 or im.shape[1] != 3:
            raise DataError(f"images must be a uint8 tensor of shape (N, 3, H, W), got {im.dtype} {tuple(im.shape)}")
        if lab.dtype != torch.int64 or tuple(lab.shape) != (im.shape[0],):
            raise DataError(f"labels must be an int64 tensor of shape ({im.shape[0]},), "
                            f"got {lab.dtype} {tuple(lab.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def device(self) -> torch.device:
        """The device the images live on."""
        return self.images.device

    def subset(self, index: Any) -> ImageSet:
        """The images at ``index`` (a tensor, list, range or array of integer positions), in that order."""
        idx = _as_index(index, self.images.device)
        return ImageSet(self.images[idx], self.labels[idx], list(self.classes))

    def to(self, device: torch.device | str) -> ImageSet:
        """A copy on ``device`` (the same object's tensors if they are already there)."""
        return ImageSet(self.images.to(device), self.labels.to(device), list(self.classes))

    @property
    def image_size(self) -> tuple[int, int, int]:
        """``(3, H, W)``: the size of every image, as a model's ``input_size``."""
        return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]


@dataclass
class DataSplits:
    """A dataset's train and test splits, plus where they came from. Each split is an in-memory
    :class:`ImageSet` or, for a streamed ImageNet-style tree, an :class:`ekg.folder.FolderSet`."""

    name: str  # "cifar10", "cifar100" or "imagefolder"
    train: ImageSet | FolderSet
    test: ImageSet | FolderSet
    source: str  # human-readable description of the origin

    @property
    def streamed(self) -> bool:
        """Whether the images are read from disk batch by batch (an ImageNet-style tree)."""
        return not isinstance(self.train, ImageSet)

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


def _one_line(e: BaseException | str) -> str:
    """An exception's message on one line (some, like tarfile's, span several)."""
    return " ".join(str(e).split())


def _as_index(index: Any, device: torch.device) -> torch.Tensor:
    """``index`` as a 1-D int64 tensor on ``device``; refuses booleans and floats."""
    idx = index if isinstance(index, torch.Tensor) else torch.as_tensor(np.asarray(index))
    if idx.dim() != 1 or (idx.numel() > 0 and (idx.dtype.is_floating_point or idx.dtype == torch.bool)):
        raise EkgError("a subset index must be a 1-D sequence of integer positions, "
                       f"got {idx.dtype} {tuple(idx.shape)}")
    return idx.to(device=device, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$EKG_CACHE`` if set, else ``~/.cache/ekg``."""
    return Path(os.environ.get("EKG_CACHE") or "~/.cache/ekg").expanduser()


def load_data(spec: PathLike, *, cache_dir: PathLike | None = None, download: bool = False,
              progress: bool = True, mode: str = "auto", stream: StreamConfig | None = None) -> DataSplits:
    """Load a dataset's train and test splits: into memory, or as streamed file lists.

    ``spec`` is one of:

    * the string ``"cifar10"`` or ``"cifar100"``: looked up under ``$EKG_DATA`` (if set) and then
      ``cache_dir`` as ``cifar-10-batches-py/``, ``cifar10/exact-subset/cifar-10-batches-py/`` or
      ``cifar-10-python.tar.gz`` (CIFAR-100: ``cifar-100-python/``, ``cifar-100-python.tar.gz``);
      if absent and ``download`` is true, the official tarball is downloaded into ``cache_dir``.
      (Pass ``./cifar10`` to mean a folder of that name.)
    * a folder that is or directly contains ``cifar-10-batches-py/`` or ``cifar-100-python/``
      (the official python layouts, any number of images per batch), or the official tarball;
    * the official ``.tar.gz``, read without extracting it;
    * a class-per-folder image tree (``train/<class>/*.jpg|jpeg|png`` and ``val/<class>/...`` or
      ``test/<class>/...``; ``val/`` is the held-out split when both exist), a zip of one, or a
      folder holding a ``*train*.zip`` and a ``*test*.zip``. Labels are the positions of the class
      folder names in sorted order; files are sorted by name within a class.

    ``mode`` says how a class-folder tree is read: ``"memory"`` decodes every image into an
    :class:`ImageSet` (all images of a split must have one size; decoded pixels are cached in
    ``cache_dir``, default :func:`default_cache_dir`); ``"stream"`` keeps only the file list
    (:class:`ekg.folder.FolderSet`: decoded batch by batch with torchvision's transforms, sizes
    from ``stream``, a :class:`ekg.folder.StreamConfig`; needs the ``vision`` extra);
    ``"auto"`` (the default) streams a folder tree unless it is *small and uniform*: the images
    probed (up to 64 per split, headers only) all have one size, at most 128 pixels a side, and
    the decoded training split would take at most 2 GiB (CIFAR- and Tiny-ImageNet-sized trees stay
    in memory, ImageNet is streamed). Zips and the CIFAR layouts are always read into memory.

    Raises :class:`DataError` with the path and the expected layout when the data is missing or
    malformed.
    """
    if mode not in DATA_MODES:
        raise DataError(f"unknown data mode {mode!r}: choose one of {', '.join(DATA_MODES)}")
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if isinstance(spec, str) and spec in _CIFAR:
        _no_stream(mode, f"the name {spec}")
        return _load_named(_CIFAR[spec], cache_root, download, progress)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist: pass a CIFAR folder or .tar.gz, an image-folder tree or zip, "
                        f"or one of the names {', '.join(_CIFAR)}")
    path = path.resolve()
    if path.is_file():
        _no_stream(mode, str(path))
        return _load_file(path, cache_root, progress)
    return _load_folder(path, cache_root, progress, mode, stream)


def _no_stream(mode: str, what: str) -> None:
    if mode == "stream":
        raise DataError(f"--data-mode stream reads a class-folder tree (train/<class>/*, val/<class>/* or "
                        f"test/<class>/*) from disk; {what} is not one (extract a zip into a folder first)")


def _load_file(path: Path, cache_root: Path, progress: bool) -> DataSplits:
    """A single file: a CIFAR tarball or a zip of an image tree."""
    if path.suffix.lower() == ".zip":
        return _load_image_zips([path], cache_root, progress)
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return _load_cifar_tarball(path)
    raise DataError(f"{path} is neither a CIFAR .tar.gz nor a .zip of train/ and test/ class folders")


def _load_folder(path: Path, cache_root: Path, progress: bool, mode: str = "auto",
                 stream: StreamConfig | None = None) -> DataSplits:
    """A folder: a CIFAR layout, an image tree, a pair of zips or a CIFAR tarball, in that order."""
    for fmt in _CIFAR.values():
        if path.name == fmt.folder or (path / fmt.folder).is_dir():
            _no_stream(mode, f"{path} (a {fmt.title} python layout)")
        if path.name == fmt.folder:
            return _load_cifar_folder(path, fmt)
        if (path / fmt.folder).is_dir():
            return _load_cifar_folder(path / fmt.folder, fmt)
    held_out = _held_out_split(path)
    if held_out is not None:
        reason = _stream_reason(path, held_out) if mode == "auto" else None
        if mode == "memory" or (mode == "auto" and reason is None):
            return _load_image_folder(path, cache_root, progress, held_out)
        from .folder import load_folder_tree

        return load_folder_tree(path, held_out, stream, reason=reason)
    _no_stream(mode, str(path))
    zips = {split: sorted(path.glob(f"*{split}*.zip")) for split in _SPLITS}
    if all(zips.values()):
        if any(len(found) > 1 for found in zips.values()):
            names = ", ".join(p.name for found in zips.values() for p in found)
            raise DataError(f"{path} holds several candidate zips ({names}): pass the path of one zip, "
                            "or keep exactly one *train*.zip and one *test*.zip in the folder")
        return _load_image_zips([zips["train"][0], zips["test"][0]], cache_root, progress)
    for fmt in _CIFAR.values():
        if (path / fmt.tarball).is_file():
            return _load_cifar_tarball(path / fmt.tarball)
    raise DataError(f"no CIFAR data in {path}: expected a folder containing cifar-10-batches-py/ (data_batch_1..5, "
                    "test_batch) or cifar-100-python/ (train, test), a .tar.gz, or train/ and test/ class folders "
                    "(or a *train*.zip and a *test*.zip of them)")


# --------------------------------------------------------------------------------------------
# CIFAR python layouts
# --------------------------------------------------------------------------------------------


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


_CIFAR: dict[str, _CifarFormat] = {
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


def _load_named(fmt: _CifarFormat, cache_root: Path, allow_download: bool, progress: bool) -> DataSplits:
    """Find ``fmt`` under ``$EKG_DATA`` and the cache folder, or download it if allowed."""
    roots = [Path(os.environ["EKG_DATA"]).expanduser()] if os.environ.get("EKG_DATA") else []
    roots += [cache_root] if cache_root not in roots else []
    candidates = [c for root in roots for c in fmt.candidates(root)]
    for candidate in candidates:
        if candidate.is_dir():
            return _load_cifar_folder(candidate.resolve(), fmt)
        if candidate.is_file():
            return _load_cifar_tarball(candidate.resolve())
    if allow_download:
        return _load_cifar_tarball(download(fmt.url, cache_root / fmt.tarball, fmt.md5, progress=progress))
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(f"no {fmt.title} data found (looked for {looked}): pass --data PATH to a folder or tarball, "
                    f"set EKG_DATA to a folder holding {fmt.folder}/ or {fmt.tarball}, or add --download "
                    f"to fetch it into {cache_root}")


def _load_cifar_folder(folder: Path, fmt: _CifarFormat) -> DataSplits:
    """Read an extracted official layout such as ``cifar-10-batches-py/``."""

    def read(name: str) -> bytes:
        path = folder / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path} is missing: {fmt.layout}") from None
        except OSError as e:
            raise DataError(f"cannot read {path} ({_one_line(e.strerror or e)}): {fmt.layout}") from None

    train, test = _read_cifar(fmt, read, str(folder))
    return DataSplits(fmt.name, train, test, f"{fmt.title} python batches in {folder}")


def _load_cifar_tarball(path: Path) -> DataSplits:
    """Read the official ``.tar.gz`` in one streaming pass, without extracting it."""
    members = _read_tar_members(path)
    found = {folder for folder, _ in members}
    fmt = next((f for f in _CIFAR.values() if f.folder in found), None)
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
    wanted = {f.folder: set(f.train_files + f.test_files + (f.meta_file,)) for f in _CIFAR.values()}
    members: dict[tuple[str, str], bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for info in tar:
                parts = PurePosixPath(info.name).parts
                if info.isfile() and len(parts) >= 2 and parts[-1] in wanted.get(parts[-2], ()):
                    members[(parts[-2], parts[-1])] = tar.extractfile(info).read()  # type: ignore[union-attr]
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path} is truncated or not a readable .tar.gz ({type(e).__name__}: {_one_line(e)}): "
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
        raise DataError(f"{source} is truncated, corrupt or not a CIFAR python batch ({_one_line(detail)}): "
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


# --------------------------------------------------------------------------------------------
# Class-per-folder image trees (folder or zips), decoded once and cached
# --------------------------------------------------------------------------------------------

_PROBE_PER_SPLIT = 64
_SMALL_SIDE = 128  # pixels: larger images are streamed (cropped and resized), even if all of one size
_MEMORY_LIMIT = 2 << 30  # bytes of decoded training pixels above which a uniform tree is streamed anyway


def _held_out_split(root: Path) -> str | None:
    """The held-out split folder of a class-folder tree (``val`` if present, else ``test``), or
    None if ``root`` has no ``train/`` beside one of them."""
    if not (root / "train").is_dir():
        return None
    return next((s for s in ("val", "test") if (root / s).is_dir()), None)


def _probe_files(split_dir: Path, limit: int) -> tuple[int, list[Path]]:
    """The number of images in ``split_dir/<class>/`` and up to ``limit`` of them spread evenly."""
    files = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        files += sorted(Path(e.path) for e in os.scandir(class_dir) if e.is_file() and _is_image(e.name))
    step = max(1, len(files) // limit)
    return len(files), files[::step][:limit]


def _stream_reason(root: Path, held_out: str) -> str | None:
    """None if the images probed in both splits share one size of at most ``_SMALL_SIDE`` pixels a
    side and the decoded training split fits in ``_MEMORY_LIMIT`` (the tree is then decoded into
    memory); else why it is streamed."""
    sizes: dict[tuple[int, int], Path] = {}
    count = 0
    for split in ("train", held_out):
        n, probe = _probe_files(root / split, _PROBE_PER_SPLIT)
        count = count or n
        for path in probe:
            try:
                with Image.open(path) as im:  # reads the header only
                    sizes.setdefault(im.size, path)
            except (OSError, ValueError, SyntaxError) as e:
                raise DataError(f"{path} is not a readable image ({_one_line(e)})") from None
    if len(sizes) > 1:
        (a, pa), (b, pb) = list(sizes.items())[:2]
        return f"holds images that are not all the same size ({pa} is {a[0]}x{a[1]}, {pb} is {b[0]}x{b[1]})"
    if not sizes:
        return None  # no images at all: the in-memory reader names what is missing
    w, h = next(iter(sizes))
    if max(w, h) > _SMALL_SIDE:
        return f"holds images of {w}x{h} pixels, larger than the {_SMALL_SIDE}x{_SMALL_SIDE} held in memory"
    if count * 3 * w * h > _MEMORY_LIMIT:
        return f"holds {count} training images of {w}x{h}, {count * 3 * w * h / 2**30:.1f} GiB decoded"
    return None


@dataclass(frozen=True)
class _ImageFile:
    """One image of a tree: its split and class, its file name, and where its bytes are."""

    split: str
    cls: str
    name: str
    path: str  # a file path, or a member name inside ``container``
    container: str | None = None  # the zip that holds it, if any

    @property
    def display(self) -> str:
        return f"{self.container}:{self.path}" if self.container else self.path


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _load_image_folder(root: Path, cache_root: Path, progress: bool, held_out: str = "test") -> DataSplits:
    """``root/train/<class>/*`` and ``root/<held_out>/<class>/*`` (the test split); cached by every
    file's path, size and mtime."""
    files, stats = [], []
    for split, folder in zip(_SPLITS, ("train", held_out)):
        for class_dir in sorted(p for p in (root / folder).iterdir() if p.is_dir()):
            for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
                if entry.is_file() and _is_image(entry.name):
                    st = entry.stat()
                    files.append(_ImageFile(split, class_dir.name, entry.name, entry.path))
                    stats.append((f"{folder}/{class_dir.name}/{entry.name}", st.st_size, st.st_mtime_ns))
    key = _cache_key("folder", str(root), stats)
    return _load_tree(lambda: files, key, f"image folders {root}", cache_root, progress)


def _load_image_zips(zips: Sequence[Path], cache_root: Path, progress: bool) -> DataSplits:
    """Zips of ``[prefix/]train/<class>/*`` and ``test/<class>/*``; cached by each zip's path, size and mtime."""
    stats = [(str(z), z.stat().st_size, z.stat().st_mtime_ns) for z in zips]
    desc = "image zip " + " + ".join(str(z) for z in zips)
    return _load_tree(lambda: _list_zips(zips), _cache_key("zip", stats), desc, cache_root, progress)


def _list_zips(zips: Sequence[Path]) -> list[_ImageFile]:
    files = []
    for z in zips:
        try:
            with zipfile.ZipFile(z) as archive:
                names = [i.filename for i in archive.infolist() if not i.is_dir()]
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{z} is not a readable zip ({_one_line(e)})") from None
        for name in names:
            parts = PurePosixPath(name).parts
            if len(parts) >= 3 and parts[-3] in _SPLITS and _is_image(parts[-1]) and "__MACOSX" not in parts:
                files.append(_ImageFile(parts[-3], parts[-2], parts[-1], name, str(z)))
    return files


def _cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([_CACHE_VERSION, *parts]).encode()).hexdigest()


def _load_tree(list_files: Callable[[], list[_ImageFile]], key: str, description: str, cache_root: Path,
               progress: bool) -> DataSplits:
    """Decoded splits from the cache if ``key`` matches, else decode ``list_files()`` and cache them."""
    cache_file = cache_root / f"imagefolder-{key[:24]}.npz"
    cached = _read_cache(cache_file, key)
    if cached is not None:
        train, test = cached
    else:
        train, test = _decode_tree(list_files(), description, progress)
        _write_cache(cache_file, key, train, test)
    return DataSplits("imagefolder", train, test, f"{description} (decoded pixels cached in {cache_file})")


def _decode_tree(files: list[_ImageFile], description: str, progress: bool) -> tuple[ImageSet, ImageSet]:
    by_split = {s: sorted((f for f in files if f.split == s), key=lambda f: (f.cls, f.name)) for s in _SPLITS}
    classes = sorted({f.cls for f in by_split["train"]})
    for split, entries in by_split.items():
        if not entries:
            raise DataError(f"{description} has no {split} images: expected {split}/<class>/*.jpg|jpeg|png")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({f.cls for f in by_split["test"]} - set(classes))
    if unknown:
        raise DataError(f"{description}: test classes {', '.join(unknown)} have no train/ folder")

    def split_set(split: str) -> ImageSet:
        entries = by_split[split]
        images = _decode_images(entries, progress=progress, desc=f"decoding {split}")
        labels = torch.tensor([index[f.cls] for f in entries], dtype=torch.int64)
        return ImageSet(torch.from_numpy(images), labels, list(classes))

    return split_set("train"), split_set("test")


def _read_bytes(entries: Sequence[_ImageFile]) -> list[bytes]:
    """The raw bytes of each entry, opening each zip once."""
    blobs: list[bytes] = []
    archives: dict[str, zipfile.ZipFile] = {}
    try:
        for f in entries:
            if f.container is None:
                blobs.append(Path(f.path).read_bytes())
                continue
            if f.container not in archives:
                archives[f.container] = zipfile.ZipFile(f.container)
            blobs.append(archives[f.container].read(f.path))
    except (OSError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"cannot read {entries[len(blobs)].display} ({_one_line(e)})") from None
    finally:
        for archive in archives.values():
            archive.close()
    return blobs


def _decode_one(blob: bytes, name: str) -> np.ndarray:
    """One image file's bytes as an RGB uint8 ``(H, W, 3)`` array."""
    try:
        with Image.open(io.BytesIO(blob)) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for bad files
        raise DataError(f"{name} is not a readable image ({_one_line(e)})") from None


def _decode_chunk(blobs: list[bytes], names: list[str], size: tuple[int, int], reference: str) -> np.ndarray:
    """Decode ``blobs`` into ``(n, H, W, 3)``; each must be ``size`` = (H, W) like ``reference``. Runs in a worker."""
    out = np.empty((len(blobs), size[0], size[1], 3), dtype=np.uint8)
    for i, (blob, name) in enumerate(zip(blobs, names)):
        img = _decode_one(blob, name)
        if img.shape[:2] != size:
            raise DataError(f"{name} is {img.shape[1]}x{img.shape[0]} pixels but {reference} is {size[1]}x{size[0]}: "
                            "all images in a split must have the same size to be held in memory (a folder tree "
                            "of any sizes can be streamed: --data-mode stream)")
        out[i] = img
    return out


def _decode_images(entries: Sequence[_ImageFile], *, progress: bool, desc: str,
                   workers: int | None = None) -> np.ndarray:
    """Decode every entry to one uint8 ``(N, 3, H, W)`` array, in worker processes for large sets."""
    blobs, names = _read_bytes(entries), [f.display for f in entries]
    size = _decode_one(blobs[0], names[0]).shape[:2]
    chunks = [(blobs[i:i + _DECODE_CHUNK], names[i:i + _DECODE_CHUNK], size, names[0])
              for i in range(0, len(blobs), _DECODE_CHUNK)]
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if len(blobs) >= _PARALLEL_MIN_IMAGES else 1
    with tqdm(total=len(blobs), unit="img", desc=desc, disable=not progress, leave=False) as bar:
        if workers <= 1:
            parts = [_tick(bar, _decode_chunk(*c)) for c in chunks]
        else:
            with _process_pool(workers) as pool:
                parts = [_tick(bar, p) for p in pool.map(_decode_chunk, *zip(*chunks))]
    return np.ascontiguousarray(np.concatenate(parts).transpose(0, 3, 1, 2))


def _tick(bar: tqdm, part: np.ndarray) -> np.ndarray:
    bar.update(len(part))
    return part


def _process_pool(workers: int) -> Executor:
    """A process pool; forked on Linux (fast start, workers only touch PIL and numpy), else spawned."""
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))


def _read_cache(path: Path, key: str) -> tuple[ImageSet, ImageSet] | None:
    """The cached splits if ``path`` exists, is readable and was made from the same ``key``."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            classes = [str(c) for c in z["classes"]]
            train, test = (ImageSet(torch.from_numpy(z[f"{s}_images"]), torch.from_numpy(z[f"{s}_labels"]),
                                    list(classes)) for s in _SPLITS)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, DataError):
        return None  # unreadable or foreign: decode again and overwrite it
    return train, test


def _write_cache(path: Path, key: str, train: ImageSet, test: ImageSet) -> None:
    """Write the decoded splits atomically; a cache that cannot be written only costs a warning."""
    arrays = {f"{s}_{k}": getattr(part, k).numpy() for s, part in zip(_SPLITS, (train, test))
              for k in ("images", "labels")}
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), classes=np.array(train.classes), **arrays)
    except OSError as e:
        warnings.warn(f"could not write the decode cache {path} ({e.strerror or e}); images will be decoded "
                      "again next time (set EKG_CACHE to a writable folder)", stacklevel=3)


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


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
        raise DataError(f"cannot write {dest} ({_one_line(e.strerror or e)}): choose a writable cache folder") from None
    return dest


def _fetch(url: str, path: Path, *, progress: bool, desc: str) -> str:
    """Stream ``url`` into ``path`` with a progress bar; return the hex MD5 of what was written."""
    hint = "download it by hand and pass its path with --data PATH"
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(f"{url} could not be reached ({_one_line(reason)}): {hint}") from None
    digest = hashlib.md5()
    with response, open(path, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False) as bar:
            while True:
                try:
                    block = response.read(1 << 20)
                except (http.client.HTTPException, OSError) as e:
                    raise DataError(f"the download of {url} was interrupted ({_one_line(e)}): "
                                    f"try again, or {hint}") from None
                if not block:
                    break
                out.write(block)
                digest.update(block)
                bar.update(len(block))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std`` with constants on the 0..255 scale, in the image's RGB order."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise EkgError(f"a normalisation needs 3 means and 3 positive stds, got mean {mean}, std {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (``(..., 3, H, W)`` on the 0..255 scale) to float32 on its device."""
        if x.dim() < 3 or x.shape[-3] != 3:
            raise EkgError(f"normalisation expects images shaped (N, 3, H, W), got {tuple(x.shape)}")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
        return (x.to(torch.float32) - mean) / std

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalization:
        try:
            return cls(tuple(d["mean"]), tuple(d["std"]))  # type: ignore[arg-type]
        except (KeyError, TypeError) as e:
            raise EkgError(f"a normalisation must be a dict with 'mean' and 'std' lists of 3 numbers ({e})") from None


def _scaled(*values: float) -> tuple[float, float, float]:
    return tuple(255.0 * v for v in values)  # type: ignore[return-value]


NORMALIZATIONS: dict[str, Normalization] = {
    # The original EKG release's constants: listed in BGR order but applied as-is to RGB images.
    # Wrong in principle, but it is what its checkpoints were trained with, so keep it verbatim.
    "ekg_tf_cifar10": Normalization((113.9, 123.0, 125.3), (66.7, 62.1, 63.0)),
    "ekg_tf_cifar100": Normalization((112.0, 124.0, 129.0), (70.0, 65.0, 68.0)),
    "imagenet": Normalization(_scaled(0.485, 0.456, 0.406), _scaled(0.229, 0.224, 0.225)),  # akamaster checkpoints
    "cifar10": Normalization(_scaled(0.4914, 0.4822, 0.4465), _scaled(0.2470, 0.2435, 0.2616)),
    "cifar100": Normalization(_scaled(0.5071, 0.4865, 0.4409), _scaled(0.2673, 0.2564, 0.2762)),
}


def get_normalization(name_or_dict: str | dict[str, Any] | Normalization) -> Normalization:
    """A preset by name (see :data:`NORMALIZATIONS`), a ``{"mean", "std"}`` dict, or a Normalization."""
    if isinstance(name_or_dict, Normalization):
        return name_or_dict
    if isinstance(name_or_dict, dict):
        return Normalization.from_dict(name_or_dict)
    try:
        return NORMALIZATIONS[name_or_dict]
    except (KeyError, TypeError):
        raise EkgError(f"unknown normalisation {name_or_dict!r}: choose one of {', '.join(NORMALIZATIONS)}") from None


# --------------------------------------------------------------------------------------------
# Batched augmentation
# --------------------------------------------------------------------------------------------

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights, RGB order
_PAD_MODES = ("reflect", "zeros")
PAD_MODES = _PAD_MODES


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation: optional EKG colour jitter, then horizontal flip, then pad + random crop.

    ``brightness`` adds a delta uniform in ``[-b, b]`` (on the [0, 1] scale, so ``255*b`` here);
    ``contrast`` scales each image's deviation from its per-channel spatial mean by a factor in
    ``[1-c, 1+c]``; ``saturation`` blends with the grayscale image by a factor in ``[1-s, 1+s]``.
    """

    pad: int = 4
    pad_mode: str = "reflect"  # "reflect" or "zeros"
    flip: bool = True
    jitter: bool = False  # the EKG colour jitter, used for fine-tuning with the memory bank
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2

    def __post_init__(self) -> None:
        if self.pad_mode not in _PAD_MODES:
            raise EkgError(f"unknown pad_mode {self.pad_mode!r}: choose 'reflect' or 'zeros'")
        if not isinstance(self.pad, int) or self.pad < 0:
            raise EkgError(f"pad must be a non-negative integer, got {self.pad!r}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise EkgError(f"{name} must lie in [0, 1], got {value}")


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a batch ``(N, 3, H, W)`` (uint8 or float, 0..255) on its own device; returns float32 0..255.

    Steps, each with independent per-image draws from ``generator`` (which must live on ``x``'s
    device) in this order: colour jitter if ``cfg.jitter`` (brightness, contrast, saturation,
    then clamp to [0, 255]; a range of 0 is skipped and draws nothing), horizontal flip with
    probability 1/2, then pad by ``cfg.pad`` and crop back to ``H x W`` at a uniform offset in
    ``0..2*pad`` per axis (vertical drawn first). No Python loop over images: the flip, pad and
    crop are one gather. ``x`` is never modified.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise EkgError(f"augment expects images shaped (N, 3, H, W), got {tuple(x.shape)}")
    if not _same_device(generator.device, x.device):
        raise EkgError(f"the augmentation generator is on {generator.device} but the images are on {x.device}: "
                       "create the generator on the images' device")
    out = x.to(torch.float32, copy=True)
    if cfg.jitter:
        out = _color_jitter(out, cfg, generator)
    if cfg.flip or cfg.pad:
        out = _flip_pad_crop(out, cfg, generator)
    return out


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.type == "cpu" or (a.index or 0) == (b.index or 0))


def _uniform(n: int, radius: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` draws uniform in ``[-radius, radius]``, shaped ``(n, 1, 1, 1)`` to broadcast over images."""
    return (torch.rand(n, 1, 1, 1, generator=generator, device=device) * 2 - 1) * radius


def _color_jitter(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """EKG's brightness, contrast and saturation jitter on float 0..255 images, then clamp.

    Applied in sequence, with ``m`` the per-image per-channel spatial mean and ``gray(.)`` the
    luma: ``x1 = x + b``; ``x2 = (x1 - mean(x1)) * fc + mean(x1)``; ``x3 = gray(x2) + fs * (x2 - gray(x2))``.
    Since ``mean(x1) = m + b``, ``x2 = fc*x + shift`` with ``shift = (1-fc)*m + b``, and as the luma
    weights sum to 1, ``x3 = fs*fc*x + (1-fs)*fc*gray(x) + fs*shift + (1-fs)*gray(shift)``: one pass
    over the pixels instead of eight, with the same result up to float rounding.
    """
    return _apply_jitter(x, *_jitter_factors(x.shape[0], cfg, generator, x.device))


def _jitter_factors(n: int, cfg: AugmentConfig, generator: torch.Generator,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-image ``(b, fc, fs)`` of :func:`_color_jitter`, each ``(n, 1, 1, 1)``, drawn in that order."""
    ones = torch.ones(n, 1, 1, 1, device=device)
    b = _uniform(n, 255.0 * cfg.brightness, generator, device) if cfg.brightness else torch.zeros_like(ones)
    fc = 1 + _uniform(n, cfg.contrast, generator, device) if cfg.contrast else ones
    fs = 1 + _uniform(n, cfg.saturation, generator, device) if cfg.saturation else ones
    return b, fc, fs


def _apply_jitter(x: torch.Tensor, b: torch.Tensor, fc: torch.Tensor, fs: torch.Tensor) -> torch.Tensor:
    """The colour jitter of :func:`_color_jitter` with given factors (on ``x``'s device), then clamp."""
    weights = torch.tensor(_GRAY, device=x.device).view(1, 3, 1, 1)
    shift = (1 - fc) * x.mean(dim=(2, 3), keepdim=True) + b  # (n, 3, 1, 1)
    offset = fs * shift + (1 - fs) * (shift * weights).sum(dim=1, keepdim=True)
    out = torch.addcmul(offset, fs * fc, x)
    out.addcmul_((1 - fs) * fc, (x * weights).sum(dim=1, keepdim=True))
    return out.clamp_(0, 255)


def _flip_pad_crop(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip, then pad and random crop, as one gather over the padded batch.

    Both padding modes are left-right symmetric, so cropping a flipped padded image at column
    offset ``ox`` equals reading the unflipped padded image's columns ``Wp-1-ox-j`` backwards.
    """
    n, c, h, w = x.shape
    p, device = cfg.pad, x.device
    if p and cfg.pad_mode == "reflect" and p >= min(h, w):
        raise EkgError(f"reflect padding by {p} needs images larger than {p}x{p}, got {h}x{w}; use pad_mode 'zeros'")
    flip = (torch.rand(n, generator=generator, device=device) < 0.5) if cfg.flip else None
    oy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=device)
    ox = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=device)
    if p:
        x = F.pad(x, (p, p, p, p), mode="reflect" if cfg.pad_mode == "reflect" else "constant")
    wp = w + 2 * p
    rows = oy[:, None] + torch.arange(h, device=device)  # (n, h)
    cols = ox[:, None] + torch.arange(w, device=device)  # (n, w)
    if flip is not None:
        cols = torch.where(flip[:, None], wp - 1 - cols, cols)
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return x.flatten(2).gather(2, index).view(n, c, h, w)


# --------------------------------------------------------------------------------------------
# Batch iteration
# --------------------------------------------------------------------------------------------


def iterate_batches(data: ImageSet | FolderSet, batch_size: int, *, shuffle: bool = False,
                    generator: torch.Generator | None = None, augment: AugmentConfig | None = None,
                    normalization: Normalization | None = None, drop_last: bool = False,
                    device: torch.device | str | None = None,
                    part: slice | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x float32, y int64)`` batches on ``device`` (default: the data's device).

    The epoch's permutation (when ``shuffle``) is drawn from ``generator`` (or torch's global RNG)
    when this function is called, followed by one draw that seeds a private augmentation
    generator on ``device``; so the same generator state gives identical batches, whatever the
    devices. ``x`` is augmented (if ``augment``) and normalised (if ``normalization``), else it
    is float32 on the 0..255 scale. CPU data bound for a GPU is copied per batch through pinned
    memory. With ``part`` (a process's :meth:`~ekg.distributed.Dist.part` of ``batch_size``) only
    those rows of each batch are yielded: the batches and their random draws are those of one
    process, and a streamed set loads only those rows.

    A streamed set (:class:`ekg.folder.FolderSet`) is read in DataLoader workers: unaugmented
    images through the evaluation transform (resize, centre crop), augmented ones through
    RandomResizedCrop and (if ``augment.flip``) a horizontal flip drawn per image from the same
    seed, the colour jitter (if ``augment.jitter``) on the device; ``augment.pad`` is not used.
    """
    if batch_size < 1:
        raise EkgError(f"batch_size must be at least 1, got {batch_size}")
    target = torch.device(device) if device is not None else data.device
    gen_device = generator.device if generator is not None else torch.device("cpu")
    n = len(data)
    order = torch.randperm(n, generator=generator, device=gen_device) if shuffle else torch.arange(n)
    if not isinstance(data, ImageSet):  # streamed from disk
        seed = _draw_seed(generator, gen_device) if augment is not None else None
        batches = batch_positions(order.cpu(), batch_size, drop_last=drop_last)
        return ((views[0], y) for views, y, _ in data.stream(batches, target, augment=augment, seed=seed,
                                                              normalization=normalization, part=part))
    aug = (augment, _derived_generator(generator, gen_device, target)) if augment is not None else None
    return _batches(data, batch_positions(order.to(data.images.device), batch_size, drop_last=drop_last), target, aug,
                    normalization, part)


def batch_positions(order: torch.Tensor, batch_size: int, *, drop_last: bool = False) -> list[torch.Tensor]:
    """``order`` cut into consecutive batches of ``batch_size`` (the last one shorter, or dropped
    with ``drop_last``). No batches at all when nothing is left, never an empty one: an empty
    batch through a BatchNorm in training mode gives NaN statistics."""
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    return list(order[:stop].split(batch_size)) if stop else []


def iterate_index_batches(data: ImageSet | FolderSet, batches: Sequence[Any], *,
                          normalization: Normalization | None = None,
                          device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the unaugmented ``(x, y)`` of each batch of positions in ``batches`` (tensors, lists,
    ranges or arrays), in that order, on ``device`` (default: the data's device): the batches of
    :func:`iterate_batches` for chosen rows, e.g. a process's share of a pass in dataset order."""
    target = torch.device(device) if device is not None else data.device
    index = [_as_index(b, torch.device("cpu")) for b in batches]
    if not isinstance(data, ImageSet):
        return ((views[0], y) for views, y, _ in data.stream(index, target, normalization=normalization))
    return _batches(data, [i.to(data.images.device) for i in index], target, None, normalization)


def _draw_seed(generator: torch.Generator | None, gen_device: torch.device) -> int:
    """One draw from ``generator`` (global RNG if None): the seed of an epoch's augmentation."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device).item())


def _derived_generator(generator: torch.Generator | None, gen_device: torch.device,
                       target: torch.device) -> torch.Generator:
    """A generator on ``target`` seeded by one draw from ``generator`` (global RNG if None)."""
    seed = _draw_seed(generator, gen_device)
    derived = torch.Generator(device=target)
    derived.manual_seed(seed)
    return derived


def _batches(data: ImageSet, batches: Sequence[torch.Tensor], target: torch.device,
             aug: tuple[AugmentConfig, torch.Generator] | None, normalization: Normalization | None,
             part: slice | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    pin = target.type == "cuda" and data.images.device.type == "cpu"
    for idx in batches:
        x, y = data.images[idx], data.labels[idx]
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(target, non_blocking=pin), y.to(target, non_blocking=pin)
        x = augment(x, *aug) if aug is not None else x.to(torch.float32)
        if part is not None:  # the whole batch is drawn and augmented, as on one process
            x, y = x[part], y[part]
        if normalization is not None:
            x = normalization.apply(x)
        yield x, y


# --------------------------------------------------------------------------------------------
# EKG search sets
# --------------------------------------------------------------------------------------------


def carve_search_sets(train: ImageSet | FolderSet, *, val_per_class: int = 32, sub_per_class: int = 256,
                      seed: int = 1) -> tuple[Any, Any]:
    """``(D_val, D_sub)``: the small sets EKG's sub-network search uses, carved as the release did.

    For each class ``c`` in label order, ``idx_c`` = positions of class ``c`` in training-set order.
    ``D_val`` takes the *last* ``val_per_class`` of each ``idx_c`` in reversed order (the release's
    ``idx[:-33:-1]``); ``D_sub`` takes the *first* ``sub_per_class``. Each set's indices are
    concatenated over classes (``np.hstack``) and shuffled once with a fresh
    ``np.random.RandomState(seed).shuffle`` (the release's ``np.random.seed(1); np.random.shuffle``).
    Raises :class:`DataError` if a class has fewer than ``val_per_class + sub_per_class`` images.
    Works alike on a streamed set (the sets are subsets of its file list).
    """
    labels = train.labels.cpu().numpy()
    val_parts, sub_parts = [], []
    for c in range(len(train.classes)):
        idx = np.where(labels == c)[0]
        if len(idx) < val_per_class + sub_per_class:
            raise DataError(f"class {c} ({train.classes[c]}) has {len(idx)} training images, fewer than the "
                            f"{val_per_class} + {sub_per_class} the search sets need")
        val_parts.append(idx[::-1][:val_per_class])
        sub_parts.append(idx[:sub_per_class])
    return _shuffled_subset(train, val_parts, seed), _shuffled_subset(train, sub_parts, seed)


def _shuffled_subset(train: Any, parts: list[np.ndarray], seed: int) -> Any:
    idx = np.hstack(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    np.random.RandomState(seed).shuffle(idx)
    return train.subset(idx)

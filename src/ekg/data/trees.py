"""Class-per-folder image trees (a folder, a zip, or a ``*train*.zip`` + ``*test*.zip`` pair)
decoded into memory once and cached as an ``.npz``; and the probe that says whether a tree is
small and uniform enough to be held in memory rather than streamed (:mod:`ekg.data.stream`)."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..errors import DataError, one_line
from ..io import atomic_path
from .sets import DataSplits, ImageSet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "test")
_CACHE_VERSION = 1
_PARALLEL_MIN_IMAGES = 4096  # below this, decoding in-process beats starting workers
_DECODE_CHUNK = 1024
_PROBE_PER_SPLIT = 64
_SMALL_SIDE = 128  # pixels: larger images are streamed (cropped and resized), even if all of one size
_MEMORY_LIMIT = 2 << 30  # bytes of decoded training pixels above which a uniform tree is streamed anyway


_SMALL_SIDE = 128  # pixels: larger images are streamed (cropped and resized), even if all of one size
_MEMORY_LIMIT = 2 << 30  # bytes of decoded training pixels above which a uniform tree is streamed anyway


def held_out_split(root: Path) -> str | None:
    """The held-out split folder of a class-folder tree (``val`` if present, else ``test``), or
    None if ``root`` has no ``train/`` beside one of them."""
    if not (root / "train").is_dir():
        return None
    return next((s for s in ("val", "test") if (root / s).is_dir()), None)


def _probe_files(split_dir: Path, limit: int) -> tuple[int, list[Path]]:
    """The number of images in ``split_dir/<class>/`` and up to ``limit`` of them spread evenly."""
    files = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        files += sorted(Path(e.path) for e in os.scandir(class_dir) if e.is_file() and is_image(e.name))
    step = max(1, len(files) // limit)
    return len(files), files[::step][:limit]


def stream_reason(root: Path, held_out: str) -> str | None:
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
                raise DataError(f"{path} is not a readable image ({one_line(e)})") from None
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


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def load_image_folder(root: Path, cache_root: Path, progress: bool, held_out: str = "test") -> DataSplits:
    """``root/train/<class>/*`` and ``root/<held_out>/<class>/*`` (the test split); cached by every
    file's path, size and mtime."""
    files, stats = [], []
    for split, folder in zip(SPLITS, ("train", held_out)):
        for class_dir in sorted(p for p in (root / folder).iterdir() if p.is_dir() and not p.name.startswith(".")):
            found = 0
            for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
                if entry.is_file() and is_image(entry.name):
                    st = entry.stat()
                    files.append(_ImageFile(split, class_dir.name, entry.name, entry.path))
                    stats.append((f"{folder}/{class_dir.name}/{entry.name}", st.st_size, st.st_mtime_ns))
                    found += 1
            if not found:  # a class folder is a class: an empty one would silently drop it
                raise DataError(f"the class folder {class_dir} holds no images (.jpg, .jpeg or .png): add its images "
                                "or remove the folder (every class folder is a class)")
    key = _cache_key("folder", str(root), stats)
    return _load_tree(lambda: files, key, f"image folders {root}", cache_root, progress)


def load_image_zips(zips: Sequence[Path], cache_root: Path, progress: bool) -> DataSplits:
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
            raise DataError(f"{z} is not a readable zip ({one_line(e)})") from None
        for name in names:
            parts = PurePosixPath(name).parts
            if len(parts) >= 3 and parts[-3] in SPLITS and is_image(parts[-1]) and "__MACOSX" not in parts:
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
    by_split = {s: sorted((f for f in files if f.split == s), key=lambda f: (f.cls, f.name)) for s in SPLITS}
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
        raise DataError(f"cannot read {entries[len(blobs)].display} ({one_line(e)})") from None
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
        raise DataError(f"{name} is not a readable image ({one_line(e)})") from None


def _decode_chunk(blobs: list[bytes], names: list[str], size: tuple[int, int], reference: str) -> np.ndarray:
    """Decode ``blobs`` into ``(n, H, W, 3)``; each must be ``size`` = (H, W) like ``reference``. Runs in a worker."""
    out = np.empty((len(blobs), size[0], size[1], 3), dtype=np.uint8)
    for i, (blob, name) in enumerate(zip(blobs, names)):
        img = _decode_one(blob, name)
        if img.shape[:2] != size:
            raise DataError(f"{name} is {img.shape[1]}x{img.shape[0]} pixels but {reference} is {size[1]}x{size[0]}: "
                            "all images in a split must have the same size to be held in memory (a folder tree "
                            "of any sizes can be streamed: `mode` stream)")
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
                                    list(classes)) for s in SPLITS)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, DataError):
        return None  # unreadable or foreign: decode again and overwrite it
    return train, test


def _write_cache(path: Path, key: str, train: ImageSet, test: ImageSet) -> None:
    """Write the decoded splits atomically; a cache that cannot be written only costs a warning."""
    arrays = {f"{s}_{k}": getattr(part, k).numpy() for s, part in zip(SPLITS, (train, test))
              for k in ("images", "labels")}
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), classes=np.array(train.classes), **arrays)
    except OSError as e:
        warnings.warn(f"could not write the decode cache {path} ({e.strerror or e}); images will be decoded "
                      "again next time (set EKG_CACHE to a writable folder)", stacklevel=3)

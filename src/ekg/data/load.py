"""The entry point: :func:`load_data` reads a dataset named or found at a path, whatever its format
(the CIFAR python layouts, class-folder trees in memory or streamed, zips of them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from ..download import default_cache_dir
from ..errors import DataError, EkgError
from .cifar import CIFAR_FORMATS, load_cifar_folder, load_cifar_tarball, load_named
from .datasets import from_datasets, is_dataset_pair
from .sets import DataSplits
from .trees import SPLITS, held_out_split, load_image_folder, load_image_zips, stream_reason

if TYPE_CHECKING:
    from .stream import StreamConfig

PathLike = Union[str, os.PathLike]
DATA_MODES = ("auto", "memory", "stream")


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
    (:class:`ekg.data.stream.FolderSet`: decoded batch by batch with torchvision's transforms, sizes
    from ``stream``, a :class:`ekg.data.stream.StreamConfig`; needs the ``vision`` extra);
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
    if isinstance(spec, str) and spec in CIFAR_FORMATS:
        _no_stream(mode, f"the name {spec}")
        return load_named(CIFAR_FORMATS[spec], cache_root, download, progress)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist: pass a CIFAR folder or .tar.gz, an image-folder tree or zip, "
                        f"or one of the names {', '.join(CIFAR_FORMATS)}")
    path = path.resolve()
    if path.is_file():
        _no_stream(mode, str(path))
        return _load_file(path, cache_root, progress)
    return _load_folder(path, cache_root, progress, mode, stream)


def _no_stream(mode: str, what: str) -> None:
    if mode == "stream":
        raise DataError(f"`mode` stream reads a class-folder tree (train/<class>/*, val/<class>/* or "
                        f"test/<class>/*) from disk; {what} is not one (extract a zip into a folder first)")


def _load_file(path: Path, cache_root: Path, progress: bool) -> DataSplits:
    """A single file: a CIFAR tarball or a zip of an image tree."""
    if path.suffix.lower() == ".zip":
        return load_image_zips([path], cache_root, progress)
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return load_cifar_tarball(path)
    raise DataError(f"{path} is neither a CIFAR .tar.gz nor a .zip of train/ and test/ class folders")


def _load_folder(path: Path, cache_root: Path, progress: bool, mode: str = "auto",
                 stream: StreamConfig | None = None) -> DataSplits:
    """A folder: a CIFAR layout, an image tree, a pair of zips or a CIFAR tarball, in that order."""
    for fmt in CIFAR_FORMATS.values():
        if path.name == fmt.folder or (path / fmt.folder).is_dir():
            _no_stream(mode, f"{path} (a {fmt.title} python layout)")
        if path.name == fmt.folder:
            return load_cifar_folder(path, fmt)
        if (path / fmt.folder).is_dir():
            return load_cifar_folder(path / fmt.folder, fmt)
    held_out = held_out_split(path)
    if held_out is not None:
        reason = stream_reason(path, held_out) if mode == "auto" else None
        if mode == "memory" or (mode == "auto" and reason is None):
            return load_image_folder(path, cache_root, progress, held_out)
        from .stream import load_folder_tree

        return load_folder_tree(path, held_out, stream, reason=reason)
    _no_stream(mode, str(path))
    zips = {split: sorted(path.glob(f"*{split}*.zip")) for split in SPLITS}
    if all(zips.values()):
        if any(len(found) > 1 for found in zips.values()):
            names = ", ".join(p.name for found in zips.values() for p in found)
            raise DataError(f"{path} holds several candidate zips ({names}): pass the path of one zip, "
                            "or keep exactly one *train*.zip and one *test*.zip in the folder")
        return load_image_zips([zips["train"][0], zips["test"][0]], cache_root, progress)
    for fmt in CIFAR_FORMATS.values():
        if (path / fmt.tarball).is_file():
            return load_cifar_tarball(path / fmt.tarball)
    raise DataError(f"no CIFAR data in {path}: expected a folder containing cifar-10-batches-py/ (data_batch_1..5, "
                    "test_batch) or cifar-100-python/ (train, test), a .tar.gz, or train/ and test/ class folders "
                    "(or a *train*.zip and a *test*.zip of them)")


def as_splits(data: Any, *, progress: bool = True, classes: Any = None, **load_kwargs: Any) -> DataSplits:
    """Whatever a user passes as data, as :class:`DataSplits`: a DataSplits as is; a name or a path
    through :func:`load_data` (``load_kwargs``); a ``(train, test)`` pair of map-style Datasets or
    DataLoaders through :func:`ekg.data.datasets.from_datasets` (``classes``: their names)."""
    if isinstance(data, DataSplits):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_data(data, progress=progress, **load_kwargs)
    if is_dataset_pair(data):
        return from_datasets(data[0], data[1], classes=classes, progress=progress)
    raise EkgError(f"`data` must be a (train, test) pair of torch Datasets or DataLoaders, a dataset name "
                   f"(cifar10, cifar100) or a path, got {type(data).__name__}"
                   + (" (a single Dataset: pass (train_set, test_set))" if hasattr(data, "__getitem__") else ""))

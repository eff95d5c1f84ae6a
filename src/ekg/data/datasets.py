"""A user's own data: a ``(train, test)`` pair of map-style ``torch.utils.data.Dataset`` objects
(or ``DataLoader`` objects over them) read once into :class:`~ekg.data.sets.ImageSet` splits, so
that every phase (the search sets, the adaptation, the memory bank's rows in dataset order,
fine-tuning, resume, torchrun shares, the landscape and the study) works on them as on CIFAR.

Each item is ``(image, label)``: the image a ``C×H×W`` tensor (uint8 on the 0..255 scale, or
float on its own scale, e.g. already normalised), a ``C×H×W`` NumPy array, or a PIL image
(mode ``L``/``I;16``-free grayscale → 1 channel, anything else → RGB); the label an ``int`` (or
a 0-d integer tensor / NumPy integer). All images of both splits share one shape and one kind
(uint8 or float). Class names come from ``classes=``, else the training set's ``.classes``
attribute (torchvision's convention), else ``"0"``, ``"1"``, ...

The split is held in memory (the method's batched on-device augmentation needs it); a dataset
over ``max_gb`` is refused with a pointer to the streamed class-folder reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DataError
from .sets import DataSplits, ImageSet

DATASET_NAME = "dataset"  # DataSplits.name of a user's data
MAX_GB = 8.0  # decoded size above which a user's dataset is refused (it would be held in memory)


def is_dataset_pair(data: Any) -> bool:
    """Whether ``data`` is a ``(train, test)`` pair of Datasets or DataLoaders."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(_is_map_style(d) or _is_loader(d) for d in data)


def _is_loader(d: Any) -> bool:
    return isinstance(d, torch.utils.data.DataLoader)


def _is_map_style(d: Any) -> bool:
    return hasattr(d, "__getitem__") and hasattr(d, "__len__") and not isinstance(d, (str, bytes, torch.Tensor))


def _dataset_of(d: Any, what: str) -> Any:
    """The map-style Dataset behind ``d`` (a DataLoader's ``.dataset``)."""
    if _is_loader(d):
        d = d.dataset
    if isinstance(d, torch.utils.data.IterableDataset) or not _is_map_style(d):
        raise DataError(f"the {what} set must be a map-style torch.utils.data.Dataset (with __len__ and "
                        f"__getitem__) or a DataLoader over one, got {type(d).__name__}: the search carves its "
                        "sets by position, and the memory bank stores one row per position")
    return d


def from_datasets(train: Any, test: Any, *, classes: Sequence[str] | None = None, progress: bool = True,
                  max_gb: float = MAX_GB) -> DataSplits:
    """``(train, test)`` Datasets (or DataLoaders) as :class:`DataSplits` held in memory.

    Every item is read once, in dataset order (a DataLoader's sampler and batch size are not
    used: its ``.dataset`` is read). Raises :class:`DataError` (one line, naming the split and
    the item) for an item that is not ``(image, label)``, an image of another shape or kind than
    the first, a label outside the classes, an empty split, or data over ``max_gb``."""
    train_ds, test_ds = _dataset_of(train, "training"), _dataset_of(test, "test")
    train_set = read_split(train_ds, "training", classes=classes, progress=progress, max_gb=max_gb)
    test_set = read_split(test_ds, "test", classes=train_set.classes, progress=progress, max_gb=max_gb,
                          like=(train_set.image_size, train_set.kind))
    source = (f"{type(train_ds).__name__} / {type(test_ds).__name__} datasets ({len(train_set)} training and "
              f"{len(test_set)} test images of {_shape(train_set.image_size)} {train_set.kind}, "
              f"{len(train_set.classes)} classes)")
    return DataSplits(DATASET_NAME, train_set, test_set, source)


def read_split(ds: Any, what: str, *, classes: Sequence[str] | None = None, progress: bool = True,
               max_gb: float = MAX_GB, like: tuple[tuple[int, ...], str] | None = None) -> ImageSet:
    """One Dataset (or DataLoader) read into an :class:`ImageSet`. ``like``: the ``(shape, kind)``
    its images must have (the training split's ``image_size`` and :attr:`~ImageSet.kind`)."""
    ds = _dataset_of(ds, what)
    n = len(ds)
    if n == 0:
        raise DataError(f"the {what} set is empty")
    first_item = _item(ds, 0, what)
    first = _image(first_item, 0, what)
    shape, kind = tuple(first.shape), "uint8" if first.dtype == torch.uint8 else "float32"
    if like is not None and (shape, kind) != (tuple(like[0]), like[1]):
        raise DataError(f"the {what} set's images are {kind} {_shape(shape)} but the training set's are "
                        f"{like[1]} {_shape(like[0])}: both splits need one shape and one kind")
    gb = n * first.numel() * first.element_size() / 2**30
    if gb > max_gb:
        raise DataError(f"the {what} set holds {n} images of {_shape(shape)} {kind}, {gb:.1f} GiB in memory, more "
                        f"than the {max_gb:g} GiB a dataset may take (`max_gb`): write it as a class-folder "
                        "tree (train/<class>/*.png, val/<class>/*.png) and stream it from disk")
    images = torch.empty((n, *shape), dtype=first.dtype)
    labels = np.empty(n, dtype=np.int64)
    for i in tqdm(range(n), desc=f"reading the {what} set", unit="img", disable=not progress, leave=False):
        item = first_item if i == 0 else _item(ds, i, what)
        img = first if i == 0 else _image(item, i, what)
        if tuple(img.shape) != shape or img.dtype != first.dtype:
            raise DataError(f"item {i} of the {what} set is a {img.dtype} image of {_shape(tuple(img.shape))} but "
                            f"item 0 is {first.dtype} {_shape(shape)}: every image needs one shape and dtype "
                            "(resize them in your Dataset)")
        images[i] = img
        labels[i] = _label(item, i, what)
    names = _classes(ds, labels, classes)
    if labels.min() < 0 or labels.max() >= len(names):
        raise DataError(f"the {what} set has labels {labels.min()}..{labels.max()} but {len(names)} classes: labels "
                        f"must lie in 0..{len(names) - 1}")
    return ImageSet(images, torch.from_numpy(labels), names)


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _item(ds: Any, i: int, what: str) -> Any:
    try:
        return ds[i]
    except Exception as e:  # the user's __getitem__: name the item, keep one line
        raise DataError(f"reading item {i} of the {what} set failed ({type(e).__name__}: "
                        f"{' '.join(str(e).split())})") from None


def _image(item: Any, i: int, what: str) -> torch.Tensor:
    """The image of ``item`` (item ``i`` of the ``what`` set) as a ``(C, H, W)`` uint8 or float32 tensor."""
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DataError(f"item {i} of the {what} set is a {type(item).__name__}, not an (image, label) pair")
    img = item[0]
    if hasattr(img, "mode") and hasattr(img, "convert"):  # a PIL image
        img = np.array(img if img.mode in ("L", "RGB") else img.convert("RGB"))  # a writable copy
        img = torch.from_numpy(np.ascontiguousarray(img[:, :, None] if img.ndim == 2 else img)).permute(2, 0, 1)
    elif isinstance(img, np.ndarray):
        img = torch.from_numpy(np.ascontiguousarray(img))
    if not isinstance(img, torch.Tensor):
        raise DataError(f"item {i} of the {what} set holds a {type(img).__name__} image: give a C×H×W tensor "
                        "(uint8 or float) or a PIL image")
    if img.dim() != 3:
        raise DataError(f"item {i} of the {what} set holds an image of shape {tuple(img.shape)}: images must be "
                        "C×H×W (a grayscale H×W image needs .unsqueeze(0))")
    if img.dtype == torch.uint8:
        return img.contiguous()
    if img.dtype.is_floating_point:
        return img.to(torch.float32).contiguous()
    raise DataError(f"item {i} of the {what} set holds a {img.dtype} image: images must be uint8 (0..255) or float")


def _label(item: Any, i: int, what: str) -> int:
    y = item[1]
    if isinstance(y, torch.Tensor) and y.numel() == 1 and not y.dtype.is_floating_point:
        return int(y.item())
    if isinstance(y, (int, np.integer)) and not isinstance(y, bool):
        return int(y)
    raise DataError(f"item {i} of the {what} set has the label {y!r}: labels must be integers (class positions)")


def _classes(ds: Any, labels: np.ndarray, classes: Sequence[str] | None) -> list[str]:
    if classes is None:
        found = getattr(ds, "classes", None)
        if isinstance(found, (list, tuple)) and len(found) > int(labels.max()):
            classes = found
    if classes is None:
        return [str(c) for c in range(int(labels.max()) + 1)]
    return [str(c) for c in classes]

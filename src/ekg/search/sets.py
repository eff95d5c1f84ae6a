"""EKG's search sets D_val and D_sub, carved from the training split by the release's rule
(:func:`carve_search_sets`), and the largest balanced carve for a training set too small for the
requested sizes (:func:`fit_search_sets`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError

if TYPE_CHECKING:
    from ..data.sets import ImageSet
    from ..data.stream import FolderSet

MIN_PER_CLASS = 2  # one image for D_val and one for D_sub


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


@dataclass(frozen=True)
class SearchSetSizes:
    """Images per class of D_val and D_sub, and the one-line note when they are not the requested ones."""

    val_per_class: int
    sub_per_class: int
    note: str | None = None


def fit_search_sets(train: Any, *, val_per_class: int = 32, sub_per_class: int = 256) -> SearchSetSizes:
    """The sizes :func:`carve_search_sets` can take from ``train``: the requested ones when every
    class has ``val_per_class + sub_per_class`` images, else the largest carve that keeps classes
    balanced, in the requested proportion: with ``m`` the smallest class's count,
    ``v = max(1, m * val_per_class // (val_per_class + sub_per_class))`` and ``s = m - v`` (with a
    note saying so). Raises :class:`DataError` naming the class when one has fewer than
    :data:`MIN_PER_CLASS` images (or none)."""
    labels = train.labels.cpu().numpy()
    counts = np.bincount(labels, minlength=len(train.classes))
    need = val_per_class + sub_per_class
    smallest = int(np.argmin(counts))
    m = int(counts[smallest])
    if m >= need:
        return SearchSetSizes(val_per_class, sub_per_class)
    name = train.classes[smallest]
    if m < MIN_PER_CLASS:
        raise DataError(f"class {smallest} ({name}) has {m} training image{'s' if m != 1 else ''}; the search sets "
                        f"need at least {MIN_PER_CLASS} per class (one for D_val, one for D_sub): add images of "
                        "that class or leave it out of the data")
    v = max(1, m * val_per_class // need)
    s = m - v
    note = (f"the smallest class, {smallest} ({name}), has {m} training images, fewer than the {val_per_class} + "
            f"{sub_per_class} per class the search sets take: carving {v} + {s} per class instead "
            f"(D_val {v * len(counts)} images, D_sub {s * len(counts)})")
    return SearchSetSizes(v, s, note)

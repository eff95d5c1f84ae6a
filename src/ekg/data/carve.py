"""EKG's search sets D_val and D_sub, carved from the training split by the release's rule."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError

if TYPE_CHECKING:
    from .sets import ImageSet
    from .stream import FolderSet


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

"""Data: what ekg reads images and labels from, one module per concept.

=================  ==========================================================================
``sets``           the containers: :class:`ImageSet` (a split in memory), :class:`DataSplits`
``load``           :func:`load_data`: a name or a path, in any of the formats below; :func:`as_splits`
``datasets``       a user's own ``(train, test)`` torch Datasets or DataLoaders, read into memory
``cifar``          the official CIFAR-10/100 python layouts (folder or ``.tar.gz``)
``trees``          class-folder trees and zips decoded into memory, with their decode cache
``stream``         class-folder trees streamed from disk (ImageNet): :class:`FolderSet`
``normalize``      :class:`Normalization` and its presets
``augment``        the method's batched on-device augmentation
``batches``        epoch batches and dataset-order batches over any split
=================  ==========================================================================

Downloads and the cache folder are :mod:`ekg.download`'s; the search sets are carved by
:mod:`ekg.search.sets`. Every problem with the data is a :class:`~ekg.errors.DataError` naming the path.
"""

from .augment import PAD_MODES, Augment, AugmentConfig, Transform, augment, augment_batch
from .batches import batch_positions, iterate_batches, iterate_index_batches
from .cifar import CIFAR10_MD5, CIFAR10_URL, CIFAR100_MD5, CIFAR100_URL
from .datasets import from_datasets
from .load import DATA_MODES, as_splits, load_data
from .normalize import IDENTITY, NORMALIZATIONS, Normalization, get_normalization
from .sets import DataSplits, ImageSet
from .stream import FolderSet, StreamConfig

__all__ = [
    "ImageSet", "DataSplits", "load_data", "as_splits", "from_datasets", "IDENTITY", "Augment", "Transform", "augment_batch", "DATA_MODES", "Normalization", "NORMALIZATIONS", "get_normalization",
    "AugmentConfig", "PAD_MODES", "augment", "iterate_batches", "iterate_index_batches", "batch_positions",
    "FolderSet", "StreamConfig", "CIFAR10_URL", "CIFAR10_MD5", "CIFAR100_URL", "CIFAR100_MD5",
]

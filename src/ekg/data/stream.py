"""Streaming class-per-folder image trees (the ImageNet layout): file lists, not pixels, in memory.

One module because it is one reader: the file list, the set over it and the DataLoader plan that
serves it share private state (the persistent loader, the per-image seeds); split, each part
would need the others' internals.

``ROOT/train/<class>/*.JPEG`` and ``ROOT/val/<class>/*`` (or ``test/``) are listed once; a
:class:`FolderSet` holds the file names, the labels and the class names, and every phase of ekg
(evaluation, the adaptation epoch, the search's Taylor scores and candidate evaluations, the
memory bank, fine-tuning) reads it through :func:`ekg.data.batches.iterate_batches` like an in-memory
:class:`~ekg.data.sets.ImageSet`. Images are decoded batch by batch in ``torch.utils.data.DataLoader``
workers with torchvision's standard transforms:

* evaluation (and the memory bank): ``Resize(resize)`` (shorter side) + ``CenterCrop(image_size)``;
* training: ``RandomResizedCrop(image_size, scale)`` + ``RandomHorizontalFlip`` (if the
  augmentation flips); the EKG colour jitter, when asked for, runs on the device afterwards;

then ``PILToTensor``: the batch reaches the device as uint8 and is normalised there
(:meth:`ekg.data.normalize.Normalization.apply`), as for in-memory data.

Determinism: the batches and every random draw come from the caller's generator, never from a
worker's RNG. Each image of an augmented batch gets a seed drawn in the main process for the
*whole* batch; a worker seeds torch's CPU generator with it just for that image's transform. So a
seed gives the same batches whatever the number of workers, and torchrun ranks that each load
only their :meth:`~ekg.distributed.Dist.part` of a batch together see exactly the one-process batch.

Every subset of a split (the search sets, ``--limit-train``, a rank's share) shares the split's
file list and its DataLoader, whose workers persist between passes. A batch is cut into chunks
spread over the workers, so even one batch is decoded in parallel.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DataError, one_line
from .augment import AugmentConfig, apply_jitter, jitter_factors
from .normalize import Normalization
from .sets import DataSplits, as_index
from .trees import is_image

__all__ = ["FolderSet", "StreamConfig", "load_folder_tree", "require_torchvision", "VISION_HINT"]

VISION_HINT = 'pip install "ekg[vision]"'
_PREFETCH = 4  # chunks in flight per worker


@dataclass(frozen=True)
class StreamConfig:
    """How a streamed tree is turned into tensors.

    ``image_size``: the side of the square crop the model sees (RandomResizedCrop for training,
    CenterCrop for evaluation); ``resize``: the evaluation resize of the shorter side (None:
    ``round(image_size * 256 / 224)``, the usual 256 for 224; 0: no resize); ``scale``:
    RandomResizedCrop's area range; ``workers``: DataLoader worker processes (None: the CPUs of
    this process divided among the processes of this machine, at most 8; 0: decode in-process).
    """

    image_size: int = 224
    resize: int | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    workers: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise DataError(f"`image_size` must be a whole number of at least 1, got {self.image_size!r}")
        if self.resize is not None and (not isinstance(self.resize, int) or self.resize < 0):
            raise DataError(f"`resize` must be a whole number of 0 (none) or more, got {self.resize!r}")
        if self.resize and self.resize < self.image_size:
            raise DataError(f"`resize` {self.resize} is smaller than the crop `image_size` {self.image_size}: "
                            "the centre crop would pad with black; resize to at least the crop (or 0: no resize)")
        lo, hi = (float(v) for v in self.scale)
        if not 0 < lo <= hi <= 1:
            raise DataError(f"the crop scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        object.__setattr__(self, "scale", (lo, hi))
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise DataError(f"`workers` (DataLoader worker processes) must be a whole number of 0 or more, got {self.workers!r}")

    @property
    def eval_resize(self) -> int:
        return round(self.image_size * 256 / 224) if self.resize is None else self.resize

    @property
    def num_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        return max(1, min(8, cpus // max(1, local)))

    def describe(self) -> str:
        resize = f"resize {self.eval_resize} + " if self.eval_resize else ""
        return (f"train RandomResizedCrop {self.image_size} (scale {self.scale[0]:g}-{self.scale[1]:g}), "
                f"eval {resize}centre crop {self.image_size}; {self.num_workers} loader workers")


def require_torchvision(why: str = "streaming a class-folder tree") -> None:
    """A one-line :class:`DataError` naming the extra to install when torchvision is missing."""
    try:
        importlib.import_module("torchvision.transforms.v2")
    except ImportError as e:
        raise DataError(f"{why} uses torchvision's transforms, which are not installed ({one_line(e)}): "
                        f"{VISION_HINT}") from None


# --------------------------------------------------------------------------------------------
# Listing a tree
# --------------------------------------------------------------------------------------------


def _list_split(split_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(classes, files, labels)`` of ``split_dir/<class>/*``: classes sorted by name, files sorted
    by name within a class, stored as ``class/name`` bytes (compact, shared by forked workers)."""
    try:
        class_dirs = sorted((e for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")),
                            key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"cannot list {split_dir} ({one_line(e.strerror or e)})") from None
    if not class_dirs:
        raise DataError(f"{split_dir} has no class folders: expected {split_dir.name}/<class>/*.JPEG|jpg|png")
    classes, files, labels = [], [], []
    for label, d in enumerate(class_dirs):
        try:
            names = sorted(e.name for e in os.scandir(d.path) if is_image(e.name) and e.is_file())
        except OSError as e:
            raise DataError(f"cannot list {d.path} ({one_line(e.strerror or e)})") from None
        if not names:
            raise DataError(f"the class folder {d.path} holds no images (.jpg, .jpeg or .png): add its images "
                            "or remove the folder (every class folder is a class)")
        classes.append(d.name)
        files += [os.fsencode(f"{d.name}/{n}") for n in names]
        labels.append(np.full(len(names), label, dtype=np.int64))
    return classes, np.array(files, dtype=bytes), np.concatenate(labels)


def _differences(a: list[str], b: list[str], limit: int = 5) -> str:
    def names(xs: list[str]) -> str:
        return ", ".join(xs[:limit]) + (f" and {len(xs) - limit} more" if len(xs) > limit else "")

    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    return "; ".join(part for part in (f"missing: {names(missing)}" if missing else "",
                                       f"not in train/: {names(extra)}" if extra else "") if part)


def load_folder_tree(root: str | os.PathLike, held_out: str = "val", config: StreamConfig | None = None, *,
                     reason: str | None = None) -> DataSplits:
    """The streamed splits of ``root/train/<class>/*`` and ``root/<held_out>/<class>/*``.

    ``reason``: why the tree is streamed (for the message when torchvision is missing). Raises
    :class:`DataError` (one line) when torchvision is missing, a split has no class folder, a class
    folder holds no image, or the held-out split's classes differ from train's."""
    root = Path(root)
    config = config or StreamConfig()
    require_torchvision(f"{root} {reason}, so it is streamed from disk (`mode` memory would need one size "
                        "that fits in memory); that" if reason else "streaming a class-folder tree")
    classes, files, labels = _list_split(root / "train")
    test_classes, test_files, test_labels = _list_split(root / held_out)
    if test_classes != classes:
        raise DataError(f"the classes of {root / held_out} differ from those of {root / 'train'} "
                        f"({_differences(classes, test_classes)}): both splits need the same class folders")
    train = FolderSet(_Source(str(root / "train"), files, labels, classes, config))
    test = FolderSet(_Source(str(root / held_out), test_files, test_labels, classes, config))
    source = (f"class folders {root} (streamed: {len(train)} train/ and {len(test)} {held_out}/ images, "
              f"{len(classes)} classes; {config.describe()})")
    return DataSplits("imagefolder", train, test, source)


# --------------------------------------------------------------------------------------------
# The set
# --------------------------------------------------------------------------------------------


class FolderSet:
    """One streamed split, or a subset of one: positions into the split's file list.

    Offers what the phases use of an :class:`~ekg.data.sets.ImageSet` (``len``, ``labels``,
    ``classes``, ``subset``, ``to``, ``device``, ``image_size``) without ``images``: batches come
    from :func:`ekg.data.batches.iterate_batches` (or :meth:`stream`)."""

    def __init__(self, source: _Source, index: np.ndarray | None = None,
                 device: torch.device | str = "cpu") -> None:
        self._source = source
        self.index = np.arange(len(source.files), dtype=np.int64) if index is None else index
        self.labels = source.labels[torch.from_numpy(self.index)]
        self._device = torch.device(device)

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"FolderSet({len(self)} images of {self._source.root}, {len(self.classes)} classes)"

    @property
    def classes(self) -> list[str]:
        return list(self._source.classes)

    @property
    def device(self) -> torch.device:
        """Where batches go by default (the images themselves stay on disk)."""
        return self._device

    @property
    def config(self) -> StreamConfig:
        return self._source.config

    @property
    def image_size(self) -> tuple[int, int, int]:
        """``(3, S, S)``: the size of every batch's images (the crop)."""
        s = self._source.config.image_size
        return (3, s, s)

    @property
    def paths(self) -> list[str]:
        """The file of every image, in order."""
        return [self._source.path(int(i)) for i in self.index]

    def subset(self, index: Any) -> FolderSet:
        """The images at ``index`` (integer positions), in that order; shares the file list and workers."""
        idx = as_index(index, torch.device("cpu")).numpy()
        return FolderSet(self._source, self.index[idx], self._device)

    def to(self, device: torch.device | str) -> FolderSet:
        """The same images, with batches going to ``device`` by default (nothing is copied)."""
        return FolderSet(self._source, self.index, device)

    def with_config(self, config: StreamConfig) -> FolderSet:
        """The same images read with other transform sizes or worker count."""
        return FolderSet(_Source(self._source.root, self._source.files, self._source.labels,
                                 self._source.classes, config), self.index, self._device)

    def stream(self, batches: Sequence[torch.Tensor], target: torch.device | str, *,
               augment: AugmentConfig | None = None, seed: int | None = None,
               normalization: Normalization | None = None, part: slice | None = None,
               views: int = 1) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        """Yield ``(views float32 list, y, positions)`` for each batch of positions in ``batches``.

        Only the rows ``part`` of each batch are loaded (default: all); ``positions`` are their
        positions in this set (the memory bank's rows for the training set). Without ``augment``
        each image goes through the evaluation transform once (``views`` must be 1). With it,
        ``views`` independent augmentations of each image are made from one decode; the crop
        seeds and the jitter factors are drawn for the whole batch from generators seeded by
        ``seed`` and sliced, so every ``part`` sees what one process would."""
        target = torch.device(target)
        if augment is None and views != 1:
            raise DataError("unaugmented batches have one view")
        part = part if part is not None else slice(None)
        batches = [b.cpu() for b in batches]
        mine = [b[part] for b in batches]
        config = self._source.config
        workers = config.num_workers
        width = max((len(m) for m in mine), default=1)
        chunk = max(1, math.ceil(width / max(1, workers)))
        crop_gen = jitter_gen = None
        if augment is not None:
            base = 0 if seed is None else int(seed)
            crop_gen = torch.Generator().manual_seed(base)
            jitter_gen = torch.Generator().manual_seed(base ^ 0x5DEECE66D)
        flip = bool(augment is not None and augment.flip)

        def plan() -> Iterator[list[tuple[int, tuple[int, ...], bool]]]:
            for b in batches:
                rows = self.index[b[part].numpy()]
                if crop_gen is not None:
                    seeds = torch.randint(0, 2**62, (len(b), views), generator=crop_gen)[part].tolist()
                else:
                    seeds = [()] * len(rows)
                keys = [(int(r), tuple(s), flip) for r, s in zip(rows.tolist(), seeds)]
                for k in range(0, len(keys), chunk):
                    yield keys[k:k + chunk]

        pin = target.type == "cuda"
        chunks = self._source.load(plan(), workers, pin)
        s = config.image_size
        try:
            for b, m in zip(batches, mine):
                pieces = [next(chunks) for _ in range(math.ceil(len(m) / chunk))]
                if pieces:
                    x = torch.cat([p.to(target, non_blocking=pin) for p in pieces])
                else:  # this process has no row of a batch smaller than the number of processes
                    x = torch.zeros((0, views, 3, s, s), dtype=torch.uint8, device=target)
                y = self.labels[m].to(target)
                factors = None
                if augment is not None and augment.jitter:  # drawn for the whole batch, as on one process
                    cpu = torch.device("cpu")
                    factors = [[f[part].to(target) for f in jitter_factors(len(b), augment, jitter_gen, cpu)]
                               for _ in range(views)]
                out = []
                for v in range(views):
                    xv = x[:, v].to(torch.float32)
                    if factors is not None:
                        xv = apply_jitter(xv, *factors[v])
                    if normalization is not None:
                        xv = normalization.apply(xv)
                    out.append(xv)
                yield out, y, m
        finally:
            chunks.close()


# --------------------------------------------------------------------------------------------
# Loading: the file list of one split, its transforms and its DataLoader
# --------------------------------------------------------------------------------------------


@dataclass
class _Failure:
    """What a worker returns instead of raising: DataLoader would re-raise a multi-line error."""

    message: str


class _Plan:
    """The DataLoader's batch sampler: yields the chunks of the pass in progress."""

    def __init__(self) -> None:
        self.chunks: Iterable[list[Any]] = ()

    def __iter__(self) -> Iterator[list[Any]]:
        return iter(self.chunks)


def _collate(items: list[Any]) -> Any:
    for item in items:
        if isinstance(item, _Failure):
            return item
    return torch.stack(items)


class _Images(torch.utils.data.Dataset):
    """Key ``(file index, seeds, flip)`` → uint8 ``(views, 3, S, S)``: the evaluation transform
    when ``seeds`` is empty, else one training transform per seed (from one decode)."""

    def __init__(self, root: str, files: np.ndarray, config: StreamConfig) -> None:
        from torchvision.transforms import v2

        self.root, self.files = root, files
        s = config.image_size
        resize = [v2.Resize(config.eval_resize, antialias=True)] if config.eval_resize else []
        self.eval = v2.Compose(resize + [v2.CenterCrop(s), v2.PILToTensor()])
        crop = v2.RandomResizedCrop(s, scale=config.scale, antialias=True)
        self.train = {False: v2.Compose([crop, v2.PILToTensor()]),
                      True: v2.Compose([crop, v2.RandomHorizontalFlip(), v2.PILToTensor()])}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, tuple[int, ...], bool]) -> Any:
        i, seeds, flip = key
        path = os.path.join(self.root, os.fsdecode(self.files[i]))
        try:
            img = open_rgb(path)
        except DataError as e:
            return _Failure(str(e))
        if not seeds:
            return self.eval(img).unsqueeze(0)
        transform = self.train[flip]
        out = []
        with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
            for seed in seeds:
                torch.default_generator.manual_seed(seed)
                out.append(transform(img))
        return torch.stack(out)


def open_rgb(path: str) -> Image.Image:
    """The image file at ``path`` decoded as RGB; a :class:`DataError` naming it if unreadable."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path} is not a readable image ({one_line(e)})") from None


class _Source:
    """The file list of one split (shared by all its subsets) and its loaders."""

    def __init__(self, root: str, files: np.ndarray, labels: np.ndarray | torch.Tensor, classes: list[str],
                 config: StreamConfig) -> None:
        self.root, self.files, self.classes, self.config = root, files, list(classes), config
        self.labels = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(labels)
        self._dataset: _Images | None = None
        self._loaders: dict[tuple[int, bool], torch.utils.data.DataLoader] = {}
        self._busy = False

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.files[i]))

    @property
    def dataset(self) -> _Images:
        if self._dataset is None:
            self._dataset = _Images(self.root, self.files, self.config)
        return self._dataset

    def _loader(self, workers: int, pin: bool, persistent: bool) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=_Plan(), num_workers=workers,
                                           collate_fn=_collate, pin_memory=pin, persistent_workers=persistent,
                                           prefetch_factor=_PREFETCH)

    def load(self, chunks: Iterable[list[Any]], workers: int, pin: bool) -> Iterator[torch.Tensor]:
        """Yield the uint8 tensor of each chunk of keys, in order (pinned if ``pin``)."""
        if workers == 0:
            ds = self.dataset
            for keys in chunks:
                out = _checked(_collate([ds[k] for k in keys]))
                yield out.pin_memory() if pin else out
            return
        # one persistent loader per (workers, pin); a second pass while one is in progress gets its own
        persistent = not self._busy
        if persistent:
            loader = self._loaders.get((workers, pin))
            if loader is None:
                loader = self._loaders[(workers, pin)] = self._loader(workers, pin, True)
            self._busy = True
        else:
            loader = self._loader(workers, pin, False)
        loader.batch_sampler.chunks = chunks
        try:
            for out in loader:
                yield _checked(out)
        finally:
            loader.batch_sampler.chunks = ()
            if persistent:
                self._busy = False


def _checked(out: Any) -> torch.Tensor:
    if isinstance(out, _Failure):
        raise DataError(out.message)
    return out


"""Batch iteration over a split (in memory or streamed): an epoch's shuffled, augmented and
normalised batches, or chosen rows in dataset order, reproducible from one generator."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import EkgError
from .augment import Augment, AugmentConfig, augment_batch
from .normalize import Normalization
from .sets import ImageSet, as_index

if TYPE_CHECKING:
    from .stream import FolderSet


def iterate_batches(data: ImageSet | FolderSet, batch_size: int, *, shuffle: bool = False,
                    generator: torch.Generator | None = None, augment: Augment | None = None,
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

    A streamed set (:class:`ekg.data.stream.FolderSet`) is read in DataLoader workers: unaugmented
    images through the evaluation transform (resize, centre crop), augmented ones through
    RandomResizedCrop and (if ``augment.flip``) a horizontal flip drawn per image from the same
    seed, the colour jitter (if ``augment.jitter``) on the device; ``augment.pad`` is not used.
    """
    if batch_size < 1:
        raise EkgError(f"`batch_size` must be at least 1, got {batch_size}")
    target = torch.device(device) if device is not None else data.device
    gen_device = generator.device if generator is not None else torch.device("cpu")
    n = len(data)
    order = torch.randperm(n, generator=generator, device=gen_device) if shuffle else torch.arange(n)
    if not isinstance(data, ImageSet):  # streamed from disk
        if augment is not None and not isinstance(augment, AugmentConfig):
            raise EkgError("a training `transform` of your own augments images held in memory; a streamed tree "
                           "is augmented by its DataLoader workers (RandomResizedCrop, flip, jitter)")
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
    index = [as_index(b, torch.device("cpu")) for b in batches]
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
             aug: tuple[Augment, torch.Generator] | None, normalization: Normalization | None,
             part: slice | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    pin = target.type == "cuda" and data.images.device.type == "cpu"
    for idx in batches:
        x, y = data.images[idx], data.labels[idx]
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(target, non_blocking=pin), y.to(target, non_blocking=pin)
        x = augment_batch(x, *aug) if aug is not None else x.to(torch.float32)
        if part is not None:  # the whole batch is drawn and augmented, as on one process
            x, y = x[part], y[part]
        if normalization is not None:
            x = normalization.apply(x)
        yield x, y

"""The containers every phase reads: one split held in memory (:class:`ImageSet`) and a
dataset's train and test splits (:class:`DataSplits`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import DataError, EkgError

if TYPE_CHECKING:
    from .stream import FolderSet


@dataclass
class ImageSet:
    """One split held in memory: images ``(N, C, H, W)``, int64 labels ``(N,)``.

    Images are uint8 (the 0..255 scale: CIFAR, decoded image files, a user's uint8 tensors or PIL
    images) or float32 (a user's float tensors, on their own scale, e.g. already normalised); any
    number of channels ``C`` and any size, one size for the whole split."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        im, lab = self.images, self.labels
        if im.dim() != 4 or im.shape[1] < 1 or not (im.dtype == torch.uint8 or im.dtype.is_floating_point):
            raise DataError(f"images must be a uint8 or float tensor of shape (N, C, H, W), got {im.dtype} "
                            f"{tuple(im.shape)}")
        if im.dtype.is_floating_point and im.dtype != torch.float32:
            self.images = im = im.to(torch.float32)
        if lab.dtype != torch.int64 or tuple(lab.shape) != (im.shape[0],):
            raise DataError(f"labels must be an int64 tensor of shape ({im.shape[0]},), "
                            f"got {lab.dtype} {tuple(lab.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def device(self) -> torch.device:
        """The device the images live on."""
        return self.images.device

    @property
    def kind(self) -> str:
        """``"uint8"`` (the 0..255 scale) or ``"float32"`` (the images' own scale)."""
        return "uint8" if self.images.dtype == torch.uint8 else "float32"

    @property
    def rgb_uint8(self) -> bool:
        """Whether the images are 3-channel uint8 (what the EKG colour jitter and the presets expect)."""
        return self.images.dtype == torch.uint8 and self.images.shape[1] == 3

    def subset(self, index: Any) -> ImageSet:
        """The images at ``index`` (a tensor, list, range or array of integer positions), in that order."""
        idx = as_index(index, self.images.device)
        return ImageSet(self.images[idx], self.labels[idx], list(self.classes))

    def to(self, device: torch.device | str) -> ImageSet:
        """A copy on ``device`` (the same object's tensors if they are already there)."""
        return ImageSet(self.images.to(device), self.labels.to(device), list(self.classes))

    @property
    def image_size(self) -> tuple[int, int, int]:
        """``(C, H, W)``: the size of every image, as a model's ``input_size``."""
        return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]


@dataclass
class DataSplits:
    """A dataset's train and test splits, plus where they came from. Each split is an in-memory
    :class:`ImageSet` or, for a streamed ImageNet-style tree, an :class:`ekg.data.stream.FolderSet`."""

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


def as_index(index: Any, device: torch.device) -> torch.Tensor:
    """``index`` as a 1-D int64 tensor on ``device``; refuses booleans and floats."""
    idx = index if isinstance(index, torch.Tensor) else torch.as_tensor(np.asarray(index))
    if idx.dim() != 1 or (idx.numel() > 0 and (idx.dtype.is_floating_point or idx.dtype == torch.bool)):
        raise EkgError("a subset index must be a 1-D sequence of integer positions, "
                       f"got {idx.dtype} {tuple(idx.shape)}")
    return idx.to(device=device, dtype=torch.int64)

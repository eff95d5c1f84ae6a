"""Per-channel normalisation and its presets (the constants each pretrained family expects)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import EkgError


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std``, one constant per channel in the images' channel order, on
    the images' scale (0..255 for uint8 images: every preset; a float dataset's own scale). No
    constants at all (``IDENTITY``, the name ``"none"``, ``normalization=None`` in the API): the
    images are used as they are (a dataset that yields normalised tensors)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        try:
            mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        except (TypeError, ValueError):
            raise EkgError(f"a normalisation's mean and std must be sequences of numbers, got mean {self.mean!r}, "
                           f"std {self.std!r}") from None
        if len(mean) != len(std) or (std and min(std) <= 0):
            raise EkgError(f"a normalisation needs one mean and one positive std per channel, got mean {mean}, "
                           f"std {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def channels(self) -> int | None:
        """The number of channels it normalises; None for the identity (any)."""
        return len(self.mean) or None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (``(..., C, H, W)``) to float32 on its device."""
        c = len(self.mean)
        if x.dim() < 3 or (c and x.shape[-3] != c):
            raise EkgError(f"this normalisation has {c} channel constants but the images are shaped "
                           f"{tuple(x.shape)}: give one mean and one std per channel")
        if not c:
            return x.to(torch.float32)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(c, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(c, 1, 1)
        return (x.to(torch.float32) - mean) / std

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalization:
        try:
            return cls(tuple(d["mean"]), tuple(d["std"]))  # type: ignore[arg-type]
        except (KeyError, TypeError) as e:
            raise EkgError(f"a normalisation must be a dict with 'mean' and 'std' lists, one number per channel "
                           f"({e})") from None


def _scaled(*values: float) -> tuple[float, float, float]:
    return tuple(255.0 * v for v in values)  # type: ignore[return-value]


IDENTITY = Normalization((), ())

NORMALIZATIONS: dict[str, Normalization] = {
    "none": IDENTITY,  # the images as they are: a dataset that yields normalised tensors
    # The original EKG release's constants: listed in BGR order but applied as-is to RGB images.
    # Wrong in principle, but it is what its checkpoints were trained with, so keep it verbatim.
    "ekg_tf_cifar10": Normalization((113.9, 123.0, 125.3), (66.7, 62.1, 63.0)),
    "ekg_tf_cifar100": Normalization((112.0, 124.0, 129.0), (70.0, 65.0, 68.0)),
    "imagenet": Normalization(_scaled(0.485, 0.456, 0.406), _scaled(0.229, 0.224, 0.225)),  # akamaster checkpoints
    "cifar10": Normalization(_scaled(0.4914, 0.4822, 0.4465), _scaled(0.2470, 0.2435, 0.2616)),
    "cifar100": Normalization(_scaled(0.5071, 0.4865, 0.4409), _scaled(0.2673, 0.2564, 0.2762)),
}


def get_normalization(name_or_dict: str | dict[str, Any] | tuple[Any, Any] | Normalization | None) -> Normalization:
    """A preset by name (see :data:`NORMALIZATIONS`), a ``{"mean", "std"}`` dict, a ``(mean, std)``
    pair, a Normalization, or None (the identity: images used as they are)."""
    if name_or_dict is None:
        return IDENTITY
    if isinstance(name_or_dict, Normalization):
        return name_or_dict
    if isinstance(name_or_dict, dict):
        return Normalization.from_dict(name_or_dict)
    if isinstance(name_or_dict, (tuple, list)) and len(name_or_dict) == 2:
        return Normalization(tuple(name_or_dict[0]), tuple(name_or_dict[1]))
    try:
        return NORMALIZATIONS[name_or_dict]
    except (KeyError, TypeError):
        raise EkgError(f"unknown normalisation {name_or_dict!r}: choose one of {', '.join(NORMALIZATIONS)}") from None

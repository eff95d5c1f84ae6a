"""Per-channel normalisation and its presets (the constants each pretrained family expects)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import EkgError


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std`` with constants on the 0..255 scale, in the image's RGB order."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise EkgError(f"a normalisation needs 3 means and 3 positive stds, got mean {mean}, std {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (``(..., 3, H, W)`` on the 0..255 scale) to float32 on its device."""
        if x.dim() < 3 or x.shape[-3] != 3:
            raise EkgError(f"normalisation expects images shaped (N, 3, H, W), got {tuple(x.shape)}")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
        return (x.to(torch.float32) - mean) / std

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalization:
        try:
            return cls(tuple(d["mean"]), tuple(d["std"]))  # type: ignore[arg-type]
        except (KeyError, TypeError) as e:
            raise EkgError(f"a normalisation must be a dict with 'mean' and 'std' lists of 3 numbers ({e})") from None


def _scaled(*values: float) -> tuple[float, float, float]:
    return tuple(255.0 * v for v in values)  # type: ignore[return-value]


NORMALIZATIONS: dict[str, Normalization] = {
    # The original EKG release's constants: listed in BGR order but applied as-is to RGB images.
    # Wrong in principle, but it is what its checkpoints were trained with, so keep it verbatim.
    "ekg_tf_cifar10": Normalization((113.9, 123.0, 125.3), (66.7, 62.1, 63.0)),
    "ekg_tf_cifar100": Normalization((112.0, 124.0, 129.0), (70.0, 65.0, 68.0)),
    "imagenet": Normalization(_scaled(0.485, 0.456, 0.406), _scaled(0.229, 0.224, 0.225)),  # akamaster checkpoints
    "cifar10": Normalization(_scaled(0.4914, 0.4822, 0.4465), _scaled(0.2470, 0.2435, 0.2616)),
    "cifar100": Normalization(_scaled(0.5071, 0.4865, 0.4409), _scaled(0.2673, 0.2564, 0.2762)),
}


def get_normalization(name_or_dict: str | dict[str, Any] | Normalization) -> Normalization:
    """A preset by name (see :data:`NORMALIZATIONS`), a ``{"mean", "std"}`` dict, or a Normalization."""
    if isinstance(name_or_dict, Normalization):
        return name_or_dict
    if isinstance(name_or_dict, dict):
        return Normalization.from_dict(name_or_dict)
    try:
        return NORMALIZATIONS[name_or_dict]
    except (KeyError, TypeError):
        raise EkgError(f"unknown normalisation {name_or_dict!r}: choose one of {', '.join(NORMALIZATIONS)}") from None

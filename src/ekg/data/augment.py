"""The method's batched training augmentation, on the batch's own device with no loop over images:
the EKG colour jitter, horizontal flip and pad + random crop, every draw from an explicit generator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from ..errors import EkgError

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights, RGB order
PAD_MODES = ("reflect", "zeros")


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation: optional EKG colour jitter, then horizontal flip, then pad + random crop.

    ``brightness`` adds a delta uniform in ``[-b, b]`` (on the [0, 1] scale, so ``255*b`` here);
    ``contrast`` scales each image's deviation from its per-channel spatial mean by a factor in
    ``[1-c, 1+c]``; ``saturation`` blends with the grayscale image by a factor in ``[1-s, 1+s]``.
    """

    pad: int = 4
    pad_mode: str = "reflect"  # "reflect" or "zeros"
    flip: bool = True
    jitter: bool = False  # the EKG colour jitter, used for fine-tuning with the memory bank
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2

    def __post_init__(self) -> None:
        if self.pad_mode not in PAD_MODES:
            raise EkgError(f"unknown pad_mode {self.pad_mode!r}: choose 'reflect' or 'zeros'")
        if not isinstance(self.pad, int) or self.pad < 0:
            raise EkgError(f"`pad` must be a whole number of 0 or more, got {self.pad!r}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise EkgError(f"{name} must lie in [0, 1], got {value}")


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a batch ``(N, C, H, W)`` (uint8 or float) on its own device; returns float32 on its scale.

    Steps, each with independent per-image draws from ``generator`` (which must live on ``x``'s
    device) in this order: colour jitter if ``cfg.jitter`` (brightness, contrast, saturation,
    then clamp to [0, 255]; a range of 0 is skipped and draws nothing), horizontal flip with
    probability 1/2, then pad by ``cfg.pad`` and crop back to ``H x W`` at a uniform offset in
    ``0..2*pad`` per axis (vertical drawn first). No Python loop over images: the flip, pad and
    crop are one gather. ``x`` is never modified.
    """
    if x.dim() != 4:
        raise EkgError(f"augment expects images shaped (N, C, H, W), got {tuple(x.shape)}")
    if cfg.jitter and x.shape[1] != 3:  # and the 0..255 scale: ekg.train refuses other in-memory data first
        raise EkgError(f"the EKG colour jitter needs 3-channel images on the 0..255 scale, got {tuple(x.shape)}: "
                       "fine-tune without it (`jitter=False`) or pass your own `transform`")
    if not _same_device(generator.device, x.device):
        raise EkgError(f"the augmentation generator is on {generator.device} but the images are on {x.device}: "
                       "create the generator on the images' device")
    out = x.to(torch.float32, copy=True)
    if cfg.jitter:
        out = _color_jitter(out, cfg, generator)
    if cfg.flip or cfg.pad:
        out = _flip_pad_crop(out, cfg, generator)
    return out


# A user's own training augmentation: a batch of float32 images (N, C, H, W) on the training device,
# on the images' scale, and a generator on that device for every random draw → the augmented batch,
# the same shape. It replaces the method's pipeline (an AugmentConfig) wherever batches are augmented.
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
Augment = Union[AugmentConfig, Transform]


def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """``x`` through the method's pipeline (an :class:`AugmentConfig`) or a user's :data:`Transform`,
    whose output is checked (a tensor of ``x``'s shape) and returned as float32."""
    if isinstance(aug, AugmentConfig):
        return augment(x, aug, generator)
    out = aug(x.to(torch.float32), generator)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EkgError(f"the training `transform` {transform_name(aug)} must return a tensor shaped like its input "
                       f"{tuple(x.shape)}, got {got}")
    return out.to(torch.float32)


def transform_name(fn: Transform) -> str:
    """How a user transform is recorded in a run's config (its module and qualified name)."""
    return f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', None) or type(fn).__qualname__}"


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.type == "cpu" or (a.index or 0) == (b.index or 0))


def _uniform(n: int, radius: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` draws uniform in ``[-radius, radius]``, shaped ``(n, 1, 1, 1)`` to broadcast over images."""
    return (torch.rand(n, 1, 1, 1, generator=generator, device=device) * 2 - 1) * radius


def _color_jitter(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """EKG's brightness, contrast and saturation jitter on float 0..255 images, then clamp.

    Applied in sequence, with ``m`` the per-image per-channel spatial mean and ``gray(.)`` the
    luma: ``x1 = x + b``; ``x2 = (x1 - mean(x1)) * fc + mean(x1)``; ``x3 = gray(x2) + fs * (x2 - gray(x2))``.
    Since ``mean(x1) = m + b``, ``x2 = fc*x + shift`` with ``shift = (1-fc)*m + b``, and as the luma
    weights sum to 1, ``x3 = fs*fc*x + (1-fs)*fc*gray(x) + fs*shift + (1-fs)*gray(shift)``: one pass
    over the pixels instead of eight, with the same result up to float rounding.
    """
    return apply_jitter(x, *jitter_factors(x.shape[0], cfg, generator, x.device))


def jitter_factors(n: int, cfg: AugmentConfig, generator: torch.Generator,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-image ``(b, fc, fs)`` of :func:`_color_jitter`, each ``(n, 1, 1, 1)``, drawn in that order."""
    ones = torch.ones(n, 1, 1, 1, device=device)
    b = _uniform(n, 255.0 * cfg.brightness, generator, device) if cfg.brightness else torch.zeros_like(ones)
    fc = 1 + _uniform(n, cfg.contrast, generator, device) if cfg.contrast else ones
    fs = 1 + _uniform(n, cfg.saturation, generator, device) if cfg.saturation else ones
    return b, fc, fs


def apply_jitter(x: torch.Tensor, b: torch.Tensor, fc: torch.Tensor, fs: torch.Tensor) -> torch.Tensor:
    """The colour jitter of :func:`_color_jitter` with given factors (on ``x``'s device), then clamp."""
    weights = torch.tensor(_GRAY, device=x.device).view(1, 3, 1, 1)
    shift = (1 - fc) * x.mean(dim=(2, 3), keepdim=True) + b  # (n, 3, 1, 1)
    offset = fs * shift + (1 - fs) * (shift * weights).sum(dim=1, keepdim=True)
    out = torch.addcmul(offset, fs * fc, x)
    out.addcmul_((1 - fs) * fc, (x * weights).sum(dim=1, keepdim=True))
    return out.clamp_(0, 255)


def _flip_pad_crop(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip, then pad and random crop, as one gather over the padded batch.

    Both padding modes are left-right symmetric, so cropping a flipped padded image at column
    offset ``ox`` equals reading the unflipped padded image's columns ``Wp-1-ox-j`` backwards.
    """
    n, c, h, w = x.shape
    p, device = cfg.pad, x.device
    if p and cfg.pad_mode == "reflect" and p >= min(h, w):
        raise EkgError(f"reflect padding by {p} needs images larger than {p}x{p}, got {h}x{w}; use pad_mode 'zeros'")
    flip = (torch.rand(n, generator=generator, device=device) < 0.5) if cfg.flip else None
    oy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=device)
    ox = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=device)
    if p:
        x = F.pad(x, (p, p, p, p), mode="reflect" if cfg.pad_mode == "reflect" else "constant")
    wp = w + 2 * p
    rows = oy[:, None] + torch.arange(h, device=device)  # (n, h)
    cols = ox[:, None] + torch.arange(w, device=device)  # (n, w)
    if flip is not None:
        cols = torch.where(flip[:, None], wp - 1 - cols, cols)
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return x.flatten(2).gather(2, index).view(n, c, h, w)

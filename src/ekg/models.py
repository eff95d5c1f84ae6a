"""CIFAR ResNets (He et al., 2016) in the variants EKG needs, built by name from a registry.

Variants:

* ``shortcut="B"`` — 1×1 projection shortcut (conv + BN) where a block changes shape. This is the
  EKG architecture (the original release's ResNet-56).
* ``shortcut="A"`` — parameter-free shortcut: ``x[:, :, ::2, ::2]`` zero-padded with the missing
  channels split evenly on both sides (the popular PyTorch family, e.g. akamaster's checkpoints).
* ``padding="tf_same"`` — TensorFlow's "SAME" padding for strided convs (pad bottom/right only),
  needed to reproduce checkpoints converted from TensorFlow.

Every width is explicit (:class:`ResNetSpec`), so a pruned network — any stage stream width, any
block-internal width — is rebuilt from its spec alone, without the original network.

Registry names: ``resnet{20,32,44,56,110}`` (projection shortcuts), ``..._a`` (zero-padding
shortcuts) and ``..._tf`` (projection shortcuts + TensorFlow padding).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, EkgError

SHORTCUTS = ("A", "B")
PADDINGS = ("torch", "tf_same")


class Conv2dSame(nn.Conv2d):
    """A conv with TensorFlow "SAME" padding: output = ceil(input / stride), and where the total
    padding is odd the extra row/column goes at the bottom/right (what TF does)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)

    @staticmethod
    def _pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._pads(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = self._pads(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def conv3x3(cin: int, cout: int, stride: int, padding: str) -> nn.Conv2d:
    # Symmetric and TF padding agree for stride 1, so only strided convs need Conv2dSame.
    if padding == "tf_same" and stride != 1:
        return Conv2dSame(cin, cout, 3, stride=stride, bias=False)
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially, then zero-pad channels (split evenly, the extra one
    after). Has no parameters."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        if cout < cin:
            raise EkgError(f"a zero-padding shortcut cannot shrink channels ({cin} -> {cout})")
        self.cin, self.cout, self.stride = cin, cout, stride
        self.pad_before = (cout - cin) // 2
        self.pad_after = cout - cin - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"{self.cin}, {self.cout}, stride={self.stride}"


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus shortcut, then ReLU. ``mid`` is the block-internal width."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, shortcut: str, padding: str):
        super().__init__()
        self.conv1 = conv3x3(cin, mid, stride, padding)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = conv3x3(mid, cout, 1, padding)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module
        if stride == 1 and cin == cout:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(cin, cout, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


@dataclass
class ResNetSpec:
    """Everything needed to rebuild a CIFAR ResNet, pruned or not (stored in checkpoints).

    ``stage_widths[s]`` is the width of stage s's residual stream (the stem writes stage 0's);
    ``block_widths[s][j]`` is the inner width of block j of stage s.
    """

    depth: int
    num_classes: int = 10
    shortcut: str = "B"
    padding: str = "torch"
    stage_widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    block_widths: list[list[int]] | None = None
    family: str = "cifar_resnet"

    def __post_init__(self) -> None:
        if self.depth < 8 or (self.depth - 2) % 6:
            raise EkgError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {self.depth}")
        if self.shortcut not in SHORTCUTS:
            raise EkgError(f"shortcut must be one of {SHORTCUTS}, got {self.shortcut!r}")
        if self.padding not in PADDINGS:
            raise EkgError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if self.num_classes < 1:
            raise EkgError(f"num_classes must be positive, got {self.num_classes}")
        self.stage_widths = [int(w) for w in self.stage_widths]
        if len(self.stage_widths) != 3:
            raise EkgError(f"a CIFAR ResNet has 3 stages, got stage_widths={self.stage_widths}")
        if self.block_widths is None:
            self.block_widths = [[w] * self.blocks_per_stage for w in self.stage_widths]
        self.block_widths = [[int(w) for w in stage] for stage in self.block_widths]
        if len(self.block_widths) != 3 or any(len(s) != self.blocks_per_stage for s in self.block_widths):
            raise EkgError(
                f"block_widths must be 3 lists of {self.blocks_per_stage} widths for depth {self.depth}"
            )
        if min(self.stage_widths + sum(self.block_widths, [])) < 1:
            raise EkgError("every width must be at least 1")

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResNetSpec":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if d.get("family", "cifar_resnet") != "cifar_resnet":
            raise CheckpointError(f"unknown model family {d.get('family')!r}")
        return cls(**known)


class CifarResNet(nn.Module):
    """stem conv-BN-ReLU, three stages of :class:`BasicBlock`, global average pool, linear."""

    def __init__(self, spec: ResNetSpec) -> None:
        super().__init__()
        self.spec = spec
        w = spec.stage_widths
        self.conv1 = conv3x3(3, w[0], 1, spec.padding)
        self.bn1 = nn.BatchNorm2d(w[0])
        cin = w[0]
        for s in range(3):
            stride = 1 if s == 0 else 2
            blocks = []
            for j, mid in enumerate(spec.block_widths[s]):
                blocks.append(BasicBlock(cin, mid, w[s], stride if j == 0 else 1, spec.shortcut, spec.padding))
                cin = w[s]
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(w[2], spec.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(x)


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., ResNetSpec]] = {}
DEPTHS = (20, 32, 44, 56, 110)


def _register(name: str, **fixed: Any) -> None:
    def make(num_classes: int = 10, **overrides: Any) -> ResNetSpec:
        return ResNetSpec(**{**fixed, "num_classes": num_classes, **overrides})

    _REGISTRY[name] = make


for _d in DEPTHS:
    _register(f"resnet{_d}", depth=_d, shortcut="B", padding="torch")
    _register(f"resnet{_d}_a", depth=_d, shortcut="A", padding="torch")
    _register(f"resnet{_d}_tf", depth=_d, shortcut="B", padding="tf_same")


def model_names() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY, key=lambda n: (n.split("_")[1:], int(n[6:].split("_")[0])))


def spec_for(name: str, num_classes: int = 10, **overrides: Any) -> ResNetSpec:
    """The :class:`ResNetSpec` of a registered model name."""
    try:
        make = _REGISTRY[name]
    except KeyError:
        raise EkgError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}") from None
    return make(num_classes=num_classes, **overrides)


def build_model(spec: ResNetSpec | dict[str, Any]) -> CifarResNet:
    """Build a model from a spec (or its dict form, as stored in checkpoints)."""
    if isinstance(spec, dict):
        spec = ResNetSpec.from_dict(spec)
    return CifarResNet(spec)


def create_model(name: str, num_classes: int = 10, *, seed: int | None = None, **overrides: Any) -> CifarResNet:
    """Build a registered model by name, randomly initialised (from ``seed`` if given)."""
    spec = spec_for(name, num_classes, **overrides)
    if seed is None:
        return CifarResNet(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CifarResNet(spec)


def arch_name(spec: ResNetSpec) -> str:
    """A short human name for a spec, e.g. ``resnet56_tf`` or ``resnet56 (pruned)``."""
    suffix = {("B", "torch"): "", ("A", "torch"): "_a", ("B", "tf_same"): "_tf"}.get(
        (spec.shortcut, spec.padding), f"_{spec.shortcut}_{spec.padding}"
    )
    base = ResNetSpec(depth=spec.depth, num_classes=spec.num_classes)
    pruned = spec.stage_widths != base.stage_widths or spec.block_widths != base.block_widths
    return f"resnet{spec.depth}{suffix}" + (" (pruned)" if pruned else "")

"""Exact FLOPs and parameter counts.

Convention (printed wherever a number is): **FLOPs = multiply-accumulates (MACs) of conv and linear
layers** for one image at the model's input resolution — the field's usual "FLOPs". A conv
contributes ``H_out·W_out·C_out·(C_in/groups)·k_h·k_w``, a linear ``in·out`` at every position it is
applied to (once for an ``(N, C)`` input, H·W times for ConvNeXt's MLP on ``(N, H, W, C)``). Biases, BN, ReLU,
pooling and additions are not counted. With ``bn_ops=True`` 2 operations are added per BN output
element, as the original EKG code counted, so its ratios can be matched.

Counting runs one forward pass with hooks, so it works for any model built of these layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .bn import inference_modes

FLOPS_CONVENTION = "FLOPs = multiply-accumulates of conv+linear layers per image"
FLOPS_CONVENTION_BN = FLOPS_CONVENTION + " + 2 ops per BN output element"


@dataclass
class LayerCount:
    name: str
    type: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int] | None
    stride: tuple[int, int] | None
    output_hw: tuple[int, int] | None
    flops: int
    params: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Counts:
    flops: int
    params: int
    layers: list[LayerCount] = field(default_factory=list)
    convention: str = FLOPS_CONVENTION

    def to_dict(self, layers: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {"flops": self.flops, "params": self.params, "flops_convention": self.convention}
        if layers:
            d["layers"] = [layer.to_dict() for layer in self.layers]
        return d


def count_params(model: nn.Module) -> int:
    """Number of parameters (weights, biases, BN affine); buffers are not counted."""
    return sum(p.numel() for p in model.parameters())


def count(model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32), *, bn_ops: bool = False) -> Counts:
    """Count FLOPs (see module doc) and params of ``model`` for one ``input_size`` image.

    Returns per-layer rows (conv, linear and, with ``bn_ops``, BN) in forward order.
    """
    rows: list[LayerCount] = []
    names = {m: n for n, m in model.named_modules()}

    def conv_hook(m: nn.Conv2d, inp: Any, out: torch.Tensor) -> None:
        h, w = out.shape[-2:]
        k = m.kernel_size
        flops = h * w * m.out_channels * (m.in_channels // m.groups) * k[0] * k[1]
        rows.append(LayerCount(names[m], "conv", m.in_channels, m.out_channels, tuple(k), tuple(m.stride),
                               (h, w), int(flops), count_params(m)))

    def linear_hook(m: nn.Linear, inp: Any, out: torch.Tensor) -> None:
        positions = out[0].numel() // m.out_features  # one image's rows: (C,) -> 1, (H, W, C) -> H·W
        hw = tuple(out.shape[1:3]) if out.dim() == 4 else None
        rows.append(LayerCount(names[m], "linear", m.in_features, m.out_features, None, None, hw,
                               positions * m.in_features * m.out_features, count_params(m)))

    def bn_hook(m: nn.modules.batchnorm._BatchNorm, inp: Any, out: torch.Tensor) -> None:
        rows.append(LayerCount(names[m], "bn", m.num_features, m.num_features, None, None,
                               tuple(out.shape[-2:]) if out.dim() == 4 else None,
                               2 * out[0].numel(), count_params(m)))

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif bn_ops and isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_hook(bn_hook))
    try:
        p = next(model.parameters(), None)
        x = torch.zeros(1, *input_size, device=p.device if p is not None else "cpu",
                        dtype=p.dtype if p is not None else torch.float32)
        with inference_modes(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return Counts(
        flops=sum(r.flops for r in rows),
        params=count_params(model),
        layers=rows,
        convention=FLOPS_CONVENTION_BN if bn_ops else FLOPS_CONVENTION,
    )


def human(n: float, unit: str = "") -> str:
    """12_345_678 -> '12.35 M'."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()

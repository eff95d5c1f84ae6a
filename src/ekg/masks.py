"""The pseudo-supernet: pretrained weights plus one mask per channel group.

A :class:`MaskedNetwork` re-plays the model's traced graph with two changes (method doc, "What a
mask does in the forward pass"):

1. at every mask point of a group (its activation outputs) the feature map is multiplied by the
   group's 0/1 mask, so masked channels are exactly zero downstream; in the backward pass the
   gradient goes through unchanged (as in the original release) and, while scores are being
   collected, ``|Σ_{batch,h,w} (∂J/∂y)·y|`` is added to the group's score per batch and point;
2. every conv/linear whose input or output channels are partly masked computes with the
   norm-preserving kernel ``(W ⊙ M)·‖W‖/‖W ⊙ M‖``. For a depthwise conv (input and output in one
   group) ``M`` masks its filters (dim 0); for a linear reading a flattened map, each input
   channel's mask entry covers its block of H·W columns; for a grouped conv (G groups) weight
   entry ``[o, j]`` pairs output o of block g = o // (out/G) with input ``g·(in/G) + j``, so its
   input mask is taken block by block.

A mask point on channels-last values (ConvNeXt's MLP after a permute) masks their last dim, and a
LayerNorm over a group's channels (:class:`MaskedLayerNorm`) normalises over the kept channels
only — mean and variance over the kept subset, 0 at the masked ones — which is what the slim
model's LayerNorm of the kept channels computes; with nothing masked it is the model's own call.

In-place operations of the model (``ReLU(inplace=True)``, ``out += identity``, ``x.mul_(gamma)``)
run out of place in the masked network, so a value kept for re-use (the search's frontier) is never
overwritten. A ``view`` runs as ``reshape`` (the same values): the search's channels-last layout
cannot *view* a spatial map as ``(N, C·H·W)``. The model's own tensors (``x * self.gamma``) are read
from the wrapped model, and a functional ``batch_norm`` of a norm-act layer on its own statistics
(timm's ``BatchNormAct2d``) runs as that module's BN, in the module's mode, so that the search's
batch statistics (:func:`ekg.bn.batch_statistics_bn`) apply to it as to any BatchNorm.

Each group's :class:`Gate` holds the channel scores, their ranks (0 = most important) and the
kept fraction ``rate``; the mask keeps the channels ranked below ``max(C·rate, 1)``. A group cut in
B equal blocks (a grouped conv's, :attr:`ekg.graph.ChannelGroup.blocks`) keeps
``B·kept_channels(C/B, rate)`` channels: in every block, its best-ranked ``kept_channels(C/B, rate)``
(by the same global ranks). Its width moves in *units* of B channels (:attr:`Gate.unit`, the width
quantum every kept width is a multiple of), and the search's step sizes and landing count units.
``round_to`` N (``--round-to``, hardware-friendly widths) makes the unit ``lcm(B, N)``: every kept
width a multiple of it, or the group's full width (a group narrower than its unit is kept whole;
where the unit does not divide the width, the last unit is partial: 20 channels at N = 8 keep 8, 16
or 20).
The masked network shares its parameters with the model it wraps; it never changes them.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .graph import ChannelGroup, DependencyGraph, build_graph


def kept_channels(channels: int, rate: float) -> int:
    """How many channels a mask keeps: those ranked below ``max(C·rate, 1)``, i.e.
    ``ceil(C·rate)`` clamped to [1, C] (C·rate is rounded to 6 decimals against float noise)."""
    return int(min(channels, max(1, math.ceil(round(channels * rate, 6)))))


def kept_width(channels: int, rate: float, unit: int = 1) -> int:
    """How many channels a group of ``channels`` moving in units of ``unit`` channels keeps at
    ``rate``: ``unit·kept_channels(U, rate)`` with ``U = ceil(channels / unit)`` units, capped at
    ``channels`` (``kept_channels`` for ``unit`` 1). Where ``unit`` does not divide the width
    (``--round-to 8`` on 20 channels) the last unit is the partial one: 8, 16 or 20 are kept; a group
    narrower than its unit keeps its full width."""
    return min(channels, unit * kept_channels(-(-channels // unit), rate))


def block_mask(ranks: torch.Tensor, blocks: int, kept: int) -> torch.Tensor:
    """Bool mask keeping ``kept`` channels (a multiple of ``blocks``): the ``kept / blocks``
    best-ranked (lowest rank) channels of each of ``blocks`` equal, consecutive blocks."""
    if blocks == 1:
        return ranks < kept
    per_block = ranks.view(blocks, -1)
    within = torch.argsort(torch.argsort(per_block, dim=1, stable=True), dim=1, stable=True)
    return (within < kept // blocks).flatten()


def ranks_from_scores(scores: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
    """Rank of each channel by descending score (0 = highest); ties keep channel order.

    With ``live`` (bool, the channels the current mask keeps), every live channel ranks above every
    masked one whatever the scores: a live channel scoring exactly 0 (a dead ReLU, or fpgm's single
    remaining filter) must not tie with the masked zeros and let a pruned channel come back."""
    order = torch.argsort(-scores.double(), stable=True)
    if live is not None:
        order = order[torch.argsort((~live.to(order.device, torch.bool))[order].to(torch.uint8), stable=True)]
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order), device=order.device)
    return ranks


@dataclass
class Gate:
    """Per-group search state: scores, ranks and kept fraction."""

    group: ChannelGroup
    rate: float = 1.0
    ranks: torch.Tensor | None = None  # None: channel order
    round_to: int = 1                  # every kept width a multiple of it (``--round-to``), or the full width

    @property
    def channels(self) -> int:
        return self.group.channels

    @property
    def n_producers(self) -> int:
        return max(1, len(self.group.producers))

    @property
    def blocks(self) -> int:
        """Equal blocks the group is cut in (each keeps as many channels)."""
        return self.group.blocks

    @property
    def unit(self) -> int:
        """The width quantum: every kept width is a multiple of it, or the full width: the lcm of the
        group's blocks and ``round_to``."""
        return math.lcm(self.group.blocks, self.round_to)

    @property
    def units(self) -> int:
        """The group's width in units (the last one partial where the unit does not divide it): the
        C of the step-size rule and of the landing's 1/C."""
        return -(-self.channels // self.unit)

    @property
    def kept(self) -> int:
        return self.kept_at(self.rate)

    def kept_at(self, rate: float) -> int:
        """Channels kept at ``rate``: ``unit·kept_channels(units, rate)``, at most the full width."""
        return kept_width(self.channels, rate, self.unit)

    def mask(self, rate: float | None = None) -> torch.Tensor:
        """Bool mask of the kept channels at ``rate`` (default: the gate's own): the best-ranked
        ``kept / blocks`` of every block."""
        ranks = self.ranks if self.ranks is not None else torch.arange(self.channels)
        return block_mask(ranks, self.blocks, self.kept_at(self.rate if rate is None else rate))


class _MaskPoint(torch.autograd.Function):
    """y = x·m, the mask along the channel dim ``dim`` (1, or the last of channels-last values);
    backward passes the gradient straight through and (optionally) adds the Taylor score |Σ g·y|
    over the batch and spatial dims to ``score``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mask: torch.Tensor, score: torch.Tensor | None,
                dim: int = 1) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[dim] = -1
        y = x * mask.view(shape)
        ctx.score, ctx.dim = score, dim % x.dim()
        if score is not None:
            ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        if ctx.score is not None:
            (y,) = ctx.saved_tensors
            dims = [d for d in range(g.dim()) if d != ctx.dim]
            ctx.score.add_((g * y).sum(dims).abs().to(ctx.score.dtype))
        return g, None, None, None


class GroupMask(nn.Module):
    """The mask of one group, applied at each of its mask points. Change it with :meth:`set`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(channels))
        self.register_buffer("score", torch.zeros(channels, dtype=torch.float64))
        self.collect = False
        self.partial = False
        self.kept_index: torch.Tensor | None = None  # indices of kept channels when partial
        self.token: bytes | None = None  # the kept channels as bytes when partial (see MaskedLayer)

    def set(self, keep: torch.Tensor) -> None:
        """Set the mask from a bool tensor of kept channels."""
        keep = keep.detach().to(self.mask.device, torch.bool)
        self.mask.copy_(keep)
        host = keep.cpu()  # one host sync: partial, the kept indices and the token
        self.partial = not bool(host.all())
        self.kept_index = torch.nonzero(host).flatten().to(self.mask.device) if self.partial else None
        # the mask's content, for the masked layers' sliced-weight cache (None: every channel kept)
        self.token = host.numpy().tobytes() if self.partial else None

    def forward(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return _MaskPoint.apply(x, self.mask, self.score if self.collect else None, dim)


def _has_hooks(m: nn.Module) -> bool:
    """Whether calling ``m`` would run a hook (its own or a global one)."""
    from torch.nn.modules import module as mm

    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or mm._global_forward_hooks or mm._global_forward_pre_hooks or mm._global_backward_hooks
                or mm._global_backward_pre_hooks)


class MaskedLayer(nn.Module):
    """A conv/linear computed with the norm-preserving masked kernel.

    With ``sliced=True`` it computes only the kept input/output channels and scatters the result
    into a zero tensor of full width: the same function and gradients, fewer FLOPs.

    With ``reuse=True`` as well (:meth:`MaskedNetwork.set_weight_reuse`, the search's setting), the
    kept channels' rescaled weight and bias are computed once per content of the layer's masks and
    re-used by later calls with the same masks (the search's candidates change one group at a time,
    so every other layer re-uses its weights): the same tensors, computed by the same operations.
    An entry is used only while the layer's weight and bias are the same tensors, unchanged
    (storage, version counter, strides), and never when a gradient with respect to them is wanted;
    the two most recently used mask contents are kept."""

    def __init__(self, layer: nn.Module, in_mask: GroupMask | None, out_mask: GroupMask | None, *,
                 depthwise: bool = False, in_block: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.layer = layer
        self.sliced = False
        self.depthwise = depthwise  # one group on both sides; the mask cuts dim 0 of the weight only
        self.in_block = in_block    # input columns per input channel (linear after a spatial flatten)
        self.dim = -1 if isinstance(layer, nn.Linear) else 1  # its channels' dim: a linear's are the last
        self.groups = 1 if depthwise else groups  # a grouped conv: output block g reads input block g only
        if depthwise:
            in_mask = None
        # Plain attributes, not submodules: the masks are registered once, under `gates`.
        self.__dict__["in_mask"] = in_mask
        self.__dict__["out_mask"] = out_mask
        self.reuse = False
        self._reused: OrderedDict[tuple, tuple] = OrderedDict()  # (in token, out token) -> (stamp, refs, value)

    def _partial(self, m: GroupMask | None) -> GroupMask | None:
        return m if m is not None and m.partial else None

    def effective_weight(self) -> torch.Tensor | None:
        """``(W ⊙ M)·‖W‖/‖W ⊙ M‖``, or None when nothing is masked."""
        w = self.layer.weight
        m_in, m_out = self._partial(self.in_mask), self._partial(self.out_mask)
        if m_in is None and m_out is None:
            return None
        shape = [1] * w.dim()
        mw = w
        if m_out is not None:
            mw = mw * m_out.mask.view(-1, *shape[1:])
        if m_in is not None:
            mw = mw * self._in_weight_mask(m_in.mask, w.shape[0])
        return mw * (w.norm() / mw.norm().clamp_min(1e-30))

    def _in_weight_mask(self, per_channel: torch.Tensor, out: int) -> torch.Tensor:
        """An input mask laid out like the weight: one entry per column, or for a grouped conv one
        per ``[o, j]`` (output o of block g reads input channel ``g·(in/G) + j``)."""
        if self.groups == 1:
            return self._expand(per_channel).view(1, -1, *[1] * (self.layer.weight.dim() - 2))
        g = self.groups
        per_block = per_channel.view(g, 1, -1).expand(g, out // g, -1)
        return per_block.reshape(out, -1, *[1] * (self.layer.weight.dim() - 2))

    def _expand(self, per_channel: torch.Tensor) -> torch.Tensor:
        """A per-channel mask as one entry per input column (blocks of ``in_block``)."""
        return per_channel if self.in_block == 1 else per_channel.repeat_interleave(self.in_block)

    def _expand_index(self, kept: torch.Tensor) -> torch.Tensor:
        if self.in_block == 1:
            return kept
        return (kept.view(-1, 1) * self.in_block + torch.arange(self.in_block, device=kept.device)).flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sliced:
            return self._sliced_forward(x)
        w = self.effective_weight()
        if w is None:
            return self.layer(x)
        return functional_call(self.layer, {"weight": w}, (x,))

    def _sliced_forward(self, x: torch.Tensor) -> torch.Tensor:
        m_in, m_out = self._partial(self.in_mask), self._partial(self.out_mask)
        if m_in is None and m_out is None:
            return self.layer(x)
        if self.depthwise:
            return self._sliced_depthwise(x, m_out)
        if self.groups > 1:
            return self._sliced_grouped(x, m_in, m_out)
        ws, b, cols = self._kept_params(m_in, m_out, self._sliced_params)
        if cols is not None:
            x = x.index_select(self.dim, cols)
        y = self._call(x, ws, b)
        return y if m_out is None else self._scatter(y, m_out, self.layer.weight.shape[0], self.dim)

    def _sliced_params(self, m_in: GroupMask | None, m_out: GroupMask | None) -> tuple:
        """The kept channels' weight (rescaled), bias and input columns (None: all)."""
        w, b = self.layer.weight, self.layer.bias
        ws, cols = w, None
        if m_out is not None:
            ws = ws.index_select(0, m_out.kept_index)
            b = b.index_select(0, m_out.kept_index) if b is not None else None
        if m_in is not None:
            cols = self._expand_index(m_in.kept_index)
            ws = ws.index_select(1, cols)
        ws = ws * (w.norm() / ws.norm().clamp_min(1e-30))
        return ws, b, cols

    def _kept_params(self, m_in: GroupMask | None, m_out: GroupMask | None, compute: Any) -> tuple:
        """``compute(m_in, m_out)``, or its value from an earlier call with the same mask contents
        and the same, unchanged parameters (``reuse``; see the class doc)."""
        params = [t for t in (self.layer.weight, self.layer.bias) if t is not None]
        if (not self.reuse or torch.is_inference_mode_enabled()
                or (torch.is_grad_enabled() and any(t.requires_grad for t in params))):
            return compute(m_in, m_out)
        key = (m_in.token if m_in is not None else None, m_out.token if m_out is not None else None)
        stamp = tuple((t.device, t.data_ptr(), t._version, t.stride(), t.dtype) for t in params)
        hit = self._reused.get(key)
        if hit is not None and hit[0] == stamp:
            self._reused.move_to_end(key)
            return hit[2]
        value = compute(m_in, m_out)
        # the references keep the parameters' storages alive, so no other tensor can take their address
        self._reused[key] = (stamp, [t.detach() for t in params], value)
        while len(self._reused) > 2:
            self._reused.popitem(last=False)
        return value

    def _call(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's forward with ``weight`` and ``bias``: a plain Conv2d/Linear without hooks calls
        the functional its forward calls, directly; any other layer goes through ``functional_call``."""
        layer = self.layer
        if not _has_hooks(layer):
            if type(layer) is nn.Conv2d and layer.padding_mode == "zeros":
                return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
            if type(layer) is nn.Linear:
                return F.linear(x, weight, bias)
        return functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    def _sliced_depthwise(self, x: torch.Tensor, m_out: GroupMask) -> torch.Tensor:
        """A depthwise conv on its kept channels (``groups`` = kept count); a conv subclass with its
        own forward (e.g. TF padding) keeps full width with the masked kernel (the same function)."""
        conv = self.layer
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
            return functional_call(conv, {"weight": self.effective_weight()}, (x,))
        idx = m_out.kept_index
        ws, b, _ = self._kept_params(None, m_out, self._depthwise_params)
        y = F.conv2d(x.index_select(1, idx), ws, b, conv.stride, conv.padding, conv.dilation, int(idx.numel()))
        return self._scatter(y, m_out, conv.weight.shape[0])

    def _depthwise_params(self, m_in: None, m_out: GroupMask) -> tuple:
        """The kept filters of a depthwise conv (rescaled) and their bias."""
        conv = self.layer
        w, idx = conv.weight, m_out.kept_index
        ws = w.index_select(0, idx)
        ws = ws * (w.norm() / ws.norm().clamp_min(1e-30))
        b = conv.bias.index_select(0, idx) if conv.bias is not None else None
        return ws, b, None

    def _sliced_grouped(self, x: torch.Tensor, m_in: GroupMask | None, m_out: GroupMask | None) -> torch.Tensor:
        """A grouped conv on its kept channels, still ``groups`` = G: every block keeps as many
        inputs (and outputs), and kept output o of block g takes the columns of block g's kept inputs."""
        w, b = self.layer.weight, self.layer.bias
        ws = w if m_out is None else w.index_select(0, m_out.kept_index)
        if m_out is not None and b is not None:
            b = b.index_select(0, m_out.kept_index)
        if m_in is not None:
            x = x.index_select(1, m_in.kept_index)
            ws = ws.gather(1, grouped_columns(m_in.kept_index, self.groups, w.shape[1], ws.shape[0], w.shape[2:]))
        rescaled = ws * (w.norm() / ws.norm().clamp_min(1e-30))  # the norm-preserving kernel
        y = functional_call(self.layer, {"weight": rescaled, "bias": b}, (x,))
        return y if m_out is None else self._scatter(y, m_out, w.shape[0])

    @staticmethod
    def _scatter(y: torch.Tensor, m_out: GroupMask, channels: int, dim: int = 1) -> torch.Tensor:
        # The full-width result is contiguous whatever y's layout, as out-of-place index_copy's always
        # is (its output takes no strides from its input): the same tensor, written in place.
        shape = list(y.shape)
        shape[dim] = channels
        return y.new_zeros(shape).index_copy_(dim, m_out.kept_index, y)


class MaskedLayerNorm(nn.Module):
    """A LayerNorm over a group's channels (the last dim) whose statistics are over the kept
    channels only, as in the slim model, where the LayerNorm has only those: with ``k`` kept
    channels, ``mean = Σ_kept x / k``, ``var = Σ_kept (x − mean)² / k`` and the masked channels'
    output is 0. With nothing masked it is the model's own ``F.layer_norm`` call. ``sliced``
    computes it on the kept channels and scatters them into zeros (the same function)."""

    def __init__(self, norm: nn.LayerNorm, mask: GroupMask) -> None:
        super().__init__()
        self.layer = norm
        self.sliced = False
        # plain attributes (the mask is registered under `gates`); the search's tails find it here
        self.__dict__["in_mask"] = mask
        self.__dict__["out_mask"] = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ln, mask = self.layer, self.__dict__["in_mask"]
        if not mask.partial:
            return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        if self.sliced:
            idx = mask.kept_index
            w = ln.weight.index_select(0, idx) if ln.weight is not None else None
            b = ln.bias.index_select(0, idx) if ln.bias is not None else None
            y = F.layer_norm(x.index_select(-1, idx), (int(idx.numel()),), w, b, ln.eps)
            return y.new_zeros(x.shape).index_copy(-1, idx, y)
        keep = mask.mask.to(x.dtype)
        n = keep.sum()
        mean = (x * keep).sum(-1, keepdim=True) / n
        centred = (x - mean) * keep
        y = centred * torch.rsqrt((centred * centred).sum(-1, keepdim=True) / n + ln.eps)
        if ln.weight is not None:
            y = y * ln.weight
        return y + ln.bias * keep if ln.bias is not None else y


def grouped_columns(kept_in: torch.Tensor, groups: int, per_group: int, rows: int,
                    kernel: Sequence[int]) -> torch.Tensor:
    """The gather index (``rows``, kept per group, *kernel) of a grouped conv's weight for the
    sorted kept input channels ``kept_in``: row r (an output of block ``r // (rows / groups)``)
    takes the local columns ``kept_in - g·per_group`` of its block g. ``kept_in`` must hold as many
    channels of every block."""
    g = torch.arange(groups, device=kept_in.device).view(groups, 1)
    local = kept_in.view(groups, -1) - g * per_group
    cols = local.repeat_interleave(rows // groups, dim=0)
    return cols.view(*cols.shape, *[1] * len(kernel)).expand(*cols.shape, *kernel)


class ModuleBatchNorm(nn.Module):
    """The BN of a BatchNorm module (a norm-act layer's, without its activation) in the module's
    current mode: what its functional ``batch_norm`` call computes, following ``train()``/``eval()``."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.__dict__["norm"] = norm  # a plain attribute: the module is registered in the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.modules.batchnorm._BatchNorm.forward(self.norm, x)


_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                 operator.itruediv: operator.truediv}


def _out_of_place_method(name: str) -> str:
    """``mul_`` -> ``mul`` for a tensor's in-place method; other names unchanged."""
    if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
        return name[:-1]
    return name


class MaskedNetwork(nn.Module):
    """``model`` with a mask per prunable channel group (see the module doc)."""

    def __init__(self, model: nn.Module, graph: DependencyGraph | None = None,
                 input_size: tuple[int, ...] = (3, 32, 32), *, round_to: int = 1) -> None:
        super().__init__()
        self.graph = graph if graph is not None else build_graph(model, input_size)
        self.model = model
        self.gates = [Gate(g, round_to=round_to) for g in self.graph.prunable]
        # the masks live where the model's weights are (a model on a GPU gets its masks there)
        first = next(iter(model.state_dict().values()), None)
        self.masks = nn.ModuleList(GroupMask(g.channels) for g in self.graph.prunable).to(
            first.device if first is not None else "cpu")
        self.gm = self._rewrite()

    # ------------------------------------------------------------------ graph rewrite
    def _rewrite(self) -> fx.GraphModule:
        src = self.graph.gm
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        mask_at = {name: i for i, g in enumerate(self.graph.prunable) for name in g.mask_nodes}
        group_of_index = {g.index: i for i, g in enumerate(self.graph.prunable)}
        root = nn.Module()
        root.model = self.model
        layer_costs = {c.name: c for c in self.graph.layers if c.kind in ("conv", "dwconv", "linear")}
        norm_groups = {c.name: c.in_group for c in self.graph.layers if c.kind == "ln"}
        for node in src.graph.nodes:
            new = graph.node_copy(node, lambda n: env[n])
            if node.op == "call_function" and node.target in _OUT_OF_PLACE:
                new.target = _OUT_OF_PLACE[node.target]
            elif node.op == "call_method":
                new.target = "reshape" if node.target == "view" else _out_of_place_method(node.target)
            elif node.op == "get_attr":  # a parameter or buffer the model's forward reads itself
                new.target = f"model.{node.target}"
            if node.name in self.graph.norm_calls:
                bn = self.graph.norm_calls[node.name]
                name = "norm_" + bn.replace(".", "_")
                if not hasattr(root, name):
                    root.add_module(name, ModuleBatchNorm(self.model.get_submodule(bn)))
                new.op, new.target, new.args, new.kwargs = "call_module", name, (env[node.args[0]],), {}
            if node.op == "call_module":
                new.target = f"model.{node.target}"
                module = self.model.get_submodule(node.target)
                if getattr(module, "inplace", False) is True and not list(module.parameters()):
                    name = "outofplace_" + node.target.replace(".", "_")
                    out_of_place = copy.copy(module)
                    out_of_place.inplace = False
                    root.add_module(name, out_of_place)
                    new.target = name
                if node.target in layer_costs:
                    c = layer_costs[node.target]
                    mi = self.masks[group_of_index[c.in_group]] if c.in_group in group_of_index else None
                    mo = self.masks[group_of_index[c.out_group]] if c.out_group in group_of_index else None
                    if mi is not None or mo is not None:
                        name = "masked_" + node.target.replace(".", "_")
                        if not hasattr(root, name):  # a module called twice is one masked layer
                            root.add_module(name, MaskedLayer(module, mi, mo, depthwise=c.kind == "dwconv",
                                                              in_block=c.in_block, groups=c.groups))
                        new.target = name
            if node.name in self.graph.layer_norms and \
                    norm_groups.get(ln := self.graph.layer_norms[node.name]) in group_of_index:
                name = "masked_" + ln.replace(".", "_")
                if not hasattr(root, name):  # a module called twice is one masked layer
                    mask = self.masks[group_of_index[norm_groups[ln]]]
                    root.add_module(name, MaskedLayerNorm(self.model.get_submodule(ln), mask))
                new.op, new.target, new.args, new.kwargs = "call_module", name, (env[node.args[0]],), {}
            if node.name in mask_at:
                i = mask_at[node.name]
                name = f"mask_{i}"
                if not hasattr(root, name):
                    root.add_module(name, self.masks[i])
                dim = self.graph.channel_dims.get(node.name, 1)  # channels-last values: their last dim
                new = graph.call_module(name, (new,), {"dim": dim} if dim != 1 else {})
            env[node] = new
        return fx.GraphModule(root, graph)

    # ------------------------------------------------------------------ state
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gm(x)

    def apply_gates(self) -> None:
        """Write every gate's current mask into the network."""
        for gate, gm in zip(self.gates, self.masks):
            gm.set(gate.mask())

    def set_sliced(self, on: bool) -> None:
        """Compute masked layers on their kept channels only (same function, fewer FLOPs)."""
        for m in self.gm.modules():
            if isinstance(m, (MaskedLayer, MaskedLayerNorm)):
                m.sliced = on
            if isinstance(m, MaskedLayer):
                m._reused.clear()

    def set_weight_reuse(self, on: bool) -> None:
        """Sliced masked layers re-use their kept channels' weights between calls with the same
        masks (see :class:`MaskedLayer`; the search's setting). Clears what they hold either way."""
        for m in self.gm.modules():
            if isinstance(m, MaskedLayer):
                m.reuse = on
                m._reused.clear()

    def clear_weight_cache(self) -> None:
        """Drop the weights the masked layers hold for re-use (the search does at each phase)."""
        for m in self.gm.modules():
            if isinstance(m, MaskedLayer):
                m._reused.clear()

    def set_rates(self, rates: Sequence[float]) -> None:
        for gate, r in zip(self.gates, rates):
            gate.rate = float(r)
        self.apply_gates()

    def rates(self) -> list[float]:
        return [g.rate for g in self.gates]

    def widths(self, rates: Sequence[float] | None = None) -> np.ndarray:
        """Channel widths of every graph group (prunable ones at their kept count)."""
        w = self.graph.full_widths()
        rates = self.rates() if rates is None else rates
        for gate, r in zip(self.gates, rates):
            w[gate.group.index] = gate.kept_at(r)
        return w

    def kept_indices(self) -> dict[int, torch.Tensor]:
        """Graph group index → indices of its kept channels (for slimming)."""
        return {g.group.index: torch.nonzero(g.mask()).flatten() for g in self.gates}

    def collect_scores(self, on: bool) -> None:
        for gm in self.masks:
            gm.collect = on
            if on:
                gm.score.zero_()

    def scores(self) -> list[torch.Tensor]:
        return [gm.score.detach().clone() for gm in self.masks]

"""Channel groups from the model's dependency graph.

One module because the rules below are applied in one pass over the traced graph
(:func:`build_graph`), which also collects the FLOPs/params coefficients, and
:class:`DependencyGraph`/:class:`ChannelGroup` are its result: split, one trace would be scattered.

The model is traced with ``torch.fx``; every tensor in the graph is given a *channel space*, and
the rules below say how layers create, pass on or couple spaces:

* a ``Conv2d`` (groups=1) creates a new space (its output channels) and *consumes* its input's;
* a depthwise ``Conv2d`` (groups = in = out channels) passes its input's space through: channel c
  of its output depends on channel c of its input only, so both sides are cut together (its weight
  is sliced along dim 0);
* a grouped ``Conv2d`` (groups G with 1 < G < in channels: in = G·a, out = G·b) consumes its input's
  space and creates a new one like a plain conv, and cuts both in G equal *blocks*: output channel
  o of block g reads block g's inputs only, so the slim conv keeps ``groups=G`` if each block keeps
  the same number of channels (the kept indices within the blocks may differ). A group's ``blocks``
  is the least common multiple of the G of every grouped conv reading or writing it (1 if none); a
  group whose blocks are single channels (G = its width) cannot be cut and is frozen, naming the
  convs;
* a conv with a channel multiplier (groups = in, out = k·in) freezes the spaces it touches: each
  input channel is a block of its own, which no mask can cut;
* BatchNorm, activations, pooling, dropout, identity and flattening of ``(N, C, 1, 1)`` (also by
  ``nn.Flatten()``, timm's and torchvision's ConvNeXt heads) pass the
  space through; so does a functional ``batch_norm`` on one BatchNorm module's own weight, bias and
  running statistics (a norm-act layer, timm's ``BatchNormAct2d``): it is that module's BN;
* multiplying (adding, dividing) a map by a tensor of the model's own with one entry per channel,
  broadcast along the channels (layer scale: ``x * self.gamma.view(1, -1, 1, 1)``), passes the space
  through, and the tensor is cut with it (one tensor applied to two spaces couples them);
* flattening ``(N, C, H, W)`` to ``(N, C·H·W)`` (``torch.flatten(x, 1)``, ``x.view(N, -1)``,
  ``nn.Flatten()``) passes the space through in *blocks* of H·W columns per channel (VGG's
  classifier reads 512·7·7 features): a linear layer reading it consumes whole blocks;
* an addition (or any elementwise op of two tensors) *couples* its inputs' spaces: they become one
  group that must be pruned together (a residual stream). So does a product (sum) of two maps of
  equal channel counts broadcast over the other dims: ``x * gate(pool(x))``, a squeeze-and-excitation
  block, makes the SE's last conv a producer of the block's expanded channels, and the SE's
  reduction (its first conv's output) is a group of its own; a one-channel map broadcast along the
  channels (a spatial gate) scales every channel alike and passes the other map's space on;
* a sigmoid (a gate), a number applied to every element (``x + 3``, ``x / 6``: timm's hard sigmoid)
  and torchvision's ``stochastic_depth`` (it scales whole samples) pass the space through; they are
  no mask points;
* a module called more than once (shared weights: ``self.conv(self.conv(x))``, one block applied at
  two places) is one set of weights: the inputs of all its calls are one space, and so are their
  outputs, so every call is cut alike; each call costs its FLOPs, its parameters count once. Where
  its calls cannot be cut alike (a linear reading a flattened map at one call and features at
  another) their spaces are frozen, naming the module ("called 2 times in forward: shared weights");
* a ``Linear`` on a 2-D input consumes its input's space and creates a new one (its output
  features: prunable when an activation follows, as in VGG's hidden classifier layers);
* a permute moves a space's channels to another dim (``x.permute(0, 2, 3, 1)``: channels last;
  one that moves the batch dim freezes them). On values whose channels are last, a ``Linear`` over
  the last dim (ConvNeXt's channels-last MLP) consumes and creates spaces like a 1×1 conv and
  costs one product per position; elementwise ops (activations, dropout, numbers), joins of two
  such values and a per-channel tensor broadcast along the channels (``gamma * x``, ``gamma`` of
  shape ``(C,)``) pass them as on ``(N, C, H, W)`` maps; anything else freezes them. A ``Linear``
  on an ``(N, ..., C)`` input whose last dim is not a space's channels freezes both;
* a LayerNorm over the channels — ``nn.LayerNorm((C,))`` on channels-last values, or a functional
  ``layer_norm`` on one LayerNorm module's own weight, bias, shape and eps (torchvision's and
  timm's ``LayerNorm2d``, timm's ``LayerNorm``) — passes the space and is cut with it like a BN
  (its weight and bias; the masked network normalises over the kept channels only,
  :class:`ekg.masks.MaskedLayerNorm`). A LayerNorm over other dims (``(C, H, W)``, or the width)
  freezes what it touches;
* arithmetic on numbers (``x.ndim == 4``, an assert) and shape queries touch no space;
* anything else — a zero-padding shortcut, a reshape that splits channels, a concatenation, an
  unknown function or module — *freezes* the spaces it touches: they are kept whole, and the group
  records why, naming the op and the module whose forward does it (qualified name and type).

The model is traced and shape-propagated in inference mode (the search's: dropout off, BN on
running statistics while tracing), and its buffers are restored afterwards: building the graph
never changes the caller's model. A model that cannot run on ``input_size`` (AlexNet's pooling
shrinks 32×32 to nothing, ViT asserts 224×224) is one :class:`EkgError` naming the size, the layer
that failed and its error.

A group's **mask points** are the activation outputs in its spaces (for a CIFAR ResNet: a block's
inner ReLU, the stem's ReLU and every block's add+ReLU), where the EKG mask is applied and the
Taylor scores are taken. A residual stream with no activation but a LayerNorm over its channels
(ConvNeXt's) is masked where it leaves its units, as the method masks a ResNet's stream after the
stem and after every block: at every residual addition's output and at every block input
(the stem's or a downsampling's output; see :func:`_unit_outputs`). Other groups without an
activation (MobileNet-V2's BN streams) have no mask point and are kept whole. The analytic
FLOPs/params of any assignment of group widths follow from the per-layer coefficients collected here.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

from .bn import inference_modes
from .errors import EkgError, one_line

_PASS_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.Identity,
                 nn.Dropout, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d,
                 nn.Sigmoid, nn.Hardsigmoid)  # a gate's sigmoid passes channels but is no mask point
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU)
_ACT_FUNCS: set[Any] = {F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.leaky_relu}
_PASS_FUNCS: set[Any] = _ACT_FUNCS | {F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.adaptive_max_pool2d,
                                      F.dropout, torch.flatten, torch.sigmoid, F.sigmoid, F.hardsigmoid}
_ACT_METHODS = {"relu", "relu_"}
_PASS_METHODS = _ACT_METHODS | {"flatten", "view", "reshape", "contiguous", "sigmoid", "sigmoid_"}
_FLATTENS: set[Any] = {torch.flatten, "flatten", "view", "reshape"}
_REDUCTIONS = {"mean", "amax", "sum"}  # pass channels only when reducing dims other than 0 and 1
_QUERY_METHODS = {"size", "dim", "numel"}  # return no tensor
_JOIN_FUNCS: set[Any] = {operator.add, operator.mul, torch.add, torch.mul, operator.iadd, operator.imul}
_JOIN_METHODS = {"add", "mul", "add_", "mul_"}
# a number applied to every element: x * 0.5, x / 6, x + 3 (timm's hard sigmoid), 1 - x
_CONSTANT_FUNCS: set[Any] = {operator.mul, operator.truediv, torch.mul, operator.add, operator.sub, torch.add,
                             torch.sub, operator.iadd, operator.imul}
# elementwise ops by which a model's own per-channel tensor may scale or shift a feature map (layer scale)
_CHANNELWISE_FUNCS: set[Any] = {operator.add, operator.mul, operator.sub, operator.truediv, operator.iadd,
                                operator.imul, torch.add, torch.mul, torch.sub, torch.div}
_CHANNELWISE_METHODS = {"add", "mul", "sub", "div", "add_", "mul_", "sub_", "div_"}
_RESHAPES = {"view", "reshape", "unsqueeze", "squeeze", "flatten"}  # of a model's own tensor
_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)
_LAYER_NORM_SIGNATURE = inspect.signature(F.layer_norm)
# ops that act on every element alike: they pass a space whatever dim its channels are in
_ELEMENTWISE_MODULES = _ACT_MODULES + (nn.Identity, nn.Dropout, nn.Sigmoid, nn.Hardsigmoid)
_ELEMENTWISE_FUNCS: set[Any] = _ACT_FUNCS | {F.dropout, torch.sigmoid, F.sigmoid, F.hardsigmoid}
_ELEMENTWISE_METHODS = _ACT_METHODS | {"contiguous", "sigmoid", "sigmoid_"}


@dataclass
class ChannelGroup:
    """Channels that must be pruned together. ``producers`` are the convs that write them (their
    count is the ``n`` of the step-size rule), ``consumers`` the convs/linears that read them."""

    index: int
    name: str
    channels: int
    producers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    depthwise: list[str] = field(default_factory=list)   # depthwise convs inside the group (sliced on dim 0)
    tensors: list[str] = field(default_factory=list)     # the model's own per-channel tensors (layer scale)
    mask_nodes: list[str] = field(default_factory=list)
    prunable: bool = True
    reason: str = ""
    # equal blocks the group is cut in (every block keeps as many channels): the lcm of the groups of
    # the grouped convs reading or writing it, listed in `grouped`
    blocks: int = 1
    grouped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LayerCost:
    """FLOPs/params of one conv/linear/BN as a function of the widths of its channel groups.

    A depthwise conv (``dwconv``) has ``in_group == out_group`` and connects one input channel to
    each output channel. A linear reading a flattened ``(N, C, H, W)`` map has ``in_block = H·W``
    input features per channel of its input group (``in_channels`` counts channels, not features).
    A module called twice (shared weights) has one row per call; the later ones are ``shared``."""

    name: str
    kind: str                 # conv, dwconv, linear, bn, ln or tensor (a per-channel parameter/buffer)
    in_group: int | None      # group index of its input channels (None: fixed)
    out_group: int | None
    in_channels: int
    out_channels: int
    flops_per_pair: int       # FLOPs per (input channel, output channel) pair: H·W·k·k (positions for linear)
    params_per_pair: int
    bias: bool
    groups: int = 1           # a grouped conv connects cin·cout/groups pairs
    in_block: int = 1         # input features per input channel (linear after a spatial flatten)
    shared: bool = False      # a later call of a module called before: its FLOPs again, no parameters


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
        return min(ra, rb)


class _Tracer(fx.Tracer):
    """Keeps convs (including subclasses such as Conv2dSame) and unknown custom modules as leaves."""

    def __init__(self, leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.Linear) + self.leaf_types) or super().is_leaf_module(m, qualname)


@dataclass
class DependencyGraph:
    """The traced model, its channel groups and the per-layer cost coefficients."""

    gm: fx.GraphModule
    groups: list[ChannelGroup]
    layers: list[LayerCost]
    input_size: tuple[int, ...]
    # node name -> the BatchNorm module a functional batch_norm call is (a norm-act layer's)
    norm_calls: dict[str, str] = field(default_factory=dict)
    # node name -> the LayerNorm module a LayerNorm over a group's channels is (a module call or a
    # functional layer_norm on a LayerNorm's own weight and bias: LayerNorm2d)
    layer_norms: dict[str, str] = field(default_factory=dict)
    # node name -> the dim its channels are in, where it is not 1 (channels-last: after a permute)
    channel_dims: dict[str, int] = field(default_factory=dict)
    fixed_params: int = 0     # parameters no group changes (those of no conv/linear/BN/per-channel tensor)

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def full_widths(self) -> np.ndarray:
        return np.array([g.channels for g in self.groups], dtype=np.int64)

    def cost(self, widths: Sequence[int] | np.ndarray, *, bn_ops: bool = False) -> tuple[int, int]:
        """(FLOPs, params) of the network with each group cut to ``widths[group.index]`` channels.

        Same convention as :func:`ekg.flops.count` (MACs of conv+linear; ``bn_ops`` adds 2 per BN
        output element), and equal to counting the slimmed model."""
        w = np.asarray(widths, dtype=np.int64)
        flops, params = 0, self.fixed_params
        for layer in self.layers:
            cin = w[layer.in_group] if layer.in_group is not None else layer.in_channels
            cout = w[layer.out_group] if layer.out_group is not None else layer.out_channels
            if layer.kind == "tensor":
                params += layer.params_per_pair * cout
                continue
            if layer.kind == "ln":  # a LayerNorm: its affine parameters, no FLOPs (nor BN ops)
                params += layer.params_per_pair * cout if not layer.shared else 0
                continue
            if layer.kind == "bn":
                params += 2 * cout if layer.bias and not layer.shared else 0
                if bn_ops:
                    flops += 2 * layer.flops_per_pair * cout
                continue
            pairs = cout if layer.kind == "dwconv" else cin * cout // layer.groups
            flops += layer.flops_per_pair * pairs
            if not layer.shared:
                params += layer.params_per_pair * pairs + (cout if layer.bias else 0)
        return int(flops), int(params)


def _conv_kind(m: nn.Conv2d) -> str:
    """plain (groups=1), depthwise (groups = in = out), multiplier (groups = in < out) or grouped
    (1 < groups < in: both sides cut in ``groups`` equal blocks)."""
    if m.groups == 1:
        return "plain"
    if m.groups == m.in_channels == m.out_channels:
        return "depthwise"
    if m.groups == m.in_channels:
        return "multiplier"
    return "grouped"


def _multiplier_reason(name: str, m: nn.Conv2d) -> str:
    return (f"conv '{name}' has a channel multiplier (groups={m.groups}, {m.in_channels} in, "
            f"{m.out_channels} out channels): each input channel feeds {m.out_channels // m.groups} "
            "output channels, which one channel mask cannot cut consistently")


def _group_blocks(channels: int, grouped: list[tuple[str, int]]) -> tuple[int, str]:
    """The equal blocks a group of ``channels`` is cut in, given the (name, groups) of the grouped
    convs reading or writing it: the lcm of their groups (every block keeps as many channels, so
    each conv's own blocks do too), and why the group cannot be cut ("" if it can)."""
    convs = list(dict.fromkeys(grouped))
    blocks = math.lcm(*(g for _, g in convs)) if convs else 1
    if channels % blocks == 0 and channels // blocks > 1:
        return blocks, ""
    names = " and ".join(f"'{n}' (groups={g})" for n, g in convs)
    what = "one channel each" if channels == blocks else f"which {channels} is not a multiple of"
    return blocks, (f"grouped conv{'s' if len(convs) > 1 else ''} {names} cut these {channels} channels in "
                    f"{blocks} equal blocks, {what}: no channel can be cut")


class CannotRun(EkgError):
    """The model fails on a batch of the given input size (the message names the layer)."""


class _NodeFailed(Exception):
    def __init__(self, node: fx.Node, error: Exception) -> None:
        super().__init__(node.name)
        self.node, self.error = node, error


class _ShapeProp(ShapeProp):
    """torch.fx's ShapeProp (no fake tensors) whose failing node raises :class:`_NodeFailed`
    (ShapeProp prints a traceback and raises a RuntimeError naming fx's node, not the layer)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = fx.Interpreter.run_node(self, n)
        except Exception as e:  # noqa: BLE001 - the model's own code failed at this input size
            raise _NodeFailed(n, e) from e
        found = False

        def meta(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        tensor_meta = fx.node.map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = tensor_meta
        n.meta["type"] = type(result)
        return result


def _cannot_run(failed: _NodeFailed, gm: fx.GraphModule, model: nn.Module, input_size: tuple[int, ...]) -> str:
    node = failed.node
    if node.op == "call_module":
        what = f"{type(gm.get_submodule(node.target)).__name__} '{node.target}'"
    else:
        what = f"{_op_name(node)} in {_where(node, model)}"
    cause = one_line(f"{type(failed.error).__name__}: {failed.error}")
    cause = cause if len(cause) <= 300 else cause[:299] + "…"
    return (f"{type(model).__name__} cannot run on {tuple(input_size)} inputs: {what} fails ({cause}); give it "
            "images of a size it accepts (larger ones where its maps shrink to nothing, or the size it was built "
            "for; `input_size` follows the images)")


@contextlib.contextmanager
def buffers_restored(model: nn.Module) -> Iterator[None]:
    """On exit, every buffer of ``model`` (BN running statistics, counters) as it was on entry."""
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in saved and saved[name].shape == b.shape:
                    b.copy_(saved[name])


def build_graph(model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32),
                leaf_types: tuple[type, ...] = ()) -> DependencyGraph:
    """Trace ``model`` and derive its channel groups (see the module doc for the rules)."""
    from .models import ZeroPadShortcut  # known custom leaf

    leaves = (ZeroPadShortcut,) + tuple(leaf_types)
    # Traced and run in inference mode, the search's semantics (dropout off, no auxiliary heads),
    # so that nothing the trace bakes in or runs updates BN statistics; the model's buffers are
    # restored all the same: building the graph never changes the caller's model.
    with buffers_restored(model), inference_modes(model):
        try:
            graph = _Tracer(leaves).trace(model)
        except Exception as e:  # fx cannot trace data-dependent control flow
            raise EkgError(f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); "
                           "models with data-dependent control flow cannot be pruned") from None
        gm = fx.GraphModule(model, graph)
        p = next(model.parameters())
        with torch.no_grad():
            try:
                _ShapeProp(gm).propagate(torch.zeros(2, *input_size, device=p.device, dtype=p.dtype))
            except _NodeFailed as e:  # the model cannot run at this size: the layer that failed, in one line
                raise CannotRun(_cannot_run(e, gm, model, input_size)) from None
    modules = dict(gm.named_modules())

    uf = _UnionFind()
    space_channels: list[int] = []
    frozen: dict[int, str] = {}
    space: dict[str, int | None] = {}           # node name -> space id
    block: dict[str, int] = {}                  # node name -> columns per channel (flattened maps), if > 1
    writer: dict[int, str] = {}                 # space id -> the layer that created it (for messages)
    producers: dict[int, list[str]] = {}
    norms: dict[int, list[str]] = {}
    consumers: dict[int, list[str]] = {}
    depthwise: dict[int, list[str]] = {}
    grouped: dict[int, list[tuple[str, int]]] = {}   # space id -> (grouped conv, its groups) reading/writing it
    acts: dict[int, list[str]] = {}
    tensors: dict[int, list[str]] = {}
    own: dict[str, str] = {}                    # node name -> the model's tensor it is (a get_attr, reshaped)
    tensor_space: dict[str, int] = {}           # a per-channel tensor of the model's -> the space it scales
    norm_calls: dict[str, str] = {}
    dims: dict[str, int] = {}                   # node name -> its channels' dim, where not 1 (channels-last)
    layer_norms: dict[str, str] = {}            # node name -> the LayerNorm module it is
    ln_names: set[str] = set()                  # LayerNorms over a group's channels
    joins: list[fx.Node] = []                   # residual additions: elementwise joins coupling two spaces
    param_names = {name for name, _ in model.named_parameters()}
    layer_refs: list[tuple[str, str, int | None, int | None, Any, tuple[int, ...], int]] = []

    def new_space(channels: int) -> int:
        s = uf.new()
        space_channels.append(channels)
        return s

    def freeze(s: int | None, why: str) -> None:
        if s is not None:
            frozen.setdefault(s, why)

    def opaque(node: fx.Node, why: str) -> None:
        """An op ekg cannot see through: freeze its inputs' spaces and give it a new, frozen one."""
        for a in node.all_input_nodes:
            freeze(space.get(a.name), why)
        out = shape(node)
        s = new_space(out[1] if out and len(out) > 1 else 0)
        freeze(s, why)
        space[node.name] = s

    def shape(n: fx.Node) -> tuple[int, ...] | None:
        meta = n.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def in_space(n: fx.Node) -> int | None:
        a = n.args[0] if n.args else None
        return space.get(a.name) if isinstance(a, fx.Node) else None

    def in_block(n: fx.Node) -> int:
        a = n.args[0] if n.args else None
        return block.get(a.name, 1) if isinstance(a, fx.Node) else 1

    def pass_through(node: fx.Node, src_node: fx.Node, is_act: bool) -> None:
        src = space.get(src_node.name)
        space[node.name] = src
        if src_node.name in dims:
            dims[node.name] = dims[src_node.name]
        b = block.get(src_node.name, 1)
        if b > 1:
            block[node.name] = b
        elif is_act and src is not None:  # a mask needs one entry per channel: not on flattened blocks
            acts.setdefault(src, []).append(node.name)

    # A module called more than once (shared weights: ``self.conv(self.conv(x))``, one block applied
    # at two places) is one set of weights: its inputs at every call are one space, and so are its
    # outputs; its later calls cost FLOPs but no parameters of their own.
    first_call: dict[str, tuple[int | None, int | None, int]] = {}
    shared_refs: set[int] = set()   # indices into layer_refs of the later calls of a module

    def called(name: str, m: nn.Module, src: int | None, out: int | None, blk: int) -> None:
        if not any(True for _ in m.parameters()) and not any(True for _ in m.buffers()):
            return  # nothing of its own to cut (a BN without affine parameters or statistics)
        if name not in first_call:
            first_call[name] = (src, out, blk)
            return
        shared_refs.add(len(layer_refs) - 1)
        src0, out0, blk0 = first_call[name]
        why = f"{type(m).__name__} '{name}' is called {calls_of[name]} times in forward: shared weights"
        if blk != blk0:
            for s in (src, src0):
                freeze(s, f"{why}, read as {blk0} and {blk} columns per channel")
        for a, b in ((src, src0), (out, out0)):
            if a is not None and b is not None:
                uf.union(a, b)
            elif a is not None or b is not None:
                freeze(a if a is not None else b, f"{why}, on a feature map at one call and not at another")

    def channel_dim_rule(node: fx.Node) -> bool:
        """The rules of the channel dim (ConvNeXt's channels-last blocks), True if ``node`` was
        handled here: a permute moves a space's channels to another dim; a LayerNorm over the
        channels (the last dim) is the group's norm; on a tensor whose channels are not in dim 1,
        a linear layer over them creates a space like a 1×1 conv, elementwise ops and joins of
        equal layouts pass it, a per-channel tensor broadcast along them scales it, and anything
        else freezes it."""
        if node.op not in ("call_module", "call_function", "call_method") or _is_query(node):
            return False
        tensor_args = [a for a in node.args if isinstance(a, fx.Node) and shape(a) is not None]
        out_shape = shape(node)
        if (perm := _permutation(node)) is not None and len(tensor_args) == 1:
            x = tensor_args[0]
            src, d = space.get(x.name), dims.get(x.name, 1)
            if src is not None and (perm[0] != 0 or block.get(x.name, 1) > 1 or d >= len(perm)):
                opaque(node, f"it passes through a permute that moves the batch or flattened channels in "
                             f"{_where(node, model)}, which ekg cannot prune through")
                return True
            space[node.name] = src
            if src is not None and perm.index(d) != 1:
                dims[node.name] = perm.index(d)
            return True
        if (ln := _own_layer_norm(node, model, modules)) is not None and tensor_args and \
                (x := node.args[0]) is tensor_args[0] and (xs := shape(x)) is not None and \
                dims.get(x.name, 1) == len(xs) - 1 >= 1 and block.get(x.name, 1) == 1 and out_shape == xs and \
                tuple(model.get_submodule(ln).normalized_shape) == (xs[-1],):
            # a LayerNorm over the channels: part of their group, like a BN (its statistics are over
            # the kept channels in the masked network, see ekg.masks.MaskedLayerNorm)
            src = space.get(x.name)
            pass_through(node, x, False)
            layer_norms[node.name] = ln
            if src is not None:
                norms.setdefault(src, []).append(ln)
                ln_names.add(ln)
                layer_refs.append((ln, "ln", src, src, model.get_submodule(ln), (1, 1), 1))
                called(ln, model.get_submodule(ln), src, src, 1)
            return True
        last = [a for a in node.all_input_nodes if dims.get(a.name, 1) != 1]
        if not last:
            return False
        d = dims[last[0].name]
        target = node.target
        m = modules[target] if node.op == "call_module" else None
        if isinstance(m, nn.Linear) and len(tensor_args) == 1 and d == len(shape(tensor_args[0])) - 1 and \
                block.get(tensor_args[0].name, 1) == 1 and (src := space.get(tensor_args[0].name)) is not None:
            # over the last dim of (N, ..., C): a new space of its out features, channels last too
            s = new_space(m.out_features)
            writer[s] = f"linear layer '{target}'"
            producers.setdefault(s, []).append(target)
            consumers.setdefault(src, []).append(target)
            layer_refs.append((target, "linear", src, s, m, (int(np.prod(shape(tensor_args[0])[1:-1])), 1), 1))
            space[node.name] = s
            dims[node.name] = len(out_shape) - 1
            called(target, m, src, s, 1)
            return True
        if node.op == "call_module":
            elementwise, is_act = isinstance(m, _ELEMENTWISE_MODULES), isinstance(m, _ACT_MODULES)
        elif node.op == "call_function":
            elementwise = target in _ELEMENTWISE_FUNCS or _is_stochastic_depth(target)
            is_act = target in _ACT_FUNCS
        else:
            elementwise, is_act = target in _ELEMENTWISE_METHODS, target in _ACT_METHODS
        if elementwise and len(tensor_args) == 1 and shape(tensor_args[0]) == out_shape:
            pass_through(node, tensor_args[0], is_act)
            return True
        if (scaled := _channelwise(node, own, shape, space, block, dims)) is not None:
            x, name = scaled  # x * self.gamma along the channels of x
            pass_through(node, x, False)
            src = space[x.name]
            if name is not None and name in tensor_space:
                uf.union(tensor_space[name], src)
            elif name is not None:
                tensor_space[name] = src
                tensors.setdefault(src, []).append(name)
                layer_refs.append((name, "tensor", None, src, name in param_names, (1, 1), 1))
            return True
        is_join = target in _JOIN_FUNCS if node.op == "call_function" else target in _JOIN_METHODS
        if is_join and len(tensor_args) == 2 and shape(tensor_args[0]) == shape(tensor_args[1]) == out_shape and \
                dims.get(tensor_args[0].name, 1) == dims.get(tensor_args[1].name, 1) and \
                all(space.get(t.name) is not None and block.get(t.name, 1) == 1 for t in tensor_args):
            space[node.name] = uf.union(space[tensor_args[0].name], space[tensor_args[1].name])
            dims[node.name] = d
            joins.append(node)
            return True
        if len(tensor_args) == 1 and not node.kwargs and out_shape == shape(tensor_args[0]) and \
                (target in _CONSTANT_FUNCS if node.op == "call_function" else target in _CHANNELWISE_METHODS):
            pass_through(node, tensor_args[0], False)  # a number applied to every element
            return True
        what = f"{type(m).__name__} '{target}'" if m is not None else f"{_op_name(node)} in {_where(node, model)}"
        opaque(node, f"it passes through {what} on channels-last values (channels in dim {d}), "
                     "which ekg cannot prune through")
        return True

    calls_of: dict[str, int] = {}  # how often each module is called (for messages)
    for node in gm.graph.nodes:
        name = str(node.target) if node.op == "call_module" else \
            _own_batch_norm(node, model) if node.op == "call_function" and node.target is F.batch_norm else None
        if name is not None:
            calls_of[name] = calls_of.get(name, 0) + 1

    for node in gm.graph.nodes:
        out_shape = shape(node)
        if node.op == "placeholder":
            s = new_space(out_shape[1] if out_shape and len(out_shape) > 1 else 0)
            freeze(s, "it is the model's input")
            space[node.name] = s
        elif channel_dim_rule(node):
            pass  # a permute, a LayerNorm over the channels, or channels-last values (ConvNeXt)
        elif node.op == "call_module":
            m = modules[node.target]
            src = in_space(node)
            refs_before = len(layer_refs)
            if isinstance(m, nn.Conv2d) and _conv_kind(m) == "depthwise" and src is not None:
                depthwise.setdefault(src, []).append(node.target)
                layer_refs.append((node.target, "dwconv", src, src, m, out_shape[-2:], 1))
                space[node.name] = src
            elif isinstance(m, nn.Conv2d) and _conv_kind(m) == "multiplier":
                why = _multiplier_reason(node.target, m)
                freeze(src, why)
                s = new_space(m.out_channels)
                freeze(s, why)
                writer[s] = f"conv '{node.target}'"
                layer_refs.append((node.target, "conv", src, s, m, out_shape[-2:], 1))
                space[node.name] = s
            elif isinstance(m, nn.Conv2d):  # plain or grouped
                s = new_space(m.out_channels)
                writer[s] = f"conv '{node.target}'"
                producers.setdefault(s, []).append(node.target)
                if src is not None:
                    consumers.setdefault(src, []).append(node.target)
                if m.groups > 1:  # its input and output are cut in m.groups equal blocks
                    for side in (src, s):
                        if side is not None:
                            grouped.setdefault(side, []).append((node.target, m.groups))
                layer_refs.append((node.target, "conv", src, s, m, out_shape[-2:], 1))
                space[node.name] = s
            elif isinstance(m, nn.Linear):
                s = new_space(m.out_features)
                writer[s] = f"linear layer '{node.target}'"
                in_shape = shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
                positions = (1, 1)
                if in_shape is not None and len(in_shape) != 2:
                    # applied at every position of an (N, ..., C) tensor (ConvNeXt's channels-last MLP)
                    positions = (int(np.prod(in_shape[1:-1])), 1)
                    why = f"linear layer '{node.target}' reads a {len(in_shape)}-D tensor"
                    freeze(src, why)
                    freeze(s, why)
                    src = None
                else:
                    producers.setdefault(s, []).append(node.target)
                if src is not None:
                    consumers.setdefault(src, []).append(node.target)
                layer_refs.append((node.target, "linear", src, s, m, positions, in_block(node)))
                space[node.name] = s
            elif isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) == (1, -1) and \
                    isinstance(node.args[0], fx.Node) and block.get(node.args[0].name, 1) == 1 and \
                    (_keeps_channels(shape(node.args[0]), out_shape) or
                     _flattens_channels(shape(node.args[0]), out_shape)):
                # nn.Flatten() is torch.flatten(x, 1): (N, C, 1, 1) -> (N, C), or blocks of H·W columns
                pass_through(node, node.args[0], False)
                if not _keeps_channels(shape(node.args[0]), out_shape):
                    block[node.name] = int(np.prod(shape(node.args[0])[2:]))
            elif isinstance(m, _PASS_MODULES) and isinstance(node.args[0], fx.Node):
                pass_through(node, node.args[0], isinstance(m, _ACT_MODULES))
                if isinstance(m, nn.BatchNorm2d) and src is not None:
                    norms.setdefault(src, []).append(node.target)
                    layer_refs.append((node.target, "bn", src, src, m, out_shape[-2:], 1))
            else:
                opaque(node, f"it passes through {type(m).__name__} '{node.target}', which ekg cannot prune through")
            if len(layer_refs) > refs_before:
                called(node.target, m, src, space.get(node.name), in_block(node))
        elif node.op in ("call_function", "call_method") and (_is_query(node) or (
                out_shape is None and all(shape(a) is None for a in node.all_input_nodes))):
            space[node.name] = None  # numbers (x.ndim == 4, an assert), not feature maps
        elif node.op == "call_method" and node.target in _RESHAPES and isinstance(node.args[0], fx.Node) and \
                node.args[0].name in own and all(shape(a) is None for a in node.all_input_nodes[1:]):
            own[node.name] = own[node.args[0].name]  # self.gamma.view(1, -1, 1, 1)
            space[node.name] = None
        elif node.op == "call_function" and node.target is F.batch_norm and \
                (bn := _own_batch_norm(node, model)) is not None and isinstance(node.args[0], fx.Node):
            # a norm-act layer (timm's BatchNormAct2d) calls batch_norm on its own weights: that BN
            src = space.get(node.args[0].name)
            pass_through(node, node.args[0], False)
            norm_calls[node.name] = bn
            if src is not None:
                norms.setdefault(src, []).append(bn)
                layer_refs.append((bn, "bn", src, src, model.get_submodule(bn), out_shape[-2:], 1))
                called(bn, model.get_submodule(bn), src, src, 1)
        elif node.op in ("call_function", "call_method") and \
                (scaled := _channelwise(node, own, shape, space, block)) is not None:
            x, name = scaled  # x * self.gamma: a per-channel tensor of the model's own scales x's channels
            pass_through(node, x, False)
            src = space.get(x.name)
            if name is not None and src is not None and name in tensor_space:
                uf.union(tensor_space[name], src)  # one tensor scaling two spaces cuts them alike
            elif name is not None and src is not None:
                tensor_space[name] = src
                tensors.setdefault(src, []).append(name)
                layer_refs.append((name, "tensor", None, src, name in param_names, (1, 1), 1))
        elif node.op in ("call_function", "call_method"):
            target = node.target
            tensor_args = [a for a in node.args if isinstance(a, fx.Node) and shape(a) is not None]
            is_pass = (target in _PASS_FUNCS if node.op == "call_function" else target in _PASS_METHODS) or \
                (node.op == "call_method" and target in _REDUCTIONS and _reduces_spatial_only(node))
            is_act = target in _ACT_FUNCS if node.op == "call_function" else target in _ACT_METHODS
            is_join = target in _JOIN_FUNCS if node.op == "call_function" else target in _JOIN_METHODS
            is_pass = is_pass or (node.op == "call_function" and _is_stochastic_depth(target))
            src_shape = shape(tensor_args[0]) if tensor_args else None
            if is_pass and len(tensor_args) == 1 and _keeps_channels(src_shape, out_shape):
                pass_through(node, tensor_args[0], is_act)
            elif is_pass and len(tensor_args) == 1 and target in _FLATTENS and \
                    _flattens_channels(src_shape, out_shape) and block.get(tensor_args[0].name, 1) == 1:
                space[node.name] = space.get(tensor_args[0].name)
                block[node.name] = int(np.prod(src_shape[2:]))
            elif is_join and len(tensor_args) == 2 and \
                    shape(tensor_args[0]) == shape(tensor_args[1]) == out_shape and \
                    block.get(tensor_args[0].name, 1) == block.get(tensor_args[1].name, 1):
                a, b = (space.get(t.name) for t in tensor_args)
                if block.get(tensor_args[0].name, 1) > 1:
                    block[node.name] = block[tensor_args[0].name]
                if a is None or b is None:
                    space[node.name] = a if b is None else b
                else:
                    space[node.name] = uf.union(a, b)
                    joins.append(node)
            elif is_join and len(tensor_args) == 2 and \
                    (joined := _broadcast_join(*tensor_args, out_shape, shape, space, block)) is not None:
                # x * gate(pool(x)) (squeeze-and-excitation): the maps' channels are one space;
                # a one-channel map (a spatial gate) is broadcast along the other's channels
                a, b = (space[t.name] for t in joined)
                space[node.name] = uf.union(a, b)
            elif len(tensor_args) == 1 and not node.kwargs and out_shape == shape(tensor_args[0]) and \
                    (target in _CONSTANT_FUNCS if node.op == "call_function" else
                     target in _CHANNELWISE_METHODS):  # a number applied to every element
                pass_through(node, tensor_args[0], False)
            elif node.op == "call_function" and target is F.batch_norm:
                opaque(node, f"{_where(node, model)} calls batch_norm() on tensors that are not one BatchNorm "
                             "module's own weight, bias and running statistics, which ekg cannot prune through")
            else:
                opaque(node, f"it passes through {_op_name(node)} in {_where(node, model)}, "
                             "which ekg cannot prune through")
        elif node.op == "output":
            for a in node.all_input_nodes:
                s = space.get(a.name)
                if s is not None:
                    by = writer.get(s)
                    freeze(s, "it is the model's output" + (f", written by {by}" if by else ""))
        else:  # get_attr: a parameter or buffer of the model's own
            space[node.name] = None
            if out_shape is not None and sum(d != 1 for d in out_shape) <= 1:  # a number or one entry per channel
                own[node.name] = str(node.target)

    # Collapse spaces into groups (roots of the union-find), in order of first appearance.
    root_of = {s: uf.find(s) for s in range(len(space_channels))}
    roots: list[int] = []
    for s in range(len(space_channels)):
        if root_of[s] not in roots:
            roots.append(root_of[s])
    group_index = {r: i for i, r in enumerate(roots)}
    groups: list[ChannelGroup] = []
    for r in roots:
        members = [s for s in range(len(space_channels)) if root_of[s] == r]
        g = ChannelGroup(index=len(groups), name="", channels=space_channels[r])
        for s in members:
            g.producers += producers.get(s, [])
            g.norms += norms.get(s, [])
            g.consumers += consumers.get(s, [])
            g.depthwise += depthwise.get(s, [])
            g.tensors += tensors.get(s, [])
            g.mask_nodes += acts.get(s, [])
        g.blocks, blocks_reason = _group_blocks(g.channels, [c for s in members for c in grouped.get(s, [])])
        g.grouped = list(dict.fromkeys(name for s in members for name, _ in grouped.get(s, [])))
        for names in (g.producers, g.norms, g.consumers, g.depthwise):
            names[:] = dict.fromkeys(names)  # a module called twice is listed once
        reasons = [frozen[s] for s in members if s in frozen]
        g.name = g.producers[0] if g.producers else f"space{r}"
        if len(g.producers) > 1:
            g.name = f"stream:{g.producers[0]}"
        if not g.mask_nodes and any(n in ln_names for n in g.norms):
            # no activation on a LayerNorm'd stream (ConvNeXt): masked where it leaves its units
            g.mask_nodes = _unit_outputs(joins, lambda n, r=r: space.get(n.name) is not None and
                                         root_of[space[n.name]] == r and block.get(n.name, 1) == 1)
        if reasons:
            g.prunable, g.reason = False, reasons[0]
        elif not g.producers:
            g.prunable, g.reason = False, "no conv produces these channels"
        elif g.channels <= 1:
            g.prunable, g.reason = False, "a single channel cannot be pruned"
        elif not g.mask_nodes:
            g.prunable, g.reason = False, "no activation follows these channels (no mask point)"
        elif blocks_reason:
            g.prunable, g.reason = False, blocks_reason
        groups.append(g)

    layers = []
    counted: set[str] = set()  # parameters the layers' costs count
    for ref, (name, kind, gin, gout, m, hw, blk) in enumerate(layer_refs):
        gi = group_index[root_of[gin]] if gin is not None else None
        go = group_index[root_of[gout]] if gout is not None else None
        if kind in ("conv", "dwconv"):
            kk = m.kernel_size[0] * m.kernel_size[1]
            layers.append(LayerCost(name, kind, gi, go, m.in_channels, m.out_channels,
                                    int(hw[0] * hw[1] * kk), kk, m.bias is not None, m.groups))
        elif kind == "linear":
            layers.append(LayerCost(name, kind, gi, go, m.in_features // blk, m.out_features, blk * hw[0], blk,
                                    m.bias is not None, in_block=blk))
        elif kind == "tensor":  # `m` says whether it is a parameter (a buffer has no params)
            channels = space_channels[gout]
            layers.append(LayerCost(name, kind, None, go, channels, channels, 0, int(m), False))
            counted.add(name)
            continue
        elif kind == "ln":  # its affine parameters, one each per channel (none without them)
            channels = space_channels[gout]
            affine = sum(getattr(m, p) is not None for p in ("weight", "bias"))
            layers.append(LayerCost(name, kind, gi, go, channels, channels, 0, affine, False))
        else:
            layers.append(LayerCost(name, kind, gi, go, m.num_features, m.num_features, int(hw[0] * hw[1]), 0,
                                    bool(m.affine)))  # for BN, `bias` records affine parameters
        layers[-1].shared = ref in shared_refs
        counted.update(f"{name}.{p}" if name else p for p in ("weight", "bias")
                       if kind != "bn" or m.affine)
    fixed = sum(p.numel() for n, p in model.named_parameters() if n not in counted)
    return DependencyGraph(gm=gm, groups=groups, layers=layers, input_size=tuple(input_size),
                           norm_calls=norm_calls, layer_norms=layer_norms, channel_dims=dims, fixed_params=int(fixed))


def check_training_forward(model: nn.Module, input_size: tuple[int, ...]) -> None:
    """Refuse (one line, naming the layers) a model whose training-mode forward is not the network
    the graph traced in inference mode: one that returns something other than a tensor of class
    scores in training (torchvision's GoogLeNet and Inception-v3 return their auxiliary heads'
    scores too), or that runs layers in training only (auxiliary heads). ekg adapts
    and fine-tunes on the class scores, and slims only the layers the graph saw: such a layer would
    read cut channels with its full width. One forward on two zero images in each mode, without
    gradients; the model's buffers, modes and the RNG are left as they were."""
    called: dict[bool, list[str]] = {True: [], False: []}
    mode = [False]
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: called[mode[0]].append(name))
             for name, m in model.named_modules() if name]
    p = next(model.parameters())
    x = torch.zeros(2, *input_size, device=p.device, dtype=p.dtype)
    modes = [(m, m.training) for m in model.modules()]
    out: Any = None
    failed = ""
    try:
        with buffers_restored(model), torch.no_grad(), \
                torch.random.fork_rng(devices=[p.device] if p.device.type == "cuda" else []):
            model.eval()
            model(x)
            mode[0] = True
            model.train()
            try:
                out = model(x)
            except Exception as e:  # the inference-mode forward ran: the training-mode one does not
                failed = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.training = training
    eval_called = set(called[False])
    only = list(dict.fromkeys(n for n in called[True] if n not in eval_called))
    only = [n for n in only if not any(n.startswith(o + ".") for o in only)]  # the outermost: the heads
    heads = ", ".join(f"'{n}'" for n in only[:4]) + (f" and {len(only) - 4} more" if len(only) > 4 else "")
    where = f" (its layers {heads} run in training only)" if only else ""
    fix = ("build it without them (torchvision's googlenet and inception_v3: aux_logits=False, as their "
           "pretrained weights load by default)")
    what = type(model).__name__
    if failed:
        raise EkgError(f"{what} runs in inference mode but not in training mode ({failed})"
                       + (f"; its layers {heads} run in training only: {fix}" if only else
                          ": ekg adapts and fine-tunes the network it prunes, so it must train"))
    if not isinstance(out, torch.Tensor):
        raise EkgError(f"{what} returns a {type(out).__name__} in training mode, not a tensor of class scores{where}: "
                       "ekg adapts and fine-tunes on the class scores; "
                       + (fix if only else "make its training-mode forward return the class scores"))
    if only:
        raise EkgError(f"{what}'s layers {heads} run in training mode only (auxiliary heads): ekg slims the "
                       f"inference network, so they would read cut channels; {fix}")


def _unit_outputs(joins: list[fx.Node], in_group: Any) -> list[str]:
    """The mask points of a residual stream with no activation (ConvNeXt's, normalised by
    LayerNorms): where its channels leave a unit, as the method masks a ResNet's stream after the
    stem and after every block's addition. They are the output of every residual addition of the
    group and every block input the additions read (the map both sides of an addition descend
    from: the stem's or a downsampling's output; the previous block's addition otherwise), in
    forward order. ``in_group(node)`` tells whether a node's values are the group's channels."""
    order = {n: k for k, n in enumerate(joins[0].graph.nodes)} if joins else {}
    points: set[fx.Node] = set()
    for j in joins:
        if not in_group(j):
            continue
        points.add(j)
        sides = [x for x in j.args if isinstance(x, fx.Node)]
        if len(sides) != 2:
            continue
        common = _ancestors(sides[0]) & _ancestors(sides[1])
        fork = max((n for n in common if in_group(n)), key=order.__getitem__, default=None)
        if fork is not None:
            points.add(fork)
    return [n.name for n in sorted(points, key=order.__getitem__)]


def _ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node its value is computed from."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _is_stochastic_depth(target: Any) -> bool:
    """torchvision's ``stochastic_depth`` (EfficientNet's residual branches): it scales whole
    samples (off in inference mode, in which the graph is traced), never single channels."""
    return getattr(target, "__name__", None) == "stochastic_depth" and \
        str(getattr(target, "__module__", "")).startswith("torchvision.ops")


def _is_query(node: fx.Node) -> bool:
    """``x.size(0)``, ``x.dim()``, ``x.shape``: ops that return numbers, not feature maps."""
    if node.op == "call_method":
        return node.target in _QUERY_METHODS
    return node.target is getattr and len(node.args) > 1 and node.args[1] in ("shape", "dtype", "device", "ndim")


def _own_batch_norm(node: fx.Node, model: nn.Module) -> str | None:
    """The BatchNorm module whose own running statistics, weight and bias (and eps) a functional
    ``batch_norm`` call reads — a norm-act layer such as timm's ``BatchNormAct2d`` — or None."""
    try:
        args = _BATCH_NORM_SIGNATURE.bind(*node.args, **node.kwargs).arguments
    except TypeError:
        return None
    names: dict[str, str | None] = {}
    for key in ("running_mean", "running_var", "weight", "bias"):
        v = args.get(key)
        if isinstance(v, fx.Node) and v.op == "get_attr":
            names[key] = str(v.target)
        elif v is None:
            names[key] = None
        else:
            return None
    owners = {n.rpartition(".")[0] for n in names.values() if n is not None}
    if len(owners) != 1:
        return None
    owner = owners.pop()
    try:
        m = model.get_submodule(owner)
    except AttributeError:
        return None
    if not isinstance(m, nn.modules.batchnorm._BatchNorm) or args.get("eps", 1e-5) != m.eps:
        return None
    for key, name in names.items():
        if (name is None) != (getattr(m, key) is None) or (name is not None and name != _join(owner, key)):
            return None
    return owner


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _permutation(node: fx.Node) -> list[int] | None:
    """The dims of ``x.permute(0, 2, 3, 1)``, ``torch.permute(x, [0, 2, 3, 1])`` (torchvision's
    ``Permute``), as non-negative ints, or None if ``node`` is no permute."""
    if node.op == "call_method" and node.target == "permute":
        rest = list(node.args[1:]) or [node.kwargs.get("dims")]
    elif node.op == "call_function" and node.target is torch.permute:
        rest = list(node.args[1:]) or [node.kwargs.get("dims")]
    else:
        return None
    perm = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    if not perm or not all(isinstance(p, int) for p in perm):
        return None
    perm = [p % len(perm) for p in perm]
    return perm if sorted(perm) == list(range(len(perm))) else None


def _own_layer_norm(node: fx.Node, model: nn.Module, modules: dict[str, nn.Module]) -> str | None:
    """The ``nn.LayerNorm`` module ``node`` computes: a call of one whose forward is LayerNorm's
    own, or a functional ``layer_norm`` on one LayerNorm module's own normalized shape, weight,
    bias and eps (torchvision's and timm's ``LayerNorm2d``, timm's ``LayerNorm``); else None."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        ok = isinstance(m, nn.LayerNorm) and type(m).forward is nn.LayerNorm.forward and not node.kwargs
        return str(node.target) if ok and len(node.args) == 1 else None
    if node.op != "call_function" or node.target is not F.layer_norm:
        return None
    try:
        args = _LAYER_NORM_SIGNATURE.bind(*node.args, **node.kwargs).arguments
    except TypeError:
        return None
    names = {key: str(v.target) for key in ("weight", "bias")
             if isinstance(v := args.get(key), fx.Node) and v.op == "get_attr"}
    owners = {n.rpartition(".")[0] for n in names.values()}
    if len(owners) != 1 or any(isinstance(args.get(k), fx.Node) and k not in names for k in ("weight", "bias")):
        return None
    owner = owners.pop()
    try:
        m = model.get_submodule(owner)  # the traced module holds only placeholders on a get_attr's path
    except AttributeError:
        return None
    if not isinstance(m, nn.LayerNorm) or args.get("eps", 1e-5) != m.eps or \
            tuple(args.get("normalized_shape", ())) != tuple(m.normalized_shape):
        return None
    for key in ("weight", "bias"):
        if (key in names) != (getattr(m, key) is not None) or (key in names and names[key] != _join(owner, key)):
            return None
    return owner


def _channelwise(node: fx.Node, own: dict[str, str], shape: Any, space: dict[str, int | None],
                 block: dict[str, int], dims: dict[str, int] | None = None) -> tuple[fx.Node, str | None] | None:
    """``x * t``, ``x + t``, ``x / t`` (or ``t * x``...) of a feature map ``x`` and a tensor of the
    model's own ``t`` broadcast along x's channels (layer scale: ``(C, 1, 1)``, or ``(C,)`` viewed as
    ``(1, C, 1, 1)``; ``(C,)`` on channels-last values, whose channels are in the dim ``dims``
    records) or a single number: (x, the tensor's name; None for a single number), else None."""
    is_op = node.target in _CHANNELWISE_FUNCS if node.op == "call_function" else node.target in _CHANNELWISE_METHODS
    if not is_op or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    if b.name not in own and a.name in own and node.target in (operator.add, operator.mul, operator.iadd,
                                                                 operator.imul, torch.add, torch.mul):
        a, b = b, a  # t * x
    if b.name not in own or a.name in own or space.get(a.name) is None or block.get(a.name, 1) > 1:
        return None
    xs, ts, out = shape(a), shape(b), shape(node)
    if xs is None or ts is None or out != xs or len(xs) < 2 or len(ts) > len(xs):
        return None
    ts = (1,) * (len(xs) - len(ts)) + ts
    c = (dims or {}).get(a.name, 1)
    if any(d != 1 for i, d in enumerate(ts) if i != c) or ts[c] not in (1, xs[c]):
        return None
    return a, (own[b.name] if ts[c] > 1 else None)


def _broadcast_join(a: fx.Node, b: fx.Node, out: tuple[int, ...] | None, shape: Any, space: dict[str, int | None],
                    block: dict[str, int]) -> tuple[fx.Node, fx.Node] | None:
    """An elementwise op of two feature maps of different shapes, broadcast to ``out`` over the
    dims after the channels (the gate of a squeeze-and-excitation block: ``(N, C, 1, 1)`` times
    ``(N, C, H, W)``): the two maps whose spaces the output's is the union of — both if their
    channel counts are equal (their channels must be cut alike), the wider one twice if the other
    has one channel (it scales every channel alike) — else None. Both must be feature maps of the
    batch (not flattened into blocks)."""
    sa, sb = space.get(a.name), space.get(b.name)
    xa, xb = shape(a), shape(b)
    if sa is None or sb is None or xa is None or xb is None or out is None or block.get(a.name, 1) > 1 or \
            block.get(b.name, 1) > 1 or not len(xa) == len(xb) == len(out) or len(out) < 3 or \
            not xa[0] == xb[0] == out[0]:
        return None
    if any(d != max(da, db) or min(da, db) not in (1, d) for da, db, d in zip(xa[2:], xb[2:], out[2:])):
        return None
    if xa[1] == xb[1] == out[1]:
        return a, b
    if sorted((xa[1], xb[1])) == [1, out[1]]:
        wide = a if xa[1] == out[1] else b
        return wide, wide
    return None


def _op_name(node: fx.Node) -> str:
    """An op as a user reads it: ``batch_norm()``, ``.permute()``, ``.ndim``."""
    if node.op == "call_method":
        return f".{node.target}()"
    if node.target is getattr and len(node.args) > 1:
        return f".{node.args[1]}"
    return f"{getattr(node.target, '__name__', str(node.target))}()"


def _where(node: fx.Node, model: nn.Module) -> str:
    """The module whose forward made ``node``: its type and qualified name (fx's module stack)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return f"the forward of {type(model).__name__} (the model itself)"
    path, cls = list(stack.values())[-1]
    kind = cls if isinstance(cls, type) else type(model.get_submodule(path))
    return f"the forward of {kind.__name__} '{path}' ({kind.__module__}.{kind.__qualname__})"


def _reduces_spatial_only(node: fx.Node) -> bool:
    """A reduction like ``x.mean((2, 3))`` that keeps the batch and channel dims."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return False
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return all(isinstance(d, int) and d >= 2 for d in dims)


def _keeps_channels(src: tuple[int, ...] | None, dst: tuple[int, ...] | None) -> bool:
    """True if an op keeps the batch and channel dimensions, e.g. (N, C, H, W) -> (N, C, h, w) or
    (N, C); flattening (N, C, H, W) with H·W > 1 does not."""
    return src is not None and dst is not None and len(src) >= 2 and len(dst) >= 2 and src[:2] == dst[:2]


def _flattens_channels(src: tuple[int, ...] | None, dst: tuple[int, ...] | None) -> bool:
    """True for ``(N, C, H, W) -> (N, C·H·W)``: channel-major blocks of H·W columns."""
    return src is not None and dst is not None and len(src) >= 3 and len(dst) == 2 and \
        dst == (src[0], int(np.prod(src[1:])))


def describe(graph: DependencyGraph) -> list[dict[str, Any]]:
    """One row per group, for logs and ``ekg info``."""
    return [{"index": g.index, "name": g.name, "channels": g.channels, "blocks": g.blocks,
             "producers": len(g.producers), "mask_points": len(g.mask_nodes), "prunable": g.prunable,
             "reason": g.reason} for g in graph.groups]


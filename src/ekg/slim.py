"""Phase 4 of EKG: physically remove pruned channels ("slimming").

Given the channel groups of a model (:mod:`ekg.graph`) and, per group, the channels to keep,
:func:`slim_model` returns a smaller copy of the model that computes the same function as the
masked one (see the method doc, "What a mask does"):

* every conv producing a group keeps only the kept output channels (and bias entries);
* every BN over a group keeps only those channels' affine parameters and running statistics;
  every LayerNorm over a group's channels (ConvNeXt's) only their weight and bias, with
  ``normalized_shape`` the kept count;
* every conv/linear consuming a group keeps only the kept input channels (a linear reading a
  flattened ``(N, C, H, W)`` map keeps the H·W columns of each kept channel);
* every depthwise conv inside a group keeps only the kept filters (dim 0 of its weight) and its
  ``groups``/``in_channels``/``out_channels`` become the kept count;
* a grouped conv (G groups) keeps ``groups=G``: each of its G blocks of input (output) channels
  must keep as many channels, and the weight row of a kept output of block g keeps the columns of
  block g's kept inputs;
* every per-channel tensor of the model's own that the forward applies to a group (layer scale,
  ``x * self.gamma``) keeps only the kept channels' entries;
* every conv/linear weight that lost channels on either side is rescaled to its original
  Frobenius norm — the norm-preserving rescale of the masked forward pass, baked in
  (``W_sliced * ||W_full|| / ||W_sliced||``; biases are not rescaled).

Modules are changed in place on a deep copy, so subclasses (e.g. :class:`ekg.models.Conv2dSame`)
keep their class and forward; the copy is in the standard memory format whatever layout the search
ran in (a channels-last copy could not ``view`` a spatial map in the model's own forward). A CIFAR ResNet also gets a :class:`ekg.models.ResNetSpec` with its
new widths, so it reloads from a checkpoint without the original network.

:func:`check_equivalent` compares the slim model with a reference (the masked network) and raises
if they differ: a mismatch is a bug in ekg and must never pass silently.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .errors import EkgError
from .graph import ChannelGroup, DependencyGraph
from .masks import grouped_columns
from .models import ResNetSpec, build_model

KeepSpec = Mapping[int, torch.Tensor | Sequence[int]]


@dataclass(frozen=True)
class _Cut:
    """The channels of one group that survive, and the group's full width."""

    index: torch.Tensor
    channels: int


@dataclass
class _Plan:
    """Per module name, the cut of its output channels (producers), input channels (consumers) or
    BN channels (norms). A name absent from a map keeps that side whole."""

    outputs: dict[str, _Cut] = field(default_factory=dict)
    inputs: dict[str, _Cut] = field(default_factory=dict)
    norms: dict[str, _Cut] = field(default_factory=dict)
    depthwise: dict[str, _Cut] = field(default_factory=dict)
    tensors: dict[str, _Cut] = field(default_factory=dict)


# ----------------------------------------------------------------------------- public API

def keep_from_masks(masks: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Turn per-group channel masks (bool, or numeric 0/1) into sorted index tensors for
    :func:`slim_model`."""
    keep: dict[int, torch.Tensor] = {}
    for gi, mask in masks.items():
        m = torch.as_tensor(mask)
        if m.dim() != 1:
            raise EkgError(f"the mask of group {gi} must be 1-D (one entry per channel), got shape {tuple(m.shape)}")
        if m.dtype != torch.bool:
            if not bool(((m == 0) | (m == 1)).all()):
                raise EkgError(f"the mask of group {gi} must hold only 0 and 1 (or be a bool tensor)")
            m = m != 0
        keep[int(gi)] = torch.nonzero(m).flatten().cpu()
    return keep


def slim_model(model: nn.Module, graph: DependencyGraph, keep: KeepSpec) -> nn.Module:
    """A new, smaller copy of ``model`` keeping, for every group index ``gi`` in ``keep``, only the
    channels ``sorted(keep[gi])`` (an index sequence/tensor, or a bool mask of the group's width).

    ``graph`` must have been built from ``model`` (or a model of the same architecture). Only
    prunable groups may be cut; the input model is left untouched. Raises :class:`EkgError` for
    a non-prunable or unknown group, empty/out-of-range/duplicate indices, a grouped conv whose
    groups would keep different numbers of channels, or a graph that does not fit the model.
    """
    plan = _plan(graph, _normalise_keep(graph, keep))
    slim = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    modules = dict(slim.named_modules())
    for name in sorted(set(plan.outputs) | set(plan.inputs)):
        _slim_weighted(name, _module(modules, name), plan.outputs.get(name), plan.inputs.get(name))
    for name, cut in plan.norms.items():
        _slim_norm(name, _module(modules, name), cut)
    for name, cut in plan.depthwise.items():
        _slim_depthwise(name, _module(modules, name), cut)
    for name, cut in plan.tensors.items():
        owner, _, attr = name.rpartition(".")
        _slim_tensor(name, _module(modules, owner), attr, cut)
    if isinstance(getattr(slim, "spec", None), ResNetSpec):
        slim.spec = resnet_spec_from_modules(slim)
    return slim


def slim_widths(graph: DependencyGraph, slim: nn.Module) -> np.ndarray:
    """The width of every channel group of ``graph`` (the unpruned model's) in ``slim``, a slimmed
    copy of that model: each group's first producer's output channels there (the modules keep their
    names). Read this way rather than from ``slim``'s own graph, whose groups can differ (a
    depthwise conv cut to one channel is a plain conv)."""
    widths = graph.full_widths()
    for g in graph.groups:
        if not g.producers:
            continue
        try:
            m = slim.get_submodule(g.producers[0])
        except AttributeError:
            raise EkgError(f"the slim model has no layer '{g.producers[0]}': it is not this model slimmed") from None
        width = getattr(m, "out_channels", getattr(m, "out_features", None))
        if width is None:
            raise EkgError(f"layer '{g.producers[0]}' of the slim model is a {type(m).__name__}, not a conv or linear")
        widths[g.index] = int(width)
    return widths


def resnet_spec_from_modules(model: nn.Module) -> ResNetSpec:
    """The :class:`ResNetSpec` of a (possibly slimmed) CIFAR ResNet, read from its modules' actual
    widths; verified to rebuild a model with exactly the same state-dict shapes."""
    old = getattr(model, "spec", None)
    if not isinstance(old, ResNetSpec):
        raise EkgError(f"{type(model).__name__} is not a CIFAR ResNet (it has no ResNetSpec)")
    try:
        stages = [getattr(model, f"layer{s + 1}") for s in range(3)]
        stage_widths = [model.conv1.out_channels] + [stage[0].conv2.out_channels for stage in stages[1:]]
        block_widths = [[block.conv1.out_channels for block in stage] for stage in stages]
        num_classes = model.linear.out_features
    except (AttributeError, IndexError, TypeError) as e:
        raise EkgError(f"cannot read the widths of {type(model).__name__} as a CIFAR ResNet ({e})") from None
    spec = ResNetSpec(depth=old.depth, num_classes=num_classes, shortcut=old.shortcut, padding=old.padding,
                      stage_widths=stage_widths, block_widths=block_widths, family=old.family)
    _check_rebuilds(model, spec)
    return spec


def check_equivalent(reference: Callable[[torch.Tensor], torch.Tensor], slim: nn.Module, x: torch.Tensor, *,
                     rtol: float = 1e-4, atol: float = 1e-4) -> float:
    """Run ``reference`` (the masked network) and ``slim`` on ``x`` without gradients and return the
    largest absolute difference of their outputs; raise :class:`EkgError` if they are not
    ``torch.allclose(rtol, atol)`` (NaNs never match).

    Both run in whatever mode they are in. ``slim``'s buffers (BN running statistics) are restored
    afterwards, so a check in training mode leaves it unchanged; keeping ``reference`` free of such
    side effects is up to the caller."""
    saved = {name: buf.detach().clone() for name, buf in slim.named_buffers()}
    try:
        with torch.no_grad(), _full_float32():
            expected, actual = reference(x), slim(x)
    finally:
        _restore_buffers(slim, saved)
    if expected.shape != actual.shape:
        raise EkgError(f"the slimmed model's output has shape {tuple(actual.shape)}, the masked one's "
                       f"{tuple(expected.shape)} — this is a bug in ekg; please report it")
    expected, actual = expected.double(), actual.double()
    diff = float((expected - actual).abs().max()) if expected.numel() else 0.0
    # atol in units of the output's scale: float32 rounding grows with the logits' magnitude
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol * scale):
        raise EkgError(f"the slimmed model differs from the masked one by {diff:.3g} (max abs) — "
                       "this is a bug in ekg; please report it")
    return diff


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """TF32 off for convolutions and matrix products (CUDA's defaults use it for convolutions),
    so that the equivalence check compares float32 with float32 on a GPU too."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


# ----------------------------------------------------------------------------- validation and plan

def _normalise_keep(graph: DependencyGraph, keep: KeepSpec) -> dict[int, torch.Tensor]:
    """Validated, sorted int64 index tensors per group index."""
    out: dict[int, torch.Tensor] = {}
    for gi, indices in keep.items():
        group = _group(graph, gi)
        if not group.prunable:
            raise EkgError(f"group {group.index} ({group.name}) cannot be pruned: {group.reason}")
        out[group.index] = _indices(group, indices)
    return out


def _group(graph: DependencyGraph, gi: object) -> ChannelGroup:
    """The group with index ``gi`` (any integer type, not bool)."""
    index = -1
    if not isinstance(gi, bool):
        with contextlib.suppress(TypeError):
            index = operator.index(gi)
    if not 0 <= index < len(graph.groups):
        raise EkgError(f"unknown channel group {gi!r}; the model has groups 0..{len(graph.groups) - 1}")
    return graph.groups[index]


def _indices(group: ChannelGroup, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """``indices`` (a tensor, or any iterable of ints) as a sorted 1-D int64 tensor on the CPU,
    checked against the group's width. A bool tensor of the group's width is read as a mask."""
    where = f"group {group.index} ({group.name}, {group.channels} channels)"
    try:
        t = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(list(indices))
    except (TypeError, ValueError, RuntimeError):
        raise EkgError(f"the channels to keep for {where} must be a tensor or a sequence of ints") from None
    t = t.detach().cpu().flatten()
    if t.dtype == torch.bool:
        if t.numel() != group.channels:
            raise EkgError(f"the bool mask for {where} has {t.numel()} entries")
        t = torch.nonzero(t).flatten()
    if t.numel() == 0:
        raise EkgError(f"no channel kept for {where}; keep at least one")
    if t.is_floating_point() or t.is_complex():
        raise EkgError(f"the channels to keep for {where} must be integer indices, got {t.dtype}")
    unique = torch.unique(t.long())  # sorted
    if unique.numel() != t.numel():
        raise EkgError(f"the channels to keep for {where} contain duplicates")
    if int(unique[0]) < 0 or int(unique[-1]) >= group.channels:
        raise EkgError(f"channel index out of range for {where}: valid indices are 0..{group.channels - 1}")
    return unique


def _plan(graph: DependencyGraph, keep: Mapping[int, torch.Tensor]) -> _Plan:
    """Which side of which layer each kept group cuts."""
    plan = _Plan()
    in_blocks = {layer.name: layer.in_block for layer in graph.layers}
    for gi, index in keep.items():
        group = graph.groups[gi]
        cut = _Cut(index, group.channels)
        for side, names in ((plan.outputs, group.producers), (plan.norms, group.norms), (plan.inputs, group.consumers),
                            (plan.depthwise, group.depthwise), (plan.tensors, group.tensors)):
            for name in names:
                if name in side:
                    raise EkgError(f"layer '{name}' appears in two channel groups on the same side — the graph "
                                   "is inconsistent; this is a bug in ekg; please report it")
                b = in_blocks.get(name, 1) if side is plan.inputs else 1
                side[name] = cut if b == 1 else _Cut((index.view(-1, 1) * b + torch.arange(b)).flatten(),
                                                     group.channels * b)
    return plan


def _module(modules: Mapping[str, nn.Module], name: str) -> nn.Module:
    try:
        return modules[name]
    except KeyError:
        raise EkgError(f"the model has no layer '{name}'; was the graph built from another model?") from None


# ----------------------------------------------------------------------------- slicing

def _slim_weighted(name: str, m: nn.Module, out_cut: _Cut | None, in_cut: _Cut | None) -> None:
    """Slice a conv's/linear's weight (and bias) to the kept channels and rescale it to its
    original norm."""
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            _slim_grouped(name, m, out_cut, in_cut)
            return
        attrs = ("out_channels", "in_channels")
    elif isinstance(m, nn.Linear):
        attrs = ("out_features", "in_features")
    else:
        raise EkgError(f"layer '{name}' is a {type(m).__name__}; only Conv2d and Linear weights can be sliced")
    full = m.weight.detach()
    out_idx = _checked_index(name, full.shape[0], out_cut, "output", full.device)
    in_idx = _checked_index(name, full.shape[1], in_cut, "input", full.device)
    sliced = full if out_idx is None else full.index_select(0, out_idx)
    sliced = sliced if in_idx is None else sliced.index_select(1, in_idx)
    m.weight = nn.Parameter(_rescaled(sliced, full), requires_grad=m.weight.requires_grad)
    if out_idx is not None and m.bias is not None:
        m.bias = nn.Parameter(m.bias.detach()[out_idx].clone(), requires_grad=m.bias.requires_grad)
    setattr(m, attrs[0], int(sliced.shape[0]))
    setattr(m, attrs[1], int(sliced.shape[1]))


def _slim_grouped(name: str, m: nn.Conv2d, out_cut: _Cut | None, in_cut: _Cut | None) -> None:
    """Slice a grouped conv (``groups`` = G kept) to the kept channels, each of its G blocks of
    inputs and of outputs keeping as many; rescaled to the full kernel's norm."""
    full = m.weight.detach()
    out_idx = _even_blocks(name, m.groups, _checked_index(name, full.shape[0], out_cut, "output", full.device),
                           full.shape[0], "output")
    in_idx = _even_blocks(name, m.groups, _checked_index(name, m.in_channels, in_cut, "input", full.device),
                          m.in_channels, "input")
    sliced = full if out_idx is None else full.index_select(0, out_idx)
    if in_idx is not None:
        sliced = sliced.gather(1, grouped_columns(in_idx, m.groups, full.shape[1], sliced.shape[0], full.shape[2:]))
    m.weight = nn.Parameter(_rescaled(sliced, full), requires_grad=m.weight.requires_grad)
    if out_idx is not None and m.bias is not None:
        m.bias = nn.Parameter(m.bias.detach()[out_idx].clone(), requires_grad=m.bias.requires_grad)
    m.out_channels = int(sliced.shape[0])
    m.in_channels = int(sliced.shape[1]) * m.groups


def _even_blocks(name: str, groups: int, index: torch.Tensor | None, width: int, side: str) -> torch.Tensor | None:
    """``index``, after checking that it keeps as many of the ``width`` channels in each of the
    conv's ``groups`` equal blocks."""
    if index is None:
        return None
    counts = torch.bincount(index // (width // groups), minlength=groups)
    if bool((counts != counts[0]).any()):
        raise EkgError(f"layer '{name}' (a conv with groups={groups}) would keep {', '.join(map(str, counts.tolist()))} "
                       f"of the {width // groups} {side} channels of its {groups} groups: a grouped conv keeps the "
                       "same number in every group (its channel group is cut in equal blocks)")
    return index


def _slim_depthwise(name: str, m: nn.Module, cut: _Cut) -> None:
    """Keep the cut's filters of a depthwise conv (weight dim 0, bias), rescaled to the full
    kernel's norm; ``groups``, ``in_channels`` and ``out_channels`` become the kept count."""
    if not isinstance(m, nn.Conv2d) or not m.groups == m.in_channels == m.out_channels:
        raise EkgError(f"layer '{name}' is not a depthwise conv (groups = in = out channels); "
                       "was the graph built from another model?")
    full = m.weight.detach()
    index = _checked_index(name, full.shape[0], cut, "output", full.device)
    m.weight = nn.Parameter(_rescaled(full.index_select(0, index), full), requires_grad=m.weight.requires_grad)
    if m.bias is not None:
        m.bias = nn.Parameter(m.bias.detach()[index].clone(), requires_grad=m.bias.requires_grad)
    m.in_channels = m.out_channels = m.groups = int(index.numel())


def _rescaled(sliced: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``sliced * ||full|| / ||sliced||`` (a copy). An all-zero slice stays zero: there is no
    direction to scale, and it contributes nothing either way."""
    norm = sliced.norm()
    if norm == 0:
        return sliced.clone()
    return sliced * (full.norm() / norm)


def _slim_norm(name: str, m: nn.Module, cut: _Cut) -> None:
    """Keep only the cut's channels of a BatchNorm: affine parameters and running statistics
    (``num_batches_tracked`` is kept as is); of a LayerNorm, see :func:`_slim_layer_norm`."""
    if isinstance(m, nn.LayerNorm):
        _slim_layer_norm(name, m, cut)
        return
    if not isinstance(m, nn.modules.batchnorm._BatchNorm):
        raise EkgError(f"layer '{name}' is a {type(m).__name__}, not a BatchNorm or LayerNorm")
    device = next(iter(m.state_dict().values()), torch.empty(0)).device
    index = _checked_index(name, m.num_features, cut, "feature", device)
    for attr in ("weight", "bias"):
        p = getattr(m, attr)
        if p is not None:
            setattr(m, attr, nn.Parameter(p.detach()[index].clone(), requires_grad=p.requires_grad))
    for attr in ("running_mean", "running_var"):
        b = getattr(m, attr)
        if b is not None:
            setattr(m, attr, b[index].clone())
    m.num_features = int(index.numel())


def _slim_layer_norm(name: str, m: nn.LayerNorm, cut: _Cut) -> None:
    """Keep only the cut's channels of a LayerNorm over them: its weight and bias, and its
    ``normalized_shape`` becomes the kept count (its statistics are then over the kept channels,
    as the masked network's :class:`ekg.masks.MaskedLayerNorm` computes them)."""
    if len(m.normalized_shape) != 1:
        raise EkgError(f"layer '{name}' normalises over {tuple(m.normalized_shape)}, not one channel dim; "
                       "was the graph built from another model?")
    device = next(iter(m.state_dict().values()), torch.empty(0)).device
    index = _checked_index(name, m.normalized_shape[0], cut, "feature", device)
    for attr in ("weight", "bias"):
        p = getattr(m, attr)
        if p is not None:
            setattr(m, attr, nn.Parameter(p.detach().index_select(0, index).clone(), requires_grad=p.requires_grad))
    m.normalized_shape = (int(index.numel()),)


def _slim_tensor(name: str, m: nn.Module, attr: str, cut: _Cut) -> None:
    """Keep the cut's entries of a per-channel parameter or buffer (its one dim of more than one
    entry: ``(C,)``, ``(C, 1, 1)``, ``(1, C, 1, 1)``)."""
    t = getattr(m, attr, None)
    dims = [d for d, n in enumerate(t.shape) if n != 1] if isinstance(t, torch.Tensor) else []
    if len(dims) != 1:
        raise EkgError(f"'{name}' is not a per-channel tensor of the model; was the graph built from another model?")
    index = _checked_index(name, t.shape[dims[0]], cut, "channel", t.device)
    sliced = t.detach().index_select(dims[0], index).clone()
    if isinstance(t, nn.Parameter):
        setattr(m, attr, nn.Parameter(sliced, requires_grad=t.requires_grad))
    elif attr in m._buffers:
        m._buffers[attr] = sliced
    else:
        setattr(m, attr, sliced)


def _checked_index(name: str, width: int, cut: _Cut | None, side: str, device: torch.device) -> torch.Tensor | None:
    """The cut's index on ``device``, after checking that the layer has the group's width."""
    if cut is None:
        return None
    if width != cut.channels:
        raise EkgError(f"layer '{name}' has {width} {side} channels but its channel group has {cut.channels}; "
                       "was the graph built from another model?")
    return cut.index.to(device)


# ----------------------------------------------------------------------------- helpers

def _check_rebuilds(model: nn.Module, spec: ResNetSpec) -> None:
    """Raise unless ``build_model(spec)`` has exactly ``model``'s state-dict keys and shapes."""
    want = {k: tuple(v.shape) for k, v in build_model(spec).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != have:
        diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        raise EkgError(f"the ResNet's layer widths are inconsistent: a model built from its widths differs in "
                       f"{len(diff)} tensors (first: {diff[0]} {have.get(diff[0])} vs {want.get(diff[0])}); "
                       "if ekg slimmed it, the graph was built from another model or this is a bug in ekg")


def _restore_buffers(model: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Copy ``saved`` (from :meth:`nn.Module.named_buffers`) back into ``model``'s buffers."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in saved and saved[name].shape == buf.shape:
                buf.copy_(saved[name])

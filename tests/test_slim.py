"""Slimming (phase 4): the slim network computes exactly what the masked network computes.

The masked network is written out here by hand from the method doc ("What a mask does"), without
any other ekg module: every conv/linear weight becomes ``(W ⊙ M) · ‖W‖ / ‖W ⊙ M‖`` with ``M`` the
outer product of its output-group and input-group masks, and each group's mask multiplies the
activations at its mask points (a block's inner ReLU; a stage stream after the stem's ReLU and after
every block's add+ReLU).

Equivalence is checked in float64: in eval mode BN does not renormalise, so a randomly initialised
network with random running statistics, once masked and rescaled, reaches activations of 1e3 or
more, where float32 rounding alone exceeds 1e-4 in absolute terms. float64 isolates the algebra
of slimming; float32 is checked with ``check_equivalent``'s relative tolerance.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ekg import flops
from ekg.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ekg.errors import EkgError
from ekg.graph import DependencyGraph, build_graph
from ekg.models import CifarResNet, Conv2dSame, create_model
from ekg.slim import check_equivalent, keep_from_masks, resnet_spec_from_modules, slim_model

Masks = dict[int, torch.Tensor]


# ----------------------------------------------------------------------------- the reference

@dataclass
class Roles:
    """Group index of each structural role of a CIFAR ResNet."""

    streams: list[int]         # stage s's residual stream
    inner: list[list[int]]     # block j of stage s's inner width


def resnet_roles(model: CifarResNet, graph: DependencyGraph) -> Roles:
    """Map roles to group indices by one conv that must write each group."""
    by_producer = {p: g.index for g in graph.groups for p in g.producers}
    streams = [by_producer[n] for n in ("conv1", "layer2.0.conv2", "layer3.0.conv2")]
    inner = [[by_producer[f"layer{s + 1}.{j}.conv1"] for j in range(len(stage))]
             for s, stage in enumerate(blocks_by_stage(model))]
    return Roles(streams, inner)


def blocks_by_stage(model: CifarResNet) -> list[nn.Sequential]:
    return [model.layer1, model.layer2, model.layer3]


def iter_blocks(model: CifarResNet) -> Iterator[tuple[int, int, nn.Module]]:
    for s, stage in enumerate(blocks_by_stage(model)):
        for j, block in enumerate(stage):
            yield s, j, block


def masked_weight(w: torch.Tensor, out_mask: torch.Tensor | None, in_mask: torch.Tensor | None) -> torch.Tensor:
    """``(W ⊙ M) · ‖W‖ / ‖W ⊙ M‖``, M = out_mask ⊗ in_mask (all ones where None)."""
    if out_mask is None and in_mask is None:
        return w
    m = torch.ones_like(w)
    if out_mask is not None:
        m = m * out_mask.to(w).view(-1, *[1] * (w.dim() - 1))
    if in_mask is not None:
        m = m * in_mask.to(w).view(1, -1, *[1] * (w.dim() - 2))
    wm = w * m
    return wm * (w.norm() / wm.norm())


def masked_resnet(model: CifarResNet, graph: DependencyGraph, masks: Masks) -> Callable[[torch.Tensor], torch.Tensor]:
    """The masked forward pass of a CIFAR ResNet, on a private copy of the model."""
    ref = copy.deepcopy(model)
    roles = resnet_roles(ref, graph)

    def stream(s: int) -> torch.Tensor | None:
        return masks.get(roles.streams[s])

    def inner(s: int, j: int) -> torch.Tensor | None:
        return masks.get(roles.inner[s][j])

    def set_weight(m: nn.Module, out_mask: torch.Tensor | None, in_mask: torch.Tensor | None) -> None:
        with torch.no_grad():
            m.weight.copy_(masked_weight(m.weight, out_mask, in_mask))

    set_weight(ref.conv1, stream(0), None)
    for s, j, block in iter_blocks(ref):
        block_in = stream(s - 1 if (j == 0 and s > 0) else s)
        set_weight(block.conv1, inner(s, j), block_in)
        set_weight(block.conv2, stream(s), inner(s, j))
        if isinstance(block.shortcut, nn.Sequential):
            set_weight(block.shortcut[0], stream(s), block_in)
    set_weight(ref.linear, None, stream(2))

    def apply(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return x if mask is None else x * mask.to(x).view(1, -1, 1, 1)

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = apply(F.relu(ref.bn1(ref.conv1(x))), stream(0))
        for s, j, block in iter_blocks(ref):
            y = apply(F.relu(block.bn1(block.conv1(h))), inner(s, j))
            y = block.bn2(block.conv2(y))
            h = apply(F.relu(y + block.shortcut(h)), stream(s))
        return ref.linear(F.adaptive_avg_pool2d(h, 1).flatten(1))

    return forward


# ----------------------------------------------------------------------------- helpers

def randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN affine parameters and running statistics, and a non-zero linear bias."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            elif isinstance(m, nn.Linear):
                m.bias.copy_(torch.randn(m.out_features, generator=gen))


def random_masks(graph: DependencyGraph, groups: list[int], gen: torch.Generator) -> Masks:
    """A random number (>= 1) of randomly placed kept channels per group."""
    masks = {}
    for gi in groups:
        c = graph.groups[gi].channels
        k = int(torch.randint(1, c + 1, (1,), generator=gen))
        mask = torch.zeros(c, dtype=torch.bool)
        mask[torch.randperm(c, generator=gen)[:k]] = True
        masks[gi] = mask
    return masks


def resnet(name: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[CifarResNet, DependencyGraph]:
    """A registry ResNet with random BN parameters/statistics, and its graph."""
    model = create_model(name, seed=seed).to(dtype)
    randomise_bn(model, torch.Generator().manual_seed(seed))
    return model, build_graph(model)


def inputs(n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=gen, dtype=dtype)


def prunable(graph: DependencyGraph) -> list[int]:
    return [g.index for g in graph.prunable]


def stream_groups(graph: DependencyGraph) -> list[int]:
    return [g.index for g in graph.groups if len(g.producers) > 1]


def inner_groups(graph: DependencyGraph) -> list[int]:
    return [g.index for g in graph.groups if len(g.producers) == 1 and g.mask_nodes]


def output_scale(model: nn.Module, x: torch.Tensor) -> float:
    """The largest output magnitude (at least 1), to state a tolerance relative to it."""
    with torch.no_grad():
        return max(1.0, float(model(x).abs().max()))


def widths_of(graph: DependencyGraph, masks: Masks) -> list[int]:
    widths = graph.full_widths()
    for gi, mask in masks.items():
        widths[gi] = int(mask.sum())
    return widths.tolist()


@pytest.fixture(scope="module")
def r20() -> tuple[CifarResNet, DependencyGraph]:
    """A shared resnet20 in eval mode (tests must not change it)."""
    model, graph = resnet("resnet20")
    return model.eval(), graph


# ----------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["resnet20", "resnet20_tf"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slim_equals_masked_reference(name, seed, train):
    model, graph = resnet(name, seed)
    model.train(train)
    gen = torch.Generator().manual_seed(100 + seed)
    masks = random_masks(graph, prunable(graph), gen)
    slim = slim_model(model, graph, keep_from_masks(masks))
    assert check_equivalent(masked_resnet(model, graph, masks), slim, inputs(8, gen)) <= 1e-4
    assert slim.training == train


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_slim_equals_masked_reference_in_float32(train):
    model, graph = resnet("resnet20", 12, torch.float32)
    model.train(train)
    gen = torch.Generator().manual_seed(13)
    masks = random_masks(graph, prunable(graph), gen)
    slim = slim_model(model, graph, keep_from_masks(masks))
    x = inputs(8, gen, torch.float32)
    diff = check_equivalent(masked_resnet(model, graph, masks), slim, x)
    with torch.no_grad():
        assert diff <= 1e-5 * float(slim(x).abs().max())


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_slim_option_a_inner_groups(train):
    model, graph = resnet("resnet20_a", 3)
    model.train(train)
    gen = torch.Generator().manual_seed(7)
    assert sorted(prunable(graph)) == sorted(inner_groups(graph))
    masks = random_masks(graph, inner_groups(graph), gen)
    slim = slim_model(model, graph, keep_from_masks(masks))
    assert check_equivalent(masked_resnet(model, graph, masks), slim, inputs(8, gen)) <= 1e-4
    for gi in stream_groups(graph):
        with pytest.raises(EkgError, match="ZeroPadShortcut"):
            slim_model(model, graph, {gi: [0]})


@pytest.mark.parametrize("which", ["streams", "inner", "one_channel"])
def test_slim_extremes(r20, which):
    model, graph = r20
    if which == "one_channel":
        masks = {gi: torch.arange(graph.groups[gi].channels) == 0 for gi in prunable(graph)}
    else:
        groups = stream_groups(graph) if which == "streams" else inner_groups(graph)
        masks = random_masks(graph, groups, torch.Generator().manual_seed(5))
    slim = slim_model(model, graph, keep_from_masks(masks))
    x = inputs(4, torch.Generator().manual_seed(6))
    diff = check_equivalent(masked_resnet(model, graph, masks), slim, x)
    assert diff <= 1e-12 * output_scale(slim, x)  # activations explode when almost everything is cut


def test_deeper_resnet_equivalence():
    model, graph = resnet("resnet56", 4)
    model.eval()
    gen = torch.Generator().manual_seed(9)
    masks = random_masks(graph, prunable(graph), gen)
    slim = slim_model(model, graph, keep_from_masks(masks))
    x = inputs(2, gen)
    diff = check_equivalent(masked_resnet(model, graph, masks), slim, x)
    assert diff <= 1e-12 * output_scale(slim, x)  # 55 layers of rescaling: outputs reach ~1e12


class PlainNet(nn.Module):
    """A non-ResNet: conv-BN-ReLU, conv(bias)-BN-ReLU, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 12, 3, padding=1, stride=2), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def masked_plain(model: PlainNet, m1: torch.Tensor, m2: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.c1.weight.copy_(masked_weight(ref.c1.weight, m1, None))
        ref.c2.weight.copy_(masked_weight(ref.c2.weight, m2, m1))
        ref.fc.weight.copy_(masked_weight(ref.fc.weight, None, m2))

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = F.relu(ref.b1(ref.c1(x))) * m1.to(x).view(1, -1, 1, 1)
        x = F.relu(ref.b2(ref.c2(x))) * m2.to(x).view(1, -1, 1, 1)
        return ref.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    return forward


def test_slim_generic_model_with_conv_bias():
    torch.manual_seed(0)
    model = PlainNet().double()
    randomise_bn(model, torch.Generator().manual_seed(1))
    model.eval()
    graph = build_graph(model, (3, 16, 16))
    g1, g2 = (next(g.index for g in graph.groups if g.producers == [n]) for n in ("c1", "c2"))
    m1 = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    m2 = torch.arange(12) % 3 == 1
    slim = slim_model(model, graph, {g1: m1, g2: torch.nonzero(m2).flatten().tolist()})
    assert (slim.c1.out_channels, slim.c2.in_channels, slim.c2.out_channels, slim.fc.in_features) == (4, 4, 4, 4)
    assert torch.equal(slim.c2.bias, model.c2.bias[m2])  # biases are sliced, not rescaled
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    assert check_equivalent(masked_plain(model, m1, m2), slim, x) <= 1e-4


# ----------------------------------------------------------------------------- structure

@pytest.mark.parametrize("name", ["resnet20", "resnet20_a", "resnet20_tf", "resnet32"])
@pytest.mark.parametrize("bn_ops", [False, True])
def test_counted_cost_equals_analytic_cost(name, bn_ops):
    model, graph = resnet(name, 11)
    for seed in range(3):
        masks = random_masks(graph, prunable(graph), torch.Generator().manual_seed(seed))
        slim = slim_model(model, graph, keep_from_masks(masks))
        counted = flops.count(slim, bn_ops=bn_ops)
        assert (counted.flops, counted.params) == graph.cost(widths_of(graph, masks), bn_ops=bn_ops)


def test_rescale_preserves_norms_and_leaves_untouched_layers(r20):
    model, graph = r20
    inner = inner_groups(graph)[0]
    stream = stream_groups(graph)[-1]
    slim = slim_model(model, graph, {inner: [1, 3, 4], stream: list(range(0, 64, 2))})
    full, small = dict(model.named_modules()), dict(slim.named_modules())
    changed = set(graph.groups[inner].producers + graph.groups[inner].consumers
                  + graph.groups[stream].producers + graph.groups[stream].consumers)
    assert "linear" in changed and len(changed) == 2 + 4 + 3  # inner: conv1, conv2; stream: 4 writers, 3 readers
    for name, m in full.items():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if name in changed:
            assert small[name].weight.shape != m.weight.shape
            torch.testing.assert_close(small[name].weight.norm(), m.weight.norm(), rtol=1e-6, atol=0)
        else:
            assert torch.equal(small[name].weight, m.weight)
    assert torch.equal(slim.linear.bias, model.linear.bias)
    conv = graph.groups[inner].producers[0]
    w = full[conv].weight.detach()[[1, 3, 4]]
    torch.testing.assert_close(small[conv].weight, w * (full[conv].weight.norm() / w.norm()))


def test_input_model_untouched_and_modules_keep_their_class():
    model, graph = resnet("resnet20_tf", 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec_before = copy.deepcopy(model.spec)
    masks = random_masks(graph, prunable(graph), torch.Generator().manual_seed(0))
    slim = slim_model(model, graph, keep_from_masks(masks))
    assert slim is not model and model.spec == spec_before
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert type(slim.layer2[0].conv1) is Conv2dSame and type(slim.layer1[0].conv1) is nn.Conv2d
    bn = slim.layer1[0].bn1
    assert bn.num_features == bn.weight.numel() == bn.running_var.numel()
    assert int(bn.num_batches_tracked) == int(model.layer1[0].bn1.num_batches_tracked)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in slim.parameters())


def test_spec_from_modules_and_checkpoint_round_trip(tmp_path):
    model, graph = resnet("resnet20", 0, torch.float32)
    model.eval()
    assert resnet_spec_from_modules(model) == model.spec
    masks = random_masks(graph, prunable(graph), torch.Generator().manual_seed(3))
    slim = slim_model(model, graph, keep_from_masks(masks)).eval()
    spec = slim.spec
    assert spec.stage_widths == [int(masks[gi].sum()) for gi in resnet_roles(model, graph).streams]
    assert spec.block_widths == [[int(masks[gi].sum()) for gi in stage] for stage in resnet_roles(model, graph).inner]
    norm = {"name": "cifar10", "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}
    path = save_checkpoint(Checkpoint(model=slim, normalization=norm), tmp_path / "slim.pt")
    loaded = load_checkpoint(path)
    assert loaded.spec == spec and loaded.arch == "resnet20 (pruned)"
    x = inputs(4, torch.Generator().manual_seed(0), torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), slim(x))


def test_spec_from_modules_rejects_other_models():
    with pytest.raises(EkgError, match="not a CIFAR ResNet"):
        resnet_spec_from_modules(PlainNet())


# ----------------------------------------------------------------------------- errors

def test_non_prunable_groups_are_refused(r20):
    model, graph = r20
    for g in graph.groups:
        if not g.prunable:
            with pytest.raises(EkgError, match=f"group {g.index} .*cannot be pruned: {g.reason}"):
                slim_model(model, graph, {g.index: [0]})


@pytest.mark.parametrize("keep,match", [
    ([], "no channel kept"),
    (torch.zeros(16, dtype=torch.bool), "no channel kept"),
    ([0, 16], "out of range"),
    ([-1, 2], "out of range"),
    ([1, 1], "duplicates"),
    ([0.0, 1.0], "integer"),
    (torch.ones(15, dtype=torch.bool), "15 entries"),
])
def test_bad_keep_indices(r20, keep, match):
    model, graph = r20
    gi = inner_groups(graph)[0]
    assert graph.groups[gi].channels == 16
    with pytest.raises(EkgError, match=match):
        slim_model(model, graph, {gi: keep})


@pytest.mark.parametrize("gi", [-1, 14, 99, "1"])
def test_unknown_group(r20, gi):
    model, graph = r20
    with pytest.raises(EkgError, match="unknown channel group"):
        slim_model(model, graph, {gi: [0]})


def test_graph_of_another_model_is_refused(r20):
    _, graph = r20
    other = create_model("resnet20", stage_widths=[8, 32, 64])
    with pytest.raises(EkgError, match="another model"):
        slim_model(other, graph, {stream_groups(graph)[0]: [0, 1]})


def test_graph_of_a_deeper_resnet_is_caught_by_the_spec_check(r20):
    _, graph = r20
    deeper = create_model("resnet32").double()
    with pytest.raises(EkgError, match="layer widths are inconsistent"):
        slim_model(deeper, graph, {stream_groups(graph)[0]: [0, 1]})


def test_keep_accepts_numpy_group_indices_and_index_sets(r20):
    model, graph = r20
    gi = inner_groups(graph)[0]
    slim = slim_model(model, graph, {np.int64(gi): {5, 1, 3}})
    assert slim.layer1[0].conv1.out_channels == 3 and slim.spec.block_widths[0][0] == 3


class DepthwiseFlat(nn.Module):
    """conv-BN-ReLU, depthwise conv(bias)-BN-ReLU, flatten of a 4x4 map, linear-ReLU, linear: the
    depthwise conv carries c1's group and fc1 reads it in blocks of 16 columns; fc1's outputs are a
    group of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.b2 = nn.Conv2d(8, 8, 3, padding=1, stride=4, groups=8), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 6), nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.dw(x)))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def masked_depthwise_flat(model: DepthwiseFlat, m1: torch.Tensor, m2: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """By the method doc: a depthwise kernel connects channel c to channel c only, so its mask is
    m1 on its filters; fc1's input mask repeats each channel's entry over its 16 columns."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.c1.weight.copy_(masked_weight(ref.c1.weight, m1, None))
        ref.dw.weight.copy_(masked_weight(ref.dw.weight, m1, None))
        ref.fc1.weight.copy_(masked_weight(ref.fc1.weight, m2, m1.repeat_interleave(16)))
        ref.fc2.weight.copy_(masked_weight(ref.fc2.weight, None, m2))

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = F.relu(ref.b1(ref.c1(x))) * m1.to(x).view(1, -1, 1, 1)
        x = F.relu(ref.b2(ref.dw(x))) * m1.to(x).view(1, -1, 1, 1)
        return ref.fc2(F.relu(ref.fc1(torch.flatten(x, 1))) * m2.to(x))

    return forward


def test_slim_depthwise_conv_and_blocked_linear():
    torch.manual_seed(0)
    model = DepthwiseFlat().double()
    randomise_bn(model, torch.Generator().manual_seed(1))
    model.eval()
    graph = build_graph(model, (3, 16, 16))
    g1, g2 = (next(g.index for g in graph.groups if g.producers == [n]) for n in ("c1", "fc1"))
    assert graph.groups[g1].depthwise == ["dw"] and graph.groups[g2].prunable
    m1 = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    m2 = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.bool)
    slim = slim_model(model, graph, {g1: m1, g2: m2})
    assert (slim.dw.in_channels, slim.dw.out_channels, slim.dw.groups) == (4, 4, 4)
    assert tuple(slim.dw.weight.shape) == (4, 1, 3, 3) and torch.equal(slim.dw.bias, model.dw.bias[m1])
    assert (slim.fc1.in_features, slim.fc1.out_features, slim.fc2.in_features) == (64, 3, 3)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    assert check_equivalent(masked_depthwise_flat(model, m1, m2), slim, x, atol=1e-8) <= 1e-8
    # ekg's masked network computes the same function, full width and sliced.
    from ekg.masks import MaskedNetwork

    net = MaskedNetwork(model, graph)
    for gate, gm in zip(net.gates, net.masks):
        gm.set(m1 if gate.group.index == g1 else m2)
    for sliced in (False, True):
        net.set_sliced(sliced)
        assert check_equivalent(net, slim, x, atol=1e-8) <= 1e-8
    assert graph.cost([w if i not in (g1, g2) else (4 if i == g1 else 3) for i, w in enumerate(graph.full_widths())],
                      bn_ops=True) == (flops.count(slim, (3, 16, 16), bn_ops=True).flops, flops.count(slim, (3, 16, 16)).params)


def test_a_conv_with_groups_the_graph_did_not_see_is_refused():
    """A conv replaced after the graph was built by a depthwise one (groups 8): cutting 2 of its 8
    inputs would leave 6 of its groups without input (tests/test_grouped.py: grouped convs)."""
    model = PlainNet()
    graph = build_graph(model, (3, 16, 16))
    g1 = next(g.index for g in graph.groups if g.producers == ["c1"])
    model.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # same name, now depthwise
    with pytest.raises(EkgError, match=r"layer 'c2' \(a conv with groups=8\) would keep 1, 1, 0, 0, 0, 0, 0, 0 of"):
        slim_model(model, graph, {g1: [0, 1]})


# ----------------------------------------------------------------------------- masks and checks

def test_keep_from_masks():
    keep = keep_from_masks({2: torch.tensor([False, True, True, False]), 5: torch.tensor([1.0, 0.0, 1.0])})
    assert torch.equal(keep[2], torch.tensor([1, 2])) and torch.equal(keep[5], torch.tensor([0, 2]))
    with pytest.raises(EkgError, match="only 0 and 1"):
        keep_from_masks({0: torch.tensor([0.5, 1.0])})
    with pytest.raises(EkgError, match="1-D"):
        keep_from_masks({0: torch.ones(2, 2, dtype=torch.bool)})


def test_check_equivalent_raises_on_a_broken_slim_model(r20):
    model, graph = r20
    masks = random_masks(graph, prunable(graph), torch.Generator().manual_seed(8))
    slim = slim_model(model, graph, keep_from_masks(masks))
    reference = masked_resnet(model, graph, masks)
    x = inputs(4, torch.Generator().manual_seed(0))
    assert check_equivalent(reference, slim, x) <= 1e-4
    with torch.no_grad():
        slim.layer2[1].conv1.weight[0] += 0.5
    with pytest.raises(EkgError, match=r"differs from the masked one by .* \(max abs\) — this is a bug in ekg"):
        check_equivalent(reference, slim, x)
    with pytest.raises(EkgError, match="bug in ekg"):
        check_equivalent(lambda t: torch.full((4, 10), float("nan"), dtype=t.dtype), slim, x)
    with pytest.raises(EkgError, match="shape"):
        check_equivalent(lambda t: torch.zeros(4, 9, dtype=t.dtype), slim, x)


def test_check_equivalent_leaves_train_mode_statistics_alone(r20):
    model, graph = r20
    slim = slim_model(model, graph, {inner_groups(graph)[0]: [0, 1]}).train()
    before = {k: v.clone() for k, v in slim.state_dict().items()}
    check_equivalent(slim, slim, inputs(4, torch.Generator().manual_seed(0)))
    assert all(torch.equal(before[k], v) for k, v in slim.state_dict().items())


def test_masks_live_on_the_models_device():
    """A model on another device gets its masks and score buffers there ('meta' stands in for a
    GPU here: before this, masks were made on the CPU and a CUDA search failed at its first forward)."""
    from ekg.masks import MaskedNetwork

    net = MaskedNetwork(create_model("resnet20", 10).to("meta"))
    assert {g.mask.device.type for g in net.masks} == {"meta"}
    assert {g.score.device.type for g in net.masks} == {"meta"}

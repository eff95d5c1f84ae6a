"""The dependency graph: channel groups of the built-in ResNets and of small custom models, and
the analytic cost formula against the hook-based counter."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ekg import flops
from ekg.graph import DependencyGraph, build_graph, describe
from ekg.models import ResNetSpec, build_model, create_model, model_names


def groups_by_producer(graph: DependencyGraph) -> dict[str, int]:
    return {p: g.index for g in graph.groups for p in g.producers}


def stream_indices(graph: DependencyGraph) -> list[int]:
    """Group index of each stage's residual stream, found by a conv that writes it."""
    by_producer = groups_by_producer(graph)
    return [by_producer[n] for n in ("conv1", "layer2.0.conv2", "layer3.0.conv2")]


def inner_indices(graph: DependencyGraph, blocks: int) -> list[list[int]]:
    by_producer = groups_by_producer(graph)
    return [[by_producer[f"layer{s + 1}.{j}.conv1"] for j in range(blocks)] for s in range(3)]


def counted(model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32), bn_ops: bool = False) -> tuple[int, int]:
    c = flops.count(model, input_size, bn_ops=bn_ops)
    return c.flops, c.params


@pytest.fixture(scope="module")
def r56() -> DependencyGraph:
    return build_graph(create_model("resnet56"))


@pytest.fixture(scope="module")
def r56_a() -> DependencyGraph:
    return build_graph(create_model("resnet56_a"))


# ----------------------------------------------------------------------------- built-in ResNets

@pytest.mark.parametrize("name", ["resnet56", "resnet56_tf"])
def test_resnet56_projection_groups(name):
    graph = build_graph(create_model(name))
    assert len(graph.groups) == 1 + 3 + 27 + 1  # input, 3 streams, 27 block-internal, logits
    assert len(graph.prunable) == 30
    streams = [graph.groups[i] for i in stream_indices(graph)]
    assert [len(g.producers) for g in streams] == [10, 10, 10]  # stem / a shortcut conv + 9 block outputs
    assert [len(g.mask_nodes) for g in streams] == [10, 9, 9]  # stem + 9 blocks; 9 block outputs
    assert [len(g.norms) for g in streams] == [10, 10, 10]
    assert [g.channels for g in streams] == [16, 32, 64]
    assert "layer2.0.shortcut.0" in streams[1].producers and "layer1.0.conv1" in streams[0].consumers
    assert streams[2].consumers[-1] == "linear" and len(streams[2].consumers) == 8 + 1
    for s, stage in enumerate(inner_indices(graph, 9)):
        for j, gi in enumerate(stage):
            g = graph.groups[gi]
            assert g.prunable and g.producers == [f"layer{s + 1}.{j}.conv1"]
            assert g.consumers == [f"layer{s + 1}.{j}.conv2"] and g.norms == [f"layer{s + 1}.{j}.bn1"]
            assert len(g.mask_nodes) == 1


def test_mask_points_are_relus(r56):
    nodes = {n.name: n for n in r56.gm.graph.nodes}
    for g in r56.prunable:
        for name in g.mask_nodes:
            assert nodes[name].target in (F.relu, torch.relu), (g.name, name)
    # A stream's block mask point is the ReLU of the block's addition.
    stream = r56.groups[stream_indices(r56)[1]]
    adds = [nodes[name].args[0] for name in stream.mask_nodes]
    assert all(a.target in (operator.add, torch.add) for a in adds)


def test_option_a_streams_are_frozen(r56_a):
    graph = r56_a
    assert len(graph.groups) == 32 and len(graph.prunable) == 27
    streams = [graph.groups[i] for i in stream_indices(graph)]
    assert [len(g.producers) for g in streams] == [10, 9, 9]  # no shortcut convs
    for g in streams:
        assert not g.prunable and "ZeroPadShortcut" in g.reason
    assert all(len(graph.groups[gi].producers) == 1 for stage in inner_indices(graph, 9) for gi in stage)


@pytest.mark.parametrize("name", ["resnet20", "resnet20_a", "resnet20_tf"])
def test_input_and_logits_groups_are_not_prunable(name):
    graph = build_graph(create_model(name))
    first, last = graph.groups[0], graph.groups[-1]
    assert not first.prunable and "input" in first.reason and first.channels == 3
    assert first.consumers == ["conv1"]
    assert not last.prunable and "linear" in last.reason and last.channels == 10
    rows = describe(graph)
    assert [r["index"] for r in rows] == list(range(len(graph.groups)))


@pytest.mark.parametrize("name", model_names())
def test_full_cost_equals_counter_for_every_registry_model(name):
    model = create_model(name)
    graph = build_graph(model)
    for bn_ops in (False, True):
        assert graph.cost(graph.full_widths(), bn_ops=bn_ops) == counted(model, bn_ops=bn_ops)


def _random_spec_widths(spec: ResNetSpec, gen: torch.Generator, streams: bool) -> tuple[list[int], list[list[int]]]:
    """Random widths within the spec's; option-A streams stay non-decreasing (zero-padding
    shortcuts cannot shrink channels)."""
    def draw(w: int) -> int:
        return int(torch.randint(1, w + 1, (1,), generator=gen))

    stage = [draw(w) for w in spec.stage_widths] if streams else list(spec.stage_widths)
    if spec.shortcut == "A":
        stage = sorted(stage)
    blocks = [[draw(w) for w in ws] for ws in spec.block_widths]
    return stage, blocks


@pytest.mark.parametrize("name", ["resnet20", "resnet32_tf", "resnet20_a", "resnet56"])
def test_cost_of_random_widths_equals_a_model_built_with_them(name):
    """The analytic formula against a real network of those widths, built from its spec."""
    model = create_model(name)
    graph = build_graph(model)
    gen = torch.Generator().manual_seed(len(name))
    for _ in range(3):
        stage, blocks = _random_spec_widths(model.spec, gen, streams=True)
        widths = graph.full_widths()
        for gi, w in zip(stream_indices(graph), stage):
            widths[gi] = w
        for stage_groups, stage_widths in zip(inner_indices(graph, model.spec.blocks_per_stage), blocks):
            for gi, w in zip(stage_groups, stage_widths):
                widths[gi] = w
        small = build_model(ResNetSpec(**{**model.spec.to_dict(), "stage_widths": stage, "block_widths": blocks}))
        for bn_ops in (False, True):
            assert graph.cost(widths, bn_ops=bn_ops) == counted(small, bn_ops=bn_ops)


# ----------------------------------------------------------------------------- custom models

class Chain(nn.Module):
    """conv-BN-ReLU, conv-BN-ReLU, global pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.b1(self.c1(x)))
        x = self.act(self.b2(self.c2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Residual(nn.Module):
    """A stem and one residual unit whose addition couples two convs into one stream."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bs = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c1, self.b1 = nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bs(self.stem(x)))
        h = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(h)) + x)
        return self.fc(x.mean((2, 3)))


class ViewFlatten(nn.Module):
    """Flattens a spatial map with ``view`` into the linear layer: the last conv's channels are
    interleaved with positions, so they cannot be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.view(x.size(0), -1))


SMALL = (3, 8, 8)


def test_chain_model():
    graph = build_graph(Chain(), SMALL)
    assert [g.channels for g in graph.groups] == [3, 8, 12, 5]
    assert [g.prunable for g in graph.groups] == [False, True, True, False]
    g1, g2 = graph.groups[1], graph.groups[2]
    assert (g1.producers, g1.norms, g1.consumers) == (["c1"], ["b1"], ["c2"])
    assert (g2.producers, g2.norms, g2.consumers) == (["c2"], ["b2"], ["fc"])
    assert len(g1.mask_nodes) == len(g2.mask_nodes) == 1
    for bn_ops in (False, True):
        assert graph.cost(graph.full_widths(), bn_ops=bn_ops) == counted(Chain(), SMALL, bn_ops)
    # Cutting the groups matches a chain built that narrow.
    small = Chain()
    small.c1, small.b1 = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)
    small.c2, small.b2 = nn.Conv2d(5, 7, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(7)
    small.fc = nn.Linear(7, 5)
    assert graph.cost([3, 5, 7, 5], bn_ops=True) == counted(small, SMALL, bn_ops=True)


def test_residual_addition_couples_a_stream():
    graph = build_graph(Residual(), SMALL)
    assert len(graph.groups) == 4  # input, stream (stem + c2), inner, logits
    stream = next(g for g in graph.groups if len(g.producers) > 1)
    inner = next(g for g in graph.groups if g.producers == ["c1"])
    assert stream.prunable and stream.producers == ["stem", "c2"] and stream.norms == ["bs", "b2"]
    assert stream.consumers == ["c1", "fc"] and len(stream.mask_nodes) == 2
    assert stream.name == "stream:stem"
    assert inner.prunable and inner.consumers == ["c2"]
    assert graph.cost(graph.full_widths()) == counted(Residual(), SMALL)


def test_view_flatten_of_a_spatial_map_is_cut_in_blocks():
    """``fc`` reads c2's 6 channels as 6 blocks of 4·4 columns: the group stays prunable and the
    cost of a narrower c2 is that of a model whose fc reads 4·4 columns per kept channel."""
    graph = build_graph(ViewFlatten(), SMALL)
    by_producer = groups_by_producer(graph)
    first, last = graph.groups[by_producer["c1"]], graph.groups[by_producer["c2"]]
    assert first.prunable and last.prunable and last.consumers == ["fc"]
    fc = next(layer for layer in graph.layers if layer.name == "fc")
    assert (fc.in_group, fc.in_block, fc.in_channels) == (last.index, 16, 6)
    assert graph.cost(graph.full_widths()) == counted(ViewFlatten(), SMALL)
    small = ViewFlatten()
    small.c2, small.b2 = nn.Conv2d(8, 2, 3, stride=2, padding=1), nn.BatchNorm2d(2)
    small.fc = nn.Linear(2 * 4 * 4, 5)
    widths = graph.full_widths()
    widths[last.index] = 2
    assert graph.cost(widths, bn_ops=True) == counted(small, SMALL, bn_ops=True)


class SplitView(ViewFlatten):
    """``x.view(N, C // 2, 2·H, W)`` mixes channel pairs into one: no channel of the input survives
    as a channel of the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        n, c, h, w = x.shape
        x = x.view(n, c // 2, 2 * h, w)
        return self.fc(x.reshape(n, -1))


def test_view_that_splits_channels_freezes_and_names_the_view():
    graph = build_graph(SplitView(), SMALL)
    g = graph.groups[groups_by_producer(graph)["c2"]]
    assert not g.prunable and "view" in g.reason and "cannot prune through" in g.reason
    assert graph.groups[groups_by_producer(graph)["c1"]].prunable


class PooledView(ViewFlatten):
    """``view(N, -1)`` after a global pool is a plain flatten of (N, C, 1, 1): nothing to freeze."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.adaptive_avg_pool2d(F.relu(self.b2(self.c2(x))), 1)
        return self.fc(x.view(x.size(0), -1))


def test_view_after_global_pool_keeps_the_group_prunable():
    graph = build_graph(PooledView(), SMALL)
    assert graph.groups[groups_by_producer(graph)["c2"]].prunable


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.dw(F.relu(self.b1(self.c1(x)))))
        return self.fc(x.mean((2, 3)))


def test_depthwise_conv_passes_its_group_through():
    graph = build_graph(Depthwise(), SMALL)
    g = graph.groups[groups_by_producer(graph)["c1"]]
    assert g.prunable and g.depthwise == ["dw"] and g.consumers == ["fc"] and len(g.mask_nodes) == 2
    assert len(graph.groups) == 3  # input, c1 (through dw), logits


def test_depthwise_conv_is_counted_in_cost():
    graph = build_graph(Depthwise(), SMALL)
    assert graph.cost(graph.full_widths()) == counted(Depthwise(), SMALL)
    small = Depthwise()
    small.c1, small.b1 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
    small.dw, small.fc = nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.Linear(3, 5)
    widths = graph.full_widths()
    widths[groups_by_producer(graph)["c1"]] = 3
    assert graph.cost(widths, bn_ops=True) == counted(small, SMALL, bn_ops=True)


class Multiplier(Depthwise):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.fc = nn.Linear(16, 5)


def test_channel_multiplier_conv_freezes_and_names_the_layer():
    graph = build_graph(Multiplier(), SMALL)
    g = graph.groups[groups_by_producer(graph)["c1"]]
    assert not g.prunable and "'dw'" in g.reason and "channel multiplier" in g.reason
    assert graph.cost(graph.full_widths()) == counted(Multiplier(), SMALL)


class NoAffineBN(Chain):
    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.BatchNorm2d(8, affine=False)


def test_bn_without_affine_has_no_params_in_cost():
    graph = build_graph(NoAffineBN(), SMALL)
    assert graph.cost(graph.full_widths()) == counted(NoAffineBN(), SMALL)


class ChannelMean(nn.Module):
    """``mean(1)`` averages the channels away; the linear reads the width axis (8 = C by chance)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.c(x)).mean(1)).mean((1, 2))


def test_mean_over_channels_freezes_them():
    graph = build_graph(ChannelMean(), SMALL)
    assert not graph.groups[groups_by_producer(graph)["c"]].prunable


# ----------------------------------------------------------------------------- the zoos' layers (issue 14)

class NormAct(nn.BatchNorm2d):
    """A norm-act layer like timm's ``BatchNormAct2d``: an assert on the input's rank, then
    ``batch_norm`` called functionally on the module's own weight and statistics, then a ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected a 4-D input")
        running = not self.training or self.track_running_stats
        x = F.batch_norm(x, self.running_mean if running else None, self.running_var if running else None,
                         self.weight, self.bias, self.training or self.running_mean is None, self.momentum, self.eps)
        return self.act(x)


class NormActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1), NormAct(8)
        self.c2, self.n2 = nn.Conv2d(8, 12, 3, stride=2, padding=1), NormAct(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.n2(self.c2(self.n1(self.c1(x)))).mean((2, 3)))


def test_a_norm_act_layer_is_the_batchnorm_of_its_group():
    """A functional batch_norm on a BatchNorm module's own weights is that module's BN: its group
    is prunable (the ReLU after it is the mask point) and slimming cuts the module."""
    graph = build_graph(NormActNet(), SMALL)
    by_producer = {p: g for g in graph.groups for p in g.producers}
    for conv, norm in (("c1", "n1"), ("c2", "n2")):
        g = by_producer[conv]
        assert g.prunable, g.reason
        assert g.norms == [norm] and len(g.mask_nodes) == 1
    assert set(graph.norm_calls.values()) == {"n1", "n2"}
    assert graph.cost(graph.full_widths()) == counted(NormActNet(), SMALL)


def test_building_the_graph_leaves_a_training_model_bit_identical():
    """Tracing in training mode used to run the norm-act layers' batch_norm with training=True and
    update their running statistics (timm's efficientnet_lite0: 98 tensors changed)."""
    torch.manual_seed(0)
    model = NormActNet().train()
    model.n2.eval()  # a mixed mode, restored module by module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    graph = build_graph(model, SMALL)
    after = model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert [m.training for m in model.modules()] == modes
    assert graph.prunable


class Shift(nn.Module):
    """Rolls the channels: no channel of the output is one channel of the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, 1, 1)


class ForeignNorm(nn.Module):
    """``batch_norm`` on tensors that are not a BatchNorm module's own."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, self.scale, None, True)


class Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.body = nn.Sequential(nn.Identity(), Shift())
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.norm = ForeignNorm(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(F.relu(self.b1(self.c1(x))))
        return self.fc(F.relu(self.norm(self.c2(x))).mean((2, 3)))


def test_a_refusal_names_the_module_and_the_cause():
    """Not fx's node names ("passes through getattr ('getattr_1')"): the layer whose forward does
    it, by qualified name and type, and what it does."""
    graph = build_graph(Opaque(), SMALL)
    by_producer = {p: g for g in graph.groups for p in g.producers}
    c1 = by_producer["c1"]
    assert not c1.prunable
    assert "roll()" in c1.reason and "Shift 'body.1'" in c1.reason and "test_graph.Shift" in c1.reason
    c2 = by_producer["c2"]
    assert not c2.prunable
    assert "ForeignNorm 'norm'" in c2.reason and "calls batch_norm()" in c2.reason
    assert "own weight, bias and running statistics" in c2.reason


class ChannelsLastMLP(nn.Module):
    """ConvNeXt's MLP: linear layers applied at every position of an ``(N, H, W, C)`` map."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c1(x).permute(0, 2, 3, 1)
        x = self.fc2(F.gelu(self.fc1(x))).permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


def test_a_linear_over_positions_counts_every_position():
    """FLOPs of a linear on (N, H, W, C): H·W·in·out, as torch.utils.flop_counter counts (2 per
    MAC); the graph's cost the same."""
    from torch.utils.flop_counter import FlopCounterMode

    model = ChannelsLastMLP().eval()
    c = flops.count(model, SMALL)
    assert {r.name: r.flops for r in c.layers if r.type == "linear"} == {"fc1": 64 * 8 * 16, "fc2": 64 * 16 * 8,
                                                                          "head": 8 * 5}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *SMALL))
    assert counter.get_total_flops() == 2 * c.flops
    graph = build_graph(model, SMALL)
    assert graph.cost(graph.full_widths()) == (c.flops, c.params)

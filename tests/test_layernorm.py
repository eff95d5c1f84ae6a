"""Channels-last LayerNorm blocks (ConvNeXt, issue 14): the graph follows the channels through
permutes, a linear layer over the last dim of ``(N, H, W, C)`` is a 1×1 conv, a LayerNorm over
the channels belongs to their group and, in the masked network, normalises over the kept channels
only, so that slim == masked for any cut; the stream (no activation on it) is masked where it
leaves its units. A small hand-written ConvNeXt in plain torch, random weights and 16×16 inputs:
each test runs in seconds on 2 CPU cores (torchvision's and timm's ConvNeXts: tests/test_zoo.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ekg import flops
from ekg.arch import record_for
from ekg.bn import batch_statistics_bn
from ekg.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ekg.graph import build_graph
from ekg.masks import GroupMask, MaskedLayerNorm, MaskedNetwork
from ekg.search import SearchConfig, Searcher
from ekg.slim import check_equivalent, slim_model
from test_zoo import NORMALIZATION, flop_counter, random_cut, random_data

SIZE = (3, 16, 16)


class LayerNorm2d(nn.LayerNorm):
    """torchvision's and timm's LayerNorm2d: permute to channels-last, ``F.layer_norm`` on the
    module's own weight and bias, permute back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Block(nn.Module):
    """ConvNeXt's block: dwconv 7×7 → permute → LayerNorm → Linear(C, 4C) → GELU → Linear(4C, C)
    → permute → layer scale → + input. ``scale_last``: the official code's ``gamma * x`` with a
    ``(C,)`` gamma on the channels-last values; else torchvision's ``(C, 1, 1)`` layer scale after
    the permute back."""

    def __init__(self, dim: int, scale_last: bool = False) -> None:
        super().__init__()
        self.scale_last = scale_last
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,) if scale_last else (dim, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(F.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        if self.scale_last:
            return x + (self.gamma * h).permute(0, 3, 1, 2)
        return x + self.gamma * torch.permute(h, [0, 3, 1, 2])


class ConvNeXtLike(nn.Module):
    """Stem (2×2 conv + LayerNorm2d), two blocks, a downsampling (LayerNorm2d + 2×2 conv), one
    block, then pooling, LayerNorm2d on ``(N, C, 1, 1)``, flatten and the classifier."""

    def __init__(self, num_classes: int = 10, dims: tuple[int, int] = (16, 24)) -> None:
        super().__init__()
        a, b = dims
        self.stem, self.stem_norm = nn.Conv2d(3, a, 2, stride=2), LayerNorm2d(a, eps=1e-6)
        self.block1, self.block2 = Block(a), Block(a, scale_last=True)
        self.down = nn.Sequential(LayerNorm2d(a, eps=1e-6), nn.Conv2d(a, b, 2, stride=2))
        self.block3 = Block(b)
        self.head_norm, self.fc = LayerNorm2d(b, eps=1e-6), nn.Linear(b, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem_norm(self.stem(x))))
        x = self.block3(self.down(x))
        return self.fc(torch.flatten(self.head_norm(F.adaptive_avg_pool2d(x, 1)), 1))


def convnext_like(seed: int = 0) -> ConvNeXtLike:
    """Random weights, LayerNorm affine parameters and layer scales (a wrong channel shows)."""
    torch.manual_seed(seed)
    model = ConvNeXtLike()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
            elif isinstance(m, Block):
                m.gamma.copy_(torch.rand(m.gamma.shape, generator=gen) + 0.5)
    return model.eval()


def groups_by_producer(graph):
    return {p: g for g in graph.groups for p in g.producers}


# ----------------------------------------------------------------------------- the graph

def test_convnext_groups_follow_the_channels_through_permutes_and_layer_norms():
    """Each stream is one group with its LayerNorms, depthwise convs, layer scales and the linear
    layers reading and writing it; each block's 4C hidden channels are a group masked at its GELU;
    the streams are masked where they leave a unit: the stem's (the downsampling's) output and
    every block's addition."""
    model = convnext_like()
    graph = build_graph(model, SIZE)
    by = groups_by_producer(graph)
    s1, s2 = by["stem"], by["down.1"]
    assert s1.prunable and s1.channels == 16 and s1.producers == ["stem", "block1.fc2", "block2.fc2"]
    assert s1.norms == ["stem_norm", "block1.norm", "block2.norm", "down.0"]
    assert s1.depthwise == ["block1.dw", "block2.dw"] and s1.tensors == ["block1.gamma", "block2.gamma"]
    assert s1.consumers == ["block1.fc1", "block2.fc1", "down.1"]
    assert s2.prunable and s2.producers == ["down.1", "block3.fc2"] and s2.norms == ["block3.norm", "head_norm"]
    assert s2.consumers == ["block3.fc1", "fc"] and s2.tensors == ["block3.gamma"]
    nodes = {n.name: n for n in graph.gm.graph.nodes}
    # the stem's norm (permuted back), each addition; the downsampling conv's output, block 3's addition
    assert [str(nodes[n].target) if nodes[n].op == "call_module" else nodes[n].name for n in s1.mask_nodes] == \
        ["permute_1", "add", "add_1"]
    assert [str(nodes[n].target) if nodes[n].op == "call_module" else n for n in s2.mask_nodes] == ["down.1", "add_2"]
    for k, dim in (("block1", 16), ("block2", 16), ("block3", 24)):
        hidden = by[f"{k}.fc1"]
        assert hidden.prunable and hidden.channels == 4 * dim and hidden.consumers == [f"{k}.fc2"]
        assert hidden.norms == [] and len(hidden.mask_nodes) == 1
        (gelu,) = hidden.mask_nodes
        assert nodes[gelu].target is F.gelu and graph.channel_dims[gelu] == 3  # channels last
    assert len(graph.prunable) == 5 and len(graph.groups) == 7  # and the input, the logits
    assert set(graph.layer_norms.values()) == {"stem_norm", "block1.norm", "block2.norm", "down.0", "block3.norm",
                                               "head_norm"}
    # FLOPs: the linear layers once per position; LayerNorm parameters counted with their channels
    full = flops.count(model, SIZE)
    assert graph.cost(graph.full_widths()) == (full.flops, full.params)
    assert flop_counter(model, SIZE) == 2 * full.flops


def test_a_layer_norm_over_other_dims_or_a_permute_moving_the_batch_freezes_its_channels():
    """A LayerNorm over (C, H, W), or over a dim that is not the channels, is no channel norm; a
    permute of the batch dim leaves no channel space: what they touch is kept whole, named."""

    class Odd(nn.Module):
        def __init__(self, mode: str) -> None:
            super().__init__()
            self.mode = mode
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
            self.norm = nn.LayerNorm([8, 8, 8]) if mode == "chw" else nn.LayerNorm(8)
            self.fc = nn.Linear(6, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.c1(x)
            if self.mode == "chw":
                h = self.norm(h)
            elif self.mode == "width":  # over W of an (N, C, H, W) map
                h = self.norm(h)
            else:
                h = h.permute(1, 0, 2, 3).permute(1, 0, 2, 3)
            return self.fc(F.relu(self.c2(F.relu(h))).mean((2, 3)))

    for mode, text in (("chw", "LayerNorm 'norm'"), ("width", "LayerNorm 'norm'"), ("batch", "moves the batch")):
        graph = build_graph(Odd(mode).eval(), (3, 8, 8))
        g = groups_by_producer(graph)["c1"]
        assert not g.prunable and text in g.reason, (mode, g.reason)
        assert groups_by_producer(graph)["c2"].prunable


# ----------------------------------------------------------------------------- the masked LayerNorm

def test_the_masked_layer_norm_is_the_slim_layer_norm_for_random_cuts():
    """Over the kept channels only (mean and variance over the kept subset, masked channels 0),
    both ways of computing it, equal to a LayerNorm of the kept channels with their weight and
    bias; with nothing masked bit for bit the model's own LayerNorm."""
    gen = torch.Generator().manual_seed(0)
    ln = nn.LayerNorm(12, eps=1e-6)
    with torch.no_grad():
        ln.weight.copy_(torch.rand(12, generator=gen) + 0.5)
        ln.bias.copy_(torch.rand(12, generator=gen) - 0.5)
    x = torch.randn(3, 5, 4, 12, generator=gen) * 3 + 1
    mask = GroupMask(12)
    masked = MaskedLayerNorm(ln, mask)
    for sliced in (False, True):
        masked.sliced = sliced
        assert torch.equal(masked(x), ln(x))
    for trial in range(6):
        k = int(torch.randint(1, 12, (1,), generator=gen))
        kept = torch.randperm(12, generator=gen)[:k].sort().values
        keep = torch.zeros(12, dtype=torch.bool)
        keep[kept] = True
        mask.set(keep)
        slim = nn.LayerNorm(k, eps=1e-6)
        with torch.no_grad():
            slim.weight.copy_(ln.weight[kept])
            slim.bias.copy_(ln.bias[kept])
        want = slim(x[..., kept])
        for sliced in (False, True):
            masked.sliced = sliced
            y = masked(x)
            torch.testing.assert_close(y[..., kept], want, rtol=1e-5, atol=1e-5)
            assert torch.equal(y[..., ~keep], torch.zeros_like(y[..., ~keep]))
        # not the statistics of all the channels
        assert not torch.allclose(ln(x)[..., kept], want, atol=1e-3)


def check_slim(model: nn.Module, x: torch.Tensor, seed: int = 4) -> tuple[MaskedNetwork, nn.Module]:
    """Random cut of every group: slim == masked (both kinds of masked layer), counted cost ==
    graph cost == torch.utils.flop_counter's."""
    graph = build_graph(model, SIZE)
    net = MaskedNetwork(model, graph)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))  # nothing masked: the model's own function, bit for bit
    random_cut(net, seed)
    slim = slim_model(model, graph, net.kept_indices()).eval()
    for sliced in (False, True):
        net.set_sliced(sliced)
        check_equivalent(net, slim, x)
    net.set_sliced(False)
    counted = flops.count(slim, SIZE)
    assert (counted.flops, counted.params) == graph.cost(net.widths())
    assert flop_counter(slim, SIZE) == 2 * counted.flops
    return net, slim


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_a_convnext_cut_at_random_slims_to_the_masked_network(seed):
    model = convnext_like()
    x = torch.randn(4, *SIZE, generator=torch.Generator().manual_seed(3))
    net, slim = check_slim(model, x, seed)
    kept = net.kept_indices()
    by = groups_by_producer(net.graph)
    s1, s2 = kept[by["stem"].index], kept[by["down.1"].index]
    assert 0 < len(s1) < 16 and 0 < len(s2) < 24
    for name in ("stem_norm", "block1.norm", "block2.norm", "down.0"):  # cut with the stream, their own entries
        full, cut = model.get_submodule(name), slim.get_submodule(name)
        assert cut.normalized_shape == (len(s1),)
        assert torch.equal(cut.weight, full.weight[s1]) and torch.equal(cut.bias, full.bias[s1])
    assert slim.head_norm.normalized_shape == (len(s2),)
    assert torch.equal(slim.head_norm.weight, model.head_norm.weight[s2])
    assert torch.equal(slim.block1.gamma, model.block1.gamma[s1]) and slim.block1.gamma.shape == (len(s1), 1, 1)
    assert torch.equal(slim.block2.gamma, model.block2.gamma[s1]) and slim.block2.gamma.shape == (len(s1),)
    assert slim.block3.fc1.out_features == len(kept[by["block3.fc1"].index]) < 96
    # and under the search's batch statistics (no BN here: the same function)
    with batch_statistics_bn(model), batch_statistics_bn(slim):
        check_equivalent(net, slim, x)


def test_a_pruned_convnext_reloads_from_its_checkpoint(tmp_path):
    """The record holds every LayerNorm's normalized shape: the slim model rebuilds from it."""
    model = convnext_like()
    x = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(3))
    _, slim = check_slim(model, x)
    record = record_for(slim, 10, factory="tests:ConvNeXtLike", pruned=True)
    assert record.shapes["block1.norm"] == {"type": "ln", "shape": list(slim.block1.norm.normalized_shape)}
    ckpt = Checkpoint(model=slim, normalization=NORMALIZATION, input_size=SIZE, record=record)
    back = load_checkpoint(save_checkpoint(ckpt, tmp_path / "slim.pt"), factory=ConvNeXtLike).model.eval()
    assert back.head_norm.normalized_shape == slim.head_norm.normalized_shape != (24,)
    with torch.no_grad():
        assert torch.equal(back(x), slim(x))


# ----------------------------------------------------------------------------- the search

def test_the_search_decides_alike_in_the_channels_last_sliced_layout_and_the_plain_one():
    """The default search (cached tails, kept-channels-only layers and LayerNorms, channels-last
    memory) and ``sliced=False`` take the same steps on a ConvNeXt."""
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, *SIZE, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(1)]
    runs = []
    for sliced in (True, False):
        model = convnext_like()
        graph = build_graph(model, SIZE)
        net = MaskedNetwork(model, graph)
        cfg = SearchConfig(keep=0.75, batch_size=8, adapt=False, sliced=sliced)
        with batch_statistics_bn(model):
            searcher = Searcher(net, batches, cfg)
            assert searcher.evaluator.fast
            state = searcher.run(searcher.initial_state())
        assert state.done
        runs.append((state.rates, [r.tolist() for r in state.ranks], [row["group"] for row in state.log]))
        slim = slim_model(model, graph, net.kept_indices()).eval()
        check_equivalent(net, slim, batches[0][0])
    assert runs[0] == runs[1]
    stream = groups_by_producer(graph)["stem"].index
    assert stream in runs[0][2]  # the stream was pruned too, not only the MLPs


def test_prune_a_convnext_end_to_end(tmp_path):
    from ekg.pruning import prune

    model = convnext_like()
    keep = 0.6
    cfg = SearchConfig(adapt=False, val_per_class=1, sub_per_class=1, batch_size=10)
    res = prune(model, random_data(16), keep, out=tmp_path / "run", config=cfg, progress=False)
    full = flops.count(model, SIZE).flops
    assert keep - 0.01 < res.flops / full <= keep
    assert res.flops == flops.count(res.model, SIZE).flops and res.slim_max_diff < 1e-4
    assert res.model.stem_norm.normalized_shape[0] < 16 or res.model.head_norm.normalized_shape[0] < 24

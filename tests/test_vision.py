"""Any CNN: torchvision models (random weights, small inputs) searched with EKG to a FLOPs budget,
slimmed, and checked against their masked twins; models that cannot be pruned are refused with a
message naming the layer and why.

Needs torchvision (the ``vision`` extra); skipped without it. CI runs this file in a second venv.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ekg import flops
from ekg.evaluate import batch_statistics_bn
from ekg.graph import build_graph
from ekg.masks import MaskedNetwork
from ekg.search import SearchConfig, Searcher
from ekg.slim import check_equivalent, slim_model

tv_models = pytest.importorskip("torchvision.models", reason="torchvision is not installed (pip install -e '.[vision]')")

# name: builder kwargs, input size, budget. Small inputs, one batch of 4 images and budgets a few
# steps away keep each search short on 2 CPU cores. The searches use full-width masked kernels
# (sliced=False): the kept-channels-only layers meet a new conv shape at every candidate width, a
# kernel set-up each on CPU; both kinds of masked layer are checked against the slim model.
CASES = {
    "resnet18": ({}, (3, 32, 32), 0.9),
    "resnet50": ({}, (3, 32, 32), 0.97),
    "mobilenet_v2": ({"width_mult": 0.5}, (3, 32, 32), 0.95),
    "vgg16_bn": ({}, (3, 32, 32), 0.95),
}


def torchvision_model(name: str, **kwargs) -> nn.Module:
    """A torchvision model with random weights and random BN running statistics (so that a wrong
    channel or a wrong BN slice shows in the output)."""
    torch.manual_seed(0)
    model = tv_models.get_model(name, weights=None, num_classes=10, **kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def random_batches(input_size: tuple[int, ...], n: int = 1, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(size, *input_size, generator=gen), torch.randint(0, 10, (size,), generator=gen))
            for _ in range(n)]


@pytest.mark.parametrize("name", list(CASES))
def test_search_slim_and_check(name):
    kwargs, input_size, keep = CASES[name]
    model = torchvision_model(name, **kwargs)
    graph = build_graph(model, input_size)
    full = flops.count(model, input_size)
    assert graph.cost(graph.full_widths()) == (full.flops, full.params)
    assert graph.prunable
    batches = random_batches(input_size)
    cfg = SearchConfig(keep=keep, batch_size=4, adapt=False, sliced=False)
    with batch_statistics_bn(model):
        net = MaskedNetwork(model, graph)
        searcher = Searcher(net, batches, cfg)
        state = searcher.run(searcher.initial_state())
    assert state.done and state.step >= 1
    kept = net.kept_indices()
    assert any(len(kept[g.group.index]) < g.channels for g in net.gates)
    slim = slim_model(model, graph, kept).eval()
    x = batches[0][0]
    for mode in (True, False):  # the search's kept-channels-only layers and the full-width masked kernels
        net.set_sliced(mode)
        check_equivalent(net, slim, x)
    counted = flops.count(slim, input_size)
    assert (counted.flops, counted.params) == graph.cost(net.widths())
    assert counted.flops <= keep * full.flops
    assert counted.flops == state.log[-1]["flops"]


def test_graph_roles_of_torchvision_models():
    """Which channels each architecture can prune, and why the others cannot."""
    r18 = build_graph(torchvision_model("resnet18"), (3, 32, 32))
    by_producer = {p: g for g in r18.groups for p in g.producers}
    stream = by_producer["layer2.0.downsample.0"]  # a downsample conv writes stage 2's stream
    assert stream.prunable and {"layer2.0.conv2", "layer2.1.conv2"} <= set(stream.producers)
    assert by_producer["layer1.0.conv1"].prunable and by_producer["layer1.0.conv1"].consumers == ["layer1.0.conv2"]

    r50 = build_graph(torchvision_model("resnet50"), (3, 32, 32))
    assert len(r50.prunable) == 1 + 4 + 2 * 16  # the stem, 4 stage streams, 2 inner groups per bottleneck
    mb = build_graph(torchvision_model("mobilenet_v2", width_mult=0.5), (3, 32, 32))
    expansion = next(g for g in mb.groups if g.producers == ["features.2.conv.0.0"])
    assert expansion.prunable and expansion.depthwise == ["features.2.conv.1.0"]
    assert len(expansion.mask_nodes) == 2  # ReLU6 before and after the depthwise conv
    project = next(g for g in mb.groups if "features.2.conv.2" in g.producers)  # a residual stream
    assert not project.prunable and "no mask point" in project.reason

    vgg = build_graph(torchvision_model("vgg16_bn"), (3, 32, 32))
    last_conv = next(g for g in vgg.groups if g.producers == ["features.40"])
    assert last_conv.prunable and last_conv.consumers == ["classifier.0"]
    fc0 = next(layer for layer in vgg.layers if layer.name == "classifier.0")
    assert (fc0.in_block, fc0.in_channels) == (49, 512)  # AdaptiveAvgPool2d((7, 7)) then flatten
    hidden = next(g for g in vgg.groups if g.producers == ["classifier.0"])
    assert hidden.prunable and hidden.consumers == ["classifier.3"]
    assert not vgg.groups[-1].prunable and "classifier.6" in vgg.groups[-1].reason


def test_resnet34_random_masks_slim_to_the_masked_network():
    """ResNet-34 (BasicBlocks, downsample shortcuts) without a search: random channels kept in every
    group, slimmed, compared with the masked network, counted against the graph's cost."""
    model = torchvision_model("resnet34")
    graph = build_graph(model, (3, 32, 32))
    assert len(graph.prunable) == 1 + 3 + 16  # stem + stage-1 stream, 3 downsampled streams, 16 blocks
    net = MaskedNetwork(model, graph)
    gen = torch.Generator().manual_seed(4)
    for gate in net.gates:
        gate.ranks = torch.randperm(gate.channels, generator=gen)
    net.set_rates([0.3 + 0.6 * torch.rand(1, generator=gen).item() for _ in net.gates])
    slim = slim_model(model, graph, net.kept_indices()).eval()
    check_equivalent(net, slim, random_batches((3, 32, 32))[0][0])
    counted = flops.count(slim, (3, 32, 32))
    assert (counted.flops, counted.params) == graph.cost(net.widths())


# ----------------------------------------------------------------------------- refusals

class ChannelShuffle(nn.Module):
    """A grouped conv with a channel multiplier and a channel shuffle by ``view``: neither can be
    cut channel by channel."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.mult = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.c2, self.b2 = nn.Conv2d(16, 12, 1), nn.BatchNorm2d(12)
        self.c3 = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.mult(x))
        x = F.relu(self.b2(self.c2(x)))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        x = F.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


def test_unprunable_layers_are_named_with_the_reason():
    graph = build_graph(ChannelShuffle(), (3, 16, 16))
    by_producer = {p: g for g in graph.groups for p in g.producers}
    c1 = by_producer["c1"]
    assert not c1.prunable and "'mult'" in c1.reason and "channel multiplier" in c1.reason
    c2 = by_producer["c2"]
    assert not c2.prunable and "view" in c2.reason and "cannot prune through" in c2.reason
    assert by_producer["c3"].prunable  # after the shuffle, c3's own channels are fine


# ----------------------------------------------------------------------------- the Python API and checkpoints

def test_prune_api_on_a_torchvision_model_and_checkpoint_round_trip(tmp_path):
    """``prune()`` on an ``nn.Module`` returns the slim module; its checkpoint records
    ``torchvision:mobilenet_v2`` with its kwargs and every width, and reloads with no code."""
    from ekg.arch import torchvision_model as tagged
    from ekg.checkpoint import load_checkpoint
    from ekg.pruning import prune

    torch.manual_seed(0)
    model = tagged("mobilenet_v2", num_classes=10, width_mult=0.5)
    cfg = SearchConfig(adapt=False, val_per_class=1, sub_per_class=1, batch_size=10, sliced=False)
    res = prune(model, random_data(), 0.9, out=tmp_path / "run", config=cfg, progress=False)
    size = (3, 32, 32)
    assert type(res.model) is type(model)
    assert flops.count(res.model, size).flops == res.flops <= 0.9 * flops.count(model, size).flops
    back = load_checkpoint(tmp_path / "run" / "pruned.pt")
    assert back.arch == "torchvision:mobilenet_v2 (pruned)" and back.record.kwargs == {"num_classes": 10, "width_mult": 0.5}
    assert back.input_size == size and back.normalization["name"] == "cifar10"
    shapes = {n: (m.in_channels, m.out_channels, m.groups) for n, m in res.model.named_modules()
              if isinstance(m, nn.Conv2d)}
    assert shapes == {n: (m.in_channels, m.out_channels, m.groups) for n, m in back.model.named_modules()
                      if isinstance(m, nn.Conv2d)}
    assert shapes != {n: (m.in_channels, m.out_channels, m.groups) for n, m in model.named_modules()
                      if isinstance(m, nn.Conv2d)}
    x = torch.randn(2, *size)
    with torch.no_grad():
        assert torch.equal(back.model.eval()(x), res.model.eval()(x))
    # the CLI reads it with no code of the user's, and fine-tuning keeps its record
    from ekg.cli import main
    from ekg.train import finetune_config, train

    assert main(["info", "--model", str(tmp_path / "run" / "pruned.pt"), "--json"]) == 0
    path = train(finetune_config("none", epochs=1, batch_size=10, device="cpu"), random_data(), tmp_path / "ft",
                 init=back, progress=False)
    tuned = load_checkpoint(path)
    assert tuned.arch == back.arch and tuned.input_size == size


def random_data(size: int = 32, per_class: int = 2):
    """CIFAR-10-shaped random images (name "cifar10": the default normalisation is its preset)."""
    from conftest import random_splits

    return random_splits("cifar10", size, per_class)


def test_convert_torchvision_weights_into_an_ekg_checkpoint(tmp_path, capsys):
    from ekg.checkpoint import load_checkpoint
    from ekg.cli import main

    torch.manual_seed(0)
    model = tv_models.resnet18(num_classes=10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "r18.pth")
    out = tmp_path / "r18.pt"
    assert main(["convert", str(tmp_path / "r18.pth"), "--torchvision", "resnet18", "--input-size", "3", "32", "32",
                 "--normalization", "cifar10", "--out", str(out)]) == 0
    assert "torchvision:resnet18" in capsys.readouterr().out
    ckpt = load_checkpoint(out)
    assert ckpt.num_classes == 10 and ckpt.input_size == (3, 32, 32) and ckpt.normalization["name"] == "cifar10"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ckpt.model.eval()(x), model.eval()(x))
    assert main(["info", "--model", str(out), "--json"]) == 0
    capsys.readouterr()
    # weights of another architecture: one line naming the mismatch
    assert main(["convert", str(tmp_path / "r18.pth"), "--torchvision", "resnet34", "--out", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ekg: error:") and "do not fit" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()

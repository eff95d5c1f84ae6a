"""`--round-to N` (SearchConfig.round_to): every kept width a multiple of N, or the group's full width
where that is smaller, the search's steps and landing in units of N, landing at or just below the
budget; and round_to 1 changes nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import random_bn
from ekg.errors import EkgError
from ekg.graph import build_graph
from ekg.masks import Gate, MaskedNetwork, kept_width
from ekg.search import SearchConfig
from ekg.search.searcher import Searcher, check_reachable, floor_ratio
from ekg.search.steps import removed_cost

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (3, 16, 16)


def test_kept_widths_are_multiples_of_n_or_the_full_width():
    rates = np.linspace(0.001, 1, 400)
    assert sorted({kept_width(64, r, 8) for r in rates}) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert sorted({kept_width(20, r, 8) for r in rates}) == [8, 16, 20]   # the last unit is partial
    assert {kept_width(5, r, 8) for r in rates} == {5}                     # narrower than N: whole
    assert [kept_width(20, r) for r in (0.05, 0.5, 1.0)] == [1, 10, 20]    # unit 1: kept_channels
    assert kept_width(20, 1.0, 8) == 20 and kept_width(20, 0.6, 8) == 16  # rates count units: 3 here


class _Group:  # the ChannelGroup fields a Gate reads
    def __init__(self, channels: int, blocks: int = 1) -> None:
        self.channels, self.blocks, self.producers = channels, blocks, ["conv"]


def test_the_unit_is_the_lcm_of_the_blocks_and_n():
    g = Gate(_Group(48, blocks=3), round_to=8)
    assert g.unit == 24 and g.units == 2
    assert sorted({g.kept_at(r) for r in np.linspace(0.01, 1, 100)}) == [24, 48]
    g = Gate(_Group(60, blocks=3), round_to=8)   # 24, 48 and the partial last unit: 60 (a multiple of 3)
    assert sorted({g.kept_at(r) for r in np.linspace(0.01, 1, 100)}) == [24, 48, 60]
    g.ranks = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    g.rate = 0.5
    mask = g.mask()
    assert int(mask.sum()) == 48 and (mask.view(3, 20).sum(1) == 16).all()   # equal per block
    assert Gate(_Group(64), round_to=1).unit == 1 and Gate(_Group(64, blocks=4)).unit == 4


def test_the_step_cost_of_rounded_widths_sums_the_channels_they_drop():
    scores = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 8.0, 7.0, 6.0])
    assert removed_cost(scores, 8, 4) == 1 + 2 + 3 + 4
    assert removed_cost(scores, 4, 2) == 5 + 6
    assert removed_cost(scores.view(2, 4).flatten(), 8, 4, blocks=2) == (1 + 2) + (3 + 6)
    # the search's step cost of a rounded gate: 20 channels in units of 8 (8, 16, 20); a step of
    # 1/3 from the full width drops 4 channels (20 -> 16), not round(20/3) = 7
    gate = Gate(_Group(20), round_to=8)
    s = torch.arange(20, dtype=torch.float64).flip(0)
    assert Searcher._step_cost(gate, s, 1 / 3) == 0 + 1 + 2 + 3
    gate.rate = 2 / 3
    assert Searcher._step_cost(gate, s, 1 / 3) == sum(range(4, 12))
    assert Searcher._step_cost(Gate(_Group(20)), s, 1 / 3) == sum(range(7))  # unrounded: by rate


class RandomNet(nn.Module):
    """A random CNN: random stage widths (not multiples of 8), residual blocks, downsampling."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = np.random.default_rng(seed)
        layers: list[nn.Module] = []
        width = int(g.integers(10, 30))
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList()
        self.kinds: list[str] = []
        for _ in range(int(g.integers(2, 4))):
            inner = int(g.integers(5, 40))
            self.blocks.append(nn.Sequential(
                nn.Conv2d(width, inner, 3, padding=1, bias=False), nn.BatchNorm2d(inner), nn.ReLU(),
                nn.Conv2d(inner, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)))
            self.kinds.append("residual")
            new = int(g.integers(12, 50))
            self.blocks.append(nn.Sequential(nn.Conv2d(width, new, 3, stride=2, padding=1, bias=False),
                                             nn.BatchNorm2d(new), nn.ReLU()))
            self.kinds.append("down")
            width = new
        self.fc = nn.Linear(width, 10)
        del layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for kind, block in zip(self.kinds, self.blocks):
            x = torch.relu(x + block(x)) if kind == "residual" else block(x)
        return self.fc(x.mean((2, 3)))


def _searcher(seed: int, keep: float, n: int) -> Searcher:
    torch.manual_seed(seed)
    model = random_bn(RandomNet(seed), seed).eval()
    net = MaskedNetwork(model, build_graph(model, SIZE), round_to=n)
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(12, *SIZE, generator=gen), torch.randint(0, 10, (12,), generator=gen))]
    return Searcher(net, batches, SearchConfig(keep=keep, batch_size=12, round_to=n))


@pytest.mark.parametrize("seed,keep,n", [(0, 0.5, 8), (1, 0.6, 8), (2, 0.45, 4), (3, 0.7, 16), (4, 0.5, 8)])
def test_rounded_searches_land_on_multiples_at_or_just_below_the_budget(seed, keep, n):
    searcher = _searcher(seed, keep, n)
    net = searcher.net
    state = searcher.run(searcher.initial_state())
    widths = net.widths()
    for gate in net.gates:
        assert gate.kept % n == 0 or gate.kept == gate.channels, (gate.group.name, gate.kept, gate.channels)
        assert widths[gate.group.index] == gate.kept
    ratio = searcher.ratio()
    assert ratio <= keep
    # the landing works in units of n: the last step's group could not keep one more unit
    last = net.gates[state.log[-1]["group"]]
    if last.kept < last.channels:
        wider = widths.copy()
        wider[last.group.index] = min(last.channels, last.kept + last.unit)
        assert net.graph.cost(wider)[0] / searcher.full_cost[0] > keep
    # and the masks the network holds keep exactly those widths
    for gate, gm in zip(net.gates, net.masks):
        assert int(gm.mask.sum()) == gate.kept


def test_rounding_changes_the_widths_the_search_keeps():
    """The same search unrounded keeps widths off the multiples; rounded, none (the round_to=1
    search itself is pinned bit for bit by tests/test_search_rules.py and test_compat.py)."""
    a, c = _searcher(0, 0.5, 1), _searcher(0, 0.5, 8)
    sa, sc = a.run(a.initial_state()), c.run(c.initial_state())
    assert any(w % 8 for w in sa.log[-1]["widths"])
    assert sc.log[-1]["widths"] != sa.log[-1]["widths"]
    assert all(w % 8 == 0 or w == g.channels for w, g in zip(sc.log[-1]["widths"], c.net.gates))


def test_the_floor_counts_one_unit_per_group_and_is_checked_up_front():
    torch.manual_seed(0)
    model = RandomNet(0).eval()
    graph = build_graph(model, SIZE)
    f1, f8 = floor_ratio(graph, SearchConfig()), floor_ratio(graph, SearchConfig(round_to=8))
    assert f8 > f1
    widths = graph.full_widths()
    for g in graph.prunable:
        widths[g.index] = min(g.channels, math.lcm(g.blocks, 8))
    assert f8 == pytest.approx(graph.cost(widths)[0] / graph.cost(graph.full_widths())[0])
    check_reachable(graph, SearchConfig(keep=f8 + 1e-3, round_to=8))
    with pytest.raises(EkgError, match="round_to"):
        check_reachable(graph, SearchConfig(keep=(f1 + f8) / 2, round_to=8))


@pytest.mark.parametrize("value", [0, -8, 2.5, True])
def test_bad_round_to_is_one_line(value):
    with pytest.raises(EkgError, match="round_to"):
        SearchConfig(round_to=value).validate()


def test_round_to_is_not_a_release_setting():
    with pytest.raises(EkgError, match="release"):
        SearchConfig(round_to=8, compat="release").validate()


def test_ekg_prune_round_to_8_end_to_end(tmp_path, shared_data, cifar10_exact, capsys):
    """`ekg prune --round-to 8` on the real ResNet-20: every kept width a multiple of 8, the landed
    ratio at or below the budget, the slim checkpoint at the logged FLOPs."""
    import json

    from ekg.cli import main

    run = tmp_path / "RUN"
    src = shared_data / "pretrained/akamaster/resnet20-12fca82f.th"
    assert main(["prune", "--model", str(src), "--data", str(cifar10_exact), "--keep", "0.6", "--out", str(run),
                 "--round-to", "8", "--val-per-class", "4", "--sub-per-class", "4", "--quiet"]) == 0
    capsys.readouterr()
    log = [json.loads(line) for line in (run / "search.jsonl").read_text().splitlines()]
    assert all(w % 8 == 0 for w in log[-1]["widths"]) and 0.5 < log[-1]["flops_ratio"] <= 0.6
    assert json.loads((run / "config.json").read_text())["search"]["round_to"] == 8
    assert main(["info", "--model", str(run / "pruned.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flops"] == log[-1]["flops"]
    # the same folder with another --round-to is another run: refused, naming the setting
    assert main(["prune", "--model", str(src), "--data", str(cifar10_exact), "--keep", "0.6", "--out", str(run),
                 "--round-to", "4", "--val-per-class", "4", "--sub-per-class", "4", "--quiet", "--resume"]) != 0
    assert "round_to" in capsys.readouterr().err

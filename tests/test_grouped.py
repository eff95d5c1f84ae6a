"""Pruning through grouped convs (ResNeXt, RegNet; issue 14): a grouped conv with G groups cuts the
channel groups it reads and writes in G equal blocks (the lcm where several meet), a gate keeps its
best-ranked channels block by block, the search moves such a group in units of one channel per
block, and the slim conv keeps its groups. Small hand-written modules of plain torch, random
weights and BN statistics, 8×8 inputs (the zoo's ResNeXt/RegNet: tests/test_zoo.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ekg import flops
from ekg.checkpoint import load_checkpoint
from ekg.errors import EkgError
from ekg.graph import ChannelGroup, build_graph
from ekg.masks import Gate, MaskedNetwork, block_mask, kept_width
from ekg.search import SearchConfig, Searcher, check_reachable, floor_ratio, step_cost
from ekg.search.evaluator import CandidateEvaluator
from ekg.search.steps import drop_a_unit
from ekg.slim import check_equivalent, slim_model
from test_zoo import SMALL, check_slim, randomise, random_data

pytestmark = pytest.mark.usefixtures("one_thread")


class ResNeXtUnit(nn.Module):
    """A ResNeXt bottleneck: 1×1 reduce to ``width``, grouped 3×3 (``groups``), 1×1 back, add."""

    def __init__(self, channels: int, width: int, groups: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, padding=1, groups=groups), nn.BatchNorm2d(width)
        self.c3, self.b3 = nn.Conv2d(width, channels, 1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(self.b2(self.c2(h)))
        return F.relu(x + self.b3(self.c3(h)))


class ResNeXtNet(nn.Module):
    """Two units: 12 wide in 4 groups (3 channels a block: units of 4 channels) and 24 wide in 4."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem, self.bs = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.unit1, self.unit2 = ResNeXtUnit(16, 12, 4), ResNeXtUnit(16, 24, 4)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bs(self.stem(x)))
        return self.fc(self.unit2(self.unit1(x)).mean((2, 3)))


class LcmNet(nn.Module):
    """Two grouped convs (groups 2 and 3) reading one group and writing one (their outputs add)."""

    def __init__(self, width: int = 12, num_classes: int = 10) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.ga, self.ba = nn.Conv2d(width, width, 3, padding=1, groups=2), nn.BatchNorm2d(width)
        self.gb, self.bb = nn.Conv2d(width, width, 3, padding=1, groups=3, bias=False), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        return self.fc(F.relu(self.ba(self.ga(x)) + self.bb(self.gb(x))).mean((2, 3)))


class OnePerGroup(nn.Module):
    """A grouped conv with one output channel per group (groups = out = 4 < in = 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.g, self.bg = nn.Conv2d(8, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bg(self.g(F.relu(self.b1(self.c1(x)))))).mean((2, 3)))


def by_producer(graph) -> dict[str, ChannelGroup]:
    return {p: g for g in graph.groups for p in g.producers}


def flop_counter(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """torch.utils.flop_counter's count for one image (2 per multiply-accumulate)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *input_size))
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- the graph

def test_a_grouped_conv_cuts_what_it_reads_and_writes_in_equal_blocks():
    graph = build_graph(ResNeXtNet().eval(), SMALL)
    groups = by_producer(graph)
    assert len(graph.prunable) == 5  # the stream and each unit's two inner groups
    for unit, width in (("unit1", 12), ("unit2", 24)):
        reduced, grouped = groups[f"{unit}.c1"], groups[f"{unit}.c2"]
        assert reduced.prunable and reduced.blocks == 4 and reduced.grouped == [f"{unit}.c2"]
        assert reduced.consumers == [f"{unit}.c2"] and reduced.channels == width
        assert grouped.prunable and grouped.blocks == 4 and grouped.producers == [f"{unit}.c2"]
        assert grouped.consumers == [f"{unit}.c3"]
    stream = groups["stem"]
    assert stream.prunable and stream.blocks == 1 and stream.grouped == []
    assert {layer.name: layer.groups for layer in graph.layers}["unit1.c2"] == 4


def test_blocks_are_the_lcm_where_grouped_convs_of_different_groups_meet():
    graph = build_graph(LcmNet(12).eval(), SMALL)
    groups = by_producer(graph)
    read, written = groups["c1"], groups["ga"]
    assert written is groups["gb"]  # their outputs add
    for g in (read, written):
        assert g.prunable and g.blocks == 6 and g.grouped == ["ga", "gb"] and g.channels == 12


def test_blocks_of_one_channel_are_refused_naming_the_convs():
    """lcm(2, 3) = 6 blocks of a 6-channel group, or a conv of one output per group: no channel
    can be cut (a width no conv's groups divide cannot occur: every conv's groups divide the width
    it reads and writes, so their lcm does too)."""
    graph = build_graph(LcmNet(6).eval(), SMALL)
    for g in (by_producer(graph)["c1"], by_producer(graph)["ga"]):
        assert not g.prunable and g.blocks == 6
        assert g.reason == ("grouped convs 'ga' (groups=2) and 'gb' (groups=3) cut these 6 channels in 6 equal "
                            "blocks, one channel each: no channel can be cut")
    graph = build_graph(OnePerGroup().eval(), SMALL)
    read, written = by_producer(graph)["c1"], by_producer(graph)["g"]
    assert read.prunable and read.blocks == 4  # 8 inputs, 2 a group
    assert not written.prunable and written.reason.startswith("grouped conv 'g' (groups=4) cut these 4 channels")
    with pytest.raises(EkgError, match=r"'g' \(groups=4\) cut these 4 channels in 4 equal blocks"):
        slim_model(OnePerGroup(), graph, {written.index: [0, 1]})


# ----------------------------------------------------------------------------- the gate

def test_a_blocked_gate_keeps_its_best_ranked_channels_block_by_block():
    # 12 channels in 4 blocks of 3; the global ranks put block 0's channels first
    ranks = torch.tensor([0, 1, 2, 9, 3, 11, 4, 10, 5, 8, 7, 6])
    gate = Gate(ChannelGroup(index=0, name="g", channels=12, blocks=4), ranks=ranks)
    assert (gate.unit, gate.units, gate.kept) == (4, 3, 12)
    picks = {rate: torch.nonzero(gate.mask(rate)).flatten().tolist() for rate in (1.0, 0.9, 2 / 3, 0.5, 1 / 3, 0.0)}
    assert picks[1.0] == picks[0.9] == list(range(12))  # ceil(3·0.9) = 3 a block
    assert picks[2 / 3] == picks[0.5] == [0, 1, 3, 4, 6, 8, 10, 11]  # per block: ranks (0 1 2) (9 3 11) (4 10 5) (8 7 6)
    assert picks[1 / 3] == picks[0.0] == [0, 4, 6, 11]  # the best of each block, never fewer
    assert [gate.kept_at(r) for r in (1.0, 0.9, 2 / 3, 0.5, 1 / 3, 0.0)] == [12, 12, 8, 8, 4, 4]
    assert [kept_width(12, r, 4) for r in (0.75, 0.7, 0.01)] == [12, 12, 4]
    # the global top 8 would be [0, 1, 2, 4, 6, 8, 10, 11]: three from block 0, one from block 1
    assert torch.nonzero(ranks < 8).flatten().tolist() != picks[2 / 3]
    assert torch.equal(block_mask(torch.arange(12), 4, 8), torch.tensor([True, True, False] * 4))
    assert torch.equal(block_mask(ranks, 1, 5), ranks < 5)  # one block: the global ranks


def test_a_blocked_groups_step_costs_the_scores_each_block_loses():
    scores = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 0.0, 6.0, 8.0, 7.0, 0.5, 9.0, 0.25])
    # 3 blocks of 4, sorted: (1 2 4 5) (0 3 6 8) (0.25 0.5 7 9); rate 1, step 0.5: 2 of each block
    assert step_cost(scores, 1.0, 0.5, blocks=3) == 1 + 2 + 0 + 3 + 0.25 + 0.5
    assert step_cost(scores, 0.75, 0.25, blocks=3) == 2 + 3 + 0.5  # the second of each block
    assert step_cost(scores, 1.0, 0.5) == 0 + 0.25 + 0.5 + 1 + 2 + 3  # one block: the 6 lowest


def test_a_step_that_keeps_every_unit_goes_on_to_one_unit_fewer():
    assert drop_a_unit(1.0, round(1 - 1 / 3, 5), 3) == pytest.approx(2 / 3)  # 0.66667 would keep 3 of 3
    assert drop_a_unit(1.0, 0.6, 3) == 0.6  # already one fewer
    assert drop_a_unit(2 / 3, 0.4, 3) == pytest.approx(1 / 3)  # ceil(1.2): still 2 of 3
    assert drop_a_unit(2 / 3, 0.3, 3) == 0.3
    assert drop_a_unit(1 / 3, 0.1, 3) == 0.1  # at one unit: nothing below


# ----------------------------------------------------------------------------- cost, masked and slim

@pytest.mark.parametrize("factory", [ResNeXtNet, lambda: LcmNet(24)], ids=["resnext", "lcm"])
def test_slim_equals_masked_and_the_cost_is_counted(factory):
    """Cut at random (random ranks, rates): slim == masked in both masked-layer kinds, the graph's
    cost is what ekg.flops and torch.utils.flop_counter count on the slim model, and every
    grouped conv keeps its groups with as many channels in each."""
    torch.manual_seed(0)
    model = randomise(factory()).eval()
    x = torch.randn(4, *SMALL)
    net, slim = check_slim(model, SMALL, x)
    assert flop_counter(slim, SMALL) == 2 * flops.count(slim, SMALL).flops == 2 * net.graph.cost(net.widths())[0]
    assert flop_counter(model, SMALL) == 2 * net.graph.cost(net.graph.full_widths())[0]
    cut = 0
    full = dict(model.named_modules())
    for name, m in slim.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == full[name].groups and m.in_channels % m.groups == 0 == m.out_channels % m.groups
            cut += (m.in_channels, m.out_channels) != (full[name].in_channels, full[name].out_channels)
    assert cut >= 2
    for gate in net.gates:
        assert gate.kept % gate.blocks == 0 and int(gate.mask().view(gate.blocks, -1).sum(1).unique().numel()) == 1


def test_a_slim_grouped_conv_takes_the_columns_of_its_blocks_kept_inputs():
    """unit1.c2 (groups 4, 3 channels a block) keeping inputs (0 2)(4 5)(6 7)(9 11) and outputs
    (1 2)(3 5)(6 8)(10 11): the row of output o of block g takes block g's kept columns, local
    (0 2), (1 2), (0 1), (0 2); groups stay 4; slim == masked at this cut."""
    torch.manual_seed(0)
    model = randomise(ResNeXtNet()).eval()
    graph = build_graph(model, SMALL)
    read, written = by_producer(graph)["unit1.c1"], by_producer(graph)["unit1.c2"]
    keep = {read.index: [0, 2, 4, 5, 6, 7, 9, 11], written.index: [1, 2, 3, 5, 6, 8, 10, 11]}
    slim = slim_model(model, graph, keep).eval()
    conv, w = slim.unit1.c2, model.unit1.c2.weight.detach()
    cols = {1: [0, 2], 2: [0, 2], 3: [1, 2], 5: [1, 2], 6: [0, 1], 8: [0, 1], 10: [0, 2], 11: [0, 2]}
    want = torch.stack([w[o, cols[o]] for o in keep[written.index]])
    assert (conv.groups, conv.in_channels, conv.out_channels) == (4, 8, 8)
    assert torch.allclose(conv.weight, want * (w.norm() / want.norm()), rtol=1e-6, atol=0)
    assert torch.equal(conv.bias, model.unit1.c2.bias[keep[written.index]])
    net = MaskedNetwork(model, graph)
    for gate, gm in zip(net.gates, net.masks):
        gm.set(torch.isin(torch.arange(gate.channels), torch.tensor(keep.get(gate.group.index, range(gate.channels)))))
    x = torch.randn(4, *SMALL)
    for sliced in (False, True):
        net.set_sliced(sliced)
        check_equivalent(net, slim, x)


def test_slimming_refuses_a_grouped_conv_cut_unevenly_naming_it():
    torch.manual_seed(0)
    model = ResNeXtNet().eval()
    graph = build_graph(model, SMALL)
    read = by_producer(graph)["unit1.c1"]
    with pytest.raises(EkgError, match=r"layer 'unit1.c2' \(a conv with groups=4\) would keep 3, 3, 1, 1 of the 3 "
                                       r"input channels of its 4 groups: a grouped conv keeps the same number"):
        slim_model(model, graph, {read.index: [0, 1, 2, 3, 4, 5, 6, 9]})
    # every conv checks its own groups: even for ga's 2 blocks of 6, not for gb's 3 blocks of 4
    lcm = LcmNet(12).eval()
    graph = build_graph(lcm, SMALL)
    with pytest.raises(EkgError, match=r"layer 'gb' \(a conv with groups=3\) would keep 3, 2, 1 of the 4 input"):
        slim_model(lcm, graph, {by_producer(graph)["c1"].index: [0, 1, 2, 6, 7, 8]})


# ----------------------------------------------------------------------------- the search

def _one_step(model: nn.Module, keep: float = 0.2) -> tuple[Searcher, list[dict], list[torch.Tensor]]:
    """One greedy step (no Otsu filter: every group a candidate): each candidate's rates, and the
    step's scores."""
    graph = build_graph(model, SMALL)
    net = MaskedNetwork(model, graph)
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, *SMALL, generator=gen), torch.randint(0, 10, (8,), generator=gen))]
    searcher = Searcher(net, batches, SearchConfig(keep=keep, batch_size=8, otsu=False))
    seen: list[dict] = []
    scores: list[torch.Tensor] = []
    evaluate, score = CandidateEvaluator.evaluate, Searcher.scores

    def recording_evaluate(self, ensemble, changed_gate=None):
        if changed_gate is not None:
            seen.append({"gate": changed_gate, "rates": [g.rate for g in self.net.gates],
                         "masks": [m.mask.bool().clone() for m in self.net.masks]})
        return evaluate(self, ensemble, changed_gate)

    def recording_scores(self, state):
        out = score(self, state)
        scores.extend(s.clone() for s in out)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CandidateEvaluator, "evaluate", recording_evaluate)
        mp.setattr(Searcher, "scores", recording_scores)
        searcher.step(searcher.initial_state())
    return searcher, seen, scores


def test_a_blocked_groups_step_is_max_1_over_units_0_2_over_n_and_removes_a_unit():
    """A group of C channels in B blocks steps as a group of C/B channels: LcmNet(36)'s input
    group (6 units, 1 producer) by 0.2, its output (6 units, 2 producers) by 1/6, not 0.2/2 (nor
    1/36); ResNeXtNet's 12-wide unit (3 units) by 1/3, and where round(1 - 1/3, 5) would keep
    every unit, to 2/3. The step's costs sum what each block loses."""
    torch.manual_seed(0)
    searcher, seen, scores = _one_step(randomise(LcmNet(36)).eval())
    gates = searcher.net.gates
    names = [g.group.name for g in gates]
    assert names == ["c1", "stream:ga"] and [g.units for g in gates] == [6, 6]
    assert [e["gate"] for e in seen] == [0, 1]
    assert [e["rates"][e["gate"]] for e in seen] == [0.8, round(1 - 1 / 6, 5)]
    assert [gates[e["gate"]].kept_at(e["rates"][e["gate"]]) for e in seen] == [30, 30]
    for e in seen:  # as many channels of every block
        mask = e["masks"][e["gate"]]
        assert mask.view(6, 6).sum(1).tolist() == [5] * 6
    for i, gate in enumerate(gates):
        step = max(1 / 6, 0.2 / len(gate.group.producers))
        assert searcher.last_costs[i] == pytest.approx(step_cost(scores[i], 1.0, step, 6), rel=1e-12)
    assert any(searcher.last_costs[i] != pytest.approx(step_cost(scores[i], 1.0, max(1 / 6, 0.2 / len(g.group.producers))))
               for i, g in enumerate(gates))

    torch.manual_seed(0)
    searcher, seen, _ = _one_step(randomise(ResNeXtNet()).eval())
    gates = searcher.net.gates
    unit1 = next(i for i, g in enumerate(gates) if g.group.name == "unit1.c1")
    [e] = [e for e in seen if e["gate"] == unit1]
    assert e["rates"][unit1] == pytest.approx(2 / 3) and gates[unit1].kept_at(e["rates"][unit1]) == 8


def test_a_blocked_group_down_to_one_channel_a_block_is_no_candidate():
    torch.manual_seed(0)
    model = randomise(ResNeXtNet()).eval()
    net = MaskedNetwork(model, build_graph(model, SMALL))
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, *SMALL, generator=gen), torch.randint(0, 10, (8,), generator=gen))]
    searcher = Searcher(net, batches, SearchConfig(keep=0.2, batch_size=8, otsu=False))
    state = searcher.initial_state()
    one = next(i for i, g in enumerate(net.gates) if g.group.name == "unit1.c1")
    state.rates[one] = 1 / 3  # 4 channels: one of each block
    searcher.restore(state)
    assert net.gates[one].kept == 4
    state = searcher.step(state)
    assert one not in searcher.last_candidates and len(searcher.last_candidates) == len(net.gates) - 1
    assert net.gates[one].kept == 4 and state.log[-1]["group"] != one


def test_the_floor_is_every_blocked_group_at_one_channel_a_block():
    graph = build_graph(ResNeXtNet().eval(), SMALL)
    ones = graph.full_widths()
    for g in graph.prunable:
        ones[g.index] = g.blocks
    floor = graph.cost(ones)[0] / graph.cost(graph.full_widths())[0]
    assert floor_ratio(graph, SearchConfig()) == pytest.approx(floor, rel=1e-12)
    check_reachable(graph, SearchConfig(keep=floor))
    with pytest.raises(EkgError, match=r"cannot reach `keep` .* at one channel \(one a block where grouped convs"):
        check_reachable(graph, SearchConfig(keep=floor * 0.999))


@pytest.mark.parametrize("method", ["greedy", "uniform"])
def test_prune_a_resnext_lands_on_the_budget_in_whole_blocks_and_reloads(tmp_path, method):
    """ekg.prune end to end (slim == masked is checked on the way): the FLOPs ratio lands at or
    just below keep (the greedy search; the uniform baseline's one rate for every group lands
    where its grid allows), every grouped conv keeps its groups with as many channels in each, and
    the pruned checkpoint reloads with its factory and computes the same."""
    from ekg.pruning import prune

    torch.manual_seed(0)
    model = randomise(ResNeXtNet())
    full = flops.count(model, SMALL).flops
    keep = 0.6
    cfg = SearchConfig(adapt=False, val_per_class=1, sub_per_class=1, batch_size=10, method=method)
    res = prune(model, random_data(), keep, out=tmp_path / "run", config=cfg, progress=False,
                factory="tests:ResNeXtNet")
    assert res.flops / full <= keep and (method == "uniform" or res.flops / full > keep - 0.01)
    assert res.flops == flops.count(res.model, SMALL).flops and res.slim_max_diff < 1e-4
    for unit in (res.model.unit1, res.model.unit2):
        assert unit.c2.groups == 4 and unit.c2.in_channels % 4 == 0 == unit.c2.out_channels % 4
        assert unit.c1.out_channels == unit.c2.in_channels and unit.c2.out_channels == unit.c3.in_channels
    widths = [(u.c2.in_channels, u.c2.out_channels) for u in (res.model.unit1, res.model.unit2)]
    assert widths != [(12, 12), (24, 24)]
    back = load_checkpoint(tmp_path / "run" / "pruned.pt", factory=ResNeXtNet)
    assert back.model.unit1.c2.groups == 4
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        assert torch.equal(back.model.eval()(x), res.model.eval()(x))

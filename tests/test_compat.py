"""``SearchConfig.compat = "release"``: the original TensorFlow release's effective search rules,
each checked where the search uses it (inside ``Searcher.step``, inside ``adapt``, the ratio the
searcher computes), against literal transcriptions of the release's code; and ``compat="method"``
unchanged. docs/design.md, "``--compat release``", lists the rules and where each comes from.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import random_bn, tiny_batches
from ekg.data import ImageSet
from ekg.distributed import Dist
from ekg.flops import count
from ekg.masks import MaskedNetwork, kept_channels
from ekg.models import ResNetSpec, build_model, create_model
from ekg.search import (
    RELEASE_ADAPT_DIVISOR,
    SearchConfig,
    Searcher,
    adapt,
    land_rate,
    land_rate_release,
    release_gate_order,
    release_step_cost,
    step_cost,
    step_size,
    trimmed_otsu_threshold,
)

from test_search_rules import _gi  # noqa: E402

N_CLASSES = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> nn.Module:
    """ResNet-20 (projection shortcuts: stream groups prunable) with random BN parameters."""
    return random_bn(create_model("resnet20", N_CLASSES, seed=seed), seed)


@pytest.fixture
def net() -> MaskedNetwork:
    return MaskedNetwork(_model(0))


@pytest.fixture(scope="module")
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return tiny_batches(N_CLASSES)


def _searcher(net: MaskedNetwork, batches, compat: str, **kw) -> tuple[Searcher, object]:
    cfg = SearchConfig(**{"keep": 0.2, "batch_size": 8, "fast": False, "sliced": False, "compat": compat, **kw})
    searcher = Searcher(net, batches, cfg)
    return searcher, searcher.initial_state()


def _record_scores(searcher: Searcher) -> list:
    """Wrap ``searcher.scores`` so the scores a step computes can be read back."""
    seen: list = []
    inner = searcher.scores

    def scores(state):
        out = inner(state)
        seen.append([s.clone() for s in out])
        return out

    searcher.scores = scores  # type: ignore[method-assign]
    return seen


def _record_evaluations(searcher: Searcher) -> dict[int, float]:
    """Wrap the evaluator: the rate each candidate gate is evaluated at."""
    tried: dict[int, float] = {}
    inner = searcher.evaluator.evaluate

    def evaluate(ensemble, changed_gate=None):
        if changed_gate is not None:
            tried[changed_gate] = searcher.net.gates[changed_gate].rate
        return inner(ensemble, changed_gate=changed_gate)

    searcher.evaluator.evaluate = evaluate  # type: ignore[method-assign]
    return tried


# ============================================================================ the release's transcriptions


def _release_mask_marking_cost(score: np.ndarray, rate: float, ss: float) -> float:
    """prune_utils.EKG.mask_marking, one gate: ``s`` is the ``[1,1,1,C]`` score variable."""
    s = score.reshape(1, 1, 1, -1)
    r = np.float32(rate).item()  # its rate variable is float32; numpy 1.x arithmetic then went float64
    s = np.sort(s)
    r = 1. - r
    s = s[round(r * s.size):round((r + ss) * s.size)]
    return float(np.sum(s))


def _release_check_next_step(width_list: list[float], i: int, search_step_i: float, fine_step_i: float,
                             search_step: float, ratio_of, target: float) -> float:
    """prune_utils.EKG.check_next_step + fine_search: the width gate ``i`` is evaluated at.
    ``ratio_of(width_list)`` is ``f/ori_f`` after ``set_width(width_list)``."""
    width_list = list(width_list)
    width_list[i] = round(width_list[i] - search_step_i, 5)
    if ratio_of(width_list) < target:
        # fine_search(i)
        W = width_list[i]
        for w in np.arange(W, W + search_step, fine_step_i):
            width_list[i] = round(w, 2)
            if ratio_of(width_list) > target:
                width_list[i] = round(w - fine_step_i, 5)
                break
    return float(width_list[i])


# ============================================================================ 1. candidate cost


def test_release_cost_is_every_score_while_untouched_and_zero_once_partly_pruned() -> None:
    scores = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0, 0.5, 0.25, 7.0, 6.0, 8.0, 9.0, 1.5, 2.5, 3.5, 4.5, 5.5],
                          dtype=torch.float64)
    total = float(scores.sum())
    assert release_step_cost(scores, 1.0, 0.2) == total
    assert release_step_cost(scores, 0.97, 0.2) == total  # round(0.03·16) = 0: counts as untouched
    assert release_step_cost(scores, 0.96875, 0.0625) == total  # round(0.5) = 0 (banker's rounding)
    for rate in (0.9375, 0.8, 0.5, 0.0625):
        assert release_step_cost(scores, rate, 0.2) == 0.0
    # the method's cost: the scores of the channels the step removes (the 3 lowest at rate 1)
    assert step_cost(scores, 1.0, 0.2) == pytest.approx(0.25 + 0.5 + 1.0)
    for rate in (1.0, 0.97, 0.96875, 0.9375, 0.8, 0.5, 0.0625):
        assert release_step_cost(scores, rate, 0.2) == _release_mask_marking_cost(scores.numpy(), rate, 0.2)


def _constructed_state(net: MaskedNetwork, state) -> dict[str, int]:
    """Some gates partly pruned, one at rate 0.97 (16 channels kept), one at one channel with its
    rate above 0, one at rate 0."""
    g = torch.Generator().manual_seed(1)
    which = {"partly": _gi(net, "layer1.0.conv1"), "almost": _gi(net, "layer1.1.conv1"),
             "one": _gi(net, "layer2.1.conv1"), "zero": _gi(net, "layer3.2.conv1"),
             "stream": _gi(net, "layer3.0.conv2")}
    for key, rate in (("partly", 0.8), ("almost", 0.97), ("one", 0.03125), ("zero", 0.0), ("stream", 0.9)):
        i = which[key]
        state.rates[i] = rate
        state.ranks[i] = torch.randperm(net.gates[i].channels, generator=g)
    return which


def test_step_costs_and_candidates_under_release(net: MaskedNetwork, batches) -> None:
    searcher, state = _searcher(net, batches, "release")
    which = _constructed_state(net, state)
    searcher.restore(state)
    assert net.gates[which["one"]].kept == 1 and net.gates[which["almost"]].kept == 16
    rates = net.rates()
    seen = _record_scores(searcher)
    searcher.step(state)
    scores = seen[0]
    gates = net.gates
    # active: every gate whose rate is above 0 (one channel left or not), in the release's numbering
    order = release_gate_order(net)
    expected_active = [i for i in order if rates[i] > 0]
    assert list(searcher.last_costs) == expected_active
    assert which["one"] in expected_active and which["zero"] not in expected_active
    for i in expected_active:
        ss = step_size(gates[i].channels, gates[i].n_producers, 0.2)
        want = _release_mask_marking_cost(scores[i].numpy(), rates[i], ss)
        assert searcher.last_costs[i] == pytest.approx(want, rel=1e-12, abs=0)
        untouched = rates[i] == 1.0 or i == which["almost"]
        assert (want > 0) == untouched, i
    threshold = trimmed_otsu_threshold(list(searcher.last_costs.values()), 0.2)
    assert searcher.last_candidates == [i for i in expected_active if searcher.last_costs[i] <= threshold]
    # every partly pruned gate costs 0 and is a candidate
    for key in ("partly", "one", "stream"):
        assert which[key] in searcher.last_candidates


def test_step_costs_and_candidates_under_method_are_unchanged(net: MaskedNetwork, batches) -> None:
    searcher, state = _searcher(net, batches, "method")
    which = _constructed_state(net, state)
    searcher.restore(state)
    rates = net.rates()
    seen = _record_scores(searcher)
    searcher.step(state)
    scores = seen[0]
    gates = net.gates
    expected_active = [i for i in range(len(gates)) if kept_channels(gates[i].channels, rates[i]) > 1]
    assert list(searcher.last_costs) == expected_active
    assert which["one"] not in expected_active and which["zero"] not in expected_active
    for i in expected_active:
        ss = step_size(gates[i].channels, gates[i].n_producers, 0.2)
        assert searcher.last_costs[i] == step_cost(scores[i], rates[i], ss)
    threshold = trimmed_otsu_threshold(list(searcher.last_costs.values()), 0.2)
    assert searcher.last_candidates == [i for i in expected_active if searcher.last_costs[i] <= threshold]
    assert searcher.order == list(range(len(gates))) and searcher.bn_ops is False


# ============================================================================ 2. adaptation loss


def _hand_adapt(model: nn.Module, batches, cfg: SearchConfig, divisor: float) -> dict[str, torch.Tensor]:
    """One pass of hand-written SGD (Nesterov momentum, coupled weight decay) on
    ``sum CE / divisor``, BN in training mode."""
    model = copy.deepcopy(model).train()
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    bufs = [None] * len(params)
    for x, y in batches:
        loss = F.cross_entropy(model(x), y, reduction="sum") / divisor
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for k, (p, g) in enumerate(zip(params, grads)):
                d = g + cfg.adapt_weight_decay * p
                bufs[k] = d.clone() if bufs[k] is None else cfg.adapt_momentum * bufs[k] + d
                p -= cfg.adapt_lr * (d + cfg.adapt_momentum * bufs[k])
    return {k: v.detach() for k, v in model.state_dict().items()}


def _adapted(model: nn.Module, batches, cfg: SearchConfig, dist: Dist | None = None) -> dict[str, torch.Tensor]:
    m = copy.deepcopy(model)
    adapt(m, iter(batches), cfg, dist=dist)
    return {k: v.detach() for k, v in m.state_dict().items()}


def _assert_same(a: dict, b: dict) -> None:
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-6), k


def _assert_differ(a: dict, b: dict) -> None:
    assert any(not torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-6) for k in a)


@pytest.fixture(scope="module")
def adapt_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, N_CLASSES, (8,), generator=g)) for _ in range(2)]


def test_adapt_release_is_summed_ce_over_128(adapt_batches) -> None:
    model = _model(1)
    cfg = SearchConfig(batch_size=8, compat="release")
    got = _adapted(model, adapt_batches, cfg)
    assert RELEASE_ADAPT_DIVISOR == 128
    _assert_same(got, _hand_adapt(model, adapt_batches, cfg, 128))
    _assert_differ(got, _hand_adapt(model, adapt_batches, cfg, 8))  # not the mean CE
    # on the release's 256-image batches this is twice the mean-CE gradient
    assert RELEASE_ADAPT_DIVISOR == SearchConfig().batch_size / 2


def test_adapt_method_is_mean_ce_unchanged(adapt_batches) -> None:
    model = _model(1)
    cfg = SearchConfig(batch_size=8)
    got = _adapted(model, adapt_batches, cfg)
    _assert_same(got, _hand_adapt(model, adapt_batches, cfg, 8))
    _assert_differ(got, _hand_adapt(model, adapt_batches, cfg, 128))


class _OneRankAsTorchrun(Dist):
    """The torchrun code path of ``adapt`` (rows, synced BN, summed gradients) on a one-process
    gloo group: every all-reduce is the identity."""

    @property
    def enabled(self) -> bool:  # type: ignore[override]
        return True


@pytest.mark.parametrize("compat", ["method", "release"])
def test_adapt_torchrun_path_uses_the_same_loss(adapt_batches, tmp_path, compat: str) -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        pytest.skip("a process group is already initialised")
    tdist.init_process_group("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = _model(1)
        cfg = SearchConfig(batch_size=8, compat=compat)
        got = _adapted(model, adapt_batches, cfg, dist=_OneRankAsTorchrun())
    finally:
        tdist.destroy_process_group()
    _assert_same(got, _hand_adapt(model, adapt_batches, cfg, 128 if compat == "release" else 8))


# ============================================================================ 3. FLOPs ratio with BN ops


def _slim_spec_model(net: MaskedNetwork, rates: list[float]) -> nn.Module:
    """The CIFAR ResNet-20 of the widths ``rates`` give (built from its spec, not from the graph)."""
    kept = {g.group.name: kept_channels(g.channels, r) for g, r in zip(net.gates, rates)}
    streams = [kept["stream:conv1"], kept["stream:layer2.0.conv2"], kept["stream:layer3.0.conv2"]]
    blocks = [[kept[f"layer{s}.{j}.conv1"] for j in range(3)] for s in (1, 2, 3)]
    return build_model(ResNetSpec(depth=20, num_classes=N_CLASSES, stage_widths=streams, block_widths=blocks))


@pytest.mark.parametrize("compat", ["method", "release"])
def test_searcher_ratio_counts_bn_ops_under_release(net: MaskedNetwork, batches, compat: str) -> None:
    searcher, state = _searcher(net, batches, compat)
    g = torch.Generator().manual_seed(2)
    rates = [round(float(torch.empty(1).uniform_(0.2, 1.0, generator=g)), 5) for _ in net.gates]
    full = _slim_spec_model(net, [1.0] * len(net.gates))
    slim = _slim_spec_model(net, rates)
    with_bn = count(slim, bn_ops=True).flops / count(full, bn_ops=True).flops
    macs = count(slim).flops / count(full).flops
    assert with_bn != pytest.approx(macs, rel=1e-4)
    want = with_bn if compat == "release" else macs
    assert searcher.ratio(rates) == pytest.approx(want, rel=1e-12)
    # what a step logs and stops on is that ratio
    searcher.restore(state)
    state = searcher.step(state)
    assert state.log[-1]["flops_ratio"] == pytest.approx(searcher.ratio(), rel=1e-12)
    logged = count(_slim_spec_model(net, state.rates), bn_ops=compat == "release").flops
    assert state.log[-1]["flops"] == logged


# ============================================================================ 4. landing (fine_search)


def test_land_rate_release_hand_cases() -> None:
    def ratio_of(c: int, other: int = 24, const: float = 300.0):
        return lambda r: (const + other * kept_channels(c, r)) / (const + other * c)

    # C=16, step 1/16 from rate 1: W = 0.9375 (15 channels) is below keep; round(0.9375, 2) = 0.94
    # keeps 16 channels (over keep), so it settles on round(0.9375 - 1/16, 5) = 0.875: 14 channels,
    # where the method keeps 15
    r16 = ratio_of(16)
    keep = (r16(0.9375) + r16(1.0)) / 2
    assert land_rate_release(1.0, 1 / 16, 16, r16, keep, 0.2) == 0.875
    assert land_rate(1.0, 1 / 16, 16, r16, keep) == 0.9375
    # C=64, step 0.2 from rate 1: tries 0.8, 0.82, ..., 0.89 (57 channels), 0.91 (59: over keep), and
    # settles on round(0.909375 - 1/64, 5) = 0.89375: 58 channels, above keep (the search goes on)
    r64 = ratio_of(64)
    keep = (r64(57 / 64) + r64(58 / 64)) / 2
    got = land_rate_release(1.0, 0.2, 64, r64, keep, 0.2)
    assert got == 0.89375 and kept_channels(64, got) == 58 and r64(got) > keep
    assert kept_channels(64, land_rate(1.0, 0.2, 64, r64, keep)) == 57
    # no overshoot in the whole walk (C=100, walk 0.8 .. 0.99): it stays at the last rate tried
    r100 = ratio_of(100)
    keep = (r100(0.99) + r100(1.0)) / 2
    assert land_rate_release(1.0, 0.2, 100, r100, keep, 0.2) == 0.99
    # not below keep (equal): no fine search at all (a fine search would settle on 0.875 here)
    assert land_rate_release(1.0, 1 / 16, 16, r16, r16(0.9375), 0.2) == 0.9375
    assert land_rate_release(1.0, 0.2, 16, r16, r16(0.8), 0.2) == 0.8 == land_rate(1.0, 0.2, 16, r16, r16(0.8))
    # against the literal transcription, on many cases
    for c, ratio in ((16, r16), (64, r64), (100, r100)):
        for rate in (1.0, 0.9, 0.51, 0.3):
            for st in (max(1 / c, 0.02), 0.2):
                for keep in np.linspace(ratio(0.05), ratio(rate), 25)[1:-1]:
                    want = _release_check_next_step([rate], 0, st, 1 / c, 0.2, lambda w: ratio(w[0]), keep)
                    assert land_rate_release(rate, st, c, ratio, keep, 0.2) == want


def _keep_where_landings_differ(searcher: Searcher, i: int) -> float:
    """A keep at which gate ``i``'s step from rate 1 lands differently under the release."""
    net = searcher.net
    gate = net.gates[i]
    st = step_size(gate.channels, gate.n_producers, 0.2)
    base = net.rates()

    def ratio_at(r: float) -> float:
        trial = list(base)
        trial[i] = r
        return searcher.ratio(trial)

    lo, hi = ratio_at(round(1.0 - st, 5)), ratio_at(1.0)
    for keep in np.linspace(lo, hi, 200)[1:-1]:
        a = land_rate(1.0, st, gate.channels, ratio_at, keep)
        b = land_rate_release(1.0, st, gate.channels, ratio_at, keep, 0.2)
        if kept_channels(gate.channels, a) != kept_channels(gate.channels, b):
            return float(keep)
    raise AssertionError("no keep separates the two landings")


def test_step_lands_every_candidate_as_the_release_fine_search(net: MaskedNetwork, batches) -> None:
    probe, _ = _searcher(net, batches, "release")
    i = _gi(net, "layer3.0.conv1")  # C = 64, n = 1: step 0.2
    keep = _keep_where_landings_differ(probe, i)
    searcher, state = _searcher(net, batches, "release", keep=keep, otsu=False)
    tried = _record_evaluations(searcher)
    width_list = list(state.rates)
    state = searcher.step(state)
    gates = net.gates
    assert set(tried) == set(range(len(gates)))  # every gate evaluated (no filter)
    fine_searched = 0
    for j, gate in enumerate(gates):
        ss = step_size(gate.channels, gate.n_producers, 0.2)
        want = _release_check_next_step(width_list, j, ss, 1 / gate.channels, 0.2, searcher.ratio, keep)
        assert tried[j] == want, (j, gate.group.name)
        fine_searched += searcher.ratio([*width_list[:j], round(1.0 - ss, 5), *width_list[j + 1:]]) < keep
    assert fine_searched >= 1
    # the release's landing, not the method's, for the gate the keep was chosen for
    assert kept_channels(64, tried[i]) != kept_channels(
        64, land_rate(1.0, 0.2, 64, lambda r: searcher.ratio([*width_list[:i], r, *width_list[i + 1:]]), keep))
    winner = state.log[-1]["group"]
    assert state.rates[winner] == tried[winner]
    assert state.done == (searcher.ratio() <= keep)


def test_step_under_method_lands_as_before(net: MaskedNetwork, batches) -> None:
    probe, _ = _searcher(net, batches, "method")
    i = _gi(net, "layer3.0.conv1")
    keep = _keep_where_landings_differ(probe, i)
    searcher, state = _searcher(net, batches, "method", keep=keep, otsu=False)
    tried = _record_evaluations(searcher)
    width_list = list(state.rates)
    searcher.step(state)
    for j, gate in enumerate(net.gates):
        ss = step_size(gate.channels, gate.n_producers, 0.2)

        def ratio_at(r: float, j: int = j) -> float:
            return searcher.ratio([*width_list[:j], r, *width_list[j + 1:]])

        assert tried[j] == land_rate(1.0, ss, gate.channels, ratio_at, keep)


# ============================================================================ 5. gate order for ties


def test_release_gate_order_resnet20() -> None:
    net = MaskedNetwork(_model(0))
    names = [net.gates[i].group.name for i in release_gate_order(net)]
    # nets/ResNet.py lists BasicBlock{s}.0/conv3 before conv1; initialize_Gate numbers gates in that order
    assert names == ["stream:conv1", "layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1",
                     "stream:layer2.0.conv2", "layer2.0.conv1", "layer2.1.conv1", "layer2.2.conv1",
                     "stream:layer3.0.conv2", "layer3.0.conv1", "layer3.1.conv1", "layer3.2.conv1"]
    # ekg's own order puts each later stage's stream after its first block's inner gate
    ours = [g.group.name for g in net.gates]
    assert ours.index("layer2.0.conv1") < ours.index("stream:layer2.0.conv2")


class _Bottleneck(nn.Module):
    """torchvision's Bottleneck layout: conv1 (1×1), conv2 (3×3), conv3 (1×1), downsample after."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu(out + identity)


class _TinyResNet50Like(nn.Module):
    """Stem + maxpool, then two stages of two bottlenecks (the first stage projects too, as ResNet-50's)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(_Bottleneck(8, 4, 16, 1), _Bottleneck(16, 4, 16, 1))
        self.layer2 = nn.Sequential(_Bottleneck(16, 8, 32, 2), _Bottleneck(32, 8, 32, 1))
        self.fc = nn.Linear(32, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_release_gate_order_bottleneck_resnet() -> None:
    net = MaskedNetwork(_TinyResNet50Like(), input_size=(3, 16, 16))
    names = [net.gates[i].group.name for i in release_gate_order(net)]
    # the release (ResNet-50): conv, then per block conv3 (projection), conv0, conv1, [conv2 -> stream]
    assert names == ["conv1",
                     "stream:layer1.0.conv3", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
                     "stream:layer2.0.conv3", "layer2.0.conv1", "layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2"]


def test_release_gate_order_falls_back_without_a_prunable_stream() -> None:
    net = MaskedNetwork(create_model("resnet20_a", N_CLASSES, seed=0))  # zero-padding: streams frozen
    assert not any(len(g.group.producers) > 1 for g in net.gates)
    assert release_gate_order(net) is None
    cfg = SearchConfig(compat="release", fast=False, sliced=False, batch_size=2)
    assert Searcher(net, [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))], cfg).order == list(range(len(net.gates)))


def _tie(searcher: Searcher, tied: set[int]) -> list[int]:
    """Make every candidate in ``tied`` reward J = 1 and every other J = 2; returns the order in
    which candidates were evaluated."""
    seen: list[int] = []
    inner = searcher.evaluator.evaluate

    def evaluate(ensemble, changed_gate=None):
        ev = inner(ensemble, changed_gate=changed_gate)
        if changed_gate is not None:
            seen.append(changed_gate)
            ev.j = 1.0 if changed_gate in tied else 2.0
        return ev

    searcher.evaluator.evaluate = evaluate  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("compat", ["method", "release"])
def test_ties_go_to_the_first_gate_in_the_release_order(net: MaskedNetwork, batches, compat: str) -> None:
    searcher, state = _searcher(net, batches, compat, otsu=False)
    inner, stream = _gi(net, "layer2.0.conv1"), _gi(net, "layer2.0.conv2")
    assert inner < stream  # ekg's order
    seen = _tie(searcher, {inner, stream})
    state = searcher.step(state)
    assert {inner, stream} <= set(seen)
    want = stream if compat == "release" else inner
    assert state.log[-1]["group"] == want
    assert searcher.order == (release_gate_order(net) if compat == "release" else list(range(len(net.gates))))


def test_ties_under_release_with_every_reward_equal(net: MaskedNetwork, batches) -> None:
    """np.argmin over the release's numbering: with gates 0..3 of stage 1 out (rate 0), the stage-2
    stream (numbered before layer2.0's inner gate) wins an all-equal tie."""
    searcher, state = _searcher(net, batches, "release", otsu=False)
    for name in ("conv1", "layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1"):
        state.rates[_gi(net, name)] = 0.0
    searcher.restore(state)
    _tie(searcher, set(range(len(net.gates))))
    state = searcher.step(state)
    assert state.log[-1]["group"] == _gi(net, "layer2.0.conv2")


# ============================================================================ end to end


def test_prune_with_compat_release_runs_and_records_it(tmp_path) -> None:
    from ekg.checkpoint import Checkpoint
    from ekg.data import DataSplits, get_normalization
    from ekg.pruning import prune

    gen = torch.Generator().manual_seed(3)
    n = 10 * 6
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    classes = [f"c{i}" for i in range(10)]
    splits = DataSplits("cifar10", ImageSet(images, labels, classes), ImageSet(images, labels, classes), "random")
    ckpt = Checkpoint(model=create_model("resnet20", N_CLASSES, seed=0),
                      normalization={"name": "cifar10", **get_normalization("cifar10").to_dict()},
                      dataset={"name": "cifar10", "num_classes": N_CLASSES})
    cfg = SearchConfig(compat="release", val_per_class=2, sub_per_class=4, batch_size=8, device="cpu")
    res = prune(ckpt, splits, 0.9, out=tmp_path / "run", config=cfg, progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["search"]
    assert saved["compat"] == "release" and saved["keep"] == 0.9
    assert res.flops_ratio <= 0.9 and res.steps >= 1
    # the logged ratio counts BN ops (the release's FLOPs)
    bn = count(res.checkpoint.model, bn_ops=True).flops / count(create_model("resnet20", N_CLASSES), bn_ops=True).flops
    assert res.flops_ratio == pytest.approx(bn, rel=1e-9)

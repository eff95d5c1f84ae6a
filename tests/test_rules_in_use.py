"""Every rule of the method (docs/ekg-method.md), checked where the code *uses* it.

tests/test_search_rules.py unit-tests the helpers (``step_size``, ``objective``, ...). The tests
here run the code that applies them — ``Searcher.initial_state``/``step``/``run``, ``prune``'s
adaptation and search sets, ``bank_for_run``/``build_bank``, the trainer, the CLI's
configurations — and compare what it did with an independent computation: a hand-written masked
forward pass (``_reference_forward``, norm-preserving kernels, masks at the activation outputs,
BN on batch statistics), hand-written J/CE/Taylor scores/Otsu filter/step sizes/landing, a
hand-written SGD step. So a rule broken at the place it is used fails here, even when the
helper's own unit test still passes (bench/mutants.py checks exactly that).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ekg.masks import MaskedNetwork, kept_channels
from ekg.models import create_model
from ekg.search import CandidateEvaluator, SearchConfig, Searcher
from ekg.search import searcher as searcher_mod  # where Searcher looks up the rules it calls

from conftest import fake_history, random_bn
from test_search_rules import _gi, _reference_forward, _stream_gates

N_CLASSES = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_bn(model: nn.Module, seed: int) -> nn.Module:
    """Random BN affine parameters and running statistics (far from any batch's statistics, so
    that BN on running statistics would give other numbers than BN on batch statistics)."""
    return random_bn(model, seed, running=(0.5, 0.3, 3.0))


def _batches(sizes=(8, 6), seed: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, N_CLASSES, (n,), generator=g)) for n in sizes]


def _masks_by_block(net: MaskedNetwork, masks: list[torch.Tensor]):
    """Gate masks as ``_reference_forward`` takes them: the three stage streams, and the inner
    mask of each block."""
    streams = [masks[i] for i in _stream_gates(net)]
    inner = {}
    for s in range(3):
        for j in range(len(getattr(net.model, f"layer{s + 1}"))):
            inner[(s, j)] = masks[_gi(net, f"layer{s + 1}.{j}.conv1")]
    return streams, inner


def _reference_logits(net: MaskedNetwork, masks: list[torch.Tensor], batches) -> torch.Tensor:
    """Logits of the sub-network ``masks`` on ``batches``, written out by hand: masks after the
    stem's, each inner and each block's add + ReLU, norm-preserving kernels, and every BN on the
    statistics of the current batch (a copy of the model in training mode)."""
    model = copy.deepcopy(net.model).train()
    streams, inner = _masks_by_block(net, [m.float() for m in masks])
    with torch.no_grad():
        return torch.cat([_reference_forward(model, streams, inner, x.contiguous()) for x, _ in batches])


def _hand_j(z: torch.Tensor, y: torch.Tensor, k: torch.Tensor) -> float:
    """J = CE(labels, z) + CE(softmax(K), z), averaged per sample."""
    log_p = F.log_softmax(z.double(), 1)
    hard = -log_p[torch.arange(len(y)), y]
    soft = -(F.softmax(k.double(), 1) * log_p).sum(1)
    return float((hard + soft).mean())


def _hand_ce(z: torch.Tensor, y: torch.Tensor) -> float:
    log_p = F.log_softmax(z.double(), 1)
    return float(-log_p[torch.arange(len(y)), y].mean())


def _hand_taylor(net: MaskedNetwork, masks: list[torch.Tensor], batches, k: torch.Tensor, nominal: int):
    """|Σ_{n,h,w} (∂J/∂y)·y| per batch and mask point, summed per gate, on the hand-written
    forward; J with the ensemble ``k`` (hard CE + soft CE against softmax(K), summed / nominal)."""
    model = copy.deepcopy(net.model).train()
    streams, inner = _masks_by_block(net, [m.float() for m in masks])
    key_to_gate = {("stream", s): i for s, i in enumerate(_stream_gates(net))}
    key_to_gate.update({("inner", s, j): _gi(net, f"layer{s + 1}.{j}.conv1") for (s, j) in inner})
    scores = [torch.zeros(g.channels, dtype=torch.float64) for g in net.gates]
    start = 0
    for x, y in batches:
        record: list = []
        with torch.enable_grad():
            out = _reference_forward(model, streams, inner, x.contiguous().clone().requires_grad_(True), record)
            kb = k[start:start + len(y)]
            j = F.cross_entropy(out, y, reduction="sum") - (F.softmax(kb, 1) * F.log_softmax(out, 1)).sum()
            (j / nominal).backward()
        start += len(y)
        for key, yv in record:
            gate = key_to_gate[key[:2] if key[0] == "stream" else key]
            scores[gate] += (yv.grad * yv).detach().sum((0, 2, 3)).abs().double()
    return scores


def _hand_otsu(costs: list[float], trim: float = 0.2) -> float:
    """The trimmed Otsu threshold, brute force: drop ceil(n·trim) at each end, try every split
    (as the release: never isolating the top value), threshold at the midpoint of the best."""
    s = sorted(costs)
    k = math.ceil(len(s) * trim)
    s = s[k:len(s) - k] if k else s
    if len(s) < 3:
        return math.inf
    best, best_t = -1.0, None
    for t in range(1, len(s) - 1):
        a, b = s[:t], s[t:]
        v = len(a) * len(b) * (sum(a) / len(a) - sum(b) / len(b)) ** 2
        if v > best:
            best, best_t = v, t
    return (s[best_t - 1] + s[best_t]) / 2


def _hand_cost(scores: torch.Tensor, rate: float, step: float) -> float:
    s = sorted(scores.tolist())
    c = len(s)
    return sum(s[round((1 - rate) * c):round((1 - rate + step) * c)])


def _hand_step(channels: int, producers: int) -> float:
    return max(1 / channels, 0.2 / producers)


def _hand_ranks(scores: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Rank by descending score, live channels before masked ones, ties in channel order."""
    order = sorted(range(len(scores)), key=lambda c: (not bool(live[c]), -float(scores[c]), c))
    ranks = torch.empty(len(scores), dtype=torch.long)
    ranks[torch.tensor(order)] = torch.arange(len(scores))
    return ranks


# ============================================================================ the greedy search, traced

def _trace(reward: str, steps: int = 2, seed: int = 7) -> dict:
    """Run ``steps`` greedy steps on a random ResNet-20 (projection shortcuts: every group prunable)
    and record what each step saw and did: the scores it used, every candidate evaluation (the
    masks and rates at that moment and its Evaluation), the state before and after."""
    model = _random_bn(create_model("resnet20", seed=seed), seed)
    model.eval()  # as prune() leaves it: the search must run BN on batch statistics all the same
    net = MaskedNetwork(model)
    batches = _batches()
    cfg = SearchConfig(keep=0.2, batch_size=8, reward=reward)
    searcher = Searcher(net, batches, cfg)
    out: dict = {"net": net, "batches": batches, "cfg": cfg, "searcher": searcher, "steps": []}
    real_evaluate, real_taylor = CandidateEvaluator.evaluate, searcher_mod.taylor_scores
    current: dict = {}

    def evaluate(self, ensemble, changed_gate=None):
        ev = real_evaluate(self, ensemble, changed_gate)
        current.setdefault("evals", []).append({
            "gate": changed_gate, "masks": [m.mask.bool().clone() for m in self.net.masks],
            "rates": [g.rate for g in self.net.gates], "ensemble": None if ensemble is None else ensemble.clone(),
            "ev": ev, "logits": torch.cat([z.float() for z in ev.parts])})
        return ev

    def taylor(net_, batches_, ensemble, nominal, **kw):
        scores = real_taylor(net_, batches_, ensemble, nominal, **kw)
        current.setdefault("taylor", []).append({"ensemble": None if ensemble is None else ensemble.clone(),
                                                 "nominal": nominal, "scores": [s.clone() for s in scores]})
        return scores

    real_otsu = searcher_mod.trimmed_otsu_threshold

    def otsu(costs, trim=0.2):
        current.setdefault("costs", []).append(list(costs))
        return real_otsu(costs, trim)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CandidateEvaluator, "evaluate", evaluate)
        mp.setattr(searcher_mod, "taylor_scores", taylor)
        mp.setattr(searcher_mod, "trimmed_otsu_threshold", otsu)
        state = searcher.initial_state()
        out["initial"] = {"ensemble": state.ensemble.clone(), "count": state.ensemble_count,
                          "history": copy.deepcopy(state.history), "evals": current.pop("evals", [])}
        # a strong, arbitrary ensemble: J and CE then disagree on the winner, and the scores with
        # K differ clearly from the scores without it
        state.ensemble = torch.randn(state.ensemble.shape, generator=torch.Generator().manual_seed(seed)) * 4
        for _ in range(steps):
            before = {"rates": list(state.rates), "masks": [m.mask.bool().clone() for m in net.masks],
                      "ensemble": state.ensemble.clone(), "count": state.ensemble_count,
                      "ranks": [r.clone() for r in state.ranks]}
            current.clear()
            state = searcher.step(state)
            out["steps"].append({"before": before, "evals": current.get("evals", []),
                                 "taylor": current.get("taylor", []), "costs": current.get("costs", []),
                                 "after": {"rates": list(state.rates), "masks": [m.mask.bool().clone() for m in net.masks],
                                           "ensemble": state.ensemble.clone(), "count": state.ensemble_count,
                                           "ranks": [r.clone() for r in state.ranks],
                                           "history": copy.deepcopy(state.history[-1]), "log": dict(state.log[-1])}})
    out["state"] = state
    return out


@pytest.fixture(scope="module")
def trace() -> dict:
    return _trace("ensemble")


@pytest.fixture(scope="module")
def trace_val_loss() -> dict:
    return _trace("val-loss")


def _labels(batches) -> torch.Tensor:
    return torch.cat([y for _, y in batches])


def _candidate_evals(step: dict) -> list[dict]:
    return [e for e in step["evals"] if e["gate"] is not None]


def test_k_starts_as_the_unpruned_networks_batch_statistics_logits(trace) -> None:
    """Step 0: K = the unpruned network's D_val logits (BN on each batch's statistics, although the
    model was left in inference mode), counted once; the history holds its masks and CE loss."""
    net, batches, init = trace["net"], trace["batches"], trace["initial"]
    want = _reference_logits(net, [torch.ones(g.channels, dtype=torch.bool) for g in net.gates], batches)
    assert torch.allclose(init["ensemble"], want, rtol=1e-4, atol=1e-5)
    assert init["count"] == 1
    [entry] = init["history"]
    assert all(bool(m.all()) for m in entry["masks"])
    assert entry["loss"] == pytest.approx(_hand_ce(want, _labels(batches)), rel=1e-5)


@pytest.mark.parametrize("which", ["ensemble", "val-loss"])
def test_the_winner_is_the_candidate_with_the_lowest_reward(which, request) -> None:
    """Every candidate is evaluated as the hand-written sub-network would compute it; the step
    applies the one with the lowest J (reward "ensemble") or the lowest CE ("val-loss")."""
    tr = request.getfixturevalue("trace" if which == "ensemble" else "trace_val_loss")
    net, batches = tr["net"], tr["batches"]
    y = _labels(batches)
    disagree = 0
    for step in tr["steps"]:
        k = step["before"]["ensemble"]
        cands = _candidate_evals(step)
        assert len(cands) >= 2
        js, ces = [], []
        for e in cands:
            z = _reference_logits(net, e["masks"], batches)
            assert torch.allclose(e["logits"], z, rtol=1e-4, atol=1e-4)
            assert torch.equal(e["ensemble"], k)  # candidates are scored against the step's K
            js.append(_hand_j(z, y, k))
            ces.append(_hand_ce(z, y))
        best = int(np.argmin(js if which == "ensemble" else ces))
        disagree += int(np.argmin(js) != np.argmin(ces))
        winner = cands[best]
        assert step["after"]["log"]["group"] == winner["gate"]
        assert step["after"]["rates"] == winner["rates"]
        assert all(torch.equal(a, b) for a, b in zip(step["after"]["masks"], winner["masks"]))
    assert disagree >= 1, "precondition: J and CE should pick different winners in at least one step"


def test_k_is_the_running_mean_of_the_winners_logits(trace) -> None:
    """After each step ``K ← (K·t + z_winner)/(t + 1)``, t the sub-networks averaged so far."""
    net, batches = trace["net"], trace["batches"]
    for n, step in enumerate(trace["steps"]):
        t = step["before"]["count"]
        assert t == n + 1 and step["after"]["count"] == t + 1
        z = _reference_logits(net, step["after"]["masks"], batches)  # the winner's logits
        want = (step["before"]["ensemble"] * t + z) / (t + 1)
        assert torch.allclose(step["after"]["ensemble"], want, rtol=1e-4, atol=1e-4)


def test_the_history_records_the_winners_ce_loss(trace) -> None:
    net, batches = trace["net"], trace["batches"]
    y = _labels(batches)
    for n, step in enumerate(trace["steps"]):
        entry = step["after"]["history"]
        z = _reference_logits(net, step["after"]["masks"], batches)
        assert entry["step"] == n + 1
        assert entry["loss"] == pytest.approx(_hand_ce(z, y), rel=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(entry["masks"], step["after"]["masks"]))
        assert entry["rates"] == step["after"]["rates"]


def test_the_scores_of_a_step_are_taylor_scores_of_j_with_k(trace) -> None:
    """The scores a step ranks by are |Σ (∂J/∂y)·y| with J against the current K, at the current
    masks; masked channels score 0 and rank below every live channel; the step's new masks keep
    the channels ranked first."""
    net, batches = trace["net"], trace["batches"]
    for step in trace["steps"]:
        [call] = step["taylor"]
        masks, k = step["before"]["masks"], step["before"]["ensemble"]
        assert call["ensemble"] is not None and torch.equal(call["ensemble"], k)
        want = _hand_taylor(net, masks, batches, k, nominal=trace["cfg"].batch_size)
        for i, (got, w, m) in enumerate(zip(call["scores"], want, masks)):
            assert torch.allclose(got, w, rtol=2e-3, atol=1e-4 * float(w.max())), net.gates[i].group.name
            assert torch.equal(got[~m], torch.zeros_like(got[~m]))
        ranks = step["after"]["ranks"]
        for i, (s, m) in enumerate(zip(call["scores"], masks)):
            assert torch.equal(ranks[i], _hand_ranks(s, m))
            kept = kept_channels(net.gates[i].channels, step["after"]["rates"][i])
            assert torch.equal(step["after"]["masks"][i], ranks[i] < kept)
            assert not bool((step["after"]["masks"][i] & ~m).any())  # monotone: nothing comes back


def test_a_step_evaluates_exactly_the_otsu_candidates_with_the_step_size(trace) -> None:
    """The candidates are the groups whose next-step cost is at or below the trimmed Otsu threshold
    of all costs; each is evaluated one step of max(1/C, 0.2/n) down (no landing needed here)."""
    net = trace["net"]
    for step in trace["steps"]:
        [call] = step["taylor"]
        rates = step["before"]["rates"]
        active = [i for i, g in enumerate(net.gates) if kept_channels(g.channels, rates[i]) > 1]
        sizes = {i: _hand_step(net.gates[i].channels, len(net.gates[i].group.producers)) for i in active}
        costs = {i: _hand_cost(call["scores"][i], rates[i], sizes[i]) for i in active}
        [seen_costs] = step["costs"]  # the costs the step filtered: each group's own next step
        assert seen_costs == pytest.approx([costs[i] for i in active], rel=1e-9)
        thr = _hand_otsu(list(costs.values()))
        want = [i for i in active if costs[i] <= thr] or active
        cands = _candidate_evals(step)
        assert [e["gate"] for e in cands] == want
        assert len(want) < len(active)  # the filter removes some groups
        for e in cands:
            i = e["gate"]
            assert e["rates"][i] == pytest.approx(round(rates[i] - sizes[i], 5), abs=1e-9)
            assert [r for j, r in enumerate(e["rates"]) if j != i] == [r for j, r in enumerate(rates) if j != i]
    # the step sizes differ between groups: stage 1's stream 1/16 (> 0.2/4), stage 2's 0.2/4, inner 0.2
    assert {round(_hand_step(g.channels, len(g.group.producers)), 5) for g in net.gates} == {0.0625, 0.05, 0.2}


def test_without_otsu_every_group_is_a_candidate_one_step_of_max_1_over_c_0_2_over_n_down() -> None:
    """otsu=False: every group is evaluated, each one step of max(1/C, 0.2/n) down, as the
    hand-written sub-network computes it (norm-preserving kernels, the linear layer's included)."""
    model = _random_bn(create_model("resnet20", seed=8), 8)
    model.eval()
    net = MaskedNetwork(model)
    batches = _batches((8, 6), seed=9)
    searcher = Searcher(net, batches, SearchConfig(keep=0.2, batch_size=8, otsu=False))
    seen: list[dict] = []
    real = CandidateEvaluator.evaluate

    def evaluate(self, ensemble, changed_gate=None):
        ev = real(self, ensemble, changed_gate)
        if changed_gate is not None:
            seen.append({"gate": changed_gate, "rates": [g.rate for g in self.net.gates],
                         "masks": [m.mask.bool().clone() for m in self.net.masks],
                         "logits": torch.cat([z.float() for z in ev.parts])})
        return ev

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CandidateEvaluator, "evaluate", evaluate)
        state = searcher.step(searcher.initial_state())
    assert [e["gate"] for e in seen] == list(range(len(net.gates)))
    want_rate = {_gi(net, "conv1"): 1 - 1 / 16,  # 16 channels, 4 producers: 1/C > 0.2/4
                 _gi(net, "layer2.0.conv2"): 1 - 0.2 / 4, _gi(net, "layer3.0.conv2"): 1 - 0.2 / 4}
    for e in seen:
        i = e["gate"]
        assert e["rates"][i] == pytest.approx(want_rate.get(i, 0.8), abs=1e-9), net.gates[i].group.name
        assert sum(r != 1.0 for r in e["rates"]) == 1
        assert torch.allclose(e["logits"], _reference_logits(net, e["masks"], batches), rtol=1e-4, atol=1e-4), \
            net.gates[i].group.name
    assert state.step == 1


def test_a_group_down_to_one_channel_is_no_candidate() -> None:
    model = _random_bn(create_model("resnet20", seed=10), 10)
    model.eval()
    net = MaskedNetwork(model)
    searcher = Searcher(net, _batches((8, 6), seed=11), SearchConfig(keep=0.2, batch_size=8, otsu=False))
    state = searcher.initial_state()
    one = _gi(net, "layer1.1.conv1")
    state.rates[one] = 1 / 16
    searcher.restore(state)
    seen: list[int] = []
    real = CandidateEvaluator.evaluate

    def evaluate(self, ensemble, changed_gate=None):
        if changed_gate is not None:
            seen.append(changed_gate)
        return real(self, ensemble, changed_gate)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CandidateEvaluator, "evaluate", evaluate)
        state = searcher.step(state)
    assert seen == [i for i in range(len(net.gates)) if i != one]
    assert net.gates[one].kept == 1 and state.log[-1]["group"] != one


def test_weight_criteria_score_masked_channels_zero_in_the_step() -> None:
    """With l1 / fpgm scores the step still ranks on scores that are 0 on masked channels (and the
    filters' L1 norms on the live ones); pruning stays monotone."""
    model = _random_bn(create_model("resnet20", seed=9), 9)
    model.eval()
    net = MaskedNetwork(model)
    modules = dict(model.named_modules())
    for importance in ("l1", "fpgm"):
        searcher = Searcher(net, _batches((8, 6), seed=10), SearchConfig(keep=0.2, batch_size=8, importance=importance))
        seen: list = []
        real = Searcher.scores

        def scores(self, state):
            out = real(self, state)
            seen.append(([m.mask.bool().clone() for m in self.net.masks], [s.clone() for s in out]))
            return out

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Searcher, "scores", scores)
            state = searcher.initial_state()
            for _ in range(3):
                state = searcher.step(state)
        assert len(seen) == 3
        for k, (masks, scs) in enumerate(seen):
            for i, (m, s) in enumerate(zip(masks, scs)):
                assert torch.equal(s[~m], torch.zeros_like(s[~m])), (importance, k, i)
                if importance == "l1":
                    l1 = sum(modules[p].weight.detach().double().abs().flatten(1).sum(1)
                             for p in net.gates[i].group.producers)
                    assert torch.allclose(s[m], l1[m])
            if k:
                assert any(not bool(m.all()) for m in masks)
                prev = seen[k - 1][0]
                assert all(not bool((a & ~b).any()) for a, b in zip(masks, prev))


def test_landing_never_above_keep_and_the_search_stops_there() -> None:
    """With a budget one step away, every candidate whose full step would overshoot is shrunk in
    1/C steps to the largest rate still at or below keep (never above); the search then stops."""
    model = _random_bn(create_model("resnet20", seed=4), 4)
    model.eval()
    net = MaskedNetwork(model)
    batches = _batches((8, 6), seed=6)
    keep = 0.985
    cfg = SearchConfig(keep=keep, batch_size=8)
    searcher = Searcher(net, batches, cfg)
    seen: list[dict] = []
    real = CandidateEvaluator.evaluate

    def evaluate(self, ensemble, changed_gate=None):
        if changed_gate is not None:
            seen.append({"gate": changed_gate, "rates": [g.rate for g in self.net.gates]})
        return real(self, ensemble, changed_gate)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CandidateEvaluator, "evaluate", evaluate)
        state = searcher.run(searcher.initial_state())
    assert state.step == 1 and state.done, "precondition: the budget is one step away"
    assert searcher.ratio() <= keep
    landed = 0
    for e in seen:
        i = e["gate"]
        g = net.gates[i]
        full = round(1.0 - _hand_step(g.channels, len(g.group.producers)), 5)
        trial = [1.0] * len(net.gates)

        def ratio(r: float) -> float:
            trial[i] = r
            return searcher.ratio(trial)

        got = e["rates"][i]
        if ratio(full) >= keep:  # the full step does not reach the budget
            assert got == full
            continue
        landed += 1
        assert ratio(got) <= keep  # never above
        assert got < 1.0
        up = got + 1 / g.channels
        assert up >= 1.0 - 1e-9 or ratio(up) > keep  # the largest such rate
    assert landed >= 1, "precondition: some candidates land"
    assert searcher.ratio() > keep - 0.01  # landed just below, not a whole step below


def test_the_search_leaves_module_modes_and_bn_running_statistics_as_it_found_them() -> None:
    """Each phase runs BN on batch statistics without updating running statistics, and restores
    every module's *own* mode (a frozen BN inside a training model stays frozen)."""
    model = _random_bn(create_model("resnet20", seed=5), 5)
    model.train()
    model.layer2[1].bn1.eval()
    model.layer3[0].bn2.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    net = MaskedNetwork(model)  # building the graph runs the model once, in inference mode
    assert {name: m.training for name, m in model.named_modules()} == modes
    searcher = Searcher(net, _batches((8, 6), seed=7), SearchConfig(keep=0.2, batch_size=8))
    state = searcher.step(searcher.initial_state())
    assert state.step == 1
    assert {name: m.training for name, m in model.named_modules()} == modes
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in buffers.items())


def test_uniform_evaluates_on_batch_statistics() -> None:
    """The uniform baseline's one step evaluates its sub-network with BN on batch statistics too."""
    model = _random_bn(create_model("resnet20", seed=6), 6)
    model.eval()
    net = MaskedNetwork(model)
    batches = _batches((8, 6), seed=8)
    searcher = Searcher(net, batches, SearchConfig(keep=0.5, batch_size=8, method="uniform", importance="l1"))
    state = searcher.run(searcher.initial_state())
    entry = state.history[-1]
    z = _reference_logits(net, entry["masks"], batches)
    assert entry["loss"] == pytest.approx(_hand_ce(z, _labels(batches)), rel=1e-5)
    assert searcher.ratio() <= 0.5


# ============================================================================ prune(): adaptation and the search sets

class _Stop(Exception):
    """Raised by a spy once it has what the test needs."""


def _tiny_checkpoint(num_classes: int = 10, seed: int = 0, widths=(4, 8, 8), inner: int = 4):
    """A CIFAR ResNet-8 with a few channels (fast), random BN statistics, in inference mode."""
    from ekg.checkpoint import Checkpoint
    from ekg.data import get_normalization
    from ekg.models import ResNetSpec, build_model

    torch.manual_seed(seed)
    spec = ResNetSpec(depth=8, num_classes=num_classes, stage_widths=list(widths), block_widths=[[inner]] * 3)
    model = _random_bn(build_model(spec), seed).eval()
    return Checkpoint(model=model, normalization={"name": "cifar10", **get_normalization("cifar10").to_dict()},
                      dataset={"name": "cifar10", "num_classes": num_classes})


def _release_indices(labels: np.ndarray, val: int = 32, sub: int = 256, seed: int = 1):
    """D_val: the last ``val`` of each class (in the release's reversed order), D_sub: the first
    ``sub``; each concatenated over classes and shuffled once with RandomState(seed)."""
    val_idx = np.hstack([np.where(labels == c)[0][::-1][:val] for c in range(10)]).astype(np.int64)
    sub_idx = np.hstack([np.where(labels == c)[0][:sub] for c in range(10)]).astype(np.int64)
    np.random.RandomState(seed).shuffle(val_idx)
    np.random.RandomState(seed).shuffle(sub_idx)
    return val_idx, sub_idx


def _hand_sgd(model: nn.Module, batches, *, lr: float, momentum: float, wd: float) -> nn.Module:
    """Nesterov SGD written out (``d = g + wd·p; buf = m·buf + d; p -= lr·(d + m·buf)``), mean CE,
    BN in training mode, on a copy of ``model``."""
    m = copy.deepcopy(model).train()
    params = list(m.parameters())
    bufs: list[torch.Tensor | None] = [None] * len(params)
    for x, y in batches:
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            loss = F.cross_entropy(m(x), y)
            grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for n, (p, g) in enumerate(zip(params, grads)):
                d = g + wd * p
                bufs[n] = d.clone() if bufs[n] is None else momentum * bufs[n] + d
                p -= lr * (d + momentum * bufs[n])
    return m


def _same_update(before: nn.Module, got: nn.Module, want: nn.Module, rel: float = 1e-3) -> None:
    """``got`` and ``want`` moved every parameter of ``before`` by the same amount (relative to
    the size of the move), and hold the same BN running statistics."""
    b, g, w = before.state_dict(), got.state_dict(), want.state_dict()
    for k in b:
        if not b[k].is_floating_point():
            assert torch.equal(g[k], w[k]), k
            continue
        dg, dw = (g[k] - b[k]).double(), (w[k] - b[k]).double()
        assert float(dw.norm()) > 0, k
        assert float((dg - dw).norm()) <= rel * float(dw.norm()) + 1e-9, k


def test_prune_adapts_one_epoch_over_d_sub_and_searches_on_d_val_in_256_plus_64(tmp_path, exact, monkeypatch) -> None:
    """prune() with the default configuration: the adaptation epoch is one pass over D_sub (the
    first 256 images per class, shuffled), unaugmented, in batches of 256, and moves the weights
    as a hand-written Nesterov SGD (momentum 0.9, lr 1e-3, wd 5e-4, mean CE, BN in training
    mode) does; the search gets D_val (the last 32 per class, shuffled) as batches of 256 + 64."""
    import ekg.pruning as prune_mod
    from ekg.data import get_normalization

    ckpt = _tiny_checkpoint()
    rec: dict = {}
    real_adapt = prune_mod.adapt

    def adapt(model, batches, cfg, dist=None):
        rec["batches"] = [(x.clone(), y.clone()) for x, y in batches]
        rec["cfg"], rec["before"] = cfg, copy.deepcopy(model)
        real_adapt(model, iter(rec["batches"]), cfg, dist=dist)
        rec["after"] = copy.deepcopy(model)

    class Stopper:
        def __init__(self, net, val_batches, cfg, dist=None, latency=None):
            rec["val"] = [(x.clone(), y.clone()) for x, y in val_batches]
            rec["frozen"] = copy.deepcopy(net.model)
            raise _Stop

    monkeypatch.setattr(prune_mod, "adapt", adapt)
    monkeypatch.setattr(prune_mod, "Searcher", Stopper)
    with pytest.raises(_Stop):
        prune_mod.prune(ckpt, exact, 0.5, out=tmp_path / "run", progress=False)

    cfg = rec["cfg"]
    assert (cfg.batch_size, cfg.val_per_class, cfg.sub_per_class, cfg.split_seed) == (256, 32, 256, 1)
    assert (cfg.adapt_lr, cfg.adapt_momentum, cfg.adapt_weight_decay) == (1e-3, 0.9, 5e-4)
    norm = get_normalization("cifar10")
    val_idx, sub_idx = _release_indices(exact.train.labels.numpy())
    images, labels = exact.train.images, exact.train.labels
    # D_sub: one epoch, batches of 256, unaugmented
    assert [len(y) for _, y in rec["batches"]] == [256] * 10
    assert torch.equal(torch.cat([y for _, y in rec["batches"]]), labels[sub_idx])
    assert torch.allclose(torch.cat([x for x, _ in rec["batches"]]), norm.apply(images[sub_idx]), atol=1e-6)
    # the adaptation step itself
    want = _hand_sgd(rec["before"], rec["batches"], lr=1e-3, momentum=0.9, wd=5e-4)
    _same_update(rec["before"], rec["after"], want)
    # the search runs on the adapted weights
    assert all(torch.equal(a, b) for a, b in zip(rec["frozen"].state_dict().values(), rec["after"].state_dict().values()))
    # D_val: 256 + 64
    assert [len(y) for _, y in rec["val"]] == [256, 64]
    assert torch.equal(torch.cat([y for _, y in rec["val"]]), labels[val_idx])
    assert torch.allclose(torch.cat([x for x, _ in rec["val"]]), norm.apply(images[val_idx]), atol=1e-6)


# ============================================================================ the CLI's configurations

def _save_tiny(path, **kw):
    from ekg.checkpoint import save_checkpoint

    save_checkpoint(_tiny_checkpoint(**kw), path)
    return path


def _paper_search_defaults(cfg: SearchConfig) -> None:
    assert cfg.keep == 0.45
    assert (cfg.importance, cfg.reward, cfg.method, cfg.search_bn) == ("ekg", "ensemble", "greedy", "batch")
    assert (cfg.step, cfg.otsu, cfg.otsu_trim) == (0.2, True, 0.2)
    assert (cfg.batch_size, cfg.val_per_class, cfg.sub_per_class, cfg.split_seed) == (256, 32, 256, 1)
    assert (cfg.adapt, cfg.adapt_lr, cfg.adapt_momentum, cfg.adapt_weight_decay) == (True, 1e-3, 0.9, 5e-4)
    assert cfg.bn_ops is False and cfg.compat == "method"  # the method's rules, not the release's quirks


def test_search_defaults_of_the_api_and_of_ekg_prune(tmp_path, cifar10_exact, monkeypatch) -> None:
    import ekg.pruning
    from ekg.cli import main

    _paper_search_defaults(SearchConfig())
    got: dict = {}

    def fake_prune(model, data, keep, *, out, config, **kw):
        got["keep"], got["cfg"] = keep, config
        raise _Stop

    monkeypatch.setattr(ekg.pruning, "prune", fake_prune)
    model = _save_tiny(tmp_path / "m.pt")
    main(["prune", "--model", str(model), "--data", str(cifar10_exact), "--out", str(tmp_path / "run"), "--quiet"])
    assert got["keep"] == 0.45
    _paper_search_defaults(got["cfg"])


def _paper_finetune(cfg, kd: str) -> None:
    """The phase-5 recipe: 100 epochs, batch 128, SGD Nesterov momentum 0.9, lr 0.01 ×0.2 at
    30/60/80%, wd 5e-4; two jittered views with the bank, flip + 4-px reflect pad-crop only without."""
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (100, 128, 0.01)
    assert (cfg.schedule, tuple(cfg.milestones), cfg.gamma, cfg.warmup_epochs) == ("step", (0.3, 0.6, 0.8), 0.2, 0.0)
    assert (cfg.momentum, cfg.nesterov, cfg.weight_decay) == (0.9, True, 5e-4)
    assert cfg.kd == kd and cfg.temperature is None and cfg.limit_train is None and cfg.accum == 1
    a = cfg.augment
    assert (a.flip, a.pad, a.pad_mode) == (True, 4, "reflect")
    assert a.jitter is (kd != "none")
    if a.jitter:
        assert (a.brightness, a.contrast, a.saturation) == (0.2, 0.2, 0.2)


def test_ekg_finetune_and_ekg_run_paper_build_the_papers_finetuning_recipe(tmp_path, cifar10_exact, monkeypatch) -> None:
    import ekg.bank
    import ekg.finetuning
    import ekg.pipeline
    from ekg.cli import main
    from ekg.train import finetune_config

    _paper_finetune(finetune_config(), "ensemble")
    _paper_finetune(finetune_config("none"), "none")
    got: list = []

    def fake_train(cfg, data, out, **kw):
        got.append((cfg, kw.get("bank")))
        raise _Stop

    model = _save_tiny(tmp_path / "m.pt")
    sentinel = object()
    monkeypatch.setattr(ekg.finetuning, "train", fake_train)  # ekg finetune goes through ekg.finetune
    monkeypatch.setattr(ekg.bank, "bank_for_run", lambda *a, **k: sentinel)
    common = ["--model", str(model), "--data", str(cifar10_exact), "--quiet"]
    main(["finetune", *common, "--bank", str(tmp_path / "RUN")])
    main(["finetune", *common, "--kd", "none", "--out", str(tmp_path / "plain")])
    # ekg run --preset paper (the default preset): the search, slimming and bank replaced by stubs
    monkeypatch.setattr(ekg.pipeline, "train", fake_train)
    monkeypatch.setattr(ekg.pipeline, "prune", lambda *a, **k: None)
    monkeypatch.setattr(ekg.pipeline, "load_checkpoint", lambda path, **k: _tiny_checkpoint())
    monkeypatch.setattr(ekg.pipeline, "bank_for_run", lambda *a, **k: sentinel)
    main(["run", *common, "--out", str(tmp_path / "run")])
    assert len(got) == 3
    (ft, bank), (plain, no_bank), (run, run_bank) = got
    _paper_finetune(ft, "ensemble")
    _paper_finetune(plain, "none")
    _paper_finetune(run, "ensemble")
    assert bank is sentinel and no_bank is None and run_bank is sentinel


# ============================================================================ the memory bank

def _bank_history(net: MaskedNetwork, losses: list[float]) -> list[dict]:
    """Entry k masks the first k·C/16 channels of every group (entry 0: the unpruned network)."""
    return fake_history(net, losses, per=16, rates=[])


def test_bank_for_run_excludes_the_final_subnetwork_spreads_teachers_and_runs_bn_on_batches_of_256(tmp_path) -> None:
    """The bank of a run directory: teachers from the history without its final entry, spread
    evenly in loss (teacher 0 the lowest); each teacher's logits on every training image in
    dataset order, unaugmented, BN on the statistics of batches of 256 (here 256 + 44)."""
    from ekg.bank import bank_for_run
    from ekg.checkpoint import save_checkpoint
    from ekg.data import ImageSet, get_normalization

    run = tmp_path / "RUN"
    run.mkdir()
    ckpt = _tiny_checkpoint(seed=2, widths=(8, 8, 8), inner=8)
    save_checkpoint(ckpt, run / "adapted.pt")
    net = MaskedNetwork(copy.deepcopy(ckpt.model))
    # non-final losses (out of order, as a search's can be): targets L_min + k(L_max - L_min)/5 =
    # 0.30, 0.46, 0.62, 0.78, 0.94 -> entries 1 (0.30), 3 (0.45), 5 (0.62), 4 (0.80), 7 (0.95). With the
    # final entry (2.5) the targets would reach it; with the paper's endpoints k/(T-1) entry 6 (1.10)
    # would be in; the five lowest would be 1, 0, 3, 2, 5; unsorted, L_min/L_max would be 0.31/0.95.
    losses = [0.31, 0.30, 0.60, 0.45, 0.80, 0.62, 1.10, 0.95, 2.5]
    history = _bank_history(net, losses)
    torch.save({"history": history, "groups": [g.group.name for g in net.gates]}, run / "history.pt")
    g = torch.Generator().manual_seed(11)
    data = ImageSet(torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (300,), generator=g), [str(i) for i in range(10)])
    bank = bank_for_run(run, data, progress=False)
    info = json.loads((run / "bank" / "bank.json").read_text())
    chosen = [t["history_index"] for t in info["teachers"]]
    assert chosen == [1, 3, 5, 4, 7]
    assert bank.logits.shape == (300, 10, 5)
    x = get_normalization("cifar10").apply(data.images)
    batches = [(x[:256], None), (x[256:], None)]
    for t, h in enumerate(chosen):
        want = _reference_logits(net, history[h]["masks"], batches)
        got = torch.from_numpy(np.asarray(bank.logits[:, :, t], dtype=np.float32))
        assert torch.allclose(got, want, rtol=2e-3, atol=2e-3), f"teacher {t}"


# ============================================================================ the trainer

class _RecordingSGD(torch.optim.SGD):
    """torch.optim.SGD that records its settings and the learning rate of every step."""

    made: list = []

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.settings = dict(kw)
        self.lrs: list[float] = []
        _RecordingSGD.made.append(self)

    def step(self, closure=None):
        self.lrs.append(self.param_groups[0]["lr"])
        return super().step(closure)


@pytest.fixture
def paper_cfg(tmp_path, cifar10_exact, monkeypatch):
    """The fine-tuning config `ekg run --preset paper` hands the trainer."""
    import ekg.pipeline
    from ekg.cli import main

    got: list = []

    def fake_train(cfg, data, out, **kw):
        got.append(cfg)
        raise _Stop

    with monkeypatch.context() as mp:
        mp.setattr(ekg.pipeline, "train", fake_train)
        mp.setattr(ekg.pipeline, "prune", lambda *a, **k: None)
        mp.setattr(ekg.pipeline, "load_checkpoint", lambda path, **k: _tiny_checkpoint())
        mp.setattr(ekg.pipeline, "bank_for_run", lambda *a, **k: None)
        main(["run", "--model", str(_save_tiny(tmp_path / "m.pt")), "--data", str(cifar10_exact), "--quiet",
              "--out", str(tmp_path / "paper")])
    [cfg] = got
    return cfg


def test_the_trainer_applies_the_step_schedule(tmp_path, exact, paper_cfg, monkeypatch) -> None:
    """10 epochs of one step each: lr 0.01, ×0.2 from the steps at 30, 60 and 80% of training."""
    from ekg.train import train

    _RecordingSGD.made.clear()
    monkeypatch.setattr(torch.optim, "SGD", _RecordingSGD)
    cfg = dataclasses.replace(paper_cfg, epochs=10, limit_train=128, limit_test=16, device="cpu", kd="none")
    train(cfg, exact, tmp_path / "ft", init=_tiny_checkpoint(), progress=False)
    [opt] = _RecordingSGD.made
    want = [0.01] * 3 + [0.002] * 3 + [0.0004] * 2 + [0.00008] * 2
    assert opt.lrs == pytest.approx(want, rel=1e-9)
    assert (opt.settings["momentum"], opt.settings["nesterov"], opt.settings["weight_decay"]) == (0.9, True, 5e-4)


def _hand_kl(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Per image T·KL(softmax(a/T) ‖ softmax(b/T))."""
    p = F.softmax(a / t, 1)
    return t * (p * (F.log_softmax(a / t, 1) - F.log_softmax(b / t, 1))).sum(1)


def _fake_bank(data, teachers: torch.Tensor):
    from ekg.bank import MemoryBank, data_fingerprint

    logits = teachers.numpy().astype(np.float16)  # (N, classes, T)
    return MemoryBank(logits=logits, info={"shape": list(logits.shape), "data": data_fingerprint(data)})


def _kd_step(tmp_path, exact, cfg, init, teachers: torch.Tensor, monkeypatch, name: str):
    """One fine-tuning step of the trainer with a bank holding ``teachers`` (N, classes, T); returns
    (views, labels, teacher rows, temperature) that the loss saw, the bank and the model.pt path."""
    import ekg.train as train_mod

    bank = _fake_bank(exact.train, teachers)
    seen: list = []
    real_loss = train_mod._loss

    def spy(model, x, y, t, c):
        seen.append(([v.clone() for v in x], y.clone(), t.clone(), c.temperature))
        return real_loss(model, x, y, t, c)

    with monkeypatch.context() as mp:
        mp.setattr(train_mod, "_loss", spy)
        path = train_mod.train(cfg, exact, tmp_path / name, init=init, bank=bank, progress=False)
    [got] = seen
    return got, bank, path


def _student(init, views) -> tuple[nn.Module, list[nn.Parameter], tuple[torch.Tensor, ...]]:
    """The hand-written forward of a step: a copy of the initial model in training mode, both
    views in one pass (BN statistics of the 2B images)."""
    model = copy.deepcopy(init.model).train()
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    return model, params, model(torch.cat(views)).float().chunk(2)


def test_a_kd_step_of_the_trainer_equals_a_hand_written_step(tmp_path, exact, paper_cfg, monkeypatch) -> None:
    """One fine-tuning step with the memory bank, as `ekg run --preset paper` configures it: two
    different augmented views of the batch's images in one forward pass, the bank rows of those
    images, teachers selected when closer to teacher 0 than the mean student over the views is
    (T = 4, T·KL), the halved two-view CE + KD loss, then a Nesterov SGD step (lr 0.01, momentum
    0.9, wd 5e-4). The epoch's test numbers are measured with BN in inference mode."""
    from ekg.checkpoint import load_checkpoint
    from ekg.data import get_normalization

    n, t = len(exact.train), 4.0
    g = torch.Generator().manual_seed(21)
    m0 = torch.randn(n, 10, generator=g) * 3
    close = m0 + 0.3 * torch.randn(n, 10, generator=g)  # selected under both rules below
    noise = torch.randn(n, 10, generator=g)
    init = _tiny_checkpoint(seed=3)
    cfg = dataclasses.replace(paper_cfg, epochs=1, limit_train=128, limit_test=16, device="cpu")
    # a first run gives the batch and its views (they depend on the seed only, not on the bank) ...
    (views, y, rows, _), _, _ = _kd_step(tmp_path, exact, cfg, init, torch.stack([m0, close, m0, -m0], -1), monkeypatch,
                                         "probe")
    _, _, s = _student(init, views)
    s = [v.detach() for v in s]
    t0 = rows[:, 0]
    curr_mean = float(_hand_kl(t0, (s[0] + s[1]) / 2, t).sum())
    curr_view0 = float(_hand_kl(t0, s[0], t).sum())
    # ... so teacher 2 can sit between the two: selected by one rule, not by the other
    idx = torch.cdist(t0, m0[:128].half().float()).argmin(1)
    target = (curr_mean + curr_view0) / 2
    lo, hi = 0.0, 50.0
    for _ in range(60):  # teacher 2 = teacher 0 + a·noise, a such that Σ kl(M0, M2) = target
        a = (lo + hi) / 2
        m1_rows = (m0[idx] + a * noise[idx]).half().float()
        d = float(_hand_kl(t0, m1_rows, t).sum())
        lo, hi = (a, hi) if d < target else (lo, a)
    m2 = m0 + a * noise

    (views2, y2, teachers, temperature), bank, path = _kd_step(tmp_path, exact, cfg, init,
                                                               torch.stack([m0, close, m2, -m0], -1), monkeypatch, "ft")
    assert temperature == t
    assert torch.equal(y2, y) and all(torch.equal(a_, b_) for a_, b_ in zip(views2, views))
    assert len(views) == 2 and views[0].shape == views[1].shape == (128, 3, 32, 32)
    assert not torch.allclose(views[0], views[1])  # two augmentations
    # the teacher rows are the bank rows of the batch's images
    stored = torch.from_numpy(bank.logits.astype(np.float32))  # (N, classes, T)
    idx = torch.cdist(teachers[:, 0], stored[:128, :, 0]).argmin(1)
    assert len(set(idx.tolist())) == 128
    assert torch.equal(teachers, stored[idx].transpose(1, 2))
    assert torch.equal(y, exact.train.labels[idx])
    # the hand-written loss and step
    model, params, s = _student(init, views)
    dist = torch.stack([_hand_kl(teachers[:, 0], teachers[:, k], t).sum() for k in range(4)])
    sel = dist < _hand_kl(teachers[:, 0], (s[0] + s[1]).detach() / 2, t).sum()
    sel_view0 = dist < _hand_kl(teachers[:, 0], s[0].detach(), t).sum()
    assert sel[:2].all() and not sel[3] and sel.tolist() != sel_view0.tolist(), \
        "precondition: teachers 0, 1 selected, 3 not, 2 by the mean over views only or by view 0 only"
    mbar = teachers[:, sel].mean(1)
    loss = 0.5 * sum(F.cross_entropy(v, y, reduction="sum") + _hand_kl(mbar, v, t).sum() for v in s) / len(y)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, gr in zip(params, grads):
            d = gr + 5e-4 * p
            p -= 0.01 * (d + 0.9 * d)
    got = load_checkpoint(path).model
    b, gg, w = init.model.state_dict(), got.state_dict(), model.state_dict()
    for k in dict(init.model.named_parameters()):
        dg, dw = (gg[k] - b[k]).double(), (w[k] - b[k]).double()
        assert float((dg - dw).norm()) <= 1e-3 * float(dw.norm()) + 1e-9, k
    # the epoch's test metrics: BN on running statistics
    log = json.loads((tmp_path / "ft" / "log.jsonl").read_text().splitlines()[0])
    got.eval()
    with torch.no_grad():
        z = got(get_normalization("cifar10").apply(exact.test.images[:16]))
    assert log["test_loss"] == pytest.approx(F.cross_entropy(z, exact.test.labels[:16]).item(), rel=1e-5)


def test_plain_finetuning_step_is_one_view_and_mean_ce(tmp_path, exact, paper_cfg, monkeypatch) -> None:
    """--kd none: one augmented view, mean CE, the same SGD step."""
    import ekg.train as train_mod
    from ekg.checkpoint import load_checkpoint

    seen: list = []
    real_loss = train_mod._loss

    def spy(model, x, y, teachers, cfg):
        seen.append((x.clone(), y.clone(), teachers))
        return real_loss(model, x, y, teachers, cfg)

    monkeypatch.setattr(train_mod, "_loss", spy)
    init = _tiny_checkpoint(seed=4)
    cfg = dataclasses.replace(paper_cfg, epochs=1, limit_train=128, limit_test=16, device="cpu", kd="none",
                              augment=dataclasses.replace(paper_cfg.augment, jitter=False))
    path = train_mod.train(cfg, exact, tmp_path / "ft", init=init, progress=False)
    [(x, y, teachers)] = seen
    assert teachers is None and x.shape == (128, 3, 32, 32)
    want = _hand_sgd(init.model, [(x, y)], lr=0.01, momentum=0.9, wd=5e-4)
    got = load_checkpoint(path).model
    b, gg, w = init.model.state_dict(), got.state_dict(), want.state_dict()
    for k in dict(init.model.named_parameters()):
        dg, dw = (gg[k] - b[k]).double(), (w[k] - b[k]).double()
        assert float((dg - dw).norm()) <= 1e-3 * float(dw.norm()) + 1e-9, k


def test_the_kd_temperature_is_4_for_cifar_and_10_for_1000_classes(tmp_path, monkeypatch) -> None:
    import ekg.train as train_mod
    from ekg.data import DataSplits, ImageSet

    temps: list = []

    def spy(views, labels, teachers, *, mode, temperature):
        temps.append(temperature)
        raise _Stop

    monkeypatch.setattr(train_mod, "kd_loss", spy)
    for classes, want in ((10, 4.0), (100, 4.0), (1000, 10.0)):
        g = torch.Generator().manual_seed(classes)
        images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
        split = ImageSet(images, torch.arange(8) % classes, [f"c{i}" for i in range(classes)])
        data = DataSplits("imagefolder", split, split, "random")
        bank = _fake_bank(split, torch.randn(8, classes, 2, generator=g))
        cfg = train_mod.finetune_config("ensemble", epochs=1, batch_size=4, device="cpu")
        with pytest.raises(_Stop):
            train_mod.train(cfg, data, tmp_path / f"ft{classes}", init=_tiny_checkpoint(classes), bank=bank,
                            progress=False)
        assert temps[-1] == want


# ============================================================================ evaluation

def test_ekg_test_and_evaluate_use_running_statistics_by_default(tmp_path, exact, cifar10_exact, capsys) -> None:
    from ekg.cli import main
    from ekg.data import get_normalization
    from ekg.evaluate import evaluate

    ckpt = _tiny_checkpoint(seed=5)
    model = copy.deepcopy(ckpt.model).eval()
    with torch.no_grad():
        z = model(get_normalization("cifar10").apply(exact.test.images))
    want = F.cross_entropy(z, exact.test.labels).item()
    path = _save_tiny(tmp_path / "m.pt", seed=5)
    assert main(["test", "--model", str(path), "--data", str(cifar10_exact), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bn_mode"] == "running" and res["loss"] == pytest.approx(want, rel=1e-5)
    trained = copy.deepcopy(ckpt.model).train()  # a model left in training mode by its trainer
    running = {k: v.clone() for k, v in trained.state_dict().items()}
    assert evaluate(trained, exact.test, get_normalization("cifar10"))["loss"] == pytest.approx(want, rel=1e-5)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in running.items())

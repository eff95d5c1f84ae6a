"""Unit tests of every rule of the EKG search (``ekg.search``) and of the pseudo-supernet
(``ekg.masks``), against hand-computed values and independent re-implementations.

Method reference: docs/ekg-method.md, "Phase 2 — greedy search" and "What a mask does in the
forward pass".
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import random_bn, tiny_batches
from ekg.errors import EkgError
from ekg.graph import ChannelGroup
from ekg.masks import Gate, MaskedNetwork, kept_channels, ranks_from_scores
from ekg.models import create_model
from ekg.search import (
    CandidateEvaluator,
    SearchConfig,
    Searcher,
    land_rate,
    objective,
    pack_masks,
    step_cost,
    step_size,
    taylor_scores,
    trimmed_otsu_threshold,
    update_ensemble,
    weight_scores,
)

# ============================================================================ masks.kept_channels


@pytest.mark.parametrize(
    ("channels", "rate", "kept"),
    [
        (16, 0.8, 13),     # 12.8 -> 13
        (16, 0.75, 12),    # exactly 12
        (16, 0.0, 1),      # never fewer than one
        (16, -0.2, 1),
        (64, 0.2, 13),     # 12.8 -> 13
        (32, 1.0, 32),
        (16, 1.5, 16),     # never more than C
        (10, 0.3, 3),      # 10*0.3 = 3.0000000000000004: float noise must not give 4
        (10, 0.7, 7),      # 7.000000000000001
        (100, 0.29, 29),   # 28.999999999999996
        (3, 0.1, 1),
        (64, 0.50001, 33),  # 32.00064 is a real excess, not noise
        (1, 0.5, 1),
    ],
)
def test_kept_channels(channels: int, rate: float, kept: int) -> None:
    assert kept_channels(channels, rate) == kept


def test_kept_channels_is_ceil_of_c_rate_without_noise() -> None:
    # every k/C rate keeps exactly k channels, and one ulp-ish above k/C still keeps k
    for c in (3, 10, 16, 24, 32, 64, 100):
        for k in range(1, c + 1):
            assert kept_channels(c, k / c) == k
            assert kept_channels(c, (k - 0.5) / c) == k


# ============================================================================ masks.ranks_from_scores


def test_ranks_descending_zero_is_highest() -> None:
    s = torch.tensor([0.5, 2.0, 1.0, 3.0])
    # order by score: ch3 (3.0), ch1 (2.0), ch2 (1.0), ch0 (0.5)
    assert ranks_from_scores(s).tolist() == [3, 1, 2, 0]


def test_ranks_ties_keep_channel_order() -> None:
    s = torch.tensor([0.5, 2.0, 1.0, 2.0, 0.5, 2.0])
    # 2.0 at ch1, ch3, ch5 -> ranks 0, 1, 2; then ch2; then 0.5 at ch0, ch4 -> 4, 5
    assert ranks_from_scores(s).tolist() == [4, 0, 3, 1, 5, 2]
    # float32 ties that are equal in float64 too
    s32 = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float32)
    assert ranks_from_scores(s32).tolist() == [0, 1, 2]


def test_ranks_masked_zeros_are_at_the_bottom() -> None:
    s = torch.tensor([0.0, 3.0, 0.0, 1.0, 2.0, 0.0], dtype=torch.float64)
    # live: ch1 (3) -> 0, ch4 (2) -> 1, ch3 (1) -> 2; masked zeros ch0, ch2, ch5 -> 3, 4, 5
    assert ranks_from_scores(s).tolist() == [3, 0, 4, 2, 1, 5]


def test_ranks_live_channels_before_masked_ones() -> None:
    s = torch.tensor([0.0, 3.0, 0.0, 0.0, 2.0, 0.0], dtype=torch.float64)
    live = torch.tensor([False, True, False, True, True, False])
    # ch3 is live with score 0 (a dead ReLU): it ties with the masked zeros but must stay above them
    assert ranks_from_scores(s, live).tolist() == [3, 0, 4, 2, 1, 5]
    # fpgm's single survivor scores 0 like everything else: it keeps rank 0
    assert ranks_from_scores(torch.zeros(4), torch.tensor([False, False, True, False])).tolist() == [1, 2, 0, 3]
    # all live: the plain ranking
    assert torch.equal(ranks_from_scores(s, torch.ones(6, dtype=torch.bool)), ranks_from_scores(s))


def test_ranks_are_a_permutation() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (50,), generator=g).double()  # many ties
    r = ranks_from_scores(s)
    assert sorted(r.tolist()) == list(range(50))
    # rank order agrees with a (-score, channel) sort
    expected = sorted(range(50), key=lambda c: (-float(s[c]), c))
    assert [int(torch.nonzero(r == k)) for k in range(50)] == expected


def _gate(channels: int, rate: float = 1.0, ranks: torch.Tensor | None = None) -> Gate:
    return Gate(ChannelGroup(index=0, name="g", channels=channels), rate=rate, ranks=ranks)


def test_gate_mask_sizes_and_selection() -> None:
    scores = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 0.0, 8.0, 2.0, 6.0, 4.0, 11.0, 10.0, 0.5, 12.0, 13.0, 14.0])
    gate = _gate(16, 0.8, ranks_from_scores(scores))
    m = gate.mask()
    assert m.dtype == torch.bool and int(m.sum()) == 13 == gate.kept
    # the 3 lowest scores (0.0 at ch5, 0.5 at ch12, 1.0 at ch1) are the ones dropped
    assert torch.nonzero(~m).flatten().tolist() == [1, 5, 12]
    for rate, kept in ((0.75, 12), (0.5, 8), (0.0625, 1), (0.0, 1), (-0.3, 1), (1.0, 16)):
        mr = gate.mask(rate)
        assert int(mr.sum()) == kept
        # the kept ones are the top-`kept` scores
        top = set(torch.argsort(-scores, stable=True)[:kept].tolist())
        assert set(torch.nonzero(mr).flatten().tolist()) == top
    assert gate.rate == 0.8  # mask(rate) does not change the gate


def test_group_mask_set() -> None:
    from ekg.masks import GroupMask

    gm = GroupMask(6)
    assert not gm.partial and gm.kept_index is None and gm.mask.tolist() == [1.0] * 6
    gm.set(torch.tensor([True, False, True, True, False, True]))
    assert gm.partial and gm.kept_index.tolist() == [0, 2, 3, 5]
    assert gm.mask.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0] and gm.mask.dtype == torch.float32
    gm.set(torch.ones(6, dtype=torch.bool))
    assert not gm.partial and gm.kept_index is None
    # a mask point multiplies by the mask and passes the gradient straight through
    gm.set(torch.tensor([True, False, True, True, False, True]))
    x = torch.randn(2, 6, 3, 3, requires_grad=True)
    y = gm(x)
    assert torch.equal(y[:, [1, 4]], torch.zeros(2, 2, 3, 3)) and torch.equal(y[:, [0, 2, 3, 5]], x[:, [0, 2, 3, 5]])
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g)
    # while collecting, |Σ_{n,h,w} g·y| is added per channel (0 for masked channels)
    gm.collect = True
    x2 = torch.randn(2, 6, 3, 3, requires_grad=True)
    gm(x2).backward(g)
    gm(x2).backward(g)
    want = 2 * (g * x2.detach() * gm.mask.view(1, -1, 1, 1)).sum((0, 2, 3)).abs().double()
    assert torch.allclose(gm.score, want, rtol=1e-6) and gm.score[1] == 0 == gm.score[4]


def test_gate_without_ranks_keeps_the_first_channels() -> None:
    assert _gate(10, 0.3).mask().tolist() == [True] * 3 + [False] * 7


# ============================================================================ search.step_size


@pytest.mark.parametrize(
    ("channels", "n", "step"),
    [(16, 1, 0.2), (16, 10, 0.0625), (64, 10, 0.02), (64, 1, 0.2), (32, 10, 0.03125), (16, 0, 0.2),
     (4, 1, 0.25), (256, 3, 0.2 / 3)],
)
def test_step_size(channels: int, n: int, step: float) -> None:
    assert step_size(channels, n) == pytest.approx(step, rel=1e-12)


def test_step_size_base() -> None:
    assert step_size(64, 2, base=0.1) == pytest.approx(0.05)
    assert step_size(64, 10, base=0.1) == pytest.approx(1 / 64)


# ============================================================================ search.step_cost


def test_step_cost_hand_example() -> None:
    # C=10, two masked channels (zeros); sorted: [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    scores = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 0.0, 0.0, 6.0, 7.0, 8.0])
    # rate 0.8, step 0.2: positions round(0.2*10)=2 .. round(0.4*10)=4 -> 1 + 2
    assert step_cost(scores, 0.8, 0.2) == 3.0
    # rate 0.8, step 0.3: 2 .. round(5.0)=5 -> 1 + 2 + 3
    assert step_cost(scores, 0.8, 0.3) == 6.0
    # unpruned, step 0.1: 0 .. 1 -> the single lowest score (a zero here)
    assert step_cost(scores, 1.0, 0.1) == 0.0
    assert step_cost(scores, 1.0, 0.5) == 0.0 + 0.0 + 1.0 + 2.0 + 3.0


def test_step_cost_uses_bankers_rounding() -> None:
    s = torch.tensor([4.0, 1.0, 3.0, 2.0])  # sorted [1, 2, 3, 4]
    # rate 0.875, step 0.25: lo = round(0.5) = 0, hi = round(1.5) = 2 -> 1 + 2
    # (round-half-up would give lo = 1, hi = 2 -> 2)
    assert step_cost(s, 0.875, 0.25) == 3.0
    # rate 0.625, step 0.25: lo = round(1.5) = 2, hi = round(2.5) = 2 -> empty, cost 0
    # (round-half-up would give 3)
    assert step_cost(s, 0.625, 0.25) == 0.0
    # rate 0.375, step 0.25: lo = round(2.5) = 2, hi = round(3.5) = 4 -> 3 + 4
    assert step_cost(s, 0.375, 0.25) == 7.0


def test_step_cost_skips_masked_zeros_and_is_monotone() -> None:
    # C=16 at rate 0.8: kept 13, three masked channels score 0
    live = torch.arange(1.0, 14.0)[torch.randperm(13, generator=torch.Generator().manual_seed(0))]
    scores = torch.zeros(16)
    scores[[0, 4, 6, 7, 9, 10, 11, 12, 13, 14, 15, 2, 3]] = live  # masked: channels 1, 5, 8
    # lo = round(0.2*16) = round(3.2) = 3 (the three zeros are skipped), hi = round(6.4) = 6 -> 1 + 2 + 3
    assert step_cost(scores, 0.8, 0.2) == 6.0
    costs = [step_cost(scores, 0.8, st) for st in (0.0, 0.0625, 0.125, 0.25, 0.5, 0.8)]
    assert costs == sorted(costs) and costs[0] == 0.0
    assert costs[-1] == float(live.sum())  # everything live
    # float32 scores are summed in float64 (in float32, 1e8 + 3 would come out as 1e8)
    big = torch.tensor([1e8, 1.0, 1.0, 1.0], dtype=torch.float32)
    assert step_cost(big, 1.0, 0.75) == 3.0
    assert step_cost(big, 1.0, 1.0) == 100000003.0


# ============================================================================ search.trimmed_otsu_threshold


def _otsu_brute(costs: list[float], trim: float) -> float:
    """Independent re-implementation: drop ceil(n·trim) from each end, try every split the release
    tries (lower class 1 .. n-2 values), weights as fractions, means as plain sums."""
    s = sorted(float(c) for c in costs)
    k = math.ceil(len(s) * trim)
    s = s[k:len(s) - k]
    n = len(s)
    if n < 3:
        return math.inf
    best_val, best_t = None, None
    for t in range(1, n - 1):
        lower, upper = s[:t], s[t:]
        w0, w1 = len(lower) / n, len(upper) / n
        m0, m1 = sum(lower) / len(lower), sum(upper) / len(upper)
        val = w0 * w1 * (m0 - m1) ** 2
        if best_val is None or val > best_val + 1e-15 * abs(best_val):
            best_val, best_t = val, t
    return (s[best_t - 1] + s[best_t]) / 2


def test_otsu_hand_worked() -> None:
    # 10 costs; trim 0.2 drops ceil(2.0)=2 from each end -> [1, 2, 3, 10, 11, 12]
    costs = [12.0, -50.0, 3.0, 100.0, 1.0, 0.0, 11.0, 13.0, 2.0, 10.0]
    # t=1: 1*5*(1-7.6)^2 = 217.8   t=2: 2*4*(1.5-9)^2 = 450
    # t=3: 3*3*(2-11)^2 = 729      t=4: 4*2*(4-11.5)^2 = 450   -> t=3, threshold (3+10)/2
    assert trimmed_otsu_threshold(costs, 0.2) == 6.5
    assert _otsu_brute(costs, 0.2) == 6.5


def test_otsu_small_hand_case_without_trim() -> None:
    # [0, 1, 5]: t=1 only (the release never isolates the top value): threshold 0.5
    assert trimmed_otsu_threshold([5.0, 0.0, 1.0], 0.0) == 0.5
    # [0, 4, 5, 6]: t=1: 1*3*(0-5)^2 = 75; t=2: 2*2*(2-5.5)^2 = 49 -> 2.0
    assert trimmed_otsu_threshold([6.0, 4.0, 0.0, 5.0], 0.0) == 2.0


def test_otsu_never_isolates_the_top_value_as_in_the_release() -> None:
    # after trimming: [0, 1, 2, 3, 4, 100]. Textbook Otsu would split off 100 alone
    # (5*1*(2-100)^2 = 48020 > 4*2*(1.5-52)^2 = 20402); the release's range(1, n-1) cannot.
    costs = [-1e3, -1e3, 0.0, 1.0, 2.0, 3.0, 4.0, 100.0, 1e3, 1e3]
    assert trimmed_otsu_threshold(costs, 0.2) == 3.5 == _otsu_brute(costs, 0.2)


@pytest.mark.parametrize("seed", range(12))
def test_otsu_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 40))
    costs = rng.lognormal(size=n).tolist()
    trim = float(rng.choice([0.0, 0.1, 0.2, 0.25]))
    got, want = trimmed_otsu_threshold(costs, trim), _otsu_brute(costs, trim)
    if math.isinf(want):
        assert math.isinf(got) and got > 0
    else:
        assert got == pytest.approx(want, rel=1e-12)


def test_otsu_too_few_left_passes_everything() -> None:
    assert trimmed_otsu_threshold([], 0.2) == math.inf
    assert trimmed_otsu_threshold([1.0], 0.2) == math.inf       # ceil(0.2)=1 dropped each side
    assert trimmed_otsu_threshold([1.0, 2.0], 0.0) == math.inf
    assert trimmed_otsu_threshold([1.0, 2.0, 3.0, 4.0], 0.2) == math.inf  # 4 - 2*1 = 2 left
    assert math.isfinite(trimmed_otsu_threshold([1.0, 2.0, 3.0, 4.0, 5.0], 0.2))  # 3 left


def test_otsu_bimodal_splits_between_the_modes() -> None:
    rng = np.random.default_rng(3)
    low, high = rng.uniform(1.0, 2.0, 10), rng.uniform(10.0, 11.0, 10)
    th = trimmed_otsu_threshold(np.concatenate([high, low]).tolist(), 0.2)
    assert low.max() < th < high.min()


def test_otsu_constant_costs_all_pass() -> None:
    costs = [2.5] * 9
    th = trimmed_otsu_threshold(costs, 0.2)
    assert all(c <= th for c in costs)


def test_otsu_passes_about_half_on_random_costs() -> None:
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(200):
        costs = rng.uniform(size=30)
        th = trimmed_otsu_threshold(costs.tolist(), 0.2)
        fractions.append(float((costs <= th).mean()))
    assert 0.4 < float(np.mean(fractions)) < 0.6
    assert 0.2 < min(fractions) and max(fractions) < 0.8


# ============================================================================ search.objective


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_objective_hand_2x3() -> None:
    z = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    labels = np.array([2, 0])
    k = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    log_p = _np_log_softmax(z)
    hard = -(log_p[0, 2] + log_p[1, 0])
    pk = np.exp(_np_log_softmax(k))
    soft = -(pk * log_p).sum()
    # spelled out for row 0: log_p = z - log(e^1 + e^2 + e^3)
    lse0 = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    assert log_p[0, 2] == pytest.approx(3 - lse0)
    got = objective(torch.tensor(z), torch.tensor(labels), torch.tensor(k))
    assert got.item() == pytest.approx(hard + soft, rel=1e-6)
    # by hand: log_p = [[-2.40761, -1.40761, -0.40761], [-1.74131, -3.24131, -0.24131]]
    # hard = 0.40761 + 1.74131 = 2.14892
    # softmax(K) = [[0.21194, 0.57612, 0.21194], [0.66524, 0.09003, 0.24473]]
    # soft = 1.40761 + (0.66524*1.74131 + 0.09003*3.24131 + 0.24473*0.24131 = 1.50927)
    assert got.item() == pytest.approx(2.14892 + 1.40761 + 1.50927, abs=2e-4)


def test_objective_without_ensemble_is_summed_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(7, 10, generator=g), torch.randint(0, 10, (7,), generator=g)
    assert objective(z, y, None).item() == pytest.approx(F.cross_entropy(z, y, reduction="sum").item(), rel=1e-6)


def test_objective_with_itself_as_ensemble_adds_the_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(5, 4, generator=g), torch.randint(0, 4, (5,), generator=g)
    p = F.softmax(z, 1)
    entropy = -(p * p.log()).sum()
    assert objective(z, y, z).item() == pytest.approx(F.cross_entropy(z, y, reduction="sum").item()
                                                      + entropy.item(), rel=1e-5)


# ============================================================================ search.update_ensemble


def test_update_ensemble_is_the_running_mean() -> None:
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(6, 10, generator=g) * (i + 1) for i in range(6)]
    k, t = zs[0].clone(), 1
    for i in range(1, 6):
        k = update_ensemble(k, zs[i], t)
        t += 1
        assert torch.allclose(k, torch.stack(zs[:i + 1]).mean(0), atol=1e-5)
    # hand value for t = 1: (K*1 + z)/2
    a, b = torch.tensor([[2.0, 4.0]]), torch.tensor([[0.0, 1.0]])
    assert update_ensemble(a, b, 1).tolist() == [[1.0, 2.5]]
    assert update_ensemble(a, b, 3).tolist() == [[1.5, 3.25]]


# ============================================================================ search.land_rate


def _linear_ratio(r: float) -> float:
    return 0.5 * r + 0.5


def test_land_rate_normal_step() -> None:
    assert land_rate(0.8, 0.2, 16, _linear_ratio, 0.7) == 0.6          # ratio 0.8 >= 0.7
    assert land_rate(1.0, 0.2 / 3, 16, _linear_ratio, 0.5) == 0.93333  # rounded to 5 decimals
    assert land_rate(0.8, 0.2, 16, lambda r: r, 0.6) == 0.6             # exactly at keep: a normal step


@pytest.mark.parametrize(
    ("keep", "expected"),
    # identity ratio, C=16, rate 0.8, step 0.2: new = 0.6; the form round(0.6 + k/16, 5) gives
    # 0.6, 0.6625, 0.725, 0.7875 (0.85 is not below the old rate)
    [(0.61, 0.6), (0.6625, 0.6625), (0.71, 0.6625), (0.7249, 0.6625), (0.725, 0.725), (0.75, 0.725),
     (0.7875, 0.7875), (0.7999, 0.7875)],
)
def test_land_rate_overshoot_hand(keep: float, expected: float) -> None:
    assert land_rate(0.8, 0.2, 16, lambda r: r, keep) == expected


def _count_ratio(channels: int, other: int = 24, const: float = 300.0):
    """A FLOPs-like ratio from channel counts: a conv pair other->C->other plus a constant."""
    full = 2 * other * channels + const
    return lambda r: (2 * other * kept_channels(channels, r) + const) / full


@pytest.mark.parametrize("channels", [16, 32, 64, 100])
def test_land_rate_is_the_largest_rate_of_the_form_at_or_below_keep(channels: int) -> None:
    ratio = _count_ratio(channels)
    rng = np.random.default_rng(channels)
    checked = 0
    for _ in range(300):
        rate = round(float(rng.uniform(0.1, 1.0)), 5)
        step = float(rng.choice([0.2, 1 / channels, 0.2 / 3, 0.1]))
        keep = float(rng.uniform(0.05, 1.0))
        got = land_rate(rate, step, channels, ratio, keep)
        new = round(rate - step, 5)
        assert got < rate  # (c)
        if ratio(new) >= keep:  # (a)
            assert got == new
            continue
        checked += 1
        form = [round(new + k / channels, 9) for k in range(channels + 2)]
        ok = [f for f in form if f < rate - 1e-9 and ratio(f) <= keep]
        assert got == max(ok)  # (b)
        assert ratio(got) <= keep  # never above keep
    assert checked > 30


def test_land_rate_never_lands_above_keep_with_rate_ratio() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        c = int(rng.choice([8, 16, 32]))
        rate = round(float(rng.uniform(0.2, 1.0)), 5)
        step = step_size(c, int(rng.choice([1, 3, 10])))
        keep = float(rng.uniform(0.4, 1.0))
        got = land_rate(rate, step, c, _linear_ratio, keep)
        assert got < rate
        if _linear_ratio(round(rate - step, 5)) < keep:
            assert _linear_ratio(got) <= keep
            # one more 1/C would be above keep or reach the old rate
            nxt = round(got + 1 / c, 5)
            assert nxt >= rate - 1e-9 or _linear_ratio(nxt) > keep


def test_land_rate_can_land_on_every_channel_count_c64() -> None:
    # C=64 block-internal group at rate 0.2 (13 kept) stepping by 0.2 -> 0.0 (1 kept), keep = 3/64
    # of a ratio proportional to the kept count: 3 channels is the largest count at or below keep.
    ratio = lambda r: kept_channels(64, r) / 64  # noqa: E731
    got = land_rate(0.2, 0.2, 64, ratio, 3 / 64)
    assert kept_channels(64, got) == 3  # round(3/64, 5) = 0.04688 would keep 4


# ============================================================================ the masked network

N_CLASSES = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> nn.Module:
    """ResNet-20 with random BN affine parameters and statistics (positive BN biases, so masked
    channels would be non-zero if a mask were missing)."""
    return random_bn(create_model("resnet20", seed=seed), seed, running=(0.2, 0.5, 2.0))


@pytest.fixture(scope="module")
def net() -> MaskedNetwork:
    return MaskedNetwork(_model(0))


@pytest.fixture
def fresh(net: MaskedNetwork):
    """The shared network reset to all rates 1 / channel order before and after each test."""
    def reset() -> None:
        for g in net.gates:
            g.ranks = None
        net.set_rates([1.0] * len(net.gates))
        net.collect_scores(False)
        net.set_sliced(False)
        net.set_weight_reuse(False)
        net.model.to(memory_format=torch.contiguous_format)
        net.model.train()
    reset()
    yield net
    reset()


@pytest.fixture(scope="module")
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return tiny_batches(N_CLASSES)


def _gi(net: MaskedNetwork, producer: str) -> int:
    """Index of the gate whose group ``producer`` writes."""
    return next(i for i, g in enumerate(net.gates) if producer in g.group.producers)


def _stream_gates(net: MaskedNetwork) -> list[int]:
    return [_gi(net, "conv1"), _gi(net, "layer2.0.conv2"), _gi(net, "layer3.0.conv2")]


def _randomize(net: MaskedNetwork, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rates = []
    for gate in net.gates:
        gate.ranks = torch.randperm(gate.channels, generator=g)
        rates.append(float(torch.empty(1).uniform_(0.3, 0.9, generator=g)))
    net.set_rates(rates)


def _reference_masks(net: MaskedNetwork) -> tuple[list[torch.Tensor], dict[tuple[int, int], torch.Tensor]]:
    streams = [net.gates[i].mask() for i in _stream_gates(net)]
    inner = {(s, j): net.gates[_gi(net, f"layer{s + 1}.{j}.conv1")].mask() for s in range(3) for j in range(3)}
    return streams, inner


def _norm_preserving(w: torch.Tensor, m_in: torch.Tensor | None, m_out: torch.Tensor | None) -> torch.Tensor:
    mask = torch.ones_like(w)
    if m_out is not None:
        mask = mask * m_out.to(w).view(-1, *[1] * (w.dim() - 1))
    if m_in is not None:
        mask = mask * m_in.to(w).view(1, -1, *[1] * (w.dim() - 2))
    if bool((mask == 0).any()):
        wm = w * mask
        return wm * (w.norm() / wm.norm())
    return w


def _reference_forward(model: nn.Module, streams: list[torch.Tensor], inner: dict, x: torch.Tensor,
                       record: list | None = None) -> torch.Tensor:
    """The masked ResNet-20 written out by hand: mask after the stem ReLU, each block's inner ReLU
    and each block's add+ReLU; norm-preserving kernels. ``record`` collects (group key, y)."""
    def conv(c: nn.Conv2d, h: torch.Tensor, m_in, m_out) -> torch.Tensor:
        return F.conv2d(h, _norm_preserving(c.weight, m_in, m_out), None, c.stride, c.padding)

    def point(h: torch.Tensor, m: torch.Tensor, key) -> torch.Tensor:
        y = h * m.to(h).view(1, -1, 1, 1)
        if record is not None:
            y.retain_grad()
            record.append((key, y))
        return y

    h = point(F.relu(model.bn1(conv(model.conv1, x, None, streams[0]))), streams[0], ("stream", 0))
    prev = streams[0]
    for s in range(3):
        for j, blk in enumerate(getattr(model, f"layer{s + 1}")):
            mid = inner[(s, j)]
            a = point(F.relu(blk.bn1(conv(blk.conv1, h, prev, mid))), mid, ("inner", s, j))
            b = blk.bn2(conv(blk.conv2, a, mid, streams[s]))
            if isinstance(blk.shortcut, nn.Identity):
                sc = h
            else:
                sc = blk.shortcut[1](conv(blk.shortcut[0], h, prev, streams[s]))
            h = point(F.relu(b + sc), streams[s], ("stream", s))
            prev = streams[s]
    pooled = F.adaptive_avg_pool2d(h, 1).flatten(1)
    return F.linear(pooled, _norm_preserving(model.linear.weight, streams[2], None), model.linear.bias)


@pytest.mark.parametrize("train", [False, True])
def test_masked_network_with_all_rates_one_is_the_model(fresh: MaskedNetwork, batches, train: bool) -> None:
    net = fresh
    net.model.train(train)
    x = batches[0][0]
    with torch.no_grad():
        assert torch.equal(net(x), net.model(x))
    for layer in net.gm.modules():
        if hasattr(layer, "effective_weight"):
            assert layer.effective_weight() is None


def _slice(net: MaskedNetwork, x: torch.Tensor, sliced: bool) -> torch.Tensor:
    """Switch to the kept-channels-only layers (channels-last), as the Searcher does."""
    if not sliced:
        return x
    net.model.to(memory_format=torch.channels_last)
    net.set_sliced(True)
    return x.contiguous(memory_format=torch.channels_last)


def _sliced_batches(net: MaskedNetwork, batches, sliced: bool):
    """``batches`` (channels-last) after switching ``net`` to sliced layers, when ``sliced``."""
    if not sliced:
        return batches
    _slice(net, batches[0][0], True)
    return [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]


@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_masked_network_matches_hand_written_masked_forward(fresh: MaskedNetwork, batches, train: bool,
                                                            sliced: bool) -> None:
    net = fresh
    _randomize(net, seed=11)
    net.model.train(train)
    x = _slice(net, batches[0][0], sliced)
    streams, inner = _reference_masks(net)
    with torch.no_grad():
        got, want = net(x), _reference_forward(net.model, streams, inner, x)
        plain = net.model(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the masks do something


def test_masked_channels_are_zero_at_every_mask_point(fresh: MaskedNetwork, batches) -> None:
    net = fresh
    _randomize(net, seed=12)
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(len(net.gates))}
    hooks = [gm.register_forward_hook(lambda mod, inp, out, i=i: seen[i].append((inp[0], out)))
             for i, gm in enumerate(net.masks)]
    try:
        with torch.no_grad():
            net(batches[0][0])
    finally:
        for h in hooks:
            h.remove()
    streams = _stream_gates(net)
    for i, gate in enumerate(net.gates):
        m = gate.mask()
        assert 0 < int(m.sum()) < gate.channels
        # one call per mask point: 4 for the stem+stage-1 stream, 3 for the other streams, 1 inner
        expected_points = (4 if i == streams[0] else 3) if i in streams else 1
        assert len(seen[i]) == expected_points == len(gate.group.mask_nodes)
        for inp, out in seen[i]:
            assert torch.equal(out[:, ~m], torch.zeros_like(out[:, ~m]))
            assert torch.equal(out[:, m], inp[:, m])
            assert inp[:, ~m].abs().sum() > 0  # the mask was needed: positive BN biases leak through


def test_effective_weight_is_norm_preserving(fresh: MaskedNetwork) -> None:
    net = fresh
    _randomize(net, seed=13)
    modules = dict(net.gm.named_modules())
    cases = {  # masked layer -> (input mask gate, output mask gate)
        "masked_layer1_0_conv2": (_gi(net, "layer1.0.conv1"), _gi(net, "conv1")),
        "masked_layer2_0_shortcut_0": (_gi(net, "conv1"), _gi(net, "layer2.0.conv2")),
        "masked_conv1": (None, _gi(net, "conv1")),
        "masked_linear": (_gi(net, "layer3.0.conv2"), None),
    }
    for name, (gi_in, gi_out) in cases.items():
        layer = modules[name]
        w = layer.layer.weight
        ew = layer.effective_weight()
        m_in = net.gates[gi_in].mask() if gi_in is not None else None
        m_out = net.gates[gi_out].mask() if gi_out is not None else None
        assert ew.shape == w.shape
        assert ew.norm().item() == pytest.approx(w.norm().item(), rel=1e-5)
        keep = torch.ones(w.shape[:2], dtype=torch.bool)
        if m_out is not None:
            keep &= m_out.view(-1, 1)
        if m_in is not None:
            keep &= m_in.view(1, -1)
        assert torch.equal(ew[~keep], torch.zeros_like(ew[~keep]))
        scale = w.norm() / w[keep].norm()
        assert torch.allclose(ew[keep], w[keep] * scale, rtol=1e-5, atol=1e-7)
        assert torch.allclose(ew, _norm_preserving(w, m_in, m_out), rtol=1e-5, atol=1e-7)


def _hand_taylor(net: MaskedNetwork, batches, ensemble: torch.Tensor | None, nominal: int) -> dict:
    """|Σ_{n,h,w} (∂J/∂y)·y| per batch and mask point, summed per group, on the hand-written
    forward (J written out: hard CE + soft CE against softmax(K), divided by ``nominal``)."""
    streams, inner = _reference_masks(net)
    scores: dict = {}
    start = 0
    for x, y in batches:
        record: list = []
        with torch.enable_grad():
            out = _reference_forward(net.model, streams, inner, x.clone().requires_grad_(True), record)
            j = F.cross_entropy(out, y, reduction="sum")
            if ensemble is not None:
                k = ensemble[start:start + len(y)]
                j = j - (F.softmax(k, 1) * F.log_softmax(out, 1)).sum()
            (j / nominal).backward()
        start += len(y)
        for key, yv in record:
            group = key[:2] if key[0] == "stream" else key
            s = (yv.grad * yv).detach().sum((0, 2, 3)).abs().double()
            scores[group] = scores.get(group, 0) + s
    return scores


def _group_key(net: MaskedNetwork, i: int):
    streams = _stream_gates(net)
    if i in streams:
        return ("stream", streams.index(i))
    name = net.gates[i].group.producers[0]  # layerS.J.conv1
    return ("inner", int(name[5]) - 1, int(name.split(".")[1]))


@pytest.mark.parametrize(("with_ensemble", "sliced"), [(True, False), (False, False), (True, True)])
def test_taylor_scores_match_hand_computation(fresh: MaskedNetwork, batches, with_ensemble: bool,
                                              sliced: bool) -> None:
    net = fresh
    _randomize(net, seed=14)
    batches = _sliced_batches(net, batches, sliced)
    n = sum(len(y) for _, y in batches)
    ensemble = torch.randn(n, N_CLASSES, generator=torch.Generator().manual_seed(9)) * 3 if with_ensemble else None
    got = taylor_scores(net, batches, ensemble, nominal_batch=256)
    want = _hand_taylor(net, batches, ensemble, 256)
    assert len(got) == len(net.gates)
    for i, gate in enumerate(net.gates):
        m = gate.mask()
        s = got[i]
        assert s.dtype == torch.float64 and s.shape == (gate.channels,)
        assert torch.equal(s[~m], torch.zeros_like(s[~m]))  # masked channels score exactly 0
        assert (s[m] > 0).all()
        w = want[_group_key(net, i)]
        assert torch.allclose(s, w, rtol=2e-4, atol=1e-6 * float(w.max())), gate.group.name
    # collection is switched off again: a further backward adds nothing
    before = net.scores()
    with torch.enable_grad():
        x = batches[0][0].clone().requires_grad_(True)
        net(x).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, net.scores()))


def test_taylor_scores_of_two_batches_are_the_sum_per_batch(fresh: MaskedNetwork, batches) -> None:
    net = fresh
    _randomize(net, seed=15)
    n0 = len(batches[0][1])
    n = n0 + len(batches[1][1])
    ensemble = torch.randn(n, N_CLASSES, generator=torch.Generator().manual_seed(4))
    both = taylor_scores(net, batches, ensemble, 256)
    first = taylor_scores(net, batches[:1], ensemble[:n0], 256)
    second = taylor_scores(net, batches[1:], ensemble[n0:], 256)
    for a, b, c in zip(both, first, second):
        assert torch.allclose(a, b + c, rtol=1e-10, atol=0)
        assert not torch.allclose(b, c)
    # scores restart from zero on every call
    again = taylor_scores(net, batches, ensemble, 256)
    assert all(torch.equal(a, b) for a, b in zip(both, again))


def test_weight_scores_l1(fresh: MaskedNetwork) -> None:
    net = fresh
    modules = dict(net.model.named_modules())

    def l1(*names: str) -> torch.Tensor:
        return sum(modules[n].weight.detach().double().abs().sum((1, 2, 3)) for n in names)

    expected = {
        _gi(net, "conv1"): l1("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"),
        _gi(net, "layer2.0.conv2"): l1("layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2", "layer2.2.conv2"),
        _gi(net, "layer3.0.conv2"): l1("layer3.0.conv2", "layer3.0.shortcut.0", "layer3.1.conv2", "layer3.2.conv2"),
    }
    for s in range(3):
        for j in range(3):
            expected[_gi(net, f"layer{s + 1}.{j}.conv1")] = l1(f"layer{s + 1}.{j}.conv1")
    assert len(expected) == len(net.gates) == 12
    got = weight_scores(net, "l1", seed=0)
    for i, e in expected.items():
        assert torch.allclose(got[i], e, rtol=1e-12)
    _randomize(net, seed=16)
    got = weight_scores(net, "l1", seed=0)
    for i, e in expected.items():
        m = net.gates[i].mask()
        assert torch.equal(got[i][~m], torch.zeros_like(got[i][~m]))
        assert torch.allclose(got[i][m], e[m], rtol=1e-12)


def test_weight_scores_random_is_fixed_per_seed_and_masked_zero(fresh: MaskedNetwork) -> None:
    net = fresh
    _randomize(net, seed=17)
    a, b, c = (weight_scores(net, "random", seed=s) for s in (3, 3, 4))
    for x, y, z, gate in zip(a, b, c, net.gates):
        m = gate.mask()
        assert torch.equal(x, y) and not torch.equal(x, z)
        assert (x[m] > 0).all() and (x[~m] == 0).all()


# ============================================================================ the candidate evaluator


@pytest.mark.parametrize(("which", "sliced"), [("inner", False), ("stream", False), ("stream", True)])
def test_fast_evaluator_equals_full_evaluation(fresh: MaskedNetwork, batches, which: str, sliced: bool) -> None:
    net = fresh
    _randomize(net, seed=18)
    batches = _sliced_batches(net, batches, sliced)
    n = sum(len(y) for _, y in batches)
    ensemble = torch.randn(n, N_CLASSES, generator=torch.Generator().manual_seed(2))
    fast = CandidateEvaluator(net, batches, fast=True)
    slow = CandidateEvaluator(net, batches, fast=False)
    fast.set_base()
    base = slow.evaluate(ensemble)
    i = _gi(net, "layer2.1.conv1") if which == "inner" else _gi(net, "layer2.0.conv2")
    # the fast path really re-uses values: nothing before the changed gate's first layer is recomputed
    affected = {node.name for node in fast._affected[i]}
    assert {"x", "conv1", "bn1", "relu", "mask_0", "layer1_0_conv1"}.isdisjoint(affected)
    assert len(affected) < len(list(net.gm.graph.nodes)) - 30
    gate = net.gates[i]
    old = gate.rate
    gate.rate = round(old - 0.15, 5)
    net.masks[i].set(gate.mask())
    try:
        a = fast.evaluate(ensemble, changed_gate=i)
        b = slow.evaluate(ensemble)
    finally:
        gate.rate = old
        net.masks[i].set(gate.mask())
    assert (a.logits - base.logits).abs().max() > 1e-3  # the candidate changes the output
    assert torch.allclose(a.logits, b.logits, rtol=0, atol=1e-5)
    assert a.loss == pytest.approx(b.loss, abs=1e-6) and a.j == pytest.approx(b.j, abs=1e-6)
    assert a.accuracy == b.accuracy
    # the metrics themselves
    labels = torch.cat([y for _, y in batches])
    assert b.loss == pytest.approx(F.cross_entropy(b.logits, labels).item(), rel=1e-6)
    assert b.j == pytest.approx(objective(b.logits, labels, ensemble).item() / n, rel=1e-6)
    assert b.accuracy == pytest.approx(100.0 * (b.logits.argmax(1) == labels).float().mean().item())
    assert b.reward("ensemble") == b.j and b.reward("val-loss") == b.loss
    # back at the base state the fast evaluator reproduces the base
    c = fast.evaluate(ensemble, changed_gate=i)
    assert torch.allclose(c.logits, base.logits, rtol=0, atol=1e-5)


def _mid_search_state(searcher: Searcher, seed: int):
    """Step 0, then every group at a random rate in [0.4, 0.9] with random ranks: a state in which
    every masked layer computes on its kept channels."""
    state = searcher.initial_state()
    g = torch.Generator().manual_seed(seed)
    for i, gate in enumerate(searcher.net.gates):
        state.rates[i] = round(float(torch.empty(1).uniform_(0.4, 0.9, generator=g)), 5)
        state.ranks[i] = torch.randperm(gate.channels, generator=g)
    searcher.restore(state)
    return state


def _trajectory(state) -> list[tuple]:
    return [(row["group"], row.get("rate"), row.get("widths"), row["j"], row["val_loss"], row["val_accuracy"],
             row["evaluated"]) for row in state.log]


@pytest.mark.parametrize("compat", ["method", "release"])
def test_the_optimised_search_takes_bit_identical_steps_to_the_straightforward_one(batches, compat: str) -> None:
    """The optimised search (cached frontier activations, tails, weights re-used per mask content)
    against the straightforward one (the whole network per candidate, every kept weight re-sliced at
    every call), from a mid-search state in which every layer is sliced, both with kept-channels-only
    layers: every step's group, rate, widths, ranks, J, CE, accuracy, history and K are the same
    floats, not just close (an optimisation may skip work, never change a number)."""
    runs = []
    for fast in (True, False):
        net = MaskedNetwork(_model(0))
        searcher = Searcher(net, batches, SearchConfig(keep=0.2, batch_size=8, fast=fast, compat=compat))
        assert searcher.evaluator.fast is fast
        net.set_weight_reuse(fast)
        state = _mid_search_state(searcher, seed=21)
        for _ in range(5):
            state = searcher.step(state)
        runs.append(state)
    opt, ref = runs
    assert len({row["group"] for row in opt.log[1:]}) > 1  # the steps go to different groups
    assert _trajectory(opt) == _trajectory(ref)
    assert all(torch.equal(a, b) for a, b in zip(opt.ranks, ref.ranks))
    assert torch.equal(opt.ensemble, ref.ensemble)
    assert [h["loss"] for h in opt.history] == [h["loss"] for h in ref.history]
    assert all(torch.equal(a, b) for h, k in zip(opt.history, ref.history) for a, b in zip(h["masks"], k["masks"]))


def test_sliced_layers_reuse_weights_only_for_the_same_masks_and_unchanged_weights(fresh: MaskedNetwork,
                                                                                   batches) -> None:
    """A sliced layer re-uses its kept weights only while its masks have the same content and its
    weight is the same, unchanged tensor; with a gradient wanted for the weights it never re-uses."""
    net = fresh
    x = _slice(net, batches[0][0], True)
    _randomize(net, seed=22)

    def reference() -> torch.Tensor:
        net.set_weight_reuse(False)
        with torch.no_grad():
            out = net(x)
        net.set_weight_reuse(True)
        return out

    net.set_weight_reuse(True)
    try:
        with torch.no_grad():
            first = net(x)
            layer = net.gm.masked_layer2_0_conv1  # in: the stage-1 stream, out: its own inner group
            assert layer.reuse and len(layer._reused) == 1
            held = next(iter(layer._reused.values()))[2][0]
            assert torch.equal(net(x), first)
            assert next(iter(layer._reused.values()))[2][0] is held  # the second call re-used it
            assert torch.equal(first, reference())
            # another content of one mask (its producer's, its consumer's), then back
            for name in ("layer2.0.conv1", "conv1"):
                i = _gi(net, name)
                old = net.gates[i].rate
                net.gates[i].rate = round(old - 0.2, 5)
                net.masks[i].set(net.gates[i].mask())
                changed = net(x)
                assert not torch.equal(changed, first) and torch.equal(changed, reference())
                net.gates[i].rate = old
                net.masks[i].set(net.gates[i].mask())
                assert torch.equal(net(x), first)
            # the weight changed in place: its version counter moved, the held weights are not used
            w = layer.layer.weight
            w.mul_(1.5)
            try:
                scaled = net(x)
                assert not torch.equal(scaled, first) and torch.equal(scaled, reference())
            finally:
                w.div_(1.5)
            assert torch.equal(net(x), reference())
        # a gradient with respect to the weights: computed afresh at every call, so two backward
        # passes give the same gradient as without re-use
        w.requires_grad_(True)
        try:
            grads = []
            for _ in range(2):
                w.grad = None
                net(x).square().sum().backward()
                grads.append(w.grad.clone())
            net.set_weight_reuse(False)
            w.grad = None
            net(x).square().sum().backward()
            assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1]) and torch.equal(grads[0], w.grad)
        finally:
            w.requires_grad_(False)
            w.grad = None
    finally:
        net.set_weight_reuse(False)


def test_each_search_phase_starts_without_held_weights(batches) -> None:
    """Weights held for re-use live one phase of the search (a step, step 0, the uniform
    baseline), in which the weights are frozen: a change the version counter does not see (through
    ``.data``) between two steps is still used by the next step."""
    net = MaskedNetwork(_model(0))
    searcher = Searcher(net, batches, SearchConfig(keep=0.2, batch_size=8))
    state = searcher.step(_mid_search_state(searcher, seed=23))
    with torch.no_grad():
        net.model.layer1[0].conv1.weight.data.mul_(-1.0)
    saved = copy.deepcopy(state)
    logs = []
    for reuse in (True, False):
        if not reuse:
            net.set_weight_reuse(False)  # the reference: nothing held, every weight sliced at every call
        again = copy.deepcopy(saved)
        searcher.restore(again)
        logs.append(_trajectory(searcher.step(again))[-1])
    assert logs[0] == logs[1]


# ============================================================================ monotone pruning (known bugs)


def _searcher(net: MaskedNetwork, batches, importance: str) -> tuple[Searcher, object]:
    cfg = SearchConfig(keep=0.2, importance=importance, batch_size=8, fast=False, sliced=False)
    searcher = Searcher(net, batches, cfg)
    return searcher, searcher.initial_state()


def _set_gate(state, i: int, rate: float, ranks: torch.Tensor) -> None:
    state.rates[i] = rate
    state.ranks[i] = ranks


def _revived(old: list[torch.Tensor], new: list[torch.Tensor]) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(old, new)) if bool((b & ~a).any())]


def test_step_never_revives_a_masked_channel_fpgm(fresh: MaskedNetwork, batches) -> None:
    net = fresh
    searcher, state = _searcher(net, batches, "fpgm")
    i = _gi(net, "layer1.0.conv1")
    ranks = torch.arange(16).roll(5)  # channel 5 has rank 0: the one survivor at rate 1/16
    _set_gate(state, i, 1 / 16, ranks)
    searcher.restore(state)
    if net.gates[i].mask().nonzero().flatten().tolist() != [5]:
        pytest.fail("precondition: channel 5 should be the survivor")
    old = pack_masks(net)
    searcher.step(state)
    assert _revived(old, pack_masks(net)) == []


def test_step_never_revives_a_masked_channel_dead_relu(fresh: MaskedNetwork, batches) -> None:
    net = fresh
    bn, bn2 = net.model.layer1[1].bn1, net.model.layer1[1].bn2
    saved, saved2 = bn.bias[3].item(), bn2.weight.clone()
    bn.bias[3] = -1e3  # channel 3 of layer1.1's inner group never fires: its Taylor score is exactly 0
    bn2.weight.mul_(50.0)  # the group's other channels matter a lot: its step cost is above the Otsu cut
    try:
        searcher, state = _searcher(net, batches, "ekg")
        i = _gi(net, "layer1.1.conv1")
        kept = [3, 8, 10, 11, 12, 13, 14, 15]  # rate 0.5: 8 kept, channel 3 among them
        order = kept + [c for c in range(16) if c not in kept]
        ranks = torch.empty(16, dtype=torch.long)
        ranks[torch.tensor(order)] = torch.arange(16)
        _set_gate(state, i, 0.5, ranks)
        searcher.restore(state)
        old = pack_masks(net)
        state = searcher.step(state)
        if state.log[-1]["group"] == i:
            pytest.fail("precondition: this group should not be the one stepped")
        assert _revived(old, pack_masks(net)) == []
    finally:
        bn.bias[3] = saved
        bn2.weight.copy_(saved2)


def test_fast_evaluator_falls_back_when_its_cache_would_not_fit(fresh: MaskedNetwork, batches) -> None:
    """The activation cache is measured (bytes per image × images); over the limit, the evaluator
    runs each candidate on the whole network instead (ImageNet-sized D_val would not fit)."""
    fits = CandidateEvaluator(fresh, batches, fast=True)
    fits.limit_cache(None)  # the free memory of this machine: a few CIFAR batches fit
    assert fits.fast and fits.cache_bytes > 0 and not fits.note
    n = sum(len(y) for _, y in batches)
    _, *kept = fits._base(batches[0][0][:2])
    assert fits.cache_bytes == sum(v.numel() * v.element_size() for v in kept) // 2 * n
    small = CandidateEvaluator(fresh, batches, fast=True)
    small.limit_cache(fits.cache_bytes / 2**30 / 2)  # half of what it needs
    assert not small.fast and "GiB of activations" in small.note
    with pytest.raises(EkgError, match="`cache_gb`"):
        SearchConfig(cache_gb=-1).validate()


def test_the_floor_of_the_budget_is_every_group_at_one_channel(shared_data):
    """check_reachable refuses exactly the budgets below the graph's floor, every prunable group at one
    channel (for the uniform method too: its smallest rate, 1/C of the widest group, keeps one channel
    of every group)."""
    from ekg.checkpoint import load_checkpoint
    from ekg.errors import EkgError
    from ekg.graph import build_graph
    from ekg.search import SearchConfig, check_reachable, floor_ratio

    graph = build_graph(load_checkpoint(shared_data / "pretrained/akamaster/resnet20-12fca82f.th").model, (3, 32, 32))
    ones = graph.full_widths()
    for g in graph.prunable:
        ones[g.index] = 1
    floor = graph.cost(ones)[0] / graph.cost(graph.full_widths())[0]
    assert floor_ratio(graph, SearchConfig()) == pytest.approx(floor, rel=1e-12)
    for method in ("greedy", "uniform"):
        check_reachable(graph, SearchConfig(keep=floor, method=method))
        with pytest.raises(EkgError, match="cannot reach"):
            check_reachable(graph, SearchConfig(keep=floor * 0.999, method=method))
    bn = floor_ratio(graph, SearchConfig(bn_ops=True))
    assert bn != floor and bn == floor_ratio(graph, SearchConfig(compat="release"))

"""BN recalibration (used to compare pruned sub-networks before fine-tuning); interleaved latency."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekg.data import ImageSet, get_normalization, iterate_batches
from ekg.evaluate import recalibrate_bn


def _data(n: int = 48) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)])


def test_recalibrate_bn_is_the_mean_of_the_batch_statistics() -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)
    model = nn.Sequential(conv, bn, nn.ReLU())
    bn.running_mean.fill_(7.0)
    bn.running_var.fill_(9.0)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    data, norm = _data(), get_normalization("cifar10")
    model.eval()
    assert recalibrate_bn(model, data, norm, batch_size=16) == 1
    means, vars_ = [], []
    with torch.no_grad():
        for x, _ in iterate_batches(data, 16, normalization=norm):
            y = conv(x)
            means.append(y.mean((0, 2, 3)))
            vars_.append(y.var((0, 2, 3), unbiased=True))
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, torch.stack(vars_).mean(0), rtol=1e-4)
    # weights untouched, mode and momentum restored
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert not model.training and bn.momentum == 0.1


def test_recalibrate_bn_without_bn_is_a_no_op() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    before = model[0].weight.clone()
    assert recalibrate_bn(model, _data(), get_normalization("cifar10")) == 0
    assert torch.equal(model[0].weight, before)


# ----------------------------------------------------------------------------- latency (no real timings asserted)

class _Clock:
    """A fake ``time.perf_counter``: it advances only when a model's forward says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Costly(nn.Module):
    """Each forward appends its name to ``log`` and advances ``clock`` by the next of ``costs_ms``
    (cycling): deterministic 'latencies'."""

    def __init__(self, name: str, log: list[str], clock: _Clock, costs_ms: list[float]) -> None:
        super().__init__()
        self.name, self.log, self.clock, self.costs = name, log, clock, costs_ms
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.name)
        self.clock.now += self.costs[self.calls % len(self.costs)] / 1e3
        self.calls += 1
        return x


def test_compare_latency_interleaves_the_models_round_by_round(monkeypatch) -> None:
    from ekg import evaluate as ev

    log: list[str] = []
    clock = _Clock()
    monkeypatch.setattr(ev.time, "perf_counter", clock)
    models = {name: _Costly(name, log, clock, [1.0]) for name in ("A", "B", "C")}
    res = ev.compare_latency(models, (3, 4, 4), 2, rounds=4, iters_per_round=3, warmup=2)
    # warm-up of each in turn, then every round: A×3, B×3, C×3
    assert log == ["A"] * 2 + ["B"] * 2 + ["C"] * 2 + (["A"] * 3 + ["B"] * 3 + ["C"] * 3) * 4
    assert res["baseline"] == "A" and set(res["speedup"]) == set(res["ratio"]) == {"B", "C"}
    assert res["rounds"] == 4 and res["iters_per_round"] == 3 and res["batch_size"] == 2
    assert all(not m.training for m in models.values())
    # measure_latency runs on the same core: warm-up, then its timed passes
    log.clear()
    lat = ev.measure_latency(models["B"], (3, 4, 4), 1, warmup=1, iters=5)
    assert log == ["B"] * 6 and lat["median_ms"] == pytest.approx(1.0) and lat["p90_ms"] == pytest.approx(1.0)


def test_compare_latency_statistics_are_those_of_the_recorded_rounds(monkeypatch) -> None:
    """Round medians, per-model medians, per-round ratios and their spread, from a fake clock
    (round 2 has a 50 ms outlier pass, round 5 is slow for both: load that hits both alike)."""
    from ekg import evaluate as ev

    log: list[str] = []
    clock = _Clock()
    monkeypatch.setattr(ev.time, "perf_counter", clock)
    # 5 rounds of 3 passes, no warm-up: the original's passes per round, and the pruned one's
    orig = [[10, 12, 11], [20, 21, 50], [10, 10, 10], [13, 12, 14], [30, 31, 29]]
    pruned = [[5, 6, 4], [12, 10, 11], [4, 5, 6], [6, 7, 5], [20, 10, 15]]
    flat = lambda rounds: [t for r in rounds for t in r]  # noqa: E731
    models = {"original": _Costly("original", log, clock, flat(orig)),
              "pruned": _Costly("pruned", log, clock, flat(pruned))}
    res = ev.compare_latency(models, (3, 4, 4), 1, rounds=5, iters_per_round=3, warmup=0)
    o_rounds, p_rounds = [11, 21, 10, 13, 30], [5, 11, 5, 6, 15]  # per-round medians
    o, p = res["models"]["original"], res["models"]["pruned"]
    assert o["round_ms"] == pytest.approx(o_rounds) and p["round_ms"] == pytest.approx(p_rounds)
    assert o["median_ms"] == pytest.approx(13) and p["median_ms"] == pytest.approx(6)
    assert p["images_per_s"] == pytest.approx(1e3 / 6)
    assert o["p90_ms"] == pytest.approx(30) and p["p90_ms"] == pytest.approx(12)  # 13th of 15 passes, sorted
    speedups = [11 / 5, 21 / 11, 10 / 5, 13 / 6, 30 / 15]  # 2.2, 1.909, 2.0, 2.1667, 2.0
    sp = res["speedup"]["pruned"]
    assert sp["per_round"] == pytest.approx(speedups)
    assert sp["median"] == pytest.approx(2.0) and sp["min"] == pytest.approx(21 / 11)
    assert sp["max"] == pytest.approx(2.2) and sp["rounds"] == 5
    assert sp["q1"] == pytest.approx(2.0) and sp["q3"] == pytest.approx(13 / 6)  # sorted: 1.909 2 2 2.167 2.2
    r = res["ratio"]["pruned"]
    assert r["per_round"] == pytest.approx([1 / s for s in speedups])
    assert r["median"] == pytest.approx(0.5) and r["min"] == pytest.approx(1 / 2.2) and r["max"] == pytest.approx(11 / 21)
    assert r["q1"] == pytest.approx(6 / 13) and r["q3"] == pytest.approx(0.5)
    assert ev.format_speedup(sp) == "2.00× (IQR 2.00–2.17, range 1.91–2.20 over 5 rounds)"


def test_spread_of_an_even_number_and_of_one_value() -> None:
    from ekg.evaluate import format_speedup, spread

    s = spread([4.0, 1.0, 3.0, 2.0])
    assert s == {"median": 2.5, "q1": 1.75, "q3": 3.25, "min": 1.0, "max": 4.0, "rounds": 4}
    assert spread([7.0]) == {"median": 7.0, "q1": 7.0, "q3": 7.0, "min": 7.0, "max": 7.0, "rounds": 1}
    # a round wrecked by load shows as such, not as "0.00"
    assert format_speedup(spread([0.0042, 1.2, 1.3])) == "1.20× (IQR 0.60–1.25, range 0.0042–1.30 over 3 rounds)"


def test_compare_latency_refuses_bad_settings() -> None:
    from ekg.errors import EkgError
    from ekg.evaluate import compare_latency

    m = nn.Identity()
    with pytest.raises(EkgError, match="rounds must be an integer >= 1"):
        compare_latency({"a": m, "b": m}, (3, 4, 4), rounds=0)
    with pytest.raises(EkgError, match="baseline 'c' is not one of"):
        compare_latency({"a": m, "b": m}, (3, 4, 4), baseline="c")
    with pytest.raises(EkgError, match="at least one model"):
        compare_latency({}, (3, 4, 4))

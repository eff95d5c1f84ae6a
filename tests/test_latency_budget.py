"""`--budget latency` (issue 15): the search on a latency model's predicted ratio — the same step
rules, the landing and the stop test on the prediction — its checks before any work, the run
directory's copy of the model (a resumed search predicts as it did), and the predicted and measured
speed-up in `ekg prune`, `ekg run` and `ekg test`.

The search's rules are checked with deterministic clocks (no test asserts a real timing): on a table
proportional to FLOPs the latency budget makes the FLOPs budget's decisions exactly; on a table with
another shape it makes others, landing at or just below the budget in predicted latency."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import random_bn
from ekg import flops
from ekg.errors import EkgError
from ekg.graph import build_graph
from ekg.latency import LatencyModel, LatencyTarget, _Timer
from ekg.masks import MaskedNetwork
from ekg.search import SearchConfig
from ekg.search.searcher import Searcher
from test_round_to import SIZE, RandomNet

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET = LatencyTarget(threads=1)


class FlopsClock(_Timer):
    """A module's "time" is its MACs (a network's: the sum of its convs' and linears'; a BN's: 0)."""

    def time_module(self, module: nn.Module, shape: tuple[int, ...]) -> float:
        return flops.count(module, tuple(shape)).flops * 1e-6


class RoundedClock(_Timer):
    """A conv's "time" is its MACs with its output channels rounded up to a multiple of 8 (as a
    vectorised kernel's remainder costs a whole vector); a linear's its MACs, a BN's 0; a network's
    1.5 times the sum over its convs and linears (what the units leave out: the adds, activations
    and pooling that shrink with them), so the calibration's scale is 1.5."""

    def time_module(self, module: nn.Module, shape: tuple[int, ...]) -> float:
        total = [0.0]

        def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if isinstance(m, nn.Conv2d):
                rounded = -(-m.out_channels // 8) * 8
                positions = out[0].numel() // m.out_channels
                total[0] += positions * rounded * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            else:
                total[0] += m.in_features * m.out_features

        hooks = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        try:
            with torch.no_grad():
                module.eval()(torch.zeros(1, *shape))
        finally:
            for h in hooks:
                h.remove()
        return total[0] * 1e-6 * (1.5 if len(hooks) > 1 else 1.0)


def _search(seed: int, keep: float, clock: type[_Timer] | None, tmp_path) -> tuple[Searcher, list[dict]]:
    torch.manual_seed(seed)
    model = random_bn(RandomNet(seed), seed).eval()
    graph = build_graph(model, SIZE)
    latency = None if clock is None else LatencyModel(model, graph, TARGET, cache=tmp_path / str(seed),
                                                      progress=False, timer=clock(TARGET))
    net = MaskedNetwork(model, graph)
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(12, *SIZE, generator=gen), torch.randint(0, 10, (12,), generator=gen))]
    cfg = SearchConfig(keep=keep, batch_size=12, **({} if clock is None else {"budget": "latency"}))
    searcher = Searcher(net, batches, cfg, latency=latency)
    searcher.final_state = searcher.run(searcher.initial_state())  # for the tests that go on from it
    return searcher, searcher.final_state.log


@pytest.mark.parametrize("seed,keep", [(0, 0.5), (1, 0.6), (2, 0.45)])
def test_on_a_flops_proportional_table_the_latency_budget_makes_the_flops_budgets_decisions(seed, keep, tmp_path):
    """The latency budget changes only the cost the landing and the stop test read: where the
    predicted latency is the FLOPs, every step picks the same group at the same rate."""
    _, by_flops = _search(seed, keep, None, tmp_path)
    searcher, by_latency = _search(seed, keep, FlopsClock, tmp_path)
    assert searcher.latency.scale == pytest.approx(1.0)
    assert [(r["group"], r.get("rate"), r.get("widths")) for r in by_latency] == \
        [(r["group"], r.get("rate"), r.get("widths")) for r in by_flops]
    assert [r["latency_ratio"] for r in by_latency] == pytest.approx([r["flops_ratio"] for r in by_flops], abs=1e-12)
    assert "latency_ratio" not in by_flops[-1]


@pytest.mark.parametrize("seed,keep", [(0, 0.5), (3, 0.6)])
def test_a_latency_budget_lands_at_or_just_below_it_in_predicted_latency(seed, keep, tmp_path):
    """On a table that is not the FLOPs, the search lands on the predicted latency: at or below
    ``keep``, and the last step's group could not keep one more channel; the logged ratio is the
    prediction of the widths kept, the table's calibrated sum. Its FLOPs ratio is another number."""
    searcher, log = _search(seed, keep, RoundedClock, tmp_path)
    net, lat = searcher.net, searcher.latency
    assert lat.scale == pytest.approx(1.5)
    widths = net.widths()
    assert log[-1]["latency_ratio"] == lat.ratio(widths) <= keep
    table = sum(lat.table.entries[r.unit.signature].at(1 if r.unit.one_width else r.widths(widths)[0],
                                                       r.widths(widths)[1]) for r in lat.rows)
    assert lat.predict(widths) == pytest.approx(lat.full_ms + lat.scale * (table - lat.full_units_ms))
    last = net.gates[log[-1]["group"]]
    if last.kept < last.channels:
        wider = widths.copy()
        wider[last.group.index] += 1
        assert lat.ratio(wider) > keep
    assert abs(log[-1]["flops_ratio"] - log[-1]["latency_ratio"]) > 1e-3
    _, by_flops = _search(seed, keep, None, tmp_path)
    assert [r.get("widths") for r in log] != [r.get("widths") for r in by_flops]


def test_a_searcher_needs_a_latency_model_exactly_for_a_latency_budget():
    torch.manual_seed(0)
    model = RandomNet(0).eval()
    net = MaskedNetwork(model, build_graph(model, SIZE))
    batches = [(torch.randn(4, *SIZE), torch.arange(4))]
    with pytest.raises(EkgError, match="latency budget needs a latency model"):
        Searcher(net, batches, SearchConfig(budget="latency", batch_size=4))


@pytest.mark.parametrize("kwargs,match", [
    ({"latency_runtime": "onnxruntime"}, r"`latency_runtime` sets the latency target of a latency budget"),
    ({"latency_threads": 2, "latency_batch": 8}, r"`latency_threads`, `latency_batch` set the latency target"),
    ({"latency_dtype": "bfloat16", "latency_channels_last": True},
     r"`latency_dtype`, `latency_channels_last` set the latency target"),
    ({"budget": "latency", "latency_dtype": "float64"}, "latency dtype must be one of"),
    ({"budget": "time"}, r"`budget` must be one of flops, latency"),
    ({"budget": "latency", "compat": "release"}, "not part of the original release"),
    ({"budget": "latency", "latency_device": "tpu"}, "latency device must be one of cpu, cuda"),
    ({"budget": "latency", "latency_batch": 0}, "latency batch must be an integer >= 1"),
    ({"budget": "latency", "keep": 1.5}, r"fraction of the measured latency"),
])
def test_bad_latency_settings_are_one_line(kwargs, match):
    with pytest.raises(EkgError, match=match) as e:
        SearchConfig(**kwargs).validate()
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_a_cuda_target_without_a_gpu_is_refused():
    with pytest.raises(EkgError, match="no CUDA GPU is available"):
        SearchConfig(budget="latency", latency_device="cuda").validate()


# ----------------------------------------------------------------------------- end to end, real timings

def _prune_args(src, data, run, keep: str, *extra: str) -> list[str]:
    return ["prune", "--model", str(src), "--data", str(data), "--keep", keep, "--out", str(run), "--budget",
            "latency", "--latency-threads", "1", "--val-per-class", "2", "--sub-per-class", "2", "--no-adapt",
            "--quiet", *extra]


def test_ekg_prune_on_a_latency_budget_end_to_end(tmp_path, shared_data, cifar10_exact, capsys, monkeypatch):
    """`ekg prune --budget latency` on the real ResNet-20: the search lands on the predicted ratio,
    RUN/latency.json keeps the model it predicted with and the measurement of the slim network
    against the original on the target (interleaved rounds), and the printed line gives both. A
    resumed run predicts with the saved model (nothing is timed again, whatever the cache holds);
    an out-of-reach budget is refused before anything is written."""
    from ekg.cli import main

    monkeypatch.setenv("EKG_CACHE", str(tmp_path / "cache"))
    src = shared_data / "pretrained/akamaster/resnet20-12fca82f.th"
    run = tmp_path / "RUN"
    assert main(_prune_args(src, cifar10_exact, run, "0.8")) == 0
    out = capsys.readouterr().out
    assert "latency on torch on CPU, 1 thread, batch 1: predicted" in out and "speed-up" in out
    log = [json.loads(line) for line in (run / "search.jsonl").read_text().splitlines()]
    saved = json.loads((run / "latency.json").read_text())
    m = saved["measured"]
    # at or below the budget in prediction, unless the refits (real timings: a busy machine measures
    # more) took the search down to one channel everywhere, which the run then says
    ran_out = (saved["model"]["accepted"] or {}).get("note")
    assert (log[-1]["latency_ratio"] <= 0.8 or ran_out) and m["predicted_ratio"] == pytest.approx(log[-1]["latency_ratio"])
    assert saved["model"]["accepted"]["widths"] == [int(w) for w in saved["model"]["accepted"]["widths"]]
    assert m["comparison"]["rounds"] == 10 and m["measured_speedup"]["rounds"] == 10
    assert m["measured_ms"] > 0 and m["original_ms"] > 0 and m["target"] == "torch on CPU, 1 thread, batch 1"
    assert saved["model"]["key"]["threads"] == 1 and saved["model"]["key"]["batch"] == 1
    assert json.loads((run / "config.json").read_text())["search"]["budget"] == "latency"
    # resumed from the last step, with an empty cache: the saved model predicts, the clock is never asked
    (run / "pruned.pt").unlink()
    monkeypatch.setenv("EKG_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(_Timer, "time_module", lambda *a, **k: pytest.fail("a resumed run timed a layer"))
    monkeypatch.setattr("ekg.pruning.latency_report", lambda *a, **k: m)  # the end-to-end check times on purpose
    assert main(_prune_args(src, cifar10_exact, run, "0.8", "--resume")) == 0
    capsys.readouterr()
    again = [json.loads(line) for line in (run / "search.jsonl").read_text().splitlines()]
    assert again == log
    # below the floor: refused before the run directory exists
    monkeypatch.undo()
    monkeypatch.setenv("EKG_CACHE", str(tmp_path / "cache"))
    code = main(_prune_args(src, cifar10_exact, tmp_path / "LOW", "0.01"))
    err = capsys.readouterr().err
    assert code == 1 and "cannot reach --keep 0.01 of the latency on torch on CPU" in err
    assert "give a --keep of at least" in err and not (tmp_path / "LOW").exists()


def test_ekg_test_predicts_and_measures_the_speed_up_on_the_target(tmp_path, shared_data, cifar10_exact, capsys,
                                                                  monkeypatch):
    """`ekg test --latency-baseline` on a named target: the measured speed-up (interleaved rounds)
    and the one the baseline's latency table predicts for the model's widths."""
    from ekg.checkpoint import load_checkpoint, save_checkpoint
    from ekg.cli import main
    from ekg.slim import slim_model

    monkeypatch.setenv("EKG_CACHE", str(tmp_path / "cache"))
    base = shared_data / "pretrained/akamaster/resnet20-12fca82f.th"
    ckpt = load_checkpoint(base)
    graph = build_graph(ckpt.model, tuple(ckpt.input_size))
    keep = {g.index: list(range(g.channels // 2)) for g in graph.prunable}
    ckpt.model = slim_model(ckpt.model, graph, keep)
    half = save_checkpoint(ckpt, tmp_path / "half.pt")
    assert main(["test", "--model", str(half), "--data", str(cifar10_exact), "--latency-baseline", str(base),
                 "--latency-threads", "1", "--latency-batch", "1", "--latency-rounds", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["latency_target"] == "torch on CPU, 1 thread"
    (pred,) = res["latency_predicted"]
    assert pred["batch_size"] == 1 and pred["predicted_speedup"] > 1 and pred["predicted_ms"] < pred["baseline_ms"]
    (cmp,) = res["latency_cpu_comparison"]
    assert cmp["rounds"] == 3 and cmp["threads"] == 1 and cmp["speedup"]["model"]["rounds"] == 3
    assert main(["test", "--model", str(half), "--data", str(cifar10_exact), "--latency-baseline", str(base),
                 "--latency-threads", "1", "--latency-batch", "1", "--latency-rounds", "2"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("latency batch"))
    assert "speed-up" in line and "predicted" in line
    # the model as deployed in another format: measured in it, and the target says so
    assert main(["test", "--model", str(half), "--data", str(cifar10_exact), "--latency", "--latency-threads", "1",
                 "--latency-dtype", "bfloat16", "--latency-channels-last", "--latency-batch", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["latency_target"] == "torch on CPU, 1 thread, bfloat16, channels-last" and "latency_cpu" not in res
    (on,) = res["latency_on_target"]
    assert on["batch_size"] == 2 and on["median_ms"] > 0 and on["threads"] == 1
    # a bad target is one line, before any work
    code = main(["test", "--model", str(half), "--data", str(tmp_path / "nowhere"), "--latency",
                 "--latency-threads", "0"])
    assert code == 1 and "latency threads must be an integer >= 1" in capsys.readouterr().err


def test_ekg_run_summary_reports_the_latency_target(tmp_path, shared_data, cifar10_exact, capsys, monkeypatch):
    """`ekg run --budget latency`: summary.json and the printed table give the final model's latency
    on the target, measured against the original's, and the speed-up the search predicted."""
    from ekg.cli import main

    monkeypatch.setenv("EKG_CACHE", str(tmp_path / "cache"))
    src = shared_data / "pretrained/akamaster/resnet20-12fca82f.th"
    run = tmp_path / "RUN"
    assert main(["run", "--model", str(src), "--data", str(cifar10_exact), "--keep", "0.8", "--out", str(run),
                 "--budget", "latency", "--latency-threads", "1", "--val-per-class", "2", "--sub-per-class", "2",
                 "--no-adapt", "--preset", "quick", "--epochs", "1", "--limit-train", "256", "--kd", "none",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    t = json.loads((run / "summary.json").read_text())["latency_target"]
    assert t["target"] == "torch on CPU, 1 thread, batch 1" and (t["predicted_ratio"] <= 0.8 or t["note"])
    assert t["measured_speedup"]["rounds"] == 10 and t["measured_ms"] > 0
    assert "latency on torch on CPU, 1 thread, batch 1" in printed and "predicted" in printed
    assert "keep 0.8 of the latency" in printed


def test_a_slim_models_widths_are_read_on_the_original_graph():
    """The widths the predictions are made at (ekg run's summary, ekg test, the benchmark) are read
    from the slim model's layers on the original's graph: the slim model's own graph can group its
    channels otherwise (a depthwise conv cut to one channel is a plain conv there)."""
    from ekg.slim import slim_model, slim_widths
    from test_latency import SIZE as TINY, TinyNet

    torch.manual_seed(0)
    model = TinyNet().eval()
    graph = build_graph(model, TINY)
    keep = {g.index: [0] if "conv1" in g.producers else list(range(g.channels // 2)) for g in graph.prunable}
    slim = slim_model(model, graph, keep)
    want = graph.full_widths()
    for g in graph.prunable:
        want[g.index] = len(keep[g.index])
    assert slim_widths(graph, slim).tolist() == want.tolist()
    assert len(build_graph(slim, TINY).groups) != len(graph.groups)  # why the slim graph is not read
    with pytest.raises(EkgError, match="no layer 'conv1'"):
        slim_widths(graph, nn.Sequential(nn.Conv2d(3, 4, 1)))


def test_a_latency_budget_under_torchrun_is_refused_before_any_work(tmp_path):
    """Each rank would time a table of its own and take other decisions: one process only."""
    from ekg.distributed import Dist
    from ekg.pruning import prune
    from test_zoo import random_data

    out = tmp_path / "run"
    with pytest.raises(EkgError, match="a latency budget is timed by one process"):
        prune(RandomNet(0), random_data(16, 2), 0.7, out=out, config=SearchConfig(budget="latency"),
              dist=Dist(world_size=2), progress=False)
    assert not out.exists()


def test_a_landing_measured_above_the_budget_is_refitted_and_searched_on(tmp_path):
    """The closed loop (ekg.pruning.refit_landing): where the end-to-end measurement of the landed
    sub-network is more than 2% above ``keep`` (here the network runs 15% slower than the table
    predicts), the measurement joins the latency model, the search goes on from its last step and
    lands again, until a landing measures within the tolerance; that landing is accepted and not
    measured again. Every step before the first landing is the search's own."""
    import copy

    from ekg.pruning import LATENCY_TOLERANCE, refit_landing

    keep = 0.6
    searcher, log = _search(0, keep, RoundedClock, tmp_path)
    lat = searcher.latency
    table = copy.deepcopy(lat)  # what the table alone predicts
    measured: list[float] = []

    def measure(widths):  # the "real" latency: 15% above the table's prediction below the full network
        r = min(1.0, 1.15 * table.ratio(widths))
        measured.append(r)
        return r

    first = [dict(row) for row in log]
    state = refit_landing(searcher, searcher.final_state, lat, measure, keep)
    assert measured[0] > keep * (1 + LATENCY_TOLERANCE)          # the first landing was too slow
    assert 1 <= len(lat.refits) <= 3 and len(measured) == len(lat.refits) + 1
    assert measured[-1] <= keep * (1 + LATENCY_TOLERANCE) and measured[-1] < measured[0]
    assert lat.accepted["measured_ratio"] == measured[-1] and lat.accepted["refits"] == len(lat.refits)
    assert state.log[:len(first) - 1] == first[:-1] and len(state.log) > len(first)
    assert lat.ratio(searcher.net.widths()) <= keep                 # the refitted model's landing
    # the refitted model passes through every measured landing
    for widths, ms in lat.refits:
        assert lat.predict(widths) == pytest.approx(ms)
    # accepted: not measured again (a resumed run)
    n = len(measured)
    refit_landing(searcher, state, lat, measure, keep)
    assert len(measured) == n
    # saved and restored, the model predicts the same
    again = LatencyModel(searcher.net.model, searcher.net.graph, TARGET, saved=json.loads(json.dumps(lat.to_dict())))
    assert again.ratio(searcher.net.widths()) == lat.ratio(searcher.net.widths()) and again.accepted == lat.accepted



def test_a_landing_measured_slower_than_a_wider_network_is_searched_on_below_it(tmp_path):
    """Real kernels are not monotone in width: in bfloat16 and channels-last on this machine's AMX
    the half-width ResNet-56 ran 1.53× faster than the full one, a narrower landing only 1.27–1.33×
    (bench/latency_format.py). Such a measurement is the cheapest point of the refitted prediction
    and the segment above it is flat (the prediction is kept non-decreasing): the search must land
    again just below it, instead
    of running every group down to one channel for want of a slope. Below the cheapest measured
    network the prediction falls with the two-point calibration's slope."""
    import copy

    from ekg.pruning import LATENCY_TOLERANCE, refit_landing

    keep = 0.2  # below the half-width network (0.28 here): the landing is the cheapest network measured
    searcher, _ = _search(0, keep, RoundedClock, tmp_path)
    lat = searcher.latency
    table = copy.deepcopy(lat)
    half = lat.half_ms / lat.full_ms
    assert lat.units_ms(searcher.net.widths()) < lat.units_ms(lat.half_widths) and keep < half
    measured: list[float] = []

    def measure(widths):  # the first landing runs slower than the half-width network; later ones as the table says
        r = half + 0.05 if not measured else table.ratio(widths)
        measured.append(r)
        return r

    state = refit_landing(searcher, searcher.final_state, lat, measure, keep)
    assert measured[0] > half and len(lat.refits) == 1 and len(measured) == 2
    assert "note" not in lat.accepted and measured[-1] <= keep * (1 + LATENCY_TOLERANCE)
    floor = [min(g.channels, 1) for g in searcher.net.graph.prunable]
    assert [int(searcher.net.widths()[g.index]) for g in searcher.net.graph.prunable] != floor
    assert state.done and lat.ratio(searcher.net.widths()) <= keep
    # below the measured point the prediction falls along the calibration line's slope
    (u0, m0), (u1, m1) = lat._points[:2]
    u = lat.units_ms(searcher.net.widths())
    assert u < u0 and m1 == m0 and lat.predict(searcher.net.widths()) == pytest.approx(m0 + lat.scale * (u - u0))

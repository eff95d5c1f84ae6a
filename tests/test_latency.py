"""The measured-latency cost model (ekg.latency): the grid of timed widths, the table's cache key and
reuse, interpolation, monotonicity, and that a sub-network's prediction is the sum the table says.

The rules are checked with a deterministic clock (`ShapeClock`: a unit's "time" is a function of its
weight shape), as the latency comparison's statistics are checked with a fake clock; one test runs
the real timer end to end. No test asserts a real timing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from ekg.errors import EkgError
from ekg.graph import build_graph
from ekg.latency import (Entry, LatencyModel, LatencyTarget, _Timer, cache_key, cache_path, grid, units)
from ekg.models import create_model


class ShapeClock(_Timer):
    """A clock whose time of a module is a fixed function of its weights' shape and input: a wider
    layer costs more, and every call is counted."""

    def __init__(self, target: LatencyTarget) -> None:
        super().__init__(target)
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def time_module(self, module: nn.Module, shape: tuple[int, ...]) -> float:
        self.calls.append((type(module).__name__, tuple(shape)))
        weights = sum(p.numel() for p in module.parameters())
        return 0.001 * weights * (shape[-1] if len(shape) == 3 else 1) + 0.01 * shape[0]


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.bn3(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


SIZE = (3, 8, 8)


def tiny():
    torch.manual_seed(0)
    model = TinyNet().eval()
    return model, build_graph(model, SIZE)


def test_the_grid_holds_the_reachable_widths_with_both_ends():
    assert grid(5) == [1, 2, 3, 4, 5]
    assert grid(64, 8) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert grid(20, 8) == [8, 16, 20]                    # the full width is reachable too
    assert grid(3, 8) == [3]                             # narrower than the quantum: only its full width
    g = grid(100)
    assert len(g) == 8 and g[0] == 1 and g[-1] == 100 and g == sorted(set(g))
    g = grid(256, 8, points=5)
    assert g[0] == 8 and g[-1] == 256 and all(w % 8 == 0 for w in g) and len(g) == 5


def test_interpolation_is_exact_on_the_grid_and_linear_between():
    e = Entry(cin=[1, 3], cout=[2, 6], ms=[[1.0, 3.0], [5.0, 7.0]])
    assert e.at(1, 2) == 1.0 and e.at(3, 6) == 7.0 and e.at(1, 6) == 3.0
    assert e.at(2, 2) == pytest.approx(3.0)              # halfway in cin
    assert e.at(1, 4) == pytest.approx(2.0)              # halfway in cout
    assert e.at(2, 4) == pytest.approx(4.0)
    assert e.at(0, 0) == 1.0 and e.at(9, 9) == 7.0       # clamped beyond the grid


def test_timings_are_made_non_decreasing_in_both_widths():
    ms = [[2.0, 1.0, 3.0], [1.5, 4.0, 2.0]]
    m = np.asarray(Entry.monotone(ms))
    assert (np.diff(m, axis=0) >= 0).all() and (np.diff(m, axis=1) >= 0).all()
    assert m.tolist() == [[2.0, 2.0, 3.0], [2.0, 4.0, 4.0]]


def test_units_are_the_graphs_conv_linear_and_bn_rows_at_their_input_shapes():
    model, graph = tiny()
    rows = units(model, graph, "torch")
    kinds = [(graph.layers[r.layer].name, r.unit.kind, r.unit.in_shape) for r in rows]
    assert kinds == [("conv1", "conv", (3, 8, 8)), ("bn1", "bn", (16, 8, 8)), ("dw", "dwconv", (16, 8, 8)),
                     ("bn2", "bn", (16, 8, 8)), ("conv2", "conv", (16, 8, 8)), ("bn3", "bn", (24, 4, 4)),
                     ("fc", "linear", (24,))]
    assert rows[4].unit.stride == (2, 2) and rows[4].unit.kernel == (3, 3)
    # onnxruntime folds batch norm into the conv: no BN units
    assert [r.unit.kind for r in units(model, graph, "onnxruntime")] == ["conv", "dwconv", "conv", "linear"]
    # a unit at other widths is the same layer cut
    conv2 = rows[4].unit.module(5, 7)
    assert isinstance(conv2, nn.Conv2d) and conv2.weight.shape == (7, 5, 3, 3) and conv2.stride == (2, 2)
    dw = rows[2].unit.module(1, 6)
    assert dw.groups == 6 and dw.weight.shape == (6, 1, 3, 3) and rows[2].unit.input_shape(1, 6) == (6, 8, 8)


def clock_ms(row, cin: int, cout: int) -> float:
    """ShapeClock's time of ``row``'s unit at (cin, cout)."""
    module = row.unit.module(cin, cout)
    shape = row.unit.input_shape(cin, cout)
    return 0.001 * sum(p.numel() for p in module.parameters()) * (shape[-1] if len(shape) == 3 else 1) + 0.01 * shape[0]


def test_the_prediction_is_the_tables_sum_calibrated_on_two_measurements(tmp_path):
    model, graph = tiny()
    target = LatencyTarget(threads=1)
    clock = ShapeClock(target)
    lm = LatencyModel(model, graph, target, cache=tmp_path, progress=False, timer=clock)
    full = graph.full_widths()
    # the two end-to-end measurements: the model itself, and every prunable group at the grid point nearest half
    assert [w for w in lm.half_widths] == [w if not graph.groups[i].prunable else min(grid(w), key=lambda v: (abs(v - w / 2), v))
                                           for i, w in enumerate(full)]
    assert clock.calls[-2:] == [("TinyNet", SIZE), ("TinyNet", SIZE)]
    assert lm.full_ms == clock.time_module(model, SIZE)
    assert lm.predict(full) == pytest.approx(lm.full_ms) and lm.predict(lm.half_widths) == pytest.approx(lm.half_ms)
    widths = full.copy()
    for g in graph.prunable:
        widths[g.index] = max(1, g.channels // 3)
    assert all(w in grid(c) for w, c in zip(widths, full))  # grid points: no interpolation
    table = sum(clock_ms(row, *row.widths(widths)) for row in lm.rows)
    table_full = sum(clock_ms(row, *row.widths(full)) for row in lm.rows)
    table_half = sum(clock_ms(row, *row.widths(lm.half_widths)) for row in lm.rows)
    scale = (lm.full_ms - lm.half_ms) / (table_full - table_half)
    assert lm.scale == pytest.approx(scale)
    assert lm.predict(widths) == pytest.approx(lm.full_ms + scale * (table - table_full))
    assert lm.ratio(widths) == pytest.approx(lm.predict(widths) / lm.full_ms)
    assert lm.ratio(widths) < 1


def test_the_table_is_cached_per_target_and_reused(tmp_path):
    model, graph = tiny()
    target = LatencyTarget(threads=1, batch=2)
    first = ShapeClock(target)
    lm = LatencyModel(model, graph, target, cache=tmp_path, progress=False, timer=first)
    assert first.calls
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"] == cache_key(target, SIZE)
    again = ShapeClock(target)
    lm2 = LatencyModel(model, graph, target, cache=tmp_path, progress=False, timer=again)
    assert again.calls == []                               # nothing timed twice
    assert lm2.predict(graph.full_widths()) == lm.predict(graph.full_widths())
    other = ShapeClock(LatencyTarget(threads=1, batch=3))
    LatencyModel(model, graph, LatencyTarget(threads=1, batch=3), cache=tmp_path, progress=False, timer=other)
    assert other.calls and len(list(tmp_path.glob("*.json"))) == 2
    # a damaged table is measured again, with a warning naming it
    files[0].write_text("{")
    redo = ShapeClock(target)
    with pytest.warns(UserWarning, match=files[0].name):
        LatencyModel(model, graph, target, cache=tmp_path, progress=False, timer=redo)
    assert redo.calls


@pytest.mark.parametrize("field,value", [("runtime", "onnxruntime"), ("threads", 3), ("batch", 4),
                                         ("dtype", "bfloat16"), ("channels_last", True)])
def test_the_cache_key_names_every_setting_a_timing_depends_on(field, value):
    base = LatencyTarget(threads=1)
    other = LatencyTarget(**{**base.__dict__, field: value})
    assert cache_key(other, SIZE) != cache_key(base, SIZE)
    assert cache_path(cache_key(other, SIZE)) != cache_path(cache_key(base, SIZE))
    assert cache_key(base, (3, 16, 16)) != cache_key(base, SIZE)
    key = cache_key(base, SIZE)
    assert key["device_name"] and key["torch"] == torch.__version__ and key["threads"] == 1
    # another machine (CPU model or GPU name) or another torch is another table
    assert cache_path({**key, "device_name": "another CPU"}) != cache_path(key)
    assert cache_path({**key, "torch": "0.0"}) != cache_path(key)
    # the default format is not in the key: float32 contiguous tables timed before there was a format keep theirs
    assert set(key) == {"version", "device", "device_name", "runtime", "torch", "threads", "batch", "input_size"}


@pytest.mark.parametrize("kwargs,match", [({"device": "tpu"}, "device"), ({"runtime": "tvm"}, "runtime"),
                                          ({"batch": 0}, "batch"), ({"threads": 0}, "threads"),
                                          ({"batch": True}, "batch"),
                                          ({"dtype": "int8"}, "dtype must be one of float32, bfloat16, float16"),
                                          ({"dtype": "float16"}, "float16 is a GPU format"),
                                          ({"channels_last": "yes"}, "channels_last must be True or False"),
                                          ({"runtime": "onnxruntime", "dtype": "bfloat16"}, "float32 ONNX graphs"),
                                          ({"runtime": "onnxruntime", "channels_last": True}, "float32 ONNX graphs")])
def test_bad_targets_are_one_line(kwargs, match):
    with pytest.raises(EkgError, match=match) as e:
        LatencyTarget(**kwargs).validate()
    assert "\n" not in str(e.value)


class Shared(list):
    """A list that deep copies of its holder share (compare_on_target times copies of the models)."""

    def __deepcopy__(self, memo: dict) -> "Shared":
        return self


class FormatSpy(nn.Module):
    """Records the dtype and memory format of every input it gets, and its conv's weight's."""

    def __init__(self, seen: list) -> None:
        super().__init__()
        self.conv, self.seen = nn.Conv2d(3, 4, 3), seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.dtype, x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                          self.conv.weight.dtype,
                          self.conv.weight.is_contiguous(memory_format=torch.channels_last)
                          and not self.conv.weight.is_contiguous()))
        return self.conv(x)


@pytest.mark.parametrize("dtype,channels_last", [("float32", False), ("bfloat16", True), ("float32", True)])
def test_units_and_comparisons_run_in_the_targets_format(dtype, channels_last, tmp_path):
    """The timer and the end-to-end comparison run the model as deployed: weights and inputs in the
    target's dtype and memory format; the models handed in are left as they were."""
    from ekg.latency import compare_on_target

    target = LatencyTarget(threads=1, dtype=dtype, channels_last=channels_last)
    expect = (target.torch_dtype, channels_last, target.torch_dtype, channels_last)
    seen = Shared()
    _Timer(target, warmup=0, min_iters=1, min_ms=0).time_module(FormatSpy(seen), (3, 8, 8))
    assert seen and set(seen) == {expect}
    seen.clear()
    spy = FormatSpy(seen)
    cmp = compare_on_target({"a": spy, "b": spy}, (3, 8, 8), target, rounds=1)
    assert seen and set(seen) == {expect} and cmp["target"] == target.describe()
    assert spy.conv.weight.dtype == torch.float32 and spy.conv.weight.is_contiguous()
    # a whole table in that format leaves the caller's model in float32, contiguous
    model, graph = tiny()
    lm = LatencyModel(model, graph, target, cache=tmp_path, progress=False, quantum=8,
                      timer=_Timer(target, warmup=0, min_iters=1, min_ms=0))
    assert lm.full_ms > 0 and all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    assert lm.to_dict()["key"] == cache_key(target, SIZE)


def test_the_targets_description_names_a_format_other_than_the_default():
    assert LatencyTarget(threads=2).describe() == "torch on CPU, 2 threads, batch 1"
    assert LatencyTarget(threads=1, dtype="bfloat16", channels_last=True, batch=8).describe() == \
        "torch on CPU, 1 thread, bfloat16, channels-last, batch 8"


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_a_real_table_for_a_cifar_resnet(tmp_path, runtime):
    """The real timer on ResNet-20, both runtimes: a positive time for every cell, and a sub-network
    predicted to cost less than the whole (the table is non-decreasing in width)."""
    model = create_model("resnet20", seed=0).eval()
    graph = build_graph(model)
    lm = LatencyModel(model, graph, LatencyTarget(runtime=runtime, threads=1), cache=tmp_path, progress=False,
                      quantum=8)  # widths in multiples of 8: a smaller grid to time
    assert lm.full_ms > 0
    for entry in lm.table.entries.values():
        assert all(ms >= 0 for row in entry.ms for ms in row)
    half = graph.full_widths()
    for g in graph.prunable:
        half[g.index] = g.channels // 2
    assert lm.predict(half) <= lm.predict(graph.full_widths())

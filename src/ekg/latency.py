"""A measured-latency cost model: what a sub-network costs on a named target, in milliseconds.

FLOPs are one answer to "what does this sub-network cost"; the time it takes on the machine it will
run on is the one users care about. Built the way NetAdapt/HALP-style tools build it:

* every conv, linear and (for eager torch) batch-norm row of the dependency graph is a **unit**:
  a standalone layer with the module's kernel, stride, padding, groups and input size, whose input
  and output widths are those of its channel groups;
* each distinct unit is **timed once** on the target, on a grid of the widths the search can reach
  (every reachable width when there are few, else :data:`GRID_POINTS` of them spread over the range,
  both ends included), and the times are made non-decreasing in each width (a wider layer never
  costs less: timing noise must not make the search prefer a wider network);
* the table is **cached on disk** (``$EKG_CACHE/latency/``), one file per target key: device name,
  runtime and its version, torch version, threads, batch and input size. A unit already in the file
  is never timed again, so models sharing layers share entries;
* a sub-network's latency is **predicted** from the sum ``U(w)`` over units of the table,
  interpolated bilinearly between grid points, **calibrated on two end-to-end measurements**: the
  full network (``M_full``) and the network with every prunable group at the grid width nearest half
  of it (``M_half``). ``predict(w) = M_full + s·(U(w) − U(full))`` with
  ``s = (M_full − M_half) / (U(full) − U(half))``. A unit timed alone pays what it would not pay
  inside the network (a session run, ONNX Runtime's layout reorders around it: measured, 20–30% of
  a small conv), and the rest of the network (adds, activations, pooling) shrinks with it; the scale
  ``s`` absorbs both, while the table keeps the shape of the costs (which widths are slow). Both
  end points are predicted exactly. When the two measurements cannot tell a scale (no prunable
  group, equal sums, or a half-width network measured no faster than the full one), the prediction
  is proportional to the table: ``s = M_full / U(full)``, ``predict(w) = M_full·U(w)/U(full)``.

Targets (:class:`LatencyTarget`): ``device`` cpu or cuda, ``runtime`` torch (eager, inference mode)
or onnxruntime (CPU; a unit is a one-node ONNX graph, batch norm folds into the conv there as in a
real export, so it is no unit), ``threads`` (CPU), ``batch``, and for eager torch the format the
model is deployed in: ``dtype`` (float32, bfloat16, float16 on a GPU: weights and inputs, as
``model.to(dtype)``) and ``channels_last`` (4-D weights and inputs in channels-last memory format).
Every unit, every end-to-end measurement and every comparison runs in that format.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import EkgError

DEVICES = ("cpu", "cuda")
RUNTIMES = ("torch", "onnxruntime")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GRID_POINTS = 8          # widths timed per dimension of a unit when more are reachable
TABLE_VERSION = 2        # 2: ONNX Runtime sessions without spin-waiting


@dataclass(frozen=True)
class LatencyTarget:
    """Where the latency is measured. ``threads=None``: torch's current number of CPU threads."""

    device: str = "cpu"
    runtime: str = "torch"
    threads: int | None = None
    batch: int = 1
    dtype: str = "float32"       # the deployed model's dtype (eager torch): float32 | bfloat16 | float16 (cuda)
    channels_last: bool = False  # the deployed model's memory format (eager torch)

    def validate(self) -> "LatencyTarget":
        if self.device not in DEVICES:
            raise EkgError(f"latency device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.runtime not in RUNTIMES:
            raise EkgError(f"latency runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        for name, value in (("batch", self.batch), ("threads", self.threads)):
            if value is None and name == "threads":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EkgError(f"latency {name} must be an integer >= 1, got {value!r}")
        if self.dtype not in DTYPES:
            raise EkgError(f"latency dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.channels_last, bool):
            raise EkgError(f"latency channels_last must be True or False, got {self.channels_last!r}")
        if self.runtime == "onnxruntime" and (self.dtype != "float32" or self.channels_last):
            raise EkgError("the onnxruntime latency target times float32 ONNX graphs in their own layout: drop "
                           "--latency-dtype/--latency-channels-last, or use the torch runtime")
        if self.dtype == "float16" and self.device != "cuda":
            raise EkgError("latency dtype float16 is a GPU format (CPU kernels of float16 convolutions are no "
                           "deployment's): use --latency-device cuda, or bfloat16 on the CPU")
        if self.device == "cuda":
            if self.runtime != "torch":
                raise EkgError("the onnxruntime latency target runs on the CPU: use --latency-device cpu, or the "
                               "torch runtime on cuda")
            if not torch.cuda.is_available():
                raise EkgError("latency device cuda was asked for but no CUDA GPU is available: use "
                               "--latency-device cpu")
            if self.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
                raise EkgError(f"latency dtype bfloat16 is not supported on {torch.cuda.get_device_name()}: use "
                               "float16 or float32")
        if self.runtime == "onnxruntime":
            import importlib.util

            if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")):
                raise EkgError('the onnxruntime latency target needs onnx and onnxruntime: pip install "ekg[export]"')
        return self

    def resolved(self) -> "LatencyTarget":
        """The target with ``threads`` filled in (torch's current count when unset)."""
        return replace(self, threads=self.threads or torch.get_num_threads())

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def deployed(self, module: nn.Module) -> nn.Module:
        """``module`` (converted in place) on the target's device, in its dtype and memory format, in eval mode."""
        module = module.to(device=self.device, dtype=self.torch_dtype).eval()
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def example(self, shape: Sequence[int]) -> torch.Tensor:
        """A random input of ``shape`` (batch included) on the target, in its dtype and memory format."""
        x = torch.randn(*shape, device=self.device, dtype=self.torch_dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def describe(self) -> str:
        t = self.resolved()
        where = "GPU" if t.device == "cuda" else f"CPU, {t.threads} thread{'s' if t.threads != 1 else ''}"
        fmt = "".join((f", {t.dtype}" if t.dtype != "float32" else "", ", channels-last" if t.channels_last else ""))
        return f"{t.runtime} on {where}{fmt}, batch {t.batch}"


def device_name(device: str) -> str:
    """The machine a table belongs to: the GPU's name, or the CPU's model name."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    return f"torch {torch.__version__}"


def cache_key(target: LatencyTarget, input_size: Sequence[int]) -> dict[str, Any]:
    """What a timing depends on besides the unit itself. Two tables with equal keys are interchangeable."""
    t = target.resolved()
    key = {"version": TABLE_VERSION, "device": t.device, "device_name": device_name(t.device),
           "runtime": runtime_version(t.runtime), "torch": torch.__version__, "threads": t.threads,
           "batch": t.batch, "input_size": [int(s) for s in input_size]}
    # the format only where it is not the default: float32 contiguous tables keep their keys (and files)
    if t.dtype != "float32":
        key["dtype"] = t.dtype
    if t.channels_last:
        key["channels_last"] = True
    return key


def cache_path(key: dict[str, Any], root: Path | None = None) -> Path:
    from .download import default_cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return (root or default_cache_dir() / "latency") / f"{digest}.json"


# -- units ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One timed layer: a conv, linear or batch norm row of the graph, at the input shape of its call."""

    kind: str                    # conv, dwconv, linear, bn
    in_shape: tuple[int, ...]    # its input without the batch dim, at full width
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1              # a grouped conv's groups (depthwise: one per channel, whatever the width)
    bias: bool = False
    in_block: int = 1            # input features per input channel (a linear after a spatial flatten)
    channels_last: bool = False  # a linear over positions: (N, ..., C)

    @property
    def signature(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def one_width(self) -> bool:
        """A depthwise conv or a BN runs on one width (its channels): its cost varies with ``cout`` only."""
        return self.kind in ("dwconv", "bn")

    def input_shape(self, cin: int, cout: int) -> tuple[int, ...]:
        cin = cout if self.one_width else cin
        if self.kind == "linear":
            return (*self.in_shape[:-1], cin * self.in_block)
        return (cin, *self.in_shape[1:])

    def module(self, cin: int, cout: int) -> nn.Module:
        """The layer at ``cin`` input and ``cout`` output channels (a depthwise conv and a BN: ``cout``)."""
        if self.kind in ("conv", "dwconv"):
            groups = cout if self.kind == "dwconv" else self.groups
            cin = cout if self.kind == "dwconv" else cin
            return nn.Conv2d(cin, cout, self.kernel, self.stride, self.padding, self.dilation, groups=groups,
                             bias=self.bias)
        if self.kind == "linear":
            return nn.Linear(cin * self.in_block, cout, bias=self.bias)
        return (nn.BatchNorm2d if len(self.in_shape) == 3 else nn.BatchNorm1d)(cout)


@dataclass(frozen=True)
class UnitRow:
    """A graph row and its unit: which groups set its widths (None: fixed) and its full widths."""

    layer: int
    unit: Unit
    in_group: int | None
    out_group: int | None
    in_channels: int
    out_channels: int

    def widths(self, widths: Sequence[int]) -> tuple[int, int]:
        cin = int(widths[self.in_group]) if self.in_group is not None else self.in_channels
        cout = int(widths[self.out_group]) if self.out_group is not None else self.out_channels
        return cin, cout


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _call_inputs(model: nn.Module, names: set[str], input_size: Sequence[int]) -> dict[str, list[tuple[int, ...]]]:
    """The input shape (no batch dim) of every call of the named modules, in call order."""
    seen: dict[str, list[tuple[int, ...]]] = {n: [] for n in names}
    handles = []
    for name, m in model.named_modules():
        if name in names:
            handles.append(m.register_forward_hook(
                lambda mod, args, out, name=name: seen[name].append(tuple(args[0].shape[1:]))))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


def units(model: nn.Module, graph: Any, runtime: str = "torch") -> list[UnitRow]:
    """The timed units of ``model`` (its graph ``graph``), one per conv/linear/BN row of the graph.
    On onnxruntime a batch norm folds into the conv before it, so it is no unit there."""
    kinds = {"conv", "dwconv", "linear"} | ({"bn"} if runtime == "torch" else set())
    rows = [(i, layer) for i, layer in enumerate(graph.layers) if layer.kind in kinds]
    calls = _call_inputs(model, {layer.name for _, layer in rows}, graph.input_size)
    taken: dict[str, int] = {}
    out = []
    for i, layer in rows:
        k = taken.get(layer.name, 0)
        taken[layer.name] = k + 1
        shapes = calls[layer.name]
        shape = shapes[min(k, len(shapes) - 1)] if shapes else None
        if shape is None:
            raise EkgError(f"layer '{layer.name}' did not run in a forward pass at {tuple(graph.input_size)}, so its "
                           "latency cannot be measured")
        m = model.get_submodule(layer.name)
        if layer.kind in ("conv", "dwconv"):
            unit = Unit(layer.kind, shape, _pair(m.kernel_size), _pair(m.stride), _pair(m.padding),
                        _pair(m.dilation), 1 if layer.kind == "dwconv" else m.groups, m.bias is not None)
        elif layer.kind == "linear":
            unit = Unit("linear", shape, bias=m.bias is not None, in_block=layer.in_block,
                        channels_last=len(shape) > 1)
        else:
            unit = Unit("bn", shape)
        out.append(UnitRow(i, unit, layer.in_group, layer.out_group, layer.in_channels, layer.out_channels))
    return out


# -- the grid ------------------------------------------------------------------------------------


def grid(channels: int, quantum: int = 1, points: int = GRID_POINTS) -> list[int]:
    """The widths at which a unit is timed along one dimension of ``channels``: every width the search
    can reach (multiples of ``quantum``, and the full width) when there are at most ``points``,
    else ``points`` of them spread evenly over the range, both ends included."""
    reach = sorted({*range(quantum, channels + 1, quantum), channels})
    if len(reach) <= points:
        return reach
    picks = np.linspace(0, len(reach) - 1, points).round().astype(int)
    return [reach[i] for i in dict.fromkeys(picks.tolist())]


def _interp(xs: Sequence[int], x: float) -> tuple[int, int, float]:
    """Indices of the grid points around ``x`` and the weight of the upper one (clamped at the ends)."""
    if x <= xs[0]:
        return 0, 0, 0.0
    if x >= xs[-1]:
        n = len(xs) - 1
        return n, n, 0.0
    hi = int(np.searchsorted(xs, x))
    lo = hi - 1
    return lo, hi, (x - xs[lo]) / (xs[hi] - xs[lo])


@dataclass
class Entry:
    """One unit's timings: ``ms[i][j]`` at ``cin[i]`` input and ``cout[j]`` output channels."""

    cin: list[int]
    cout: list[int]
    ms: list[list[float]]

    def at(self, cin: float, cout: float) -> float:
        """Bilinear interpolation between the grid points (constant beyond them)."""
        i0, i1, a = _interp(self.cin, cin)
        j0, j1, b = _interp(self.cout, cout)
        m = self.ms
        return ((1 - a) * ((1 - b) * m[i0][j0] + b * m[i0][j1]) + a * ((1 - b) * m[i1][j0] + b * m[i1][j1]))

    @staticmethod
    def monotone(ms: list[list[float]]) -> list[list[float]]:
        """Running maxima along both widths: no cell costs less than a narrower one."""
        a = np.maximum.accumulate(np.maximum.accumulate(np.asarray(ms, dtype=np.float64), axis=0), axis=1)
        return a.tolist()


# -- timing --------------------------------------------------------------------------------------


class _Timer:
    """Times one forward of a module on the target: the median of repeated passes after a warm-up,
    repeated until ``min_iters`` passes and ``min_ms`` in all.

    :meth:`overhead` is the time of a call that does (almost) nothing — an ONNX Runtime session run,
    a module call — which a unit timed alone pays once and a network pays once in all (onnxruntime)
    or once per layer (eager torch, where it stays in the unit's time)."""

    def __init__(self, target: LatencyTarget, *, warmup: int = 3, min_iters: int = 15, min_ms: float = 30.0) -> None:
        self.target = target.resolved()
        self.warmup, self.min_iters, self.min_ms = warmup, min_iters, min_ms
        self._overhead: float | None = None

    def overhead(self) -> float:
        """The per-unit time that is not the layer's (0 for eager torch; an empty session run for onnxruntime)."""
        if self.target.runtime != "onnxruntime":
            return 0.0
        if self._overhead is None:
            self._overhead = self._time_onnx(nn.Identity(), (1,))
        return self._overhead

    def _repeat(self, run: Callable[[], Any], sync: Callable[[], None]) -> float:
        for _ in range(self.warmup):
            run()
        sync()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < self.min_iters or (time.perf_counter() - start) * 1e3 < self.min_ms:
            t0 = time.perf_counter()
            run()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
            if len(times) >= 10 * self.min_iters:
                break
        return statistics.median(times)

    def time_module(self, module: nn.Module, shape: tuple[int, ...]) -> float:
        """The time (ms) of one forward of ``module`` on a batch of ``shape`` inputs on the target; the
        module is converted to the target's device, dtype and memory format in place."""
        t = self.target
        if t.runtime == "onnxruntime":
            return self._time_onnx(module, shape)
        module = t.deployed(module)
        x = t.example((t.batch, *shape))
        sync = torch.cuda.synchronize if t.device == "cuda" else (lambda: None)
        with _threads(t.threads), torch.inference_mode():
            return self._repeat(lambda: module(x), sync)

    def _time_onnx(self, module: nn.Module, shape: tuple[int, ...]) -> float:
        session = ort_session(onnx_bytes(module, (self.target.batch, *shape)), self.target.threads or 1)
        x = np.random.default_rng(0).standard_normal((self.target.batch, *shape)).astype(np.float32)
        name = session.get_inputs()[0].name
        return self._repeat(lambda: session.run(None, {name: x}), lambda: None)


class _threads:
    def __init__(self, n: int | None) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.old = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.old)


def onnx_bytes(model: nn.Module, shape: tuple[int, ...]) -> bytes:
    """``model`` exported to ONNX (fixed shapes, the TorchScript-based exporter) as bytes."""
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.cpu().eval(), (torch.zeros(*shape),), buffer, dynamo=False,
                          input_names=["x"], output_names=["y"])
    return buffer.getvalue()


def ort_session(model: bytes, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # no spin-waiting after a run: an idle session's spinning threads would steal the cores from the
    # next model timed (interleaved comparisons, table cells timed one after another)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


# -- the table and the model ---------------------------------------------------------------------


class LatencyTable:
    """Unit signature → :class:`Entry`, for one target key, kept in one JSON file."""

    def __init__(self, key: dict[str, Any], path: Path | None) -> None:
        self.key, self.path = key, path
        self.entries: dict[str, Entry] = {}
        self.full: dict[str, float] = {}   # "model fingerprint:full|half" → measured end-to-end ms
        if path is not None and path.is_file():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            if data["key"] != self.key:
                raise ValueError("another target's key")
            self.entries = {sig: Entry(**e) for sig, e in data["entries"].items()}
            self.full = {k: float(v) for k, v in data.get("full", {}).items()}
        except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged cache is measured again
            import warnings

            warnings.warn(f"ignoring the latency table {path} ({type(e).__name__}: {e}); it is measured again",
                          stacklevel=3)
            self.entries, self.full = {}, {}

    def save(self) -> None:
        if self.path is None:
            return
        from .io import write_json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"key": self.key, "entries": {s: asdict(e) for s, e in self.entries.items()},
                               "full": self.full})


def _first_channels(model: nn.Module, graph: Any, widths: Sequence[int]) -> nn.Module:
    """``model`` cut to the first ``widths[g]`` channels of every prunable group (a timing stand-in:
    which channels are kept does not change the time)."""
    from .slim import slim_model

    keep = {g.index: list(range(int(widths[g.index]))) for g in graph.prunable if widths[g.index] < g.channels}
    return slim_model(model, graph, keep).eval()


def _fingerprint(model: nn.Module, graph: Any) -> str:
    layers = [(l.name, l.kind, l.in_channels, l.out_channels, l.flops_per_pair) for l in graph.layers]
    return hashlib.sha256(json.dumps([type(model).__name__, layers]).encode()).hexdigest()[:16]


class LatencyModel:
    """Predicted latency (ms) of ``model``'s sub-networks on ``target``: see the module doc.

    ``quantum`` (int or per-group sequence) is the width step the search moves in; the grid covers
    the widths it can reach. ``cache``: a folder for the table (default ``$EKG_CACHE/latency``), or
    ``False`` for none. ``progress``: show a progress bar while timing."""

    def __init__(self, model: nn.Module, graph: Any, target: LatencyTarget, *, quantum: int | Sequence[int] = 1,
                 cache: Path | str | bool | None = None, progress: bool = True,
                 timer: _Timer | None = None, saved: dict[str, Any] | None = None) -> None:
        self.target = target.validate().resolved()
        self.graph = graph
        self.rows = units(model, graph, self.target.runtime)
        key = cache_key(self.target, graph.input_size)
        self.full_widths = graph.full_widths()
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # (widths, per-row ms) of the last sum
        self._rows_of: dict[int, list[int]] = {}                # group -> the rows it sets a width of
        for k, row in enumerate(self.rows):
            for g in {row.in_group, row.out_group} - {None}:
                self._rows_of.setdefault(g, []).append(k)
        if saved is not None:  # a run directory's copy: the same predictions, nothing timed
            self._restore(saved, key)
            return
        path = None if cache is False else cache_path(key, None if cache in (None, True) else Path(cache))
        self.table = LatencyTable(key, path)
        quanta = [quantum] * len(graph.groups) if isinstance(quantum, int) else list(quantum)
        self.timer = timer or _Timer(self.target)
        self._fill(quanta, progress)
        self.half_widths = self.full_widths.copy()
        for g in graph.prunable:
            points = grid(g.channels, quanta[g.index])
            self.half_widths[g.index] = min(points, key=lambda w: (abs(w - g.channels / 2), w))
        fp = _fingerprint(model, graph)
        self.full_ms = self._measured(f"{fp}:full", lambda: copy.deepcopy(model))  # timing converts it
        self.half_ms = self._measured(f"{fp}:half", lambda: _first_channels(model, graph, self.half_widths))
        self.refits: list[tuple[list[int], float]] = []
        self.accepted: dict[str, Any] | None = None  # the landing measured within tolerance (widths, ratio)
        self._calibrate()

    def _calibrate(self) -> None:
        self.full_units_ms = self.units_ms(self.full_widths)
        du = self.full_units_ms - self.units_ms(self.half_widths)
        dm = self.full_ms - self.half_ms
        # no scale from two measurements (no prunable group, equal sums, or a half-width network measured
        # no faster): the prediction is proportional to the table, M_full·U(w)/U(full)
        self.scale = dm / du if du > 0 and dm > 0 else self.full_ms / max(self.full_units_ms, 1e-12)
        self._points: list[tuple[float, float]] = []
        if self.refits:  # the calibration line, and the sub-networks measured since: a piecewise-linear map
            low = (self.full_units_ms - du, self.half_ms) if du > 0 and dm > 0 else (0.0, 0.0)  # the line's other end
            pts = [(self.full_units_ms, self.full_ms), low]
            pts += [(self.units_ms(w), ms) for w, ms in self.refits]
            pts.sort()
            ms = np.maximum.accumulate([m for _, m in pts])  # never cheaper for more of the table
            self._points = [(u, float(m)) for (u, _), m in zip(pts, ms)]

    def refit(self, widths: Sequence[int], ms: float) -> None:
        """Add a sub-network measured end to end (``ms`` on this model's target, on the scale of
        ``full_ms``): the prediction then passes through it, linear between measured points and
        along the nearest segment beyond them; below the cheapest point it falls at least as steeply
        as the two-point calibration line (``scale``): a segment made flat or shallow by a narrower
        network measured no faster must not make every narrower network look no faster, or the
        search would remove channels down to one per group looking for a slope."""
        self.refits.append(([int(w) for w in widths], float(ms)))
        self._last = None
        self._calibrate()

    def to_dict(self) -> dict[str, Any]:
        """What predicts exactly as this model does (a run directory keeps it: a resumed search
        predicts with the table it started with, whatever the cache holds by then)."""
        sigs = dict.fromkeys(row.unit.signature for row in self.rows)
        return {"version": TABLE_VERSION, "key": self.table.key, "target": asdict(self.target),
                "full_ms": self.full_ms, "half_ms": self.half_ms, "scale": self.scale,
                "refits": [{"widths": w, "ms": ms} for w, ms in self.refits], "accepted": self.accepted,
                "half_widths": [int(w) for w in self.half_widths],
                "entries": {sig: asdict(self.table.entries[sig]) for sig in sigs}}

    def _restore(self, saved: dict[str, Any], key: dict[str, Any]) -> None:
        try:
            entries = {sig: Entry(**e) for sig, e in saved["entries"].items()}
            missing = [row.unit for row in self.rows if row.unit.signature not in entries]
            if missing or saved["key"] != key:
                raise ValueError(f"{len(missing)} layers not in it" if missing else
                                 "measured for another target: " + ", ".join(
                                     f"{k} {saved['key'].get(k)!r} (here {v!r})" for k, v in key.items()
                                     if saved["key"].get(k) != v))
            self.table = LatencyTable(dict(saved["key"]), None)
            self.table.entries = entries
            self.full_ms, self.half_ms = float(saved["full_ms"]), float(saved["half_ms"])
            self.refits = [([int(v) for v in r["widths"]], float(r["ms"])) for r in saved.get("refits", [])]
            self.accepted = saved.get("accepted")
            self.half_widths = np.asarray(saved["half_widths"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as e:
            raise EkgError(f"the saved latency model does not fit this model and target ({e})") from None
        self._calibrate()

    def _measured(self, key: str, build: Callable[[], nn.Module]) -> float:
        if key not in self.table.full:
            self.table.full[key] = self.timer.time_module(build(), tuple(self.graph.input_size))
            self.table.save()
        return self.table.full[key]

    def _axis(self, group: int | None, channels: int, quanta: Sequence[int]) -> list[int]:
        if group is None or not self.graph.groups[group].prunable:
            return [channels]
        return grid(channels, quanta[group])

    def _fill(self, quanta: Sequence[int], progress: bool) -> None:
        todo: dict[str, tuple[Unit, list[int], list[int]]] = {}
        for row in self.rows:
            cin = self._axis(row.in_group, row.in_channels, quanta)
            cout = self._axis(row.out_group, row.out_channels, quanta)
            if row.unit.one_width:
                cin = [1]  # one width: the channels it runs on
            have = self.table.entries.get(row.unit.signature)
            if have is not None and set(cin) <= set(have.cin) and set(cout) <= set(have.cout):
                continue
            if have is not None:  # a wider grid than the cached one: time the union
                cin, cout = sorted({*cin, *have.cin}), sorted({*cout, *have.cout})
            prev = todo.get(row.unit.signature)
            if prev is not None:
                cin, cout = sorted({*cin, *prev[1]}), sorted({*cout, *prev[2]})
            todo[row.unit.signature] = (row.unit, cin, cout)
        if not todo:
            return
        from tqdm import tqdm

        cells = sum(len(c) * len(o) for _, c, o in todo.values())
        bar = tqdm(total=cells, desc=f"latency table ({self.target.describe()})", unit="layer", disable=not progress,
                   leave=False)
        try:
            for sig, (unit, cin, cout) in todo.items():
                ms = []
                for ci in cin:
                    ms.append([])
                    for co in cout:
                        ms[-1].append(self._time(unit, ci, co))
                        bar.update(1)
                self.table.entries[sig] = Entry(cin, cout, Entry.monotone(ms))
                self.table.save()  # a crash keeps what was timed
        finally:
            bar.close()

    def _time(self, unit: Unit, cin: int, cout: int) -> float:
        ms = self.timer.time_module(unit.module(cin, cout), unit.input_shape(cin, cout))
        return max(ms - self.timer.overhead(), 0.0)

    def _row_ms(self, row: UnitRow, widths: Sequence[int]) -> float:
        cin, cout = row.widths(widths)
        return self.table.entries[row.unit.signature].at(1 if row.unit.one_width else cin, cout)

    def units_ms(self, widths: Sequence[int]) -> float:
        """The units' sum of the table at ``widths`` (one width per group). The rows whose widths
        changed since the last call are looked up again, the others kept: the same sum either way."""
        w = np.asarray(widths, dtype=np.int64)
        if self._last is None or self._last[0].shape != w.shape:
            vals = np.array([self._row_ms(row, w) for row in self.rows], dtype=np.float64)
        else:
            last_w, vals = self._last
            changed = np.nonzero(last_w != w)[0]
            if len(changed):
                vals = vals.copy()
                for k in sorted({k for g in changed.tolist() for k in self._rows_of.get(g, ())}):
                    vals[k] = self._row_ms(self.rows[k], w)
        self._last = (w.copy(), vals)
        return float(vals.sum())

    def predict(self, widths: Sequence[int]) -> float:
        """Predicted latency (ms) of the sub-network with group widths ``widths``."""
        u = self.units_ms(widths)
        if not self._points:
            return self.full_ms + self.scale * (u - self.full_units_ms)
        pts = self._points
        k = min(max(int(np.searchsorted([p[0] for p in pts], u)), 1), len(pts) - 1)
        (u0, m0), (u1, m1) = pts[k - 1], pts[k]
        slope = (m1 - m0) / (u1 - u0) if u1 > u0 else 0.0
        if u < u0:  # below every measured network: at least the calibration line's slope
            return m0 + max(slope, self.scale) * (u - u0)
        return m0 + slope * (u - u0) if u1 > u0 else m1

    def ratio(self, widths: Sequence[int]) -> float:
        return self.predict(widths) / self.full_ms

    def floor(self, quantum: Sequence[int]) -> float:
        """The predicted ratio with every prunable group at one unit (``quantum[g]`` channels, or
        whole where narrower): the smallest a latency budget can reach."""
        w = self.full_widths.copy()
        for g in self.graph.prunable:
            w[g.index] = min(g.channels, quantum[g.index])
        return self.ratio(w)


# -- end-to-end, on the target -------------------------------------------------------------------


class _OrtRunner:
    """An ONNX Runtime session that :func:`ekg.evaluate.compare_latency` times like a module."""

    def __init__(self, model: nn.Module, target: LatencyTarget, input_size: Sequence[int]) -> None:
        shape = (target.batch, *input_size)
        self.session = ort_session(onnx_bytes(model, shape), target.threads or 1)
        self.name = self.session.get_inputs()[0].name
        self.x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    def eval(self) -> "_OrtRunner":
        return self

    def __call__(self, x: Any) -> Any:
        return self.session.run(None, {self.name: self.x})


def compare_on_target(models: dict[str, nn.Module], input_size: Sequence[int], target: LatencyTarget, *,
                      rounds: int | None = None, baseline: str | None = None) -> dict[str, Any]:
    """:func:`ekg.evaluate.compare_latency` on ``target``: the models timed interleaved, round by
    round, in its runtime (eager torch in inference mode on its device, or ONNX Runtime sessions),
    with its threads and batch. Adds ``target`` (its description) to the result."""
    from .evaluate import COMPARE_ROUNDS, compare_latency

    t = target.validate().resolved()
    if t.runtime == "onnxruntime":
        runners: dict[str, Any] = {n: _OrtRunner(copy.deepcopy(m), t, input_size) for n, m in models.items()}
        x = torch.zeros(t.batch, *input_size)  # unused: each session has its input
    else:
        runners = {n: t.deployed(copy.deepcopy(m)) for n, m in models.items()}
        x = t.example((t.batch, *input_size))
    with _threads(t.threads):
        out = compare_latency(runners, tuple(input_size), t.batch, device=x.device, rounds=rounds or COMPARE_ROUNDS,
                              baseline=baseline, example=x)
    out["target"] = t.describe()
    out["threads"] = t.threads
    return out

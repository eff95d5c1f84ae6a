"""Evaluation: top-1/top-5/loss on a test set, and latency (one model, or several timed interleaved).

BN runs in inference mode (``bn_mode="running"``, the default). ``bn_mode="batch"`` uses the statistics
of each test batch instead, as the original EKG ``test.py`` did; the running statistics are left
untouched either way.
"""

from __future__ import annotations

import contextlib
import numbers
import statistics
import time
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .bn import BN_STATS, batch_statistics_bn, inference_modes
from .data import ImageSet, Normalization, iterate_batches
from .distributed import Dist
from .errors import EkgError

BN_MODES = BN_STATS  # evaluate's bn_mode: "running" (inference mode, the default) or "batch"
COMPARE_ROUNDS = 10  # compare_latency's default rounds
LATENCY_BATCHES = (1, 64)  # the batch sizes latency is reported at (`ekg test --latency`, `ekg run`)
SPLITS = ("test", "train")  # the splits of a DataSplits that `ekg test` evaluates


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: ImageSet, normalization: Normalization, *, batch_size: int = 256,
                   device: torch.device | str = "cpu") -> int:
    """Re-estimate every BN's running statistics on ``data`` (unaugmented, in order), as the
    cumulative average over its batches; no weight changes. Returns the number of BN layers.

    This is how a pruned network is compared before fine-tuning: its channels moved, so the
    running statistics of the original no longer describe its activations."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(data) == 0:
        return len(bns)
    saved = [m.momentum for m in bns]
    try:
        with inference_modes(model):
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average: the mean over batches
                m.train()
            for x, _ in iterate_batches(data, batch_size, normalization=normalization, device=device):
                model(x)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
    return len(bns)


@torch.no_grad()
def predict_logits(model: nn.Module, data: ImageSet, normalization: Normalization, *, batch_size: int = 256,
                   device: torch.device | str = "cpu", bn_mode: str = "running") -> torch.Tensor:
    """Logits for every image of ``data`` in order (float32, on CPU)."""
    if bn_mode not in BN_MODES:
        raise EkgError(f"`bn_mode` must be one of {', '.join(BN_MODES)}, got {bn_mode!r}")
    model.eval()
    ctx = batch_statistics_bn(model) if bn_mode == "batch" else contextlib.nullcontext()
    out = []
    with ctx:
        for x, _ in iterate_batches(data, batch_size, normalization=normalization, device=device):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """top-1 / top-5 accuracy in percent, mean cross-entropy, number of images."""
    labels = labels.to(logits.device)
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    correct = topk.eq(labels[:, None])
    n = len(labels)
    return {
        "top1": 100.0 * correct[:, 0].float().sum().item() / n,
        "top5": 100.0 * correct.any(dim=1).float().sum().item() / n,
        "loss": F.cross_entropy(logits, labels).item(),
        "n_images": n,
    }


def evaluate(model: nn.Module, data: ImageSet, normalization: Normalization, *, batch_size: int = 256,
             device: torch.device | str = "cpu", bn_mode: str = "running", dist: Dist | None = None) -> dict[str, Any]:
    """Accuracy and loss of ``model`` on ``data``; see :func:`metrics_from_logits`.

    With ``dist`` on several processes (and BN in inference mode, where a batch's composition does
    not matter) each rank evaluates its consecutive share of ``data`` and the counts and loss sums
    are summed over ranks; every rank returns the same numbers."""
    if len(data) == 0:
        raise EkgError("the evaluation set is empty")
    if dist is None or not dist.enabled or bn_mode != "running":
        logits = predict_logits(model, data, normalization, batch_size=batch_size, device=device, bn_mode=bn_mode)
        return metrics_from_logits(logits, data.labels.cpu())
    part = dist.part(len(data))
    mine = data.subset(range(len(data))[part])
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    if len(mine):
        logits = predict_logits(model, mine, normalization, batch_size=batch_size, device=device)
        m = metrics_from_logits(logits, mine.labels.cpu())
        n = m["n_images"]
        sums += torch.tensor([m["top1"] * n / 100, m["top5"] * n / 100, m["loss"] * n], dtype=torch.float64,
                             device=device)
    top1, top5, loss = dist.all_reduce_sum(sums).tolist()
    n = len(data)
    return {"top1": 100.0 * round(top1) / n, "top5": 100.0 * round(top5) / n, "loss": loss / n, "n_images": n}


def _timed_rounds(models: Sequence[nn.Module], x: torch.Tensor, *, rounds: int, iters: int,
                  warmup: int) -> list[list[list[float]]]:
    """The timing core: ``times[m][r]`` holds the ``iters`` forward times (ms) of ``models[m]`` in
    round ``r``. Every model first runs ``warmup`` untimed passes, in turn; then, round after round,
    each model in turn runs its ``iters`` timed passes (A×iters, B×iters, A×iters, …), so that a
    change of load lands on every model alike instead of on whichever ran while it lasted. On a
    GPU every timed pass ends with a synchronisation, so a time is the whole pass."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for m in models:
        m.eval()
    times: list[list[list[float]]] = [[[] for _ in range(rounds)] for _ in models]
    with torch.inference_mode():
        for m in models:
            for _ in range(warmup):
                m(x)
        sync()
        for r in range(rounds):
            for i, m in enumerate(models):
                for _ in range(iters):
                    t0 = time.perf_counter()
                    m(x)
                    sync()
                    times[i][r].append((time.perf_counter() - t0) * 1e3)
    return times


def _check_counts(*, warmup: int, **at_least_one: int) -> None:
    for name, value, low in [("warmup", warmup, 0), *((k, v, 1) for k, v in at_least_one.items())]:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise EkgError(f"latency {name} must be an integer >= {low}, got {value!r}")


def _p90(times: list[float]) -> float:
    times = sorted(times)
    return times[int(0.9 * (len(times) - 1))]


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles (inclusive method: linear interpolation, as numpy's default), min, max and
    the number of ``values``; the quartiles of one value are that value."""
    vals = [float(v) for v in values]
    if not vals:
        raise EkgError("no values to summarise")
    q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else (vals[0],) * 3
    return {"median": statistics.median(vals), "q1": q1, "q3": q3, "min": min(vals), "max": max(vals),
            "rounds": len(vals)}


def measure_latency(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 1, *,
                    device: torch.device | str = "cpu", warmup: int = 5, iters: int = 30) -> dict[str, float]:
    """Wall-clock latency of one forward pass (median and p90 over ``iters``, in milliseconds), in
    inference mode (no autograd bookkeeping, as a deployed model runs). To compare models, use
    :func:`compare_latency`: timed one after the other, a change of load lands on one of them."""
    _check_counts(batch_size=batch_size, iters=iters, warmup=warmup)
    x = torch.randn(batch_size, *input_size, device=device)
    times = _timed_rounds([model], x, rounds=1, iters=iters, warmup=warmup)[0][0]
    median = statistics.median(times)
    return {"batch_size": batch_size, "median_ms": median, "p90_ms": _p90(times),
            "images_per_s": batch_size * 1e3 / median, "threads": torch.get_num_threads()}


def compare_latency(models: Mapping[str, nn.Module], input_size: tuple[int, int, int], batch_size: int = 1, *,
                    device: torch.device | str = "cpu", rounds: int = COMPARE_ROUNDS, iters_per_round: int = 3,
                    warmup: int = 3, baseline: str | None = None, example: torch.Tensor | None = None) -> dict[str, Any]:
    """Latency of several models on one input, timed interleaved: ``rounds`` rounds in which each
    model in turn (in the mapping's order) runs ``iters_per_round`` timed forward passes, after
    ``warmup`` untimed ones each. A round's time of a model is the median of its passes in that
    round; passes of the models in one round run within moments of each other, so a change of load
    hits them alike and their ratio survives it. ``example``: the input batch to time on (its
    dtype and memory format the models'); default: a random float32 batch on ``device``.

    Returns ``batch_size``, ``device``, ``threads``, ``rounds``, ``iters_per_round``, ``warmup``,
    ``baseline`` (the name the others are compared with; default: the first), and

    - ``models``: per name, ``median_ms`` (the median of its round times), ``p90_ms`` (over all its
      timed passes), ``images_per_s`` (from ``median_ms``) and ``round_ms`` (its round times);
    - ``ratio``: per name but the baseline, :func:`spread` of the per-round time ratio
      model/baseline (below 1: faster than the baseline), with ``per_round``;
    - ``speedup``: the same for the per-round ratio baseline/model (above 1: faster).

    The median of the per-round ratios is the comparison; its quartiles and min/max tell how much
    it moved from round to round (a wide range means the load changed within rounds too)."""
    models = dict(models)
    if not models:
        raise EkgError("compare_latency needs at least one model")
    baseline = next(iter(models)) if baseline is None else baseline
    if baseline not in models:
        raise EkgError(f"baseline {baseline!r} is not one of the models ({', '.join(models)})")
    _check_counts(batch_size=batch_size, rounds=rounds, iters_per_round=iters_per_round, warmup=warmup)
    x = torch.randn(batch_size, *input_size, device=device) if example is None else example
    times = dict(zip(models, _timed_rounds(list(models.values()), x, rounds=rounds, iters=iters_per_round,
                                           warmup=warmup)))
    round_ms = {name: [statistics.median(r) for r in per_round] for name, per_round in times.items()}
    per_model = {}
    for name, rms in round_ms.items():
        median = statistics.median(rms)
        per_model[name] = {"median_ms": median, "p90_ms": _p90([t for r in times[name] for t in r]),
                           "images_per_s": batch_size * 1e3 / median, "round_ms": rms}
    base = round_ms[baseline]
    ratio, speedup = {}, {}
    for name, rms in round_ms.items():
        if name != baseline:
            per_round = [m / b for m, b in zip(rms, base)]
            ratio[name] = {**spread(per_round), "per_round": per_round}
            per_round = [b / m for m, b in zip(rms, base)]
            speedup[name] = {**spread(per_round), "per_round": per_round}
    return {"batch_size": batch_size, "device": str(torch.device(device)), "threads": torch.get_num_threads(),
            "rounds": rounds, "iters_per_round": iters_per_round, "warmup": warmup, "baseline": baseline,
            "models": per_model, "ratio": ratio, "speedup": speedup}


def format_speedup(s: dict[str, Any]) -> str:
    """``1.84× (IQR 1.80–1.90, range 1.70–1.95 over 10 rounds)``: the median per-round speed-up,
    its quartiles and its range (one round hit by a burst of load moves the range, not the IQR)."""
    def num(v: float) -> str:  # two decimals; two significant digits below 0.1 (not a bare "0.00")
        return f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.2g}"

    return (f"{num(s['median'])}× (IQR {num(s['q1'])}–{num(s['q3'])}, range {num(s['min'])}–{num(s['max'])} "
            f"over {s['rounds']} rounds)")

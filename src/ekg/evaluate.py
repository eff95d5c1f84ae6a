"""Evaluation: top-1/top-5/loss on a test set, and CPU latency.

BN runs in inference mode (running statistics) by default. ``bn_mode="batch"`` uses the statistics
of each test batch instead, as the original EKG ``test.py`` did; the running statistics are left
untouched either way.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .bn import batch_statistics_bn, inference_modes
from .data import ImageSet, Normalization, iterate_batches
from .distributed import Dist
from .errors import EkgError

BN_MODES = ("eval", "batch")


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
                   device: torch.device | str = "cpu", bn_mode: str = "eval") -> torch.Tensor:
    """Logits for every image of ``data`` in order (float32, on CPU)."""
    if bn_mode not in BN_MODES:
        raise EkgError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
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
             device: torch.device | str = "cpu", bn_mode: str = "eval", dist: Dist | None = None) -> dict[str, Any]:
    """Accuracy and loss of ``model`` on ``data``; see :func:`metrics_from_logits`.

    With ``dist`` on several processes (and BN in inference mode, where a batch's composition does
    not matter) each rank evaluates its consecutive share of ``data`` and the counts and loss sums
    are summed over ranks; every rank returns the same numbers."""
    if len(data) == 0:
        raise EkgError("the evaluation set is empty")
    if dist is None or not dist.enabled or bn_mode != "eval":
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


@torch.inference_mode()
def measure_latency(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 1, *,
                    device: torch.device | str = "cpu", warmup: int = 5, iters: int = 30) -> dict[str, float]:
    """Wall-clock latency of one forward pass (median and p90 over ``iters``, in milliseconds), in
    inference mode (no autograd bookkeeping, as a deployed model runs)."""
    model.eval()
    x = torch.randn(batch_size, *input_size, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        sync()
        for _ in range(iters):
            t0 = time.perf_counter()
            model(x)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"batch_size": batch_size, "median_ms": statistics.median(times),
            "p90_ms": times[int(0.9 * (len(times) - 1))], "images_per_s": batch_size * 1e3 / statistics.median(times),
            "threads": torch.get_num_threads()}

"""Module modes and BatchNorm statistics: the one place that switches them.

* :func:`inference_modes` — every module in inference mode, each restored to *its own* mode;
* :func:`batch_statistics_bn` — BN on the current batch's statistics, running statistics untouched;
* :func:`bn_mode` — dropout off and BN on ``"batch"`` or ``"running"`` statistics.

The search (method doc, "What a mask does", rule 3), the memory bank and ``ekg test --bn batch``
evaluation run BN on batch statistics; inference runs it on running statistics. ``model.train(was)``
is never used to restore a mode: it would put every BN in the model's mode (the bug that made the
search run on running statistics: building the dependency graph ended with ``model.train(False)``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from .errors import EkgError

BN_STATS = ("batch", "running")


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def inference_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``model`` in inference mode; on exit each back in its own mode."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, training in saved:
            m.training = training


@contextlib.contextmanager
def batch_statistics_bn(model: nn.Module) -> Iterator[nn.Module]:
    """Run every BatchNorm on the current batch's statistics without changing its running
    statistics (they are restored on exit). Other modules keep their mode."""
    bns = batchnorms(model)
    saved = [(m.training, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in bns]
    try:
        for m in bns:
            m.train()
        yield model
    finally:
        for m, (training, buffers) in zip(bns, saved):
            m.train(training)
            for k, v in buffers.items():
                getattr(m, k).copy_(v)


@contextlib.contextmanager
def bn_mode(model: nn.Module, stats: str) -> Iterator[nn.Module]:
    """Dropout off and every BN on ``stats``: ``"batch"`` (the current batch's statistics, running
    statistics untouched) or ``"running"`` (inference mode). Every module's mode is restored on exit."""
    if stats not in BN_STATS:
        raise EkgError(f"BN statistics must be one of {', '.join(BN_STATS)}, got {stats!r}")
    with inference_modes(model):
        if stats == "batch":
            with batch_statistics_bn(model):
                yield model
        else:
            yield model

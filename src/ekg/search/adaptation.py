"""Phase 1, the adaptation: one epoch of SGD on D_sub with BN in training mode before the search
(with ``compat = "release"``, the release's summed-CE/128 loss)."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import Dist, synced_batchnorm
from .config import SearchConfig
from .release import RELEASE_ADAPT_DIVISOR


def adapt(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], cfg: SearchConfig,
          dist: Dist | None = None) -> None:
    """Phase 1: one epoch of SGD (Nesterov) on D_sub with BN in training mode.

    On several processes (``dist``) each rank runs its consecutive share of every batch of
    ``cfg.batch_size`` (``batches`` yields either whole batches, of which it takes its
    :meth:`~ekg.distributed.Dist.part`, or only that part, as ``iterate_batches(..., part=...)``
    does), BN normalises with the whole batch's statistics
    (:func:`~ekg.distributed.synced_batchnorm`) and the gradients of the batch's summed loss are
    summed over ranks: the step of one process on the whole batch, up to float rounding.

    ``cfg.compat == "release"``: the loss is the batch's summed CE divided by
    :data:`RELEASE_ADAPT_DIVISOR` (128) instead of its mean, as the release's (twice the mean-CE
    gradient on 256-image batches), on one process or several."""
    dist = dist or Dist()
    release = cfg.compat == "release"
    divisor = RELEASE_ADAPT_DIVISOR if release else cfg.batch_size
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=cfg.adapt_lr, momentum=cfg.adapt_momentum, nesterov=True,
                          weight_decay=cfg.adapt_weight_decay)
    model.train()
    with synced_batchnorm(model, dist):
        for x, y in batches:
            if dist.enabled:
                if len(y) == cfg.batch_size:  # a whole batch: this rank's part of it
                    part = dist.part(len(y))
                    x, y = x[part], y[part]
                loss = F.cross_entropy(model(x), y, reduction="sum") / divisor
            elif release:
                loss = F.cross_entropy(model(x), y, reduction="sum") / divisor
            else:
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.sum_gradients(params)
            opt.step()
    for p in params:
        p.requires_grad_(False)

"""The ensemble knowledge: the objective ``J = CE(labels, z) + CE(softmax(K), z)`` and the running
mean ``K`` of the winners' logits it is measured against (the reward and the Taylor scores use J)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def objective(logits: torch.Tensor, labels: torch.Tensor, ensemble: torch.Tensor | None) -> torch.Tensor:
    """Per-sample ``CE(labels, z) + CE(softmax(K), z)`` (summed, not averaged); without an
    ensemble, plain cross-entropy."""
    log_p = F.log_softmax(logits.float(), dim=1)
    j = F.nll_loss(log_p, labels, reduction="sum")
    if ensemble is not None:
        j = j - (F.softmax(ensemble.float(), dim=1) * log_p).sum()
    return j


def update_ensemble(ensemble: torch.Tensor, logits: torch.Tensor, count: int) -> torch.Tensor:
    """Running mean of logits: ``(K·t + z)/(t + 1)`` where ``t`` sub-networks are averaged in K."""
    return (ensemble * count + logits) / (count + 1)

"""Channel importance per gate, the scores a step ranks and costs channels by: EKG's Taylor scores
of J (``ekg``; of plain CE: ``taylor``) and the data-free criteria (``l1``, ``fpgm``, ``random``)."""

from __future__ import annotations

from typing import Callable

import torch

from ..distributed import Dist
from ..masks import MaskedNetwork
from .ensemble import objective


def weight_scores(net: MaskedNetwork, kind: str, seed: int) -> list[torch.Tensor]:
    """Data-free channel scores per gate: ``l1`` (L1 norm of the producing filters), ``fpgm``
    (summed distance of each filter to the other kept filters of its conv: near the geometric
    median = redundant), ``random`` (fixed per seed). Masked channels score 0."""
    modules = dict(net.model.named_modules())
    out = []
    gen = torch.Generator().manual_seed(seed)
    for gate, gm in zip(net.gates, net.masks):
        keep = gm.mask.bool().cpu()
        if kind == "random":
            s = torch.rand(gate.channels, generator=gen, dtype=torch.float64) + 1e-6
        else:
            s = torch.zeros(gate.channels, dtype=torch.float64)
            for name in gate.group.producers:
                w = modules[name].weight.detach().double().cpu().flatten(1)
                if kind == "l1":
                    s += w.abs().sum(1)
                else:
                    kept = w[keep]
                    s += torch.cdist(w, kept).sum(1)
        out.append(torch.where(keep, s, torch.zeros_like(s)))
    return out


def taylor_scores(net: MaskedNetwork, batches: list[tuple[torch.Tensor, torch.Tensor]],
                  ensemble: torch.Tensor | None, nominal_batch: int,
                  forward: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                  dist: Dist | None = None) -> list[torch.Tensor]:
    """EKG's Taylor scores: back-propagate J (or plain CE when ``ensemble`` is None) batch by
    batch and accumulate ``|Σ (∂J/∂y)·y|`` per batch and mask point. ``forward(b, x)`` replaces
    ``net(x)`` (same function; the search's records activations on the way).

    Each batch's scores are kept apart (float64), laid out by batch index, summed over ranks
    (``dist``: each rank runs its share of the batches) and then over batches in batch order, so
    the scores are the same on any number of processes."""
    dist = dist or Dist()
    sizes = [g.score.numel() for g in net.masks]
    per_batch = torch.zeros(len(batches), sum(sizes), dtype=torch.float64,
                            device=net.masks[0].score.device if net.masks else "cpu")
    starts = [sum(len(y) for _, y in batches[:b]) for b in range(len(batches))]
    net.collect_scores(True)
    try:
        for b in dist.shard(len(batches)):
            x, y = batches[b]
            k = ensemble[starts[b]:starts[b] + len(y)] if ensemble is not None else None
            for gm in net.masks:
                gm.score.zero_()
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                out = forward(b, xg) if forward is not None else net(xg)
                (objective(out, y, k) / nominal_batch).backward()
            per_batch[b] = torch.cat(net.scores())
    finally:
        net.collect_scores(False)
    dist.all_reduce_sum(per_batch)
    total = torch.zeros(per_batch.shape[1], dtype=torch.float64, device=per_batch.device)
    for b in range(len(batches)):
        total += per_batch[b]
    return [t.clone() for t in total.split(sizes)]

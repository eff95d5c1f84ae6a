"""The original TensorFlow release's effective search rules, used with ``SearchConfig.compat =
"release"`` where they depart from the method doc (docs/design.md, "``--compat release``"): its
candidate cost, its landing (``fine_search``), its gate numbering (which breaks ties) and its
adaptation loss divisor. (BN ops in the FLOPs ratio and gates staying candidates while their
rate is above 0 are switches in :class:`~ekg.search.searcher.Searcher`.)"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.fx as fx

from ..masks import MaskedNetwork

#: The release's adaptation loss divides the summed CE of each D_sub batch by this: its
#: ``--batch_size`` (the fine-tuning batch, 128 by default and in its README command), whatever its
#: search batch (256): op_utils.Optimizer, ``loss_object(labels, pred)/args.batch_size`` with SUM reduction.
RELEASE_ADAPT_DIVISOR = 128


def release_step_cost(scores: torch.Tensor, rate: float, step: float) -> float:
    """The release's candidate cost (``prune_utils.EKG.mask_marking``), transcribed literally.

    Its score array has shape ``[1, 1, 1, C]``; it sorts it (along the last axis) and then slices
    *axis 0* with ``[round((1-r)·C) : round((1-r+step)·C)]``. Axis 0 has length 1, so the slice is
    the whole array while ``round((1-r)·C)`` is 0 (an untouched gate) and empty once it is 1 or
    more (a partly pruned gate): the cost is the sum of all the gate's scores, or 0. ``r`` is the
    gate's float32 rate variable, and the arithmetic is float64 as in the numpy of its time
    (``np.float32 - float`` was float64 before NEP 50)."""
    s = np.sort(scores.detach().double().cpu().numpy()).reshape(1, -1)  # [1, C]: the leading axes of [1,1,1,C]
    r = 1.0 - float(np.float32(rate))
    return float(np.sum(s[round(r * s.size):round((r + step) * s.size)]))


def land_rate_release(rate: float, step: float, channels: int, ratio_at: Callable[[float], float], keep: float,
                      search_step: float) -> float:
    """The rate after one step as the release lands it (``prune_utils.EKG.check_next_step`` and
    ``fine_search``), transcribed literally.

    ``W = round(rate - step, 5)``; only if its ratio is *below* ``keep`` (strictly) does the fine
    search run: for ``w`` in ``np.arange(W, W + search_step, 1/C)`` (``search_step`` is the global
    base step, 0.2, not the gate's own), the rate ``round(w, 2)`` is tried, and at the first whose
    ratio is *above* ``keep`` (strictly) the rate settles on ``round(w - 1/C, 5)``, which is not
    re-checked (its ratio can be above ``keep``: the search then simply goes on). If no ``w``
    overshoots, the rate stays at the last one tried, ``round(w, 2)``. ``w`` is a numpy float64, so
    both roundings are numpy's (``round(np.float64, n)``), as in the release."""
    new = round(rate - step, 5)
    if not ratio_at(new) < keep:
        return new
    fine = 1 / channels
    landed = new
    for w in np.arange(new, new + search_step, fine):
        landed = float(round(w, 2))
        if ratio_at(landed) > keep:
            return float(round(w - fine, 5))
    return landed


def release_gate_order(net: MaskedNetwork) -> list[int] | None:
    """The gates (indices into ``net.gates``) in the order the release numbers them, or None where
    that order cannot be derived (then ekg's own order stands).

    The release (``prune_utils.EKG.initialize_Gate``) creates one gate per conv in its layer dict's
    order, except for a block's last conv, which writes its stage's stream gate: stem ``conv``,
    then per block ``conv3`` (the projection shortcut, listed first), ``conv0``/``conv1``,
    ``conv2``. So a stage's stream gate, created at its projection conv, comes *before* the first
    block's inner gates, where ekg's graph (traced in forward order: the shortcut runs after the
    block's convs) puts it after them. The same order from the graph, for any ResNet: each conv is
    keyed by (position of the tensor it reads, 0 if it writes a residual stream — a group of more
    than one producer — else 1, its own position), a gate by the smallest key of its producers. The
    projection conv reads the block input, like the block's first conv, and writes the stream, so
    it sorts first; everything else stays in forward order.

    None (ekg's order) for a model without a prunable residual stream (the release had ResNets only;
    with no projection to move its order is the forward order anyway) or where a producer is not one
    module called once (a shared module has no single position)."""
    gates = net.gates
    if not any(len(g.group.producers) > 1 for g in gates):
        return None
    nodes = list(net.graph.gm.graph.nodes)
    pos = {n: k for k, n in enumerate(nodes)}
    calls: dict[str, list[fx.Node]] = {}
    for n in nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    keys = []
    for g in gates:
        stream = len(g.group.producers) > 1
        ks = []
        for name in g.group.producers:
            found = calls.get(name, [])
            if len(found) != 1 or not found[0].args or not isinstance(found[0].args[0], fx.Node):
                return None
            node = found[0]
            ks.append((pos[node.args[0]], 0 if stream else 1, pos[node]))
        keys.append(min(ks))
    return sorted(range(len(gates)), key=lambda i: (keys[i], i))

"""EKG's greedy sub-network search (method doc, phases 1 and 2).

The rules are small pure functions, each unit-tested:

* :func:`step_size` — a group's step removes ``max(1/C, 0.2/n)`` of its channels;
* :func:`step_cost` — the summed scores of the channels a step would remove;
* :func:`trimmed_otsu_threshold` — the candidate filter;
* :func:`objective` — ``J = CE(labels, z) + CE(softmax(K), z)``;
* :func:`update_ensemble` — ``K ← (K·t + z)/(t + 1)``;
* :func:`land_rate` — the fine landing on the budget.

With ``SearchConfig.compat = "release"`` the search replays the original TensorFlow release's
*effective* rules where they depart from the method doc (docs/design.md, "``--compat release``"):
:func:`release_step_cost` (its candidate cost), :func:`land_rate_release` (its ``fine_search``),
:func:`release_gate_order` (its gate numbering, which breaks ties), the summed-CE/128 adaptation
loss (:func:`adapt`), BN ops in the FLOPs ratio, and gates staying candidates while their rate is
above 0. The default, ``compat = "method"``, is the method doc.

:class:`Searcher` runs them over a :class:`~ekg.masks.MaskedNetwork`. It evaluates candidates either
straightforwardly (the whole network for each) or with the optimised evaluator, which re-uses the
activations of every graph node that a candidate does not change; both make the same decisions.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .bn import BN_STATS, bn_mode
from .errors import EkgError
from .distributed import Dist, synced_batchnorm
from .masks import MaskedNetwork, ranks_from_scores

IMPORTANCES = ("ekg", "taylor", "l1", "fpgm", "random")
REWARDS = ("ensemble", "val-loss")
METHODS = ("greedy", "uniform")
COMPATS = ("method", "release")


# ----------------------------------------------------------------------------- the rules

def step_size(channels: int, n_producers: int, base: float = 0.2) -> float:
    """Fraction of a group's channels one step removes: ``max(1/C, base/n)``."""
    return max(1.0 / channels, base / max(1, n_producers))


def step_cost(scores: torch.Tensor, rate: float, step: float) -> float:
    """Sum of the scores of the channels a step from ``rate`` would remove: the ascending-sorted
    scores from position ``round((1-rate)·C)`` to ``round((1-rate+step)·C)`` (Python rounding, as
    the release)."""
    s = torch.sort(scores.double()).values
    c = len(s)
    lo, hi = round((1 - rate) * c), round((1 - rate + step) * c)
    return float(s[lo:hi].sum())


def trimmed_otsu_threshold(costs: Sequence[float], trim: float = 0.2) -> float:
    """Otsu's threshold of ``costs`` after dropping the lowest and highest ``ceil(n·trim)``.

    The split maximising ``w0·w1·(m0-m1)²`` over the sorted, trimmed costs; the threshold is the
    midpoint between the two values either side of it. With fewer than 3 costs left after
    trimming there is nothing to split and every group passes (threshold +inf)."""
    s = np.sort(np.asarray(costs, dtype=np.float64))
    k = math.ceil(len(s) * trim)
    s = s[k:len(s) - k] if k else s
    n = len(s)
    if n < 3:
        return math.inf
    best, best_t = -1.0, 1
    for t in range(1, n - 1):
        v = t * (n - t) * (s[:t].mean() - s[t:].mean()) ** 2
        if v > best:
            best, best_t = v, t
    return float((s[best_t - 1] + s[best_t]) / 2)


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


def land_rate(rate: float, step: float, channels: int, ratio_at: Callable[[float], float], keep: float) -> float:
    """The rate after one step, landed on the budget.

    ``rate - step`` (rounded to 5 decimals, as the release); if that takes the FLOPs ratio below
    ``keep``, the step is shrunk in ``1/C`` increments — ``rate - step + k/C``, exact rather than
    rounded to 5 decimals, so that every channel count stays reachable when ``1/C`` needs more
    decimals (C = 64: ``round(3/64, 5)`` would keep 4 channels) — to the largest rate whose ratio is
    still at or below ``keep``; never above."""
    new = round(rate - step, 5)
    if ratio_at(new) >= keep:
        return new
    best = new
    for k in range(1, channels + 1):
        up = round(new + k / channels, 9)  # 9 decimals: float noise only
        if up >= rate - 1e-9 or ratio_at(up) > keep:
            break
        best = up
    return best


# ----------------------------------------------------------------------------- the release's rules (compat="release")

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


# ----------------------------------------------------------------------------- configuration

@dataclass
class SearchConfig:
    """Settings of the search. Defaults: the paper's CIFAR run."""

    keep: float = 0.45                 # target FLOPs ratio
    importance: str = "ekg"            # ekg | taylor | l1 | fpgm | random
    reward: str = "ensemble"           # ensemble (J) | val-loss (CE)
    method: str = "greedy"             # greedy | uniform
    step: float = 0.2                  # the 0.2 of max(1/C, 0.2/n)
    otsu_trim: float = 0.2
    otsu: bool = True                  # the candidate filter
    batch_size: int = 256
    val_per_class: int = 32
    sub_per_class: int = 256
    split_seed: int = 1
    seed: int = 0                      # only the random importance uses it
    adapt: bool = True
    adapt_lr: float = 1e-3
    adapt_momentum: float = 0.9
    adapt_weight_decay: float = 5e-4
    bn_ops: bool = False               # count 2 ops per BN output element in the FLOPs ratio
    search_bn: str = "batch"           # BN statistics of every search pass: batch (the method) | running (ablation)
    compat: str = "method"             # method (the method doc's rules) | release (the TF release's effective ones)
    fast: bool = True                  # re-use unchanged activations per candidate (same decisions)
    cache_gb: float | None = None      # fast mode's activation cache limit; None: half the free memory
    sliced: bool = True                # channels-last, kept-channels-only layers (same function, less work)
    device: str = "auto"

    def validate(self) -> None:
        if not 0 < self.keep < 1:
            raise EkgError(f"--keep must lie in (0, 1) (the FLOPs ratio to reach), got {self.keep}")
        for name, value, allowed in (("importance", self.importance, IMPORTANCES),
                                     ("reward", self.reward, REWARDS), ("method", self.method, METHODS),
                                     ("search-bn", self.search_bn, BN_STATS), ("compat", self.compat, COMPATS)):
            if value not in allowed:
                raise EkgError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0 < self.step <= 1:
            raise EkgError(f"--step must lie in (0, 1], got {self.step}")
        if self.batch_size < 2:
            raise EkgError("--batch-size must be at least 2 (BN uses batch statistics in the search)")
        if self.cache_gb is not None and self.cache_gb < 0:
            raise EkgError(f"--search-cache-gb must be at least 0, got {self.cache_gb}")
        if self.val_per_class < 1 or self.sub_per_class < 0:
            raise EkgError(f"--val-per-class must be at least 1 and --sub-per-class at least 0, got "
                           f"{self.val_per_class} and {self.sub_per_class}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# ----------------------------------------------------------------------------- evaluation

@dataclass
class Evaluation:
    parts: list[torch.Tensor | None]  # logits per D_val batch; on several processes only this rank's
    loss: float      # mean CE
    j: float         # mean J
    accuracy: float  # percent

    @property
    def logits(self) -> torch.Tensor:
        """All logits ``(N, classes)`` (one process; on several, ``CandidateEvaluator.gather``)."""
        if any(z is None for z in self.parts):
            raise RuntimeError("this rank holds only its batches' logits: use CandidateEvaluator.gather")
        return torch.cat(self.parts)  # type: ignore[arg-type]

    def reward(self, kind: str) -> float:
        return self.j if kind == "ensemble" else self.loss


def _tail_module(gm: fx.GraphModule, affected: set[fx.Node], inputs: list[fx.Node]) -> fx.GraphModule:
    """A GraphModule computing ``gm``'s output from the values of ``inputs`` (the unchanged nodes the
    ``affected`` nodes read), running only the affected nodes."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in inputs:
        env[n] = graph.placeholder(f"in_{n.name}")
    for n in gm.graph.nodes:
        if n.op == "output":
            graph.output(fx.map_arg(n.args[0], lambda a: env[a]))
        elif n in affected:
            env[n] = graph.node_copy(n, lambda a: env[a])
    return fx.GraphModule(gm, graph)


def _base_module(gm: fx.GraphModule, keep: list[fx.Node]) -> fx.GraphModule:
    """``gm`` returning ``(output, *values of keep)``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            graph.output((fx.map_arg(n.args[0], lambda a: env[a]), *(env[k] for k in keep)))
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    return fx.GraphModule(gm, graph)


class CandidateEvaluator:
    """Evaluates sub-networks on D_val (BN on batch statistics, running statistics untouched).

    ``fast=False`` runs the whole network per candidate. ``fast=True`` is exact too: for each gate
    it builds, once, a graph of only the nodes downstream of the gate's masks and masked layers
    (its *tail*), fed by the values of the unchanged nodes those read (its *frontier*). A base pass
    per step keeps the frontier values of the current sub-network; a candidate that changes one
    gate then runs only that gate's tail. Only frontier values are kept (block inputs, for a
    ResNet), not every activation."""

    def __init__(self, net: MaskedNetwork, batches: list[tuple[torch.Tensor, torch.Tensor]], fast: bool,
                 dist: Dist | None = None) -> None:
        self.net = net
        self.batches = batches
        self.fast = fast
        self.dist = dist or Dist()
        # rows of each batch in D_val's order; this rank runs only its own batches (`local`)
        sizes = [len(y) for _, y in batches]
        starts = [sum(sizes[:b]) for b in range(len(sizes))]
        self.rows = [slice(a, a + n) for a, n in zip(starts, sizes)]
        self.local = self.dist.shard(len(batches))
        self.labels = torch.cat([y for _, y in batches]) if batches else torch.zeros(0, dtype=torch.long)
        self.base_values: dict[int, dict[fx.Node, torch.Tensor]] | None = None
        self.base_key: tuple | None = None
        self._affected: list[set[fx.Node]] = []
        self._frontier: list[list[fx.Node]] = []
        self._tails: list[fx.GraphModule] = []
        if fast:
            order = {n: k for k, n in enumerate(net.gm.graph.nodes)}
            for i in range(len(net.gates)):
                affected = self._downstream(i)
                frontier = sorted({a for n in affected for a in n.all_input_nodes if a not in affected},
                                  key=order.__getitem__)
                self._affected.append(affected)
                self._frontier.append(frontier)
                self._tails.append(_tail_module(net.gm, affected, frontier))
            self._kept = sorted({n for f in self._frontier for n in f}, key=order.__getitem__)
            self._base = _base_module(net.gm, self._kept)
        self.cache_bytes = 0  # fast mode: what the cached activations of this rank's batches take
        self.note = ""

    def limit_cache(self, limit_gb: float | None) -> None:
        """Fall back on straightforward evaluation (the same decisions, more compute) when the fast
        mode's activation cache for this rank's batches would exceed ``limit_gb`` (None: half the
        free memory of the device, e.g. ImageNet's D_val at 224 px). Measured on one image."""
        if not self.fast or not self.local:
            return
        x = self.batches[self.local[0]][0][:2]  # two images: BN on batch statistics needs more than one
        with torch.no_grad():
            _, *kept = self._base(x)
        per_image = sum(v.numel() * v.element_size() for v in kept) // len(x)
        self.cache_bytes = per_image * sum(len(self.batches[b][1]) for b in self.local)
        limit = limit_gb * 2**30 if limit_gb is not None else free_memory(x.device) / 2
        if self.cache_bytes > limit:
            self.note = (f"the fast search would cache {self.cache_bytes / 2**30:.1f} GiB of activations "
                         f"(limit {limit / 2**30:.1f} GiB): evaluating each candidate on the whole network "
                         "instead (the same decisions; --search-cache-gb or a smaller --val-per-class changes this)")
            self.fast = False
            self.cache_bytes = 0

    def _downstream(self, gate_index: int) -> set[fx.Node]:
        """Nodes whose value depends on gate ``gate_index``'s mask."""
        mask_mod = self.net.masks[gate_index]
        modules = dict(self.net.gm.named_modules())
        seeds = set()
        for node in self.net.gm.graph.nodes:
            if node.op != "call_module":
                continue
            m = modules[node.target]
            if m is mask_mod or (hasattr(m, "layer") and (m.__dict__.get("in_mask") is mask_mod
                                                         or m.__dict__.get("out_mask") is mask_mod)):
                seeds.add(node)
        out, stack = set(), list(seeds)
        while stack:
            n = stack.pop()
            if n in out or n.op == "output":
                continue
            out.add(n)
            stack.extend(n.users)
        return out

    def _key(self) -> tuple:
        return tuple(bool(v) for gm in self.net.masks for v in gm.mask.tolist())

    @torch.no_grad()
    def evaluate(self, ensemble: torch.Tensor | None, changed_gate: int | None = None) -> Evaluation:
        """Evaluate the network in its current mask state. ``changed_gate`` names the one gate that
        differs from the base state recorded by :meth:`set_base` (fast mode); None means evaluate
        from scratch."""
        logits: list[torch.Tensor | None] = [None] * len(self.batches)
        use_cache = self.fast and changed_gate is not None and self.base_values is not None
        for b in self.local:
            if use_cache:
                vals = self.base_values[b]
                logits[b] = self._tails[changed_gate](*(vals[n] for n in self._frontier[changed_gate]))
            else:
                logits[b] = self.net(self.batches[b][0])
        return self._metrics(logits, ensemble)

    def gather(self, logits: list[torch.Tensor | None]) -> torch.Tensor:
        """Every batch's logits as one ``(N, classes)`` tensor on every rank (each rank fills its
        batches' rows with zeros elsewhere and the sum over ranks is exact)."""
        if not self.dist.enabled:
            return torch.cat(logits)  # type: ignore[arg-type]
        own = next((z for z in logits if z is not None), None)
        classes = torch.tensor([own.shape[1] if own is not None else 0], device=self.labels.device)
        torch.distributed.all_reduce(classes, op=torch.distributed.ReduceOp.MAX)
        full = torch.zeros(len(self.labels), int(classes), device=self.labels.device)
        for b in self.local:
            full[self.rows[b]] = logits[b].float()
        return self.dist.all_reduce_sum(full)

    def recording_forward(self) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """A forward for batch ``b`` that also records the frontier values (fast mode), so that a
        pass the search makes anyway (the Taylor scores) doubles as the base pass. The values
        are recorded for the masks as they are now; :meth:`set_base` keeps them while the masks
        stay the same."""
        if not self.fast:
            return lambda b, x: self.net(x)
        key = self._key()
        values: dict[int, dict[fx.Node, torch.Tensor]] = {}
        last = self.local[-1] if self.local else None
        if last is None:  # a rank without batches has nothing to record
            self.base_values, self.base_key = values, key

        def forward(b: int, x: torch.Tensor) -> torch.Tensor:
            out, *kept = self._base(x)
            values[b] = {n: v.detach() for n, v in zip(self._kept, kept)}
            if b == last:
                self.base_values, self.base_key = values, key
            return out

        return forward

    @torch.no_grad()
    def set_base(self) -> None:
        """Record the frontier values of the current state (fast mode)."""
        if not self.fast:
            return
        if self._key() == self.base_key:
            return
        forward = self.recording_forward()
        for b in self.local:
            forward(b, self.batches[b][0])

    def _metrics(self, logits: list[torch.Tensor | None] | torch.Tensor, ensemble: torch.Tensor | None) -> Evaluation:
        """Mean CE, mean J and accuracy over all batches. ``logits``: per batch (this rank's filled)
        or one ``(N, classes)`` tensor. Each batch's sums are computed alone, laid out by batch
        index, summed over ranks and then over batches in float64 in batch order: the same numbers
        on any number of processes."""
        if isinstance(logits, torch.Tensor):
            logits = [logits[r] for r in self.rows]
        stats = torch.zeros(len(self.batches), 3, dtype=torch.float64, device=self.labels.device)
        for b in self.local:
            z, y = logits[b], self.labels[self.rows[b]]
            k = ensemble[self.rows[b]] if ensemble is not None else None
            stats[b] = torch.stack([F.cross_entropy(z.float(), y, reduction="sum"), objective(z, y, k),
                                    (z.argmax(1) == y).sum().float()]).double()
        self.dist.all_reduce_sum(stats)
        total = torch.zeros(3, dtype=torch.float64, device=stats.device)
        for b in range(len(self.batches)):
            total += stats[b]
        loss, j, acc = total.tolist()  # one host sync
        n = len(self.labels)
        return Evaluation(parts=logits, loss=loss / n, j=j / n, accuracy=100.0 * acc / n)


# ----------------------------------------------------------------------------- importance

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


# ----------------------------------------------------------------------------- the search

@dataclass
class SearchState:
    """Everything needed to continue a search exactly (saved after every step)."""

    step: int
    rates: list[float]
    ranks: list[torch.Tensor]
    ensemble: torch.Tensor
    ensemble_count: int
    history: list[dict[str, Any]] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "rates": list(self.rates), "ranks": [r.cpu() for r in self.ranks],
                "ensemble": self.ensemble.cpu(), "ensemble_count": self.ensemble_count,
                "history": self.history, "log": self.log, "done": self.done}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchState":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def pack_masks(net: MaskedNetwork) -> list[torch.Tensor]:
    """The current masks, one bool tensor per gate (for the history / memory bank)."""
    return [gm.mask.bool().cpu().clone() for gm in net.masks]


class Searcher:
    """Greedy EKG search over ``net`` on ``D_val`` batches."""

    def __init__(self, net: MaskedNetwork, val_batches: list[tuple[torch.Tensor, torch.Tensor]],
                 cfg: SearchConfig, dist: Dist | None = None) -> None:
        if cfg.sliced:  # channels-last convs and kept-channels-only layers: same function, less work
            net.model.to(memory_format=torch.channels_last)
            net.set_sliced(True)
            val_batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in val_batches]
        self.net, self.batches, self.cfg, self.dist = net, val_batches, cfg, dist or Dist()
        self.evaluator = CandidateEvaluator(net, val_batches, fast=cfg.fast, dist=self.dist)
        with self.bn():
            self.evaluator.limit_cache(cfg.cache_gb)
        # every rank takes the same path (a rank that falls back makes the others fall back too)
        if cfg.fast and self.dist.enabled:
            slow = self.dist.all_reduce_sum(torch.tensor([float(not self.evaluator.fast)],
                                                         device=self.evaluator.labels.device))
            if float(slow) > 0 and self.evaluator.fast:
                self.evaluator.fast = False
                self.evaluator.note = self.evaluator.note or "another process's activation cache would not fit"
        self.release = cfg.compat == "release"
        # the release's FLOPs count 2 ops per BN output element (nets/tcl.py BatchNorm.call)
        self.bn_ops = cfg.bn_ops or self.release
        # candidates are tried in this order and the first of equal rewards wins (np.argmin in the release)
        self.order = (release_gate_order(net) if self.release else None) or list(range(len(net.gates)))
        self.full_cost = net.graph.cost(net.graph.full_widths(), bn_ops=self.bn_ops)
        self.last_costs: dict[int, float] = {}  # the last step's cost per active gate, and its candidates
        self.last_candidates: list[int] = []

    def bn(self) -> Any:
        """The BN mode of every pass the search makes (scores, rewards, the fast evaluator's base and
        tails), whatever mode the caller left the model in: dropout off, BN on batch statistics with
        running statistics untouched (the method), or on running statistics (``search_bn="running"``,
        an ablation). Each public phase below enters it."""
        return bn_mode(self.net.model, self.cfg.search_bn)

    # -- budget
    def ratio(self, rates: Sequence[float] | None = None) -> float:
        flops, _ = self.net.graph.cost(self.net.widths(rates), bn_ops=self.bn_ops)
        return flops / self.full_cost[0]

    def cost(self) -> tuple[int, int]:
        return self.net.graph.cost(self.net.widths(), bn_ops=self.bn_ops)

    # -- phases
    def initial_state(self) -> SearchState:
        """Step 0: the unpruned network's D_val logits are K, its masks and CE loss the history."""
        with self.bn():
            return self._initial_state()

    def _initial_state(self) -> SearchState:
        self.net.set_rates([1.0] * len(self.net.gates))
        base = self.evaluator.evaluate(None)
        logits = self.evaluator.gather(base.parts)
        entry = {"step": 0, "masks": pack_masks(self.net), "rates": self.net.rates(), "loss": base.loss,
                 "accuracy": base.accuracy}
        state = SearchState(step=0, rates=self.net.rates(), ranks=[torch.arange(g.channels) for g in self.net.gates],
                            ensemble=logits, ensemble_count=1, history=[entry])
        flops, params = self.cost()
        state.log.append({"step": 0, "group": None, "group_name": None, "flops": flops, "params": params,
                          "flops_ratio": 1.0, "val_accuracy": base.accuracy, "val_loss": base.loss,
                          "j": self.evaluator._metrics(logits, logits).j,
                          "candidates": 0, "evaluated": 0, "seconds": 0.0})
        return state

    def restore(self, state: SearchState) -> None:
        for gate, r, rk in zip(self.net.gates, state.rates, state.ranks):
            gate.rate, gate.ranks = float(r), rk.to(self.net.masks[0].mask.device)
        self.net.apply_gates()

    def scores(self, state: SearchState) -> list[torch.Tensor]:
        imp = self.cfg.importance
        if imp in ("ekg", "taylor"):
            k = state.ensemble if imp == "ekg" else None
            return taylor_scores(self.net, self.batches, k, self.cfg.batch_size,
                                 forward=self.evaluator.recording_forward(), dist=self.dist)
        return weight_scores(self.net, imp, self.cfg.seed)

    def step(self, state: SearchState) -> SearchState:
        """One greedy step: score, filter, evaluate candidates, apply the best."""
        with self.bn():
            return self._step(state)

    def _step(self, state: SearchState) -> SearchState:
        t0 = time.perf_counter()
        cfg, gates = self.cfg, self.net.gates
        scores = self.scores(state)
        for gate, s, gm in zip(gates, scores, self.net.masks):
            gate.ranks = ranks_from_scores(s, live=gm.mask.bool())
        self.net.apply_gates()
        steps = [step_size(g.channels, g.n_producers, cfg.step) for g in gates]
        if self.release:  # the release: every gate whose rate is above 0, in its numbering
            active = [i for i in self.order if gates[i].rate > 0]
            cost_of = release_step_cost
        else:
            active = [i for i, g in enumerate(gates) if g.kept > 1]
            cost_of = step_cost
        if not active:
            left = "has a rate at or below 0 (--compat release)" if self.release else "is down to one channel"
            raise EkgError(f"cannot reach --keep {cfg.keep}: every prunable group {left} "
                           f"at a FLOPs ratio of {self.ratio():.4f}")
        costs = {i: cost_of(scores[i], gates[i].rate, steps[i]) for i in active}
        threshold = trimmed_otsu_threshold(list(costs.values()), cfg.otsu_trim) if cfg.otsu else math.inf
        candidates = [i for i in active if costs[i] <= threshold] or active
        self.last_costs, self.last_candidates = costs, candidates
        self.evaluator.set_base()
        best: tuple[float, int, float, Evaluation] | None = None
        rates = self.net.rates()
        for i in candidates:
            gate = gates[i]
            trial = list(rates)

            def ratio_at(r: float, i: int = i) -> float:
                trial[i] = r
                return self.ratio(trial)

            if self.release:
                new_rate = land_rate_release(gate.rate, steps[i], gate.channels, ratio_at, cfg.keep, cfg.step)
            else:
                new_rate = land_rate(gate.rate, steps[i], gate.channels, ratio_at, cfg.keep)
            old = gate.rate
            gate.rate = new_rate
            self.net.masks[i].set(gate.mask())
            ev = self.evaluator.evaluate(state.ensemble, changed_gate=i)
            gate.rate = old
            self.net.masks[i].set(gate.mask())
            r = ev.reward(cfg.reward)
            if best is None or r < best[0]:
                best = (r, i, new_rate, ev)
        assert best is not None
        _, winner, new_rate, ev = best
        gates[winner].rate = new_rate
        self.net.apply_gates()
        state.ensemble = update_ensemble(state.ensemble, self.evaluator.gather(ev.parts), state.ensemble_count)
        state.ensemble_count += 1
        state.step += 1
        state.rates = self.net.rates()
        state.ranks = [g.ranks.clone() for g in gates]
        state.history.append({"step": state.step, "masks": pack_masks(self.net), "rates": state.rates,
                              "loss": ev.loss, "accuracy": ev.accuracy})
        flops, params = self.cost()
        state.log.append({
            "step": state.step, "group": winner, "group_name": gates[winner].group.name,
            "rate": new_rate, "kept": gates[winner].kept, "widths": [g.kept for g in gates],
            "flops": flops, "params": params, "flops_ratio": flops / self.full_cost[0],
            "val_accuracy": ev.accuracy, "val_loss": ev.loss, "j": ev.j,
            "candidates": len(active), "evaluated": len(candidates), "seconds": time.perf_counter() - t0,
        })
        state.done = self.ratio() <= cfg.keep
        return state

    def uniform(self, state: SearchState) -> SearchState:
        """The same kept fraction for every group (see :meth:`_uniform`)."""
        with self.bn():
            return self._uniform(state)

    def _uniform(self, state: SearchState) -> SearchState:
        """The same kept fraction for every group, the largest that lands at or below the budget;
        channels chosen by the importance scores of the unpruned network."""
        t0 = time.perf_counter()
        for gate, s in zip(self.net.gates, self.scores(state)):
            gate.ranks = ranks_from_scores(s)
        grid = sorted({round(k / g.channels, 6) for g in self.net.gates for k in range(1, g.channels + 1)})
        lo, hi = 0, len(grid) - 1  # find the largest grid rate with ratio <= keep
        if self.ratio([grid[0]] * len(self.net.gates)) > self.cfg.keep:
            raise EkgError(f"cannot reach --keep {self.cfg.keep} uniformly: one channel per group leaves "
                           f"a FLOPs ratio of {self.ratio([grid[0]] * len(self.net.gates)):.4f}")
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.ratio([grid[mid]] * len(self.net.gates)) <= self.cfg.keep:
                lo = mid
            else:
                hi = mid - 1
        self.net.set_rates([grid[lo]] * len(self.net.gates))
        ev = self.evaluator.evaluate(state.ensemble)
        flops, params = self.cost()
        state.step, state.rates = 1, self.net.rates()
        state.ranks = [g.ranks.clone() for g in self.net.gates]
        state.history.append({"step": 1, "masks": pack_masks(self.net), "rates": state.rates,
                              "loss": ev.loss, "accuracy": ev.accuracy})
        state.log.append({"step": 1, "group": None, "group_name": "all (uniform)", "rate": grid[lo],
                          "widths": [g.kept for g in self.net.gates], "flops": flops, "params": params,
                          "flops_ratio": flops / self.full_cost[0], "val_accuracy": ev.accuracy,
                          "val_loss": ev.loss, "j": ev.j, "candidates": 0, "evaluated": 1,
                          "seconds": time.perf_counter() - t0})
        state.done = True
        return state

    def run(self, state: SearchState, on_step: Callable[[SearchState], None] | None = None) -> SearchState:
        """Steps until the budget is met; ``on_step`` runs after each (e.g. to save the state)."""
        self.restore(state)
        if self.cfg.method == "uniform" and not state.done:
            state = self.uniform(state)
            if on_step:
                on_step(state)
        while not state.done and self.ratio() > self.cfg.keep:
            state = self.step(state)
            if on_step:
                on_step(state)
        state.done = True
        return state


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

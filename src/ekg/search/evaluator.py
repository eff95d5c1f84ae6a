"""Evaluating candidate sub-networks on D_val: :class:`Evaluation` (logits, CE, J, accuracy) and
:class:`CandidateEvaluator`, straightforward (the whole network per candidate) or fast (only the
graph nodes a candidate changes, fed by cached activations; the same decisions), with its cache
limit (:func:`free_memory`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..distributed import Dist
from ..masks import MaskedNetwork
from .ensemble import objective


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
                         "instead (the same decisions; `cache_gb` or a smaller `val_per_class` changes this)")
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

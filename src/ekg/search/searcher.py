"""Phase 2, the search itself: :class:`Searcher` (step 0, the greedy steps, the uniform baseline,
the budget) over a :class:`~ekg.masks.MaskedNetwork`, and :class:`SearchState`, everything needed
to continue a search exactly."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..bn import bn_mode
from ..distributed import Dist
from ..errors import EkgError
from ..masks import MaskedNetwork, ranks_from_scores
from .config import SearchConfig
from .ensemble import update_ensemble
from .evaluator import CandidateEvaluator, Evaluation
from .release import land_rate_release, release_gate_order, release_step_cost
from .scores import taylor_scores, weight_scores
from .steps import drop_a_unit, land_rate, removed_cost, step_cost, step_size, trimmed_otsu_threshold


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


def pack_masks(net: MaskedNetwork) -> list[torch.Tensor]:
    """The current masks, one bool tensor per gate (for the history / memory bank)."""
    return [gm.mask.bool().cpu().clone() for gm in net.masks]


def counts_bn_ops(cfg: SearchConfig) -> bool:
    """Whether the FLOPs ratio counts 2 ops per BN output element (``bn_ops``; the release always does,
    nets/tcl.py BatchNorm.call)."""
    return cfg.bn_ops or cfg.compat == "release"


def floor_ratio(graph: Any, cfg: SearchConfig) -> float:
    """The smallest FLOPs ratio the search can reach on ``graph`` (an :class:`ekg.graph.Graph`):
    every prunable group at one unit, one channel per block (also ``method="uniform"``'s smallest
    rate, 1/C of the widest group, keeps one unit of every group). What is left is the cost of the
    layers no mask reaches."""
    bn_ops = counts_bn_ops(cfg)
    full = graph.cost(graph.full_widths(), bn_ops=bn_ops)[0]
    return graph.cost(floor_widths(graph, cfg), bn_ops=bn_ops)[0] / full


def floor_widths(graph: Any, cfg: SearchConfig) -> Any:
    """The group widths at the floor: every prunable group at one unit."""
    widths = graph.full_widths()
    for g in graph.prunable:  # one unit: a channel per block, or the rounded width (`round_to`)
        widths[g.index] = min(g.channels, math.lcm(g.blocks, cfg.round_to))
    return widths


def check_reachable(graph: Any, cfg: SearchConfig) -> None:
    """Refuse, before any work, a ``keep`` below :func:`floor_ratio`."""
    floor = floor_ratio(graph, cfg)
    if cfg.keep < floor:
        blocks = " (one a block where grouped convs cut them in blocks)" if any(g.blocks > 1 for g in graph.prunable) else ""
        if cfg.round_to > 1:
            blocks = f" (at {cfg.round_to} channels with `round_to` {cfg.round_to}, or whole where narrower)"
        raise EkgError(f"cannot reach `keep` {cfg.keep}: with every prunable channel group at one channel{blocks} this model "
                       f"still has a FLOPs ratio of {floor:.4f} ({_floor_shares(graph, cfg)}); "
                       f"give a `keep` of at least {floor:.4f}")


def _floor_shares(graph: Any, cfg: SearchConfig, top: int = 3) -> str:
    """What the FLOPs at the floor are (every prunable group at one channel), summed by why the
    channels a conv/linear still reads or writes cannot be cut (the reason of a fixed side, which
    names a layer): the ``top`` largest shares of the full FLOPs, then the rest."""
    groups = graph.groups
    widths = floor_widths(graph, cfg)
    by_why: dict[str, int] = {}
    for layer in graph.layers:
        if layer.kind not in ("conv", "dwconv", "linear"):
            continue
        cin = widths[layer.in_group] if layer.in_group is not None else layer.in_channels
        cout = widths[layer.out_group] if layer.out_group is not None else layer.out_channels
        pairs = cout if layer.kind == "dwconv" else cin * cout // layer.groups
        fixed = [groups[i] for i in (layer.out_group, layer.in_group) if i is not None and not groups[i].prunable]
        why = next((f"where {g.reason}" for g in fixed if g.reason),
                   f"in '{layer.name}', whose channels are fixed" if fixed else "in the channel left of each group")
        by_why[why] = by_why.get(why, 0) + layer.flops_per_pair * pairs
    full = max(1, graph.cost(graph.full_widths())[0])
    ranked = [kv for kv in sorted(by_why.items(), key=lambda kv: -kv[1]) if 2000 * kv[1] >= full]  # >= 0.05%
    text = "; ".join(f"{100 * flops / full:.1f}% {why}" for why, flops in ranked[:top])
    rest = sum(by_why.values()) - sum(flops for _, flops in ranked[:top])
    return text + (f"; {100 * rest / full:.1f}% in {len(by_why) - len(ranked[:top])} more places"
                   if 2000 * rest >= full else "")


class Searcher:
    """Greedy EKG search over ``net`` on ``D_val`` batches."""

    def __init__(self, net: MaskedNetwork, val_batches: list[tuple[torch.Tensor, torch.Tensor]],
                 cfg: SearchConfig, dist: Dist | None = None, latency: Any = None) -> None:
        """``latency``: for a latency budget, the :class:`ekg.latency.LatencyModel` whose predicted
        latency ratio is the budget's cost (the step sizes, candidate costs and rewards are the
        same; the landing and the stop test use it); None: the FLOPs ratio."""
        if (latency is None) != (cfg.budget == "flops"):
            raise EkgError(f"a {cfg.budget} budget needs {'a' if latency is None else 'no'} latency model")
        self.latency = latency
        self.what = "predicted latency ratio" if latency is not None else "FLOPs ratio"
        if cfg.sliced:  # channels-last convs and kept-channels-only layers: same function, less work
            net.model.to(memory_format=torch.channels_last)
            net.set_sliced(True)
            net.set_weight_reuse(True)  # a layer whose masks a candidate leaves alone re-uses its weights
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
        self.bn_ops = counts_bn_ops(cfg)
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
        """The budget's cost at ``rates`` (default: the gates' own) relative to the full network's:
        the FLOPs ratio, or with a latency budget the predicted latency ratio."""
        if self.latency is not None:
            return self.latency.ratio(self.net.widths(rates))
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
        self.net.clear_weight_cache()  # held weights live one phase, in which the weights are frozen
        self.net.set_rates([1.0] * len(self.net.gates))
        base = self.evaluator.evaluate(None)
        logits = self.evaluator.gather(base.parts)
        entry = {"step": 0, "masks": pack_masks(self.net), "rates": self.net.rates(), "loss": base.loss,
                 "accuracy": base.accuracy}
        state = SearchState(step=0, rates=self.net.rates(), ranks=[torch.arange(g.channels) for g in self.net.gates],
                            ensemble=logits, ensemble_count=1, history=[entry])
        flops, params = self.cost()
        state.log.append({"step": 0, "group": None, "group_name": None, "flops": flops, "params": params,
                          "flops_ratio": 1.0, **({"latency_ratio": 1.0} if self.latency is not None else {}),
                          "val_accuracy": base.accuracy, "val_loss": base.loss,
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

    @staticmethod
    def _step_cost(gate: Any, scores: torch.Tensor, step: float) -> float:
        """The scores a step of ``gate`` removes: positions by rate (the method's, and the release's,
        rounding), or, for widths rounded to ``round_to``, the channels its rounded widths drop."""
        if gate.round_to == 1:
            return step_cost(scores, gate.rate, step, gate.blocks)
        after = drop_a_unit(gate.rate, round(gate.rate - step, 5), gate.units)  # a step removes a unit
        return removed_cost(scores, gate.kept, gate.kept_at(after), gate.blocks)

    def step(self, state: SearchState) -> SearchState:
        """One greedy step: score, filter, evaluate candidates, apply the best."""
        with self.bn():
            return self._step(state)

    def _step(self, state: SearchState) -> SearchState:
        t0 = time.perf_counter()
        self.net.clear_weight_cache()  # held weights live one phase, in which the weights are frozen
        cfg, gates = self.cfg, self.net.gates
        scores = self.scores(state)
        for gate, s, gm in zip(gates, scores, self.net.masks):
            gate.ranks = ranks_from_scores(s, live=gm.mask.bool())
        self.net.apply_gates()
        steps = [step_size(g.units, g.n_producers, cfg.step) for g in gates]
        if self.release:  # the release: every gate whose rate is above 0, in its numbering
            active = [i for i in self.order if gates[i].rate > 0]
        else:  # every gate above one unit (one channel per block)
            active = [i for i, g in enumerate(gates) if g.kept > g.unit]
        if not active:
            left = 'has a rate at or below 0 (`compat` release)' if self.release else "is down to one channel"
            raise EkgError(f"cannot reach `keep` {cfg.keep}: every prunable group {left} "
                           f"at a {self.what} of {self.ratio():.4f}")
        if self.release:
            costs = {i: release_step_cost(scores[i], gates[i].rate, steps[i]) for i in active}
        else:
            costs = {i: self._step_cost(gates[i], scores[i], steps[i]) for i in active}
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
                new_rate = land_rate_release(gate.rate, steps[i], gate.units, ratio_at, cfg.keep, cfg.step)
            else:
                new_rate = land_rate(gate.rate, steps[i], gate.units, ratio_at, cfg.keep)
                if gate.unit > 1:  # a step removes a unit (blocks of 1: the release's rounding, as it was)
                    new_rate = drop_a_unit(gate.rate, new_rate, gate.units)
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
            **({"latency_ratio": self.ratio()} if self.latency is not None else {}),
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
        self.net.clear_weight_cache()
        for gate, s in zip(self.net.gates, self.scores(state)):
            gate.ranks = ranks_from_scores(s)
        grid = sorted({round(k / g.units, 6) for g in self.net.gates for k in range(1, g.units + 1)})
        lo, hi = 0, len(grid) - 1  # find the largest grid rate with ratio <= keep
        if self.ratio([grid[0]] * len(self.net.gates)) > self.cfg.keep:
            raise EkgError(f"cannot reach `keep` {self.cfg.keep} uniformly: one channel per group leaves "
                           f"a {self.what} of {self.ratio([grid[0]] * len(self.net.gates)):.4f}")
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
                          "flops_ratio": flops / self.full_cost[0],
                          **({"latency_ratio": self.ratio()} if self.latency is not None else {}),
                          "val_accuracy": ev.accuracy,
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

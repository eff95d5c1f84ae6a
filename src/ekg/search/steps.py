"""The method doc's step rules for the candidate groups of one greedy step: a group's step size,
the cost of its next step, the trimmed-Otsu candidate filter over those costs, and the fine
landing of a step on the FLOPs budget. (The release's departures from them: :mod:`.release`.)

A group cut in B equal blocks (a grouped conv's) moves in units of B channels: its C in
``max(1/C, 0.2/n)`` and in the landing's ``1/C`` increments is its width in units, C/B
(:attr:`ekg.masks.Gate.units`; C itself for B = 1), its step cost sums the scores each block's step
removes, and a step of its that keeps every unit (5-decimal rounding: ``round(1 - 1/3, 5)`` keeps 3
of 3) goes on to one unit fewer (:func:`drop_a_unit`)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from ..masks import kept_channels


def step_size(channels: int, n_producers: int, base: float = 0.2) -> float:
    """Fraction of a group's channels one step removes: ``max(1/C, base/n)`` (C: the group's width
    in units, :attr:`ekg.masks.Gate.units`)."""
    return max(1.0 / channels, base / max(1, n_producers))


def step_cost(scores: torch.Tensor, rate: float, step: float, blocks: int = 1) -> float:
    """Sum of the scores of the channels a step from ``rate`` would remove: the ascending-sorted
    scores from position ``round((1-rate)·C)`` to ``round((1-rate+step)·C)`` (Python rounding, as
    the release). A group of ``blocks`` equal blocks removes as many channels from every block:
    the same positions of each block's own sorted scores (C there is a block's width), summed."""
    if blocks > 1:
        s = torch.sort(scores.double().view(blocks, -1), dim=1).values
        c = s.shape[1]
        lo, hi = round((1 - rate) * c), round((1 - rate + step) * c)
        return float(s[:, lo:hi].sum())
    s = torch.sort(scores.double()).values
    c = len(s)
    lo, hi = round((1 - rate) * c), round((1 - rate + step) * c)
    return float(s[lo:hi].sum())


def removed_cost(scores: torch.Tensor, kept: int, kept_after: int, blocks: int = 1) -> float:
    """Sum of the scores of the channels a step from ``kept`` to ``kept_after`` channels removes, in
    each of ``blocks`` equal blocks its share: the ascending-sorted scores of each block from position
    ``(C − kept)/B`` to ``(C − kept_after)/B``. The step cost of a gate whose widths are rounded
    (``round_to`` > 1), where a rate's channel count is a rounded one, not ``round(rate·C)``."""
    s = torch.sort(scores.double().view(blocks, -1), dim=1).values
    c = s.shape[1]
    return float(s[:, c - kept // blocks:c - kept_after // blocks].sum())


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


def drop_a_unit(rate: float, new: float, units: int) -> float:
    """``new``, or, where it keeps as many of ``units`` as ``rate`` does (``round(1 - 1/3, 5)`` =
    0.66667 keeps 3 of 3), the rate that keeps one unit fewer: a step always removes a unit."""
    k = kept_channels(units, rate)
    return new if kept_channels(units, new) < k or k <= 1 else (k - 1) / units


def land_rate(rate: float, step: float, channels: int, ratio_at: Callable[[float], float], keep: float) -> float:
    """The rate after one step, landed on the budget.

    ``rate - step`` (rounded to 5 decimals, as the release); if that takes the FLOPs ratio below
    ``keep``, the step is shrunk in ``1/C`` increments — ``rate - step + k/C``, exact rather than
    rounded to 5 decimals, so that every channel count stays reachable when ``1/C`` needs more
    decimals (C = 64: ``round(3/64, 5)`` would keep 4 channels) — to the largest rate whose ratio is
    still at or below ``keep``; never above. (C: the group's width in units, ``channels``.)"""
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

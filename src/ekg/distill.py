"""Fine-tuning loss with the memory bank (method doc, phase 5).

With student logits ``s_v`` for view ``v`` (two augmented views per image) and the stored teacher
logits ``M_k`` of the batch's images:

* ``kl_T(a, b) = T · Σ_c softmax(a/T)_c · (log_softmax(a/T)_c − log_softmax(b/T)_c)`` per image
  (T·KL, not T²·KL);
* ``curr = Σ_batch kl_T(M_0, mean_v s_v)``; teacher ``k`` is selected for this batch when
  ``Σ_batch kl_T(M_0, M_k) < curr``;
* ``M̄`` = mean of the selected teachers' logits (teacher 0 when none is selected: curr = 0);
* loss = ``½ · Σ_v [CE(labels, s_v) + Σ_batch kl_T(M̄, s_v)] / B`` (the gradient halved).

``mode``: ``ensemble`` (the rule above), ``single`` (``M̄ = M_0`` always), ``none`` (plain
cross-entropy, mean over the batch, one view).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KD_MODES = ("none", "single", "ensemble")


def kl_t(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-image ``T · KL(softmax(teacher/T) ‖ softmax(student/T))``, shape ``(B,)``."""
    t = temperature
    log_p = F.log_softmax(teacher.float() / t, dim=-1)
    log_q = F.log_softmax(student.float() / t, dim=-1)
    return t * (log_p.exp() * (log_p - log_q)).sum(-1)


def select_batch_teachers(teachers: torch.Tensor, student_mean: torch.Tensor, temperature: float) -> torch.Tensor:
    """Bool ``(K,)``: teacher k is selected when ``Σ_batch kl_T(M_0, M_k) < Σ_batch kl_T(M_0, s̄)``.

    ``teachers``: ``(B, K, C)``; ``student_mean``: ``(B, C)``, the mean over views."""
    m0 = teachers[:, 0]
    curr = kl_t(m0, student_mean.detach(), temperature).sum()
    dist = kl_t(m0[:, None].expand_as(teachers), teachers, temperature).sum(0)  # (K,)
    return dist < curr


@dataclass
class KDOutput:
    loss: torch.Tensor   # what to back-propagate (already halved where the method halves it)
    ce: float            # mean CE over views
    kd: float            # mean per-image kl_T(M̄, s_v) over views (0 without teachers)
    selected: int        # teachers selected for this batch


def kd_loss(views: list[torch.Tensor], labels: torch.Tensor, teachers: torch.Tensor | None, *,
            mode: str = "ensemble", temperature: float = 4.0) -> KDOutput:
    """The phase-5 loss for one batch; ``views``: student logits per view, each ``(B, C)``;
    ``teachers``: ``(B, K, C)`` (ignored for ``mode='none'``)."""
    if mode not in KD_MODES:
        raise ValueError(f"mode must be one of {KD_MODES}, got {mode!r}")
    b = labels.shape[0]
    if mode == "none":
        ce = sum(F.cross_entropy(v.float(), labels) for v in views) / len(views)
        return KDOutput(loss=ce, ce=float(ce.detach()), kd=0.0, selected=0)
    if teachers is None:
        raise ValueError(f"kd mode {mode!r} needs teacher logits")
    teachers = teachers.float()
    if mode == "single":
        target, selected = teachers[:, 0], 1
    else:
        student_mean = torch.stack([v.float() for v in views]).mean(0)
        sel = select_batch_teachers(teachers, student_mean, temperature)
        if not bool(sel.any()):
            sel = torch.zeros_like(sel)
            sel[0] = True
        target, selected = teachers[:, sel].mean(1), int(sel.sum())
    ce_sum = torch.zeros((), device=labels.device)
    kd_sum = torch.zeros((), device=labels.device)
    for v in views:
        ce_sum = ce_sum + F.cross_entropy(v.float(), labels, reduction="sum")
        kd_sum = kd_sum + kl_t(target, v, temperature).sum()
    loss = 0.5 * (ce_sum + kd_sum) / b
    n = len(views) * b
    return KDOutput(loss=loss, ce=float(ce_sum.detach()) / n, kd=float(kd_sum.detach()) / n, selected=selected)

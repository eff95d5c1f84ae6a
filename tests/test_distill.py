"""The phase-5 loss: T·KL, per-batch teacher selection, the halved two-view loss (hand-computed)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ekg.distill import kd_loss, kl_t, select_batch_teachers


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_kl_t_is_t_times_kl_at_temperature() -> None:
    teacher, student = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    # T = 1: p = (.5, .5), q = (.75, .25)
    assert kl_t(teacher, student, 1.0).item() == pytest.approx(_kl([0.5, 0.5], [0.75, 0.25]), rel=1e-6)
    assert kl_t(teacher, student, 1.0).item() == pytest.approx(0.1438410, rel=1e-5)
    # T = 2: q = softmax(log(3)/2, 0) = (√3, 1)/(√3 + 1); T·KL, not T²·KL
    q = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]
    assert kl_t(teacher, student, 2.0).item() == pytest.approx(2 * _kl([0.5, 0.5], q), rel=1e-6)
    assert kl_t(teacher, student, 2.0).item() == pytest.approx(0.0745046, rel=1e-5)
    assert kl_t(student, student, 4.0).item() == pytest.approx(0.0, abs=1e-7)


def test_teacher_selection_keeps_teachers_closer_to_the_best_than_the_student() -> None:
    # one image, two classes: M0 = (0, 0), M1 = (1, 0), M2 = (3, 0); student mean (2, 0)
    teachers = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]]])
    sel = select_batch_teachers(teachers, torch.tensor([[2.0, 0.0]]), 1.0)
    assert sel.tolist() == [True, True, False]
    # a student closer to M0 than any other teacher: only teacher 0
    assert select_batch_teachers(teachers, torch.tensor([[0.5, 0.0]]), 1.0).tolist() == [True, False, False]
    # sums over the batch decide, not single images
    t2 = torch.tensor([[[0.0, 0.0], [2.5, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    s2 = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    assert select_batch_teachers(t2, s2, 1.0).tolist() == [True, True]  # 1 image far + 1 at 0 < 2 images at 2


def test_ensemble_loss_by_hand() -> None:
    teachers = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]]])
    v1, v2 = torch.tensor([[2.5, 0.0]], requires_grad=True), torch.tensor([[1.5, 0.0]], requires_grad=True)
    labels = torch.tensor([1])
    out = kd_loss([v1, v2], labels, teachers, mode="ensemble", temperature=1.0)
    assert out.selected == 2  # M0 and M1 (student mean (2, 0), as above)
    mbar = _softmax([0.5, 0.0])  # mean of M0 and M1
    want = 0.0
    for s in ([2.5, 0.0], [1.5, 0.0]):
        q = _softmax(s)
        want += -math.log(q[1]) + _kl(mbar, q)
    want *= 0.5  # / B (= 1), gradient halved
    assert out.loss.item() == pytest.approx(want, rel=1e-6)
    # the halving is in the gradient too
    out.loss.backward()
    g_half = v1.grad.clone()
    v1.grad = None
    full = F.cross_entropy(v1, labels, reduction="sum") + kl_t(torch.tensor([[0.5, 0.0]]), v1, 1.0).sum()
    full.backward()
    assert torch.allclose(g_half, 0.5 * v1.grad, atol=1e-7)


def test_single_uses_teacher_zero_and_none_is_plain_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(6, 10, generator=g) for _ in range(2)]
    labels = torch.randint(0, 10, (6,), generator=g)
    teachers = torch.randn(6, 3, 10, generator=g)
    single = kd_loss(views, labels, teachers, mode="single", temperature=4.0)
    want = sum(F.cross_entropy(v, labels, reduction="sum") + kl_t(teachers[:, 0], v, 4.0).sum() for v in views) / 6 / 2
    assert single.loss.item() == pytest.approx(want.item(), rel=1e-6) and single.selected == 1
    none = kd_loss(views[:1], labels, None, mode="none")
    assert none.loss.item() == pytest.approx(F.cross_entropy(views[0], labels).item(), rel=1e-6)
    with pytest.raises(ValueError):
        kd_loss(views, labels, None, mode="ensemble")


def test_no_teacher_selected_falls_back_to_teacher_zero() -> None:
    # the student equals M0: curr = 0, nothing is strictly closer; M̄ = M0, no division by zero
    teachers = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])
    v = torch.tensor([[1.0, 0.0]])
    out = kd_loss([v, v], torch.tensor([0]), teachers, mode="ensemble", temperature=4.0)
    assert out.selected == 1 and math.isfinite(out.loss.item())
    assert out.kd == pytest.approx(0.0, abs=1e-7)


def test_default_temperature_follows_the_number_of_classes():
    from ekg.train import TrainConfig, default_temperature

    assert default_temperature(10) == 4.0 and default_temperature(100) == 4.0
    assert default_temperature(1000) == 10.0
    TrainConfig(temperature=None).validate()
    from ekg.errors import EkgError

    with pytest.raises(EkgError, match="`temperature`"):
        TrainConfig(temperature=0.0).validate()

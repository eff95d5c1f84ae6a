"""Baseline training on the real subset: the loss falls, and --resume equals an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from ekg import train as train_mod
from ekg.checkpoint import load_checkpoint
from ekg.cli import main
from ekg.errors import EkgError
from ekg.train import TrainConfig, lr_at, train

pytestmark = pytest.mark.slow


def small_cfg(**kw) -> TrainConfig:
    base = dict(arch="resnet20_a", epochs=3, batch_size=64, lr=0.05, limit_train=768, limit_test=256,
                device="cpu", seed=3, schedule="cosine")
    return TrainConfig(**{**base, **kw})


def read_log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_lr_schedules():
    cfg = TrainConfig(epochs=100, lr=0.1, schedule="step")
    assert lr_at(cfg, 0.0) == 0.1 and lr_at(cfg, 0.49) == 0.1
    assert lr_at(cfg, 0.5) == pytest.approx(0.01) and lr_at(cfg, 0.8) == pytest.approx(0.001)
    cfg = TrainConfig(epochs=100, lr=0.1, schedule="cosine", warmup_epochs=10)
    assert lr_at(cfg, 0.05) == pytest.approx(0.05)
    assert lr_at(cfg, 0.1) == pytest.approx(0.1) and lr_at(cfg, 0.55) == pytest.approx(0.05)


def test_training_loss_falls_and_the_model_reloads(tmp_path, exact, cifar10_exact, capsys):
    run = tmp_path / "run"
    path = train(small_cfg(limit_test=None), exact, run, progress=False)
    log = read_log(run)
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.1
    assert (run / "config.json").exists() and (run / "tb").is_dir() and any((run / "tb").iterdir())
    ckpt = load_checkpoint(path)
    assert ckpt.arch == "resnet20_a" and ckpt.normalization["name"] == "cifar10"
    # the saved model reproduces the last logged test accuracy through `ekg test`
    code = main(["test", "--model", str(path), "--data", str(cifar10_exact), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["n_images"] == 1017
    assert res["top1"] == pytest.approx(log[-1]["test_top1"]) and res["loss"] == pytest.approx(log[-1]["test_loss"], rel=1e-5)


def test_resume_after_interrupt_equals_uninterrupted(tmp_path, exact, monkeypatch):
    cfg = small_cfg(epochs=2, limit_train=384)
    full = tmp_path / "full"
    train(cfg, exact, full, progress=False)

    # Interrupt in the middle of epoch 2 (after its training steps, before its checkpoint).
    part = tmp_path / "part"
    real_evaluate = train_mod.evaluate
    calls = {"n": 0}

    def flaky_evaluate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(train_mod, "evaluate", flaky_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, exact, part, progress=False)
    monkeypatch.setattr(train_mod, "evaluate", real_evaluate)
    assert [r["epoch"] for r in read_log(part)] == [1]
    assert torch.load(part / "last.pt", weights_only=True)["epoch"] == 1

    with pytest.raises(EkgError, match="`resume=True`"):
        train(cfg, exact, part, progress=False)
    train(cfg, exact, part, resume=True, progress=False)
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    la, lb = read_log(full), read_log(part)
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb]


def test_resume_refuses_changed_settings(tmp_path, exact):
    run = tmp_path / "run"
    train(small_cfg(epochs=1, limit_train=128), exact, run, progress=False)
    with pytest.raises(EkgError, match="lr"):
        train(small_cfg(epochs=2, limit_train=128, lr=0.2), exact, run, resume=True, progress=False)
    with pytest.raises(EkgError, match="nothing to resume"):
        train(small_cfg(), exact, tmp_path / "empty", resume=True, progress=False)


def test_resume_drops_log_lines_past_the_saved_epoch(tmp_path):
    from ekg.train import _truncate_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n{"epoch": 4, "tra')  # killed mid-line
    _truncate_log(log, 2)
    assert log.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'


def test_a_training_set_smaller_than_one_batch_is_refused(tmp_path, exact):
    cfg = TrainConfig(arch="resnet20", epochs=1, batch_size=64, limit_train=40, limit_test=16, device="cpu")
    with pytest.raises(EkgError, match="40 images, fewer than one batch of 64"):
        train(cfg, exact, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing half-written

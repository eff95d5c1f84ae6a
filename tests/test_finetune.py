"""Fine-tuning a pruned model from the memory bank (`ekg finetune`), on the real exact subset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ekg.bank import bank_for_run
from ekg.checkpoint import load_checkpoint
from ekg.cli import main
from ekg.errors import EkgError
from ekg.train import TrainConfig, train

pytestmark = pytest.mark.slow


def test_finetune_cli_with_the_memory_bank(pruned_run, cifar10_exact, capsys):
    out = pruned_run / "ft"
    assert main(["finetune", "--model", str(pruned_run / "pruned.pt"), "--bank", str(pruned_run),
                 "--data", str(cifar10_exact), "--out", str(out), "--epochs", "2", "--limit-train", "512",
                 "--limit-test", "256", "--teachers", "3", "--quiet"]) == 0
    capsys.readouterr()
    bank = np.load(pruned_run / "bank" / "logits.npy", mmap_mode="r")
    assert bank.shape == (5085, 10, 3) and bank.dtype == np.float16
    info = json.loads((pruned_run / "bank" / "bank.json").read_text())
    assert info["teachers"][0]["val_loss"] == min(t["val_loss"] for t in info["teachers"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(1 <= r["teachers_selected"] <= 3 and r["kd_loss"] >= 0 for r in log)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kd"] == "ensemble" and cfg["augment"]["jitter"] and cfg["milestones"] == [0.3, 0.6, 0.8]
    assert cfg["temperature"] == 4.0  # the default for 10 classes
    # the fine-tuned model keeps the pruned architecture and reloads through `ekg test`
    pruned, tuned = load_checkpoint(pruned_run / "pruned.pt"), load_checkpoint(out / "model.pt")
    assert tuned.spec == pruned.spec
    assert not all(torch.equal(a, b) for a, b in zip(pruned.model.state_dict().values(),
                                                     tuned.model.state_dict().values()))
    assert main(["test", "--model", str(out / "model.pt"), "--data", str(cifar10_exact), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["flops"] == json.loads((pruned_run / "search.jsonl").read_text().splitlines()[-1])["flops"]
    assert res["top1"] > 50


def test_kd_needs_a_bank_and_none_does_not(pruned_run, cifar10_exact, capsys, tmp_path):
    code = main(["finetune", "--model", str(pruned_run / "pruned.pt"), "--data", str(cifar10_exact),
                 "--out", str(tmp_path / "x"), "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "--bank" in err and "Traceback" not in err
    assert main(["finetune", "--model", str(pruned_run / "pruned.pt"), "--data", str(cifar10_exact), "--kd", "none",
                 "--out", str(tmp_path / "plain"), "--epochs", "1", "--limit-train", "256", "--limit-test", "128",
                 "--quiet"]) == 0
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert cfg["kd"] == "none" and not cfg["augment"]["jitter"]
    code = main(["finetune", "--model", str(pruned_run / "pruned.pt"), "--data", str(cifar10_exact),
                 "--bank", str(tmp_path), "--out", str(tmp_path / "y"), "--epochs", "1", "--quiet"])
    assert code == 1 and "not a finished `ekg prune` run" in capsys.readouterr().err


def test_finetune_resume_after_a_kill_finishes_like_an_uninterrupted_run(pruned_run, exact, tmp_path):
    bank = bank_for_run(pruned_run, exact.train, teachers=3, progress=False)
    init = load_checkpoint(pruned_run / "pruned.pt")
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.01, schedule="step", milestones=(0.3, 0.6, 0.8), gamma=0.2,
                      kd="ensemble", limit_train=256, limit_test=64)
    train(cfg, exact, tmp_path / "full", progress=False, init=init, bank=bank)

    def kill_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, exact, tmp_path / "part", progress=False, init=init, bank=bank, on_epoch=kill_after_first)
    with pytest.raises(EkgError, match="`resume=True`"):
        train(cfg, exact, tmp_path / "part", progress=False, init=init, bank=bank)
    train(cfg, exact, tmp_path / "part", resume=True, progress=False, init=init, bank=bank)
    a = load_checkpoint(tmp_path / "full" / "model.pt").model.state_dict()
    b = load_checkpoint(tmp_path / "part" / "model.pt").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [(tmp_path / d / "log.jsonl").read_text().splitlines() for d in ("full", "part")]
    assert [json.loads(r)["epoch"] for r in logs[1]] == [1, 2, 3]


def test_finetune_killed_with_sigkill_resumes_and_finishes(pruned_run, cifar10_exact, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ekg.cli", "finetune", "--model", str(pruned_run / "pruned.pt"), "--bank",
           str(pruned_run), "--data", str(cifar10_exact), "--out", str(out), "--epochs", "4", "--batch-size", "64",
           "--limit-train", "512", "--limit-test", "64", "--teachers", "3", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = out / "log.jsonl"
    deadline = time.time() + 600
    while not (out / "last.pt").exists():  # the first epoch is committed
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # no clean-up handlers run
    proc.wait()
    done = len(log.read_text().splitlines())
    assert 1 <= done < 4
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert epochs[-1] == 4 and sorted(set(epochs)) == [1, 2, 3, 4]
    assert not list(out.glob(".*.tmp"))  # no half-written file left behind
    assert load_checkpoint(out / "model.pt").meta["epoch"] == 4

"""torchrun: `ekg prune` and `ekg finetune` on 2 processes (gloo, CPU) decide what one process decides.

Also the building blocks on their own: the row split, the summed gradients with BN over all ranks
(== one process on the whole batch), and evaluation/search sums that do not depend on the number
of processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import independent_step0
from ekg.checkpoint import load_checkpoint
from ekg.distributed import Dist

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def torchrun(nproc: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N --no-python ekg ARGS`` (the torchrun module of this
    interpreter, the ekg script beside it), on the CPU."""
    ekg = shutil.which("ekg", path=str(BIN)) or shutil.which("ekg")
    assert ekg, "the ekg console script is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--no-python", ekg, *args, "--device", "cpu", "--quiet"]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_row_split_covers_every_row_once():
    for n in (7, 8, 128):
        for world in (1, 2, 3):
            parts = [Dist(rank=r, world_size=world).part(n) for r in range(world)]
            assert sum((list(range(n))[p] for p in parts), []) == list(range(n))
            shards = [Dist(rank=r, world_size=world).shard(n) for r in range(world)]
            assert sorted(sum(shards, [])) == list(range(n))


def test_prune_and_finetune_on_two_processes_match_one(tmp_path, shared_data, cifar10_exact, exact):
    model = shared_data / "pretrained/akamaster/resnet20-12fca82f.th"
    runs = {}
    for nproc in (1, 2):
        run = tmp_path / f"np{nproc}"
        out = torchrun(nproc, "prune", "--model", str(model), "--data", str(cifar10_exact), "--keep", "0.85",
                       "--out", str(run), cwd=tmp_path)
        assert out.stdout.count("pruned model:") == 1  # rank 0 alone reports
        torchrun(nproc, "finetune", "--model", str(run / "pruned.pt"), "--bank", str(run), "--data",
                 str(cifar10_exact), "--out", str(run / "ft"), "--epochs", "1", "--batch-size", "64",
                 "--limit-train", "256", "--limit-test", "128", "--teachers", "2", cwd=tmp_path)
        runs[nproc] = run
    one, two = runs[1], runs[2]
    # the same search: the same group at every step, the same final widths
    steps = [[json.loads(line) for line in (r / "search.jsonl").read_text().splitlines()] for r in (one, two)]
    assert [s["group"] for s in steps[0]] == [s["group"] for s in steps[1]] and len(steps[0]) > 2
    # under torchrun too the search runs BN on batch statistics (an independent step-0 forward)
    want = independent_step0(two, exact.train, "batch")
    assert steps[1][0]["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4)
    assert abs(independent_step0(two, exact.train, "running")["val_loss"] - want["val_loss"]) > 1e-3 * want["val_loss"]
    for a, b in zip(*steps):
        assert a["j"] == pytest.approx(b["j"], rel=1e-4)
        assert a["val_accuracy"] == b["val_accuracy"]
    widths = [json.loads((r / "widths.json").read_text())["groups"] for r in (one, two)]
    assert widths[0] == widths[1]
    assert any(g["kept"] < g["channels"] for g in widths[0].values())
    # every artifact once, written whole by rank 0
    for name in ("config.json", "adapted.pt", "search_state.pt", "history.pt", "pruned.pt", "bank/logits.npy",
                 "bank/bank.json", "ft/model.pt", "ft/last.pt", "ft/log.jsonl"):
        assert (two / name).exists(), name
    assert not list(two.rglob(".*.tmp")) and not (two / "bank" / "logits.partial.npy").exists()
    # the bank: the same teachers, the same rows (each rank wrote its batches)
    banks = [json.loads((r / "bank" / "bank.json").read_text()) for r in (one, two)]
    assert [t["history_index"] for t in banks[0]["teachers"]] == [t["history_index"] for t in banks[1]["teachers"]]
    import numpy as np

    la, lb = (np.load(r / "bank" / "logits.npy").astype(np.float32) for r in (one, two))
    assert np.abs(la - lb).max() < 0.05 and np.abs(lb).min() >= 0 and (lb != 0).mean() > 0.99
    # fine-tuning keeps the widths; one log line per epoch, test accuracy over the whole limit-test set
    tuned = [load_checkpoint(r / "ft" / "model.pt") for r in (one, two)]
    assert tuned[0].spec == tuned[1].spec == load_checkpoint(one / "pruned.pt").spec
    logs = [[json.loads(line) for line in (r / "ft" / "log.jsonl").read_text().splitlines()] for r in (one, two)]
    assert [len(lg) for lg in logs] == [1, 1]
    assert abs(logs[0][0]["test_top1"] - logs[1][0]["test_top1"]) < 10
    # resuming a finished run on 2 processes is a no-op that succeeds
    torchrun(2, "prune", "--model", str(model), "--data", str(cifar10_exact), "--keep", "0.85", "--out", str(two),
             "--resume", cwd=tmp_path)
    assert json.loads((two / "widths.json").read_text())["groups"] == widths[0]
    # `ekg run` on 2 processes continues that run directory: its search and bank are re-used,
    # then fine-tuning and the comparison, reported once
    out = torchrun(2, "run", "--model", str(model), "--data", str(cifar10_exact), "--keep", "0.85", "--out", str(two),
                   "--preset", "quick", "--epochs", "1", "--limit-train", "256", cwd=tmp_path)
    assert out.stdout.count("final model:") == 1
    summary = json.loads((two / "summary.json").read_text())
    assert summary["pruned"]["flops"] == steps[1][-1]["flops"] and (two / "final.pt").exists()


def test_ddp_step_on_two_processes_equals_two_micro_batches_on_one(tmp_path, shared_data, cifar10_exact):
    """Each rank takes its half of the same batch, as --accum 2 takes two halves: BN sees the same
    64 images either way and DDP averages what accumulation sums, so one step gives the same weights
    (BN running statistics aside: DDP keeps rank 0's)."""
    model = shared_data / "pretrained/akamaster/resnet20-12fca82f.th"
    common = ["--model", str(model), "--data", str(cifar10_exact), "--kd", "none", "--epochs", "1",
              "--batch-size", "128", "--limit-train", "128", "--limit-test", "64", "--lr", "0.05"]
    torchrun(2, "finetune", *common, "--out", str(tmp_path / "ddp"), cwd=tmp_path)
    torchrun(1, "finetune", *common, "--accum", "2", "--out", str(tmp_path / "accum"), cwd=tmp_path)
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True)["model"] for d in ("ddp", "accum"))
    init = load_checkpoint(model).model.state_dict()
    params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert max((a[k] - init[k]).abs().max() for k in params) > 1e-3  # the step moved the weights
    for k in params:
        moved = (a[k] - init[k]).abs().max()
        assert (a[k] - b[k]).abs().max() <= 1e-3 * moved + 1e-7, k


def test_torchrun_errors_are_one_line(tmp_path, cifar10_exact):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           str(BIN / "ekg"), "train", "--arch", "resnet20_a", "--data", str(cifar10_exact), "--out",
           str(tmp_path / "t"), "--batch-size", "6", "--accum", "2", "--device", "cpu", "--quiet"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "not divisible by --accum 2 × 2 processes" in res.stderr
    ours = res.stderr.split("failed (exitcode")[0]  # what follows is the launcher's own report
    assert ours.count("ekg: error:") == 2 and "Traceback" not in ours  # one line per process

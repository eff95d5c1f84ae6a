"""`ekg run`: every phase into one run directory, resumable, with the original-vs-pruned summary."""

from __future__ import annotations

import json

import pytest

from conftest import independent_step0, search_log
from ekg.cli import main

pytestmark = pytest.mark.slow


def test_ekg_run_end_to_end_and_rerun_skips_finished_phases(tmp_path, shared_data, cifar10_exact, exact, capsys):
    run_dir = tmp_path / "RUN"
    src = shared_data / "pretrained/akamaster/resnet20-12fca82f.th"
    args = ["run", "--model", str(src), "--data", str(cifar10_exact), "--keep", "0.85", "--out", str(run_dir),
            "--preset", "quick", "--epochs", "1", "--limit-train", "512", "--teachers", "2", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| top-1 (%) |" in printed and "final.pt" in printed
    summary = json.loads((run_dir / "summary.json").read_text())
    for side in ("original", "pruned"):
        assert {"top1", "top5", "flops", "params", "latency_cpu_ms", "checkpoint_bytes"} <= set(summary[side])
    assert summary["pruned"]["flops"] <= 0.85 * summary["original"]["flops"]
    assert summary["original"]["top1"] == pytest.approx(91.64, abs=0.2)
    # ekg run's search ran BN on batch statistics (an independent step-0 forward of adapted.pt)
    want = independent_step0(run_dir, exact.train, "batch")
    assert search_log(run_dir)[0]["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4)
    assert abs(independent_step0(run_dir, exact.train, "running")["val_loss"] - want["val_loss"]) > 1e-3 * want["val_loss"]
    assert (run_dir / "summary.md").read_text().count("|") > 20
    # the final checkpoint reloads with `ekg test` and gives the numbers the run reported
    assert main(["test", "--model", str(run_dir / "final.pt"), "--data", str(cifar10_exact), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for k in ("top1", "top5", "flops", "params"):
        assert res[k] == summary["pruned"][k], k
    # re-running does not repeat finished phases
    stamps = {p: (run_dir / p).stat().st_mtime_ns for p in ("pruned.pt", "bank/logits.npy", "finetune/last.pt")}
    assert main(args) == 0
    capsys.readouterr()
    assert stamps == {p: (run_dir / p).stat().st_mtime_ns for p in stamps}
    # other settings in the same directory are refused
    assert main(args[:-1] + ["--kd", "none", "--quiet"]) == 1
    assert "other settings" in capsys.readouterr().err


def test_summary_shows_gpu_latency_when_measured():
    """A run on a GPU adds fp32 GPU latency rows (batch sizes of the CPU rows, and 256)."""
    from ekg.pipeline import summary_markdown

    side = {"top1": 90.0, "top5": 99.0, "loss": 0.3, "flops": 2e6, "params": 1e5, "n_images": 10,
            "latency_cpu_ms": {"b1": 2.0}, "checkpoint_bytes": 1e6}
    s = {"settings": {"keep": 0.5, "preset": "quick", "kd": "ensemble"}, "flops_convention": "MACs",
         "original": side, "pruned": side, "flops_reduction": 0.5, "params_reduction": 0.5}
    assert "GPU latency" not in summary_markdown(s)
    gpu = {**side, "latency_gpu_ms": {"b1": 0.5, "b256": 3.25}, "gpu": "NVIDIA H200"}
    text = summary_markdown({**s, "original": gpu, "pruned": gpu})
    assert "| GPU latency batch 256 (ms, median, fp32, NVIDIA H200) | 3.250 | 3.250 |" in text

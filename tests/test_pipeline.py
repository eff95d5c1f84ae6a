"""`ekg run`: every phase into one run directory, resumable, with the original-vs-pruned summary."""

from __future__ import annotations

import json

import pytest

from ekg.cli import main

pytestmark = pytest.mark.slow


def test_ekg_run_end_to_end_and_rerun_skips_finished_phases(tmp_path, shared_data, cifar10_exact, capsys):
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

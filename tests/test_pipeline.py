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
    assert main(args[:-3] + ["--kd", "none", "--quiet"]) == 1  # without --teachers, which --kd none refuses
    assert "other settings (kd: ensemble saved, none requested" in capsys.readouterr().err


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


def _latency_summary(**extra):
    side = {"top1": 90.0, "top5": 99.0, "loss": 0.3, "flops": 2e6, "params": 1e5, "n_images": 10,
            "latency_cpu_ms": {"b1": 2.0}, "checkpoint_bytes": 1e6}
    return {"settings": {"keep": 0.5, "preset": "quick", "kd": "ensemble"}, "flops_convention": "MACs",
            "original": side, "pruned": {**side, "latency_cpu_ms": {"b1": 1.0}}, "flops_reduction": 0.5,
            "params_reduction": 0.5, **extra}


def test_summary_shows_the_interleaved_speed_up_and_its_range():
    from ekg.pipeline import summary_markdown

    sp = {"median": 1.84, "q1": 1.8, "q3": 1.9, "min": 1.7, "max": 1.95, "rounds": 10, "iters_per_round": 3}
    text = summary_markdown(_latency_summary(latency_cpu_speedup={"b1": sp}))
    assert "| CPU latency batch 1 (ms, median) | 2.00 | 1.00; speed-up 1.84× (IQR 1.80–1.90, range 1.70–1.95 over 10 rounds) |" in text
    assert "timed interleaved" in text
    # a summary.json written before the speed-up was measured still renders
    old = summary_markdown(_latency_summary())
    assert "| CPU latency batch 1 (ms, median) | 2.00 | 1.00 |" in old and "interleaved" not in old


def test_measure_times_original_and_pruned_together(tmp_path, monkeypatch, slim_checkpoint):
    """The summary's latency comes from one interleaved comparison per batch size (both models in
    each call), not from two separate measurements."""
    from conftest import random_splits

    from ekg import pipeline
    from ekg.checkpoint import Checkpoint, save_checkpoint
    from ekg.data import get_normalization
    from ekg.models import create_model

    original = Checkpoint(model=create_model("resnet20", 10),
                          normalization={"name": "cifar10", **get_normalization("cifar10").to_dict()},
                          dataset={"name": "cifar10", "num_classes": 10})
    paths = save_checkpoint(original, tmp_path / "original.pt"), save_checkpoint(slim_checkpoint, tmp_path / "final.pt")
    calls, real = [], pipeline.compare_latency

    def spy(models, input_size, batch_size, *, device):
        calls.append((list(models), batch_size, str(device)))
        return real(models, input_size, batch_size, device=device, rounds=3, iters_per_round=1, warmup=0)

    monkeypatch.setattr(pipeline, "compare_latency", spy)
    res = pipeline._measure(*paths, random_splits("cifar10", 32, 1), (1, 2))
    assert calls == [(["original", "pruned"], 1, "cpu"), (["original", "pruned"], 2, "cpu")]
    for side in ("original", "pruned"):
        assert set(res[side]["latency_cpu_ms"]) == {"b1", "b2"} and "latency_gpu_ms" not in res[side]
    sp = res["latency_cpu_speedup"]["b2"]
    assert sp["rounds"] == 3 and len(sp["per_round"]) == 3 and sp["min"] <= sp["median"] <= sp["max"]
    assert res["pruned"]["flops"] < res["original"]["flops"]
    text = pipeline.summary_markdown({**_latency_summary(), **res})
    assert text.count("; speed-up ") == 2  # one per batch size

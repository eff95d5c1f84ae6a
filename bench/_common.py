"""Helpers shared by the benchmark scripts: where the shared data is, what machine this is."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def shared_data_root() -> Path:
    """``$EKG_SHARED_DATA``, else the ``shared/data`` folder beside the repository."""
    env = os.environ.get("EKG_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def cpu_model() -> str:
    """The CPU's model name (the one ``ekg.latency`` keys its tables by)."""
    from ekg.latency import device_name

    return device_name("cpu")


def machine(device: str = "cpu") -> str:
    """One line naming the CPU, cores, torch build and threads, and the device."""
    dev = device
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name()})"
    return (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), device {dev}")


def paired(a: np.ndarray, b: np.ndarray, rounds: int = 2000, seed: int = 0) -> dict:
    """Accuracy difference b - a (points) with a paired bootstrap 95% interval."""
    rng = np.random.default_rng(seed)
    n = len(a)
    idx = rng.integers(0, n, size=(rounds, n))
    diffs = (b[idx].mean(1) - a[idx].mean(1)) * 100
    return {"diff": round(float((b.mean() - a.mean()) * 100), 2),
            "ci95": [round(float(np.percentile(diffs, 2.5)), 2), round(float(np.percentile(diffs, 97.5)), 2)],
            "only_ref_right": int((a & ~b).sum()), "only_this_right": int((b & ~a).sum())}


def finetune_and_test(cfg, data, folder: Path, pruned, bank) -> tuple[dict, np.ndarray]:
    """Fine-tune ``pruned`` with ``cfg`` (and ``bank``, None for ``--kd none``) into ``folder``,
    continuing an interrupted run there, then test it on ``data.test``. Returns the row (top-1,
    top-5, loss, training seconds, teachers selected per epoch) and which test images it got right."""
    import json

    from ekg.checkpoint import load_checkpoint
    from ekg.data import get_normalization
    from ekg.evaluate import metrics_from_logits, predict_logits
    from ekg.train import train

    train(cfg, data, folder, resume=(folder / "last.pt").exists(), progress=False, init=pruned, bank=bank)
    model = load_checkpoint(folder / "model.pt").model
    labels = data.test.labels
    logits = predict_logits(model, data.test, get_normalization(pruned.normalization))
    m = metrics_from_logits(logits, labels)
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    row = {"top1": round(m["top1"], 2), "top5": round(m["top5"], 2), "loss": round(m["loss"], 4),
           "train_s": round(sum(r["seconds"] for r in log), 1),
           "teachers_selected": [round(r.get("teachers_selected", 0), 2) for r in log]}
    return row, (logits.argmax(1) == labels).numpy()

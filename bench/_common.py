"""Helpers shared by the benchmark scripts: where the shared data is, what machine this is."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch


def shared_data_root() -> Path:
    """``$EKG_SHARED_DATA``, else the ``shared/data`` folder beside the repository."""
    env = os.environ.get("EKG_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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

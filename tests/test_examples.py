"""The examples run end to end on real data: examples/prune_your_own_cnn.py prunes a user-defined
CNN on scikit-learn's digits (real 8x8 scans in a torch Dataset of normalised floats) through
``ekg.prune`` → ``ekg.finetune`` and keeps its accuracy at half the FLOPs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_prune_your_own_cnn_keeps_its_accuracy_at_half_the_flops(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, str(ROOT / "examples/prune_your_own_cnn.py"), "--out", str(tmp_path / "digits"),
                          "--epochs", "5"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    before, after = (float(v) for v in re.search(r"original ([\d.]+)%\s+pruned \+ fine-tuned ([\d.]+)%", out).groups())
    ratio = float(re.search(r"\(([\d.]+) of the original\)", out).group(1))
    assert before > 97 and after >= before - 1.5, out  # the pretrained CNN is good, and stays good
    assert ratio <= 0.5, out
    assert (tmp_path / "digits/prune/pruned.pt").is_file() and (tmp_path / "digits/prune/finetune/model.pt").is_file()
    assert "carving 15 + 121 per class" in run.stderr  # 136 training images of the digit 8

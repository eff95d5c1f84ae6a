"""ekg.plots: the trajectory and widths figures are valid 150 dpi PNGs, written atomically."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from ekg.plots import DPI, plot_trajectory, plot_widths  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _synthetic_log(steps: int = 50, keep: float = 0.45) -> list[dict]:
    """Rows shaped like SearchState.log: step 0 is the unpruned network, ratio falls to ``keep``."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(steps + 1):
        ratio = 1.0 - (1.0 - keep) * s / steps
        loss = 0.2 + 0.6 * (1 - ratio) ** 2 + 0.01 * rng.random()
        rows.append({"step": s, "group": None if s == 0 else s % 7, "flops_ratio": ratio, "val_loss": loss,
                     "j": 2 * loss + 0.05, "val_accuracy": 95.0 - 15 * (1 - ratio) ** 2, "seconds": 0.1})
    return rows


def _read_png(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    return img


def _only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_trajectory_png(tmp_path: Path) -> None:
    log = _synthetic_log(50)
    out = plot_trajectory(log, tmp_path / "trajectory.png")
    assert out == tmp_path / "trajectory.png"
    img = _read_png(out)
    # 8 x 6.5 inches at 150 dpi, not cropped
    assert img.shape[:2] == (round(6.5 * DPI), 8 * DPI)
    assert img[..., :3].std() > 0.05  # something was drawn
    assert _only(tmp_path) == ["trajectory.png"]  # atomic: no temp file left behind


def test_trajectory_nonpositive_and_short_logs(tmp_path: Path) -> None:
    log = _synthetic_log(3)
    log[1]["val_loss"] = 0.0  # no log scale possible
    plot_trajectory(log, tmp_path / "a.png")
    plot_trajectory(_synthetic_log(50)[:1], tmp_path / "one.png")  # only the unpruned network
    for name in ("a.png", "one.png"):
        _read_png(tmp_path / name)
    with pytest.raises(ValueError):
        plot_trajectory([], tmp_path / "empty.png")
    assert _only(tmp_path) == ["a.png", "one.png"]


def test_widths_png_scales_with_group_count(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    sizes = {}
    for n in (30, 60):
        names = [f"layer{1 + i // 20}.{i % 20}.conv1" for i in range(n)]
        before = [int(rng.choice([16, 32, 64])) for _ in range(n)]
        after = [max(1, int(b * rng.uniform(0.2, 1.0))) for b in before]
        path = plot_widths(names, before, after, tmp_path / "sub" / f"widths{n}.png", title=f"{n} groups")
        img = _read_png(path)
        sizes[n] = img.shape[1]
        assert img.shape[1] >= 40 * n  # at least ~40 px per group for the rotated labels
    assert sizes[60] > sizes[30]
    assert _only(tmp_path / "sub") == ["widths30.png", "widths60.png"]
    with pytest.raises(ValueError):
        plot_widths(["a", "b"], [1, 2], [1], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_overwrite_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A render that fails leaves the previous figure in place and no temp file."""
    import matplotlib.figure

    dest = tmp_path / "widths.png"
    plot_widths(["a", "b", "c"], [16, 32, 64], [8, 16, 30], dest)
    before = dest.read_bytes()

    def boom(self, *args, **kwargs):  # noqa: ANN001
        raise RuntimeError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_widths(["a", "b", "c"], [16, 32, 64], [1, 1, 1], dest)
    assert dest.read_bytes() == before
    assert _only(tmp_path) == ["widths.png"]


def test_import_stays_light() -> None:
    code = "import sys, ekg, ekg.plots; assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)

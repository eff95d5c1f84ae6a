"""Figures of a pruning run: the search trajectory and the per-group widths.

matplotlib is imported inside the functions (Agg backend, no display needed), so ``import ekg``
stays light. Every figure is a 150 dpi PNG written atomically (:func:`ekg.io.atomic_path`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from .io import atomic_path

DPI = 150


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> Path:
    plt = _pyplot()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return path


def _values(log: Sequence[dict[str, Any]], key: str) -> list[float]:
    out = []
    for row in log:
        v = row.get(key)
        out.append(float(v) if v is not None else math.nan)
    return out


def plot_trajectory(log: list[dict], path: str | os.PathLike) -> Path:
    """The search trajectory: val loss and J (top) and val accuracy (bottom) against the FLOPs
    ratio, which falls from 1.0 to the budget (x axis inverted so the search reads left to right).

    ``log`` rows as in ``SearchState.log`` (keys ``step``, ``flops_ratio``, ``val_loss``,
    ``val_accuracy``, ``j``). Returns ``path``."""
    if not log:
        raise ValueError("plot_trajectory needs at least one log row")
    plt = _pyplot()
    x = _values(log, "flops_ratio")
    loss, j, acc = _values(log, "val_loss"), _values(log, "j"), _values(log, "val_accuracy")
    steps = [row.get("step", i) for i, row in enumerate(log)]

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6.5), constrained_layout=True)
    marker = "o" if len(log) <= 60 else None
    top.plot(x, loss, marker=marker, markersize=3, lw=1.5, color="tab:blue", label="val CE loss")
    top.plot(x, j, marker=marker, markersize=3, lw=1.5, color="tab:orange", label="J (CE + ensemble CE)")
    finite = [v for v in loss + j if math.isfinite(v)]
    if finite and min(finite) > 0:
        top.set_yscale("log")
    top.set_ylabel("val loss / J (per sample)")
    bottom.plot(x, acc, marker=marker, markersize=3, lw=1.5, color="tab:green", label="val accuracy")
    bottom.set_ylabel("val accuracy (%)")
    bottom.set_xlabel("FLOPs ratio (conv + linear MACs, pruned / original)")

    # the final sub-network
    xf = x[-1]
    for ax, ys in ((top, (loss[-1], j[-1])), (bottom, (acc[-1],))):
        for y in ys:
            if math.isfinite(xf) and math.isfinite(y):
                ax.plot([xf], [y], marker="*", markersize=14, color="tab:red", zorder=5, linestyle="none")
    if math.isfinite(xf) and math.isfinite(acc[-1]):
        bottom.annotate(f"final: ratio {xf:.3f}, acc {acc[-1]:.2f}%, step {steps[-1]}", (xf, acc[-1]),
                        textcoords="offset points", xytext=(-10, 12), ha="right", fontsize=9, color="tab:red")
    top.plot([], [], marker="*", markersize=10, color="tab:red", linestyle="none", label="final")

    finite_x = [v for v in x if math.isfinite(v)]
    if finite_x:
        lo, hi = min(finite_x), max(finite_x)
        pad = max(0.01, 0.03 * (hi - lo))
        bottom.set_xlim(hi + pad, lo - pad)  # inverted: the search goes from 1.0 down to the budget
    for ax in (top, bottom):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    n_steps = len(log) - 1
    top.set_title(f"Search trajectory ({n_steps} step{'' if n_steps == 1 else 's'})")
    return _save(fig, path)


def plot_widths(names: list[str], before: list[int], after: list[int], path: str | os.PathLike,
                title: str = "") -> Path:
    """Grouped bars of every channel group's width, original vs pruned. The figure widens with
    the number of groups so that 30–60 rotated labels stay readable. Returns ``path``."""
    if not (len(names) == len(before) == len(after)):
        raise ValueError(f"names, before and after must have the same length, got "
                         f"{len(names)}, {len(before)}, {len(after)}")
    plt = _pyplot()
    n = len(names)
    width_in = min(max(6.0, 0.32 * n + 2.0), 40.0)
    longest = max((len(str(s)) for s in names), default=0)
    height_in = 4.0 + min(longest, 40) * 0.07
    fig, ax = plt.subplots(figsize=(width_in, height_in), constrained_layout=True)
    pos = list(range(n))
    bar = 0.4
    ax.bar([p - bar / 2 for p in pos], before, bar, label="original", color="tab:gray", alpha=0.6)
    ax.bar([p + bar / 2 for p in pos], after, bar, label="pruned", color="tab:blue")
    ax.set_xticks(pos)
    ax.set_xticklabels([str(s) for s in names], rotation=70, ha="right", rotation_mode="anchor",
                       fontsize=8 if n <= 40 else 7)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylabel("channels")
    ax.set_xlabel("channel group")
    if n <= 40:  # the kept count on each pruned bar, while there is room for it
        for p, a in zip(pos, after):
            ax.text(p + bar / 2, a, str(a), ha="center", va="bottom", fontsize=6, color="tab:blue")
    top = max(list(before) + list(after) + [1])
    ax.set_ylim(0, top * 1.2)  # headroom for the legend
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9, ncol=2)
    total_b, total_a = sum(before), sum(after)
    ax.set_title(title or f"Channel widths: {total_a} of {total_b} channels kept")
    return _save(fig, path)


def plot_surface_1d(surface: dict[str, Any], out: str | os.PathLike, title: str = "") -> list[Path]:
    """``out/surface_1d.png``: the loss along one filter-normalised direction (``surface`` as
    written by :func:`ekg.landscape.surfaces`: ``alpha``, ``loss``). Returns the paths written."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    ax.plot(surface["alpha"], surface["loss"], lw=1.8, color="tab:blue")
    ax.axvline(0.0, color="tab:gray", lw=0.8, ls="--")
    ax.set_xlabel("α (step along a filter-normalised random direction)")
    ax.set_ylabel("loss (mean cross-entropy)")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"1-D loss surface{': ' + title if title else ''}", fontsize=10)
    return [_save(fig, Path(out) / "surface_1d.png")]


def plot_surface_2d(surface: dict[str, Any], out: str | os.PathLike, title: str = "") -> list[Path]:
    """``out/surface_2d_contour.png`` (filled contours with labelled levels) and
    ``out/surface_2d_3d.png`` (a 3-D surface) of the loss over two filter-normalised directions
    (``alpha``, ``beta``, ``loss[i][j]`` at ``(alpha[i], beta[j])``). Returns the paths written."""
    import numpy as np

    plt = _pyplot()
    a, b = np.asarray(surface["alpha"]), np.asarray(surface["beta"])
    z = np.asarray(surface["loss"], dtype=float)
    A, B = np.meshgrid(a, b, indexing="ij")
    levels = np.linspace(np.nanmin(z), np.nanmax(z), 25) if np.nanmax(z) > np.nanmin(z) else 10
    fig, ax = plt.subplots(figsize=(5.5, 4.8), constrained_layout=True)
    filled = ax.contourf(A, B, z, levels=levels, cmap="viridis")
    lines = ax.contour(A, B, z, levels=levels if isinstance(levels, int) else levels[::3], colors="white",
                       linewidths=0.6)
    ax.clabel(lines, fontsize=7, fmt="%.2f")
    fig.colorbar(filled, ax=ax, label="loss")
    ax.plot([0], [0], marker="*", color="tab:red", markersize=12, linestyle="none")
    ax.set_xlabel("α (direction 1)")
    ax.set_ylabel("β (direction 2)")
    ax.set_title(f"2-D loss contours{': ' + title if title else ''}", fontsize=10)
    paths = [_save(fig, Path(out) / "surface_2d_contour.png")]
    fig = plt.figure(figsize=(6, 5), constrained_layout=True)
    ax3 = fig.add_subplot(projection="3d")
    ax3.plot_surface(A, B, z, cmap="viridis", linewidth=0, antialiased=True)
    ax3.set_xlabel("α")
    ax3.set_ylabel("β")
    ax3.set_zlabel("loss")
    ax3.set_title(f"2-D loss surface{': ' + title if title else ''}", fontsize=10)
    paths.append(_save(fig, Path(out) / "surface_2d_3d.png"))
    return paths


def plot_study(rows: list[dict[str, Any]], metrics: Sequence[str], target: str, correlations: dict[str, Any],
               path: str | os.PathLike) -> Path:
    """One scatter panel per metric of the potential study: the metric (x) against ``target``
    (y, the loss after fine-tuning), points coloured by where the sub-network came from, with
    Spearman's and Kendall's coefficients in the panel title."""
    plt = _pyplot()
    n = len(metrics)
    cols = min(n, 3)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.8 * rows_n), constrained_layout=True,
                             squeeze=False)
    sources = sorted({r.get("source", "") for r in rows})
    bases = sorted({s.replace(" perturbed", "") for s in sources})
    cmap = plt.get_cmap("tab10" if len(bases) <= 10 else "tab20")
    colours = {b: cmap(i % cmap.N) for i, b in enumerate(bases)}
    for ax, m in zip(axes.flat, metrics):
        for s in sources:  # colour: the criterion; filled circle: its run, cross: a perturbation of it
            pts = [(r[m], r[target]) for r in rows if r.get("source", "") == s and r.get(m) is not None]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=24, label=s,
                           color=colours[s.replace(" perturbed", "")], marker="x" if "perturbed" in s else "o")
        c = correlations.get(m, {})
        sp, kd = c.get("spearman", {}), c.get("kendall", {})
        ax.set_title(f"{m}\nSpearman {sp.get('value', math.nan):.2f} [{sp.get('low', math.nan):.2f}, "
                     f"{sp.get('high', math.nan):.2f}], Kendall {kd.get('value', math.nan):.2f}", fontsize=9)
        ax.set_xlabel(m)
        ax.set_ylabel(target)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="best")
    return _save(fig, path)

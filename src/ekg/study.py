"""The potential study: does a sub-network's smoothness predict how well it fine-tunes?

The paper's feasibility experiment at a chosen scale (``ekg study``):

1. **Sub-networks at one budget.** Each pruning run given (``ekg prune`` with different criteria:
   ``--importance l1``, ``--method uniform``, ...) contributes its sub-network, and ``perturb``
   random perturbations of it: in every pruned group a fraction ``f`` of the kept channels
   (``f`` drawn uniformly from ``swap`` per sub-network) is swapped for pruned ones. Widths, hence
   FLOPs, stay exactly those of the run.
2. **Before fine-tuning**, on the same fixed training images for all: the val loss (BN on batch
   statistics, as the search measures it) and the Hessian numbers of :mod:`ekg.landscape`
   (λmax, |λmin|/λmax, trace) of the slim sub-network.
3. **Fine-tuning**: the same short schedule for every sub-network (plain CE, the paper's optimiser
   and lr), then the test loss and accuracy: the sub-network's "potential".
4. **Rank correlations** (Spearman's ρ and Kendall's τ-b) of each number with the test loss after
   fine-tuning, with percentile bootstrap intervals over sub-networks; a scatter plot per number.

Every sub-network's result is a file (``subnets/NAME/result.json``) written when it is finished,
so an interrupted study continues where it stopped (same command).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import EkgError
from .landscape import LandscapeConfig
from .io import check_output_folder, read_json
from .rundir import FINETUNE, TrainDir, check_settings, decision_settings, load_artifact

METRICS = ("val_loss", "lambda_max", "neg_ratio", "trace")
TARGET = "test_loss_after"


# ----------------------------------------------------------------------------- statistics

def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (as scipy.stats.rankdata)."""
    a = np.asarray(x, dtype=float)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    sorted_a = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: Pearson's correlation of the (average-tie) ranks; nan if either is constant."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def kendall(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b (ties corrected); nan if either is constant."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    i, j = np.triu_indices(len(a), k=1)
    dx, dy = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    n1, n2 = float((dx != 0).sum()), float((dy != 0).sum())
    den = math.sqrt(n1 * n2)
    return float((dx * dy).sum() / den) if den > 0 else float("nan")


def bootstrap_interval(x: Sequence[float], y: Sequence[float], stat: Any, *, samples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(x, y)`` over resampled pairs (nan draws dropped)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.RandomState(seed)
    draws = []
    for _ in range(samples):
        idx = rng.randint(0, len(a), len(a))
        v = stat(a[idx], b[idx])
        if math.isfinite(v):
            draws.append(v)
    if not draws:
        return float("nan"), float("nan")
    lo, hi = np.percentile(draws, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def correlations(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = METRICS, target: str = TARGET, *,
                 samples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """For each metric: Spearman and Kendall with ``target`` over ``rows``, each with a 95% interval."""
    out: dict[str, Any] = {}
    for m in metrics:
        pairs = [(r[m], r[target]) for r in rows
                 if r.get(m) is not None and r.get(target) is not None and math.isfinite(r[m])]
        x, y = [p[0] for p in pairs], [p[1] for p in pairs]
        entry: dict[str, Any] = {"n": len(pairs)}
        for name, fn in (("spearman", spearman), ("kendall", kendall)):
            if len(pairs) < 3:
                entry[name] = {"value": float("nan"), "low": float("nan"), "high": float("nan")}
                continue
            lo, hi = bootstrap_interval(x, y, fn, samples=samples, seed=seed)
            entry[name] = {"value": fn(x, y), "low": lo, "high": hi}
        out[m] = entry
    return out


# ----------------------------------------------------------------------------- sub-networks

@dataclass
class SubNetwork:
    name: str
    source: str                         # the criterion of the run it comes from (+ "perturbed")
    run: str
    kept: dict[int, torch.Tensor]       # graph group index -> kept channel indices
    swap: float = 0.0


def perturb(kept: dict[int, torch.Tensor], channels: dict[int, int], fraction: float,
            rng: np.random.RandomState, blocks: dict[int, int] | None = None) -> dict[int, torch.Tensor]:
    """Swap ``round(fraction · kept)`` kept channels of every pruned group for pruned ones
    (at random); the widths are unchanged. A group cut in equal blocks (``blocks[g]`` > 1: a
    grouped conv's) swaps within each block, so that every block keeps as many channels as before."""
    if not 0 <= fraction <= 1:
        raise EkgError(f"a swap fraction must lie in [0, 1], got {fraction}")
    out = {}
    for gi, idx in kept.items():
        n_blocks = (blocks or {}).get(gi, 1)
        width = channels[gi] // n_blocks
        all_kept = idx.cpu().numpy()
        parts = []
        for k in range(n_blocks):
            lo = k * width
            keep = all_kept[(all_kept >= lo) & (all_kept < lo + width)]
            pruned = np.setdiff1d(np.arange(lo, lo + width), keep)
            s = min(int(round(fraction * len(keep))), len(pruned))
            if s == 0:
                parts.append(keep)
                continue
            drop = rng.choice(len(keep), s, replace=False)
            add = rng.choice(pruned, s, replace=False)
            parts.append(np.concatenate([np.delete(keep, drop), add]))
        out[gi] = torch.as_tensor(np.sort(np.concatenate(parts)), dtype=torch.long)
    return out


def _finished_run(run: str | Path) -> Any:
    """The :class:`~ekg.rundir.RunDir` of ``run``, or an error if it is not a finished pruning run."""
    from .rundir import RunDir

    rd = RunDir(run)
    for f in (rd.adapted, rd.search_state, rd.config, rd.pruned):
        if not f.exists():
            raise EkgError(f"{run} is not a finished pruning run ({f.name} is missing); "
                           f"run `ekg prune --out {run}` first")
    return rd


def _run_subnetwork(run: Path, factory: Any = None) -> tuple[Any, Any, dict[int, torch.Tensor], str]:
    """(adapted checkpoint, its dependency graph, kept channels, criterion) of a finished prune run
    (``factory`` rebuilds its checkpoints when they hold a user's module)."""
    from .checkpoint import load_checkpoint
    from .masks import MaskedNetwork
    from .search import SearchConfig, SearchState

    rd = _finished_run(run)
    base = load_checkpoint(rd.adapted, factory=factory)
    state = SearchState.from_dict(load_artifact(rd.search_state))
    cfg = SearchConfig.from_dict(rd.prune_record()["search"])  # type: ignore[index]
    net = MaskedNetwork(base.model, input_size=tuple(base.input_size))
    if len(net.gates) != len(state.rates):
        raise EkgError(f"{run}: its search state does not fit its adapted model")
    for gate, r, rk in zip(net.gates, state.rates, state.ranks):
        gate.rate, gate.ranks = float(r), rk
    kept = net.kept_indices()
    criterion = cfg.importance if cfg.method == "greedy" else f"{cfg.method}-{cfg.importance}"
    return base, net.graph, kept, criterion


# ----------------------------------------------------------------------------- the study

@dataclass
class StudyConfig:
    """Settings of :func:`study`. Defaults: a small CPU-sized study."""

    perturb: int = 3                              # random perturbations per run
    swap: tuple[float, float] = (0.1, 0.6)        # range of the swapped fraction
    finetune_epochs: int = 1
    finetune_lr: float = 0.01
    limit_train: int | None = None
    batch_size: int = 128
    bootstrap: int = 2000
    seed: int = 0
    landscape: LandscapeConfig = field(default_factory=lambda: LandscapeConfig(
        images=256, power_iters=20, power_tol=1e-2, lanczos_steps=20, hutchinson_samples=10, surface_1d=0,
        surface_2d=0))

    def validate(self) -> None:
        if self.perturb < 0:
            raise EkgError(f"`perturb` must be 0 or more, got {self.perturb}")
        lo, hi = self.swap
        if not 0 <= lo <= hi <= 1:
            raise EkgError(f"`swap` must be two fractions 0 <= low <= high <= 1, got {lo} {hi}")
        if self.finetune_epochs < 1:
            raise EkgError(f"`finetune_epochs` must be at least 1, got {self.finetune_epochs}")
        if not 0 < self.finetune_lr < math.inf:
            raise EkgError(f"`finetune_lr` must be a positive finite number, got {self.finetune_lr}")
        if self.limit_train is not None and self.limit_train < 1:
            raise EkgError(f"`limit_train` must be at least 1 (or absent for every image), got {self.limit_train}")
        if self.bootstrap < 0:
            raise EkgError(f"`bootstrap` must be 0 (no intervals) or more resamples, got {self.bootstrap}")
        self.landscape.validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def study(runs: Sequence[str | Path], data: Any, out: str | Path, *, config: StudyConfig | None = None,
          progress: bool = True, model: Any = None, classes: Any = None) -> dict[str, Any]:
    """Run the potential study over the sub-networks of ``runs`` (finished ``ekg prune`` run
    directories of the same model at the same budget) and write ``out/study.json``,
    ``out/study.md`` and ``out/study.png``. Returns the study record. ``data`` as for
    :func:`ekg.prune` (a ``(train, test)`` pair of Datasets with ``classes``, or a name or path);
    ``model``: the ``nn.Module`` the runs pruned, when it is your own (to rebuild their checkpoints)."""
    import copy
    import dataclasses

    from .arch import module_shapes
    from .checkpoint import Checkpoint
    from .user_model import module_factory
    from .data import as_splits, get_normalization
    from .flops import count
    from .io import write_json
    from .landscape import DEFINITIONS, analyse, fixed_batches
    from .plots import plot_study
    from .runtime import resolve_device
    from .slim import slim_model
    from .train import finetune_config, train

    cfg = config or StudyConfig()
    cfg.validate()
    if not runs:
        raise EkgError("give at least one pruning run (`runs`)")
    seen: set[Path] = set()
    for r in runs:
        key = Path(r).resolve()
        if key in seen:
            raise EkgError(f"`runs` names {r} twice: give each pruning run once")
        seen.add(key)
    out = Path(out)
    check_output_folder(out)
    saved_cfg = out / "study_config.json"
    record = {"runs": [str(r) for r in runs], **cfg.to_dict()}
    if saved_cfg.exists():
        saved = read_json(saved_cfg, "delete it (and the study's other files) to start the study over, or choose "
                                     "another `out`")
        check_settings(out, decision_settings("study", saved),
                       decision_settings("study", record), what="a study",
                       fix="use the same settings to continue it, or choose another `out`")
    for r in runs:  # before anything is written
        _finished_run(r)
    splits = as_splits(data, progress=progress, classes=classes)
    factory = None if model is None else module_factory(model)
    device = resolve_device(cfg.landscape.device)
    read = [_run_subnetwork(Path(r), factory) for r in runs]  # each run read and checked before anything is written
    for r, (base, *_) in zip(runs, read):
        if base.num_classes != splits.num_classes:
            raise EkgError(f"{r} predicts {base.num_classes} classes but the data has {splits.num_classes}: "
                           "study runs of a model of the data's classes")
    out.mkdir(parents=True, exist_ok=True)
    write_json(saved_cfg, record)

    subnets: list[tuple[SubNetwork, Any, Any]] = []
    for ri, (r, (base, graph, kept, criterion)) in enumerate(zip(runs, read)):
        run = Path(r)
        channels = {g.index: g.channels for g in graph.groups}
        blocks = {g.index: g.blocks for g in graph.groups}
        label = run.name
        subnets.append((SubNetwork(label, criterion, str(run), kept), base, graph))
        rng = np.random.RandomState(cfg.seed * 7919 + ri)
        for k in range(cfg.perturb):
            f = float(rng.uniform(*cfg.swap))
            subnets.append((SubNetwork(f"{label}~{k + 1}", f"{criterion} perturbed", str(run),
                                       perturb(kept, channels, f, rng, blocks), swap=f), base, graph))

    rows = []
    batches_by_norm: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    bar = tqdm(subnets, desc="study", unit="sub-network", disable=not progress)
    for sub, base, graph in bar:
        bar.set_postfix_str(sub.name)
        folder = out / "subnets" / sub.name
        result_path = folder / "result.json"
        if result_path.exists():
            rows.append(json.loads(result_path.read_text()))
            continue
        t0 = time.perf_counter()
        slim = slim_model(base.model, graph, sub.kept).to(device)
        if cfg.landscape.channels_last:
            slim.to(memory_format=torch.channels_last)
        key = json.dumps(base.normalization, sort_keys=True)
        if key not in batches_by_norm:  # the same fixed images for every sub-network
            batches_by_norm[key] = fixed_batches(splits.train, get_normalization(base.normalization), cfg.landscape,
                                                 device)
        batches = batches_by_norm[key]
        scape = analyse(slim, batches, cfg.landscape, with_surfaces=False, progress=False)
        counts = count(slim, tuple(base.input_size))
        flops, params = counts.flops, counts.params
        record = None if base.record is None else dataclasses.replace(base.record, shapes=module_shapes(slim), pruned=True)
        ckpt = Checkpoint(model=slim.cpu().to(memory_format=torch.contiguous_format),
                          normalization=dict(base.normalization), dataset=dict(base.dataset),
                          input_size=tuple(base.input_size), meta={"source": f"{sub.run} ({sub.name})"}, record=record)
        ft_cfg = finetune_config("none", epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, batch_size=cfg.batch_size,
                                 limit_train=cfg.limit_train, device=str(device), seed=cfg.seed)
        ft = TrainDir(folder / FINETUNE)
        train(ft_cfg, splits, ft.path, init=copy.deepcopy(ckpt), resume=ft.state.exists(), progress=False)
        last = json.loads(ft.log.read_text().strip().splitlines()[-1])
        row = {"name": sub.name, "source": sub.source, "run": sub.run, "swap": sub.swap, "flops": flops,
               "params": params, "val_loss": scape["loss"], "val_accuracy": scape["accuracy"],
               "lambda_max": scape["lambda_max"], "lambda_min": scape["lambda_min"],
               "neg_ratio": scape["neg_ratio"], "trace": scape["trace"], "trace_stderr": scape["trace_stderr"],
               "power_converged": scape["power"]["converged"], TARGET: last["test_loss"],
               "test_top1_after": last["test_top1"], "seconds": time.perf_counter() - t0}
        write_json(result_path, row)
        rows.append(row)
    bar.close()

    corr = correlations(rows, samples=cfg.bootstrap, seed=cfg.seed)
    record = {"subnetworks": rows, "correlations": corr, "target": TARGET, "metrics": list(METRICS),
              "definitions": {**{k: DEFINITIONS[k] for k in ("lambda_max", "neg_ratio", "trace")},
                              "val_loss": "mean cross-entropy on the fixed training images before fine-tuning, "
                                          "BN on batch statistics (as the search)",
                              TARGET: f"test-set cross-entropy after {cfg.finetune_epochs} epoch(s) of plain "
                                      "fine-tuning (BN on running statistics)",
                              "intervals": f"95% percentile bootstrap over sub-networks ({cfg.bootstrap} resamples)"},
              "settings": cfg.to_dict(), "data": splits.source}
    write_json(out / "study.json", record)
    (out / "study.md").write_text(study_markdown(record))
    plot_study(rows, list(METRICS), TARGET, corr, out / "study.png")
    return record


def study_markdown(record: dict[str, Any]) -> str:
    """The study's correlation table and its sub-networks, as Markdown."""
    corr, rows = record["correlations"], record["subnetworks"]
    lines = [f"# Potential study: {len(rows)} sub-networks", "",
             f"Rank correlation of each number (before fine-tuning) with `{record['target']}`; "
             "95% bootstrap intervals over sub-networks.", "",
             "| number | Spearman ρ [95% CI] | Kendall τ [95% CI] |", "|---|---|---|"]
    for m, c in corr.items():
        s, k = c["spearman"], c["kendall"]
        lines.append(f"| {m} | {s['value']:.2f} [{s['low']:.2f}, {s['high']:.2f}] | "
                     f"{k['value']:.2f} [{k['low']:.2f}, {k['high']:.2f}] |")
    lines += ["", "| sub-network | source | val loss | λmax | \\|λmin\\|/λmax | trace | test loss after | "
              "test top-1 after (%) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['source']} | {r['val_loss']:.3f} | {r['lambda_max']:.2f} | "
                     f"{r['neg_ratio']:.3f} | {r['trace']:.1f} | {r[TARGET]:.3f} | {r['test_top1_after']:.2f} |")
    return "\n".join(lines) + "\n"

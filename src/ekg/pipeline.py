"""``ekg run``: the whole method into one run directory, resumable phase by phase.

The layout is :mod:`ekg.rundir`'s: the `ekg prune` artifacts (config.json, adapted.pt, search log,
history, pruned.pt, plots), ``bank/`` (the memory bank), ``finetune/`` (the fine-tuning run),
``run.json`` (this command's own settings), ``original.pt``, ``final.pt`` (the fine-tuned slim
model), ``summary.json`` and ``summary.md`` (original vs pruned: top-1, top-5, loss, FLOPs,
params, CPU latency, size).

Re-running the same command continues where it stopped; a finished phase is not repeated. A
folder is continued, or an `ekg prune` folder adopted, only if the settings it records match the
requested ones (:func:`ekg.rundir.check_settings`: one error line names each that differs);
``restart=True`` (``--restart``) removes its ekg artifacts and starts over.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .bank import DEFAULT_TEACHERS, bank_for_run, check_bank_args, check_topk
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .data import DataSplits, as_splits, get_normalization
from .errors import EkgError
from .evaluate import LATENCY_BATCHES, compare_latency, evaluate, format_speedup
from .flops import FLOPS_CONVENTION, count
from .io import atomic_path, check_output_folder, write_json
from .lock import check_free, hold
from .pruning import check_prunable, latency_report, prune, saved_latency_model
from .distributed import Dist
from .rundir import RunDir, TrainDir, check_settings, prune_record, prune_settings, run_settings
from .runtime import resolve_amp
from .search import SearchConfig, with_keep
from .train import finetune_config, fit_jitter, train
from .user_model import AUTO, as_checkpoint, rebuilder


@dataclass
class Preset:
    """Fine-tuning schedule and bank size of a preset."""

    name: str
    epochs: int
    batch_size: int = 128
    lr: float = 0.01
    teachers: int = DEFAULT_TEACHERS
    bank_topk: int | None = None      # None: a dense bank; K: each teacher's K largest logits per image
    limit_train: int | None = None
    description: str = ""


PRESETS = {
    "paper": Preset("paper", epochs=100, description="the paper's CIFAR recipe: 100 epochs, batch 128, "
                    "lr 0.01 ×0.2 at 30/60/80%"),
    "quick": Preset("quick", epochs=3, limit_train=10_000, description="a complete demonstration on a few CPU "
                    "cores: the full search and bank, then 3 fine-tuning epochs on (at most) the first 10,000 "
                    "training images"),
}


def run(model: Checkpoint | str | Path | nn.Module, data: Any, keep: float | None = None, *, out: str | Path,
        preset: str = "paper", kd: str = "ensemble", search: SearchConfig | None = None,
        latency_batches: tuple[int, ...] = LATENCY_BATCHES, progress: bool = True, epochs: int | None = None,
        limit_train: int | None = None, teachers: int | None = None, bank_topk: int | None = None,
        speed: dict[str, Any] | None = None, restart: bool = False, classes: Any = None,
        input_size: tuple[int, int, int] | None = None, normalization: Any = AUTO,
        factory: str | None = None, factory_kwargs: dict[str, Any] | None = None,
        dist: Dist | None = None) -> dict[str, Any]:
    """Adaptation, search, slimming, memory bank, fine-tuning and the final comparison.
    ``model`` and ``data`` are taken as by :func:`ekg.prune` (an ``nn.Module`` with ``input_size``,
    ``normalization``, ``factory``; a ``(train, test)`` pair of Datasets with ``classes``); the
    budget is stated once, ``keep`` or ``search.keep`` (default 0.45).
    ``epochs``, ``limit_train``, ``teachers`` and ``bank_topk`` (K: a top-k memory bank, see
    :mod:`ekg.bank`) override the preset's; ``speed`` holds how the
    fine-tuning runs (TrainConfig's amp, compile, channels_last, accum), not part of run.json.
    An existing ``out`` (a stopped `ekg run`, or an `ekg prune` run to adopt) is continued only if
    its recorded settings match these, else one :class:`EkgError` line names each that differs;
    ``restart`` removes its ekg artifacts first (refused if it holds files ekg did not write).
    Everything is checked before anything is written.
    With ``dist`` (torchrun) the search, the bank and the fine-tuning are split over the ranks;
    rank 0 writes every file and measures the final comparison."""
    dist = dist or Dist()
    progress = progress and dist.is_main
    if preset not in PRESETS:
        raise EkgError(f"`preset` must be one of {', '.join(PRESETS)}, got {preset!r}")
    check_bank_args(kd, teachers, bank_topk)
    overrides = {k: v for k, v in (("epochs", epochs), ("limit_train", limit_train), ("teachers", teachers),
                                   ("bank_topk", bank_topk)) if v is not None}
    p = dataclasses.replace(PRESETS[preset], **overrides)
    device = search.device if search is not None else "auto"
    ft_cfg = finetune_config(kd, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, limit_train=p.limit_train,
                             device=device, **(speed or {}))
    ft_cfg.validate()  # a bad fine-tuning setting fails before the search, not after
    resolve_amp(ft_cfg.amp, dist.device(device))
    out = Path(out)
    rd = RunDir(out)
    cfg = with_keep(search, keep)
    cfg.validate()
    settings = {"keep": cfg.keep, "preset": preset, "kd": kd, **overrides}
    check_output_folder(out)
    check_free(out)  # at once; hold() below is the authoritative lock
    if restart:
        rd.check_restart()  # before any work: nothing is removed if this refuses
    splits = as_splits(data, progress=progress, classes=classes)
    ckpt = as_checkpoint(model, splits, input_size=input_size, normalization=normalization, factory=factory,
                         factory_kwargs=factory_kwargs)
    check_topk(p.bank_topk, ckpt.num_classes)  # before the search, not after
    check_prunable(ckpt, splits, cfg)
    ft_cfg, note = fit_jitter(ft_cfg, splits.train)
    dist.note(note)
    with hold(out, dist):  # one process (one torchrun job) in the folder; prune and the bank take it again
        return _run(ckpt, splits, rd, cfg, ft_cfg, p, settings, restart, latency_batches, progress, dist)


def _run(ckpt: Checkpoint, splits: DataSplits, rd: RunDir, cfg: SearchConfig, ft_cfg: Any, p: Preset,
         settings: dict[str, Any], restart: bool, latency_batches: tuple[int, ...], progress: bool,
         dist: Dist) -> dict[str, Any]:
    """The phases of :func:`run`, its arguments checked, in its locked run directory."""
    out, kd, teachers = rd.path, settings["kd"], settings.get("teachers")
    factory_fn = rebuilder(ckpt)  # reloads the run's checkpoints of a user's module
    if restart:
        rd.check_restart()
    else:  # the folder's settings (its `ekg prune` record and run.json) must be these
        requested = {**prune_settings(prune_record(cfg, ckpt, splits)), **run_settings(settings)}
        check_settings(out, rd.saved_settings(), requested)
    if restart and dist.is_main:
        rd.clear()
    dist.barrier()  # the old run is gone for every rank
    resume_prune, have_pruned = rd.config.exists(), rd.pruned.exists()
    resume_ft = TrainDir(rd.finetune).state.exists()
    dist.barrier()  # every rank has looked at the run directory before rank 0 writes to it
    if dist.is_main:
        write_json(rd.run_record, settings)

    # phase 1, 2, 4: adaptation, search, slimming (prune resumes from its own state)
    if not have_pruned:
        _say(progress, "== search and slimming")
        prune(ckpt, splits, out=out, config=cfg, resume=resume_prune, progress=progress, dist=dist)
    pruned = load_checkpoint(rd.pruned, factory=factory_fn)

    # phase 3: memory bank; phase 5: fine-tuning
    bank = None
    if kd != "none":
        _say(progress, "== memory bank")
        # an existing bank is taken as built unless --teachers was given (then it must match)
        bank = bank_for_run(out, splits.train, teachers=teachers, device=dist.device(cfg.device),
                            progress=progress, dist=dist, topk=p.bank_topk, factory=factory_fn)
    ft = TrainDir(rd.finetune)
    _say(progress, f"== fine-tuning ({p.description})")
    train(ft_cfg, splits, ft.path, resume=resume_ft, progress=progress, init=pruned, bank=bank, dist=dist)
    if not dist.is_main:  # rank 0 measures and writes the comparison; the others read it
        dist.barrier()
        return json.loads(rd.summary.read_text())
    final = load_checkpoint(ft.model, factory=factory_fn)
    final.meta = {**final.meta, "pipeline": "ekg run", **settings}
    save_checkpoint(final, rd.final)
    if not rd.original.exists():
        save_checkpoint(ckpt, rd.original)

    # the comparison
    _say(progress, "== final comparison")
    summary = {"settings": settings, "data": splits.source, "flops_convention": FLOPS_CONVENTION,
               **_measure(rd.original, rd.final, splits, latency_batches, dist.device(cfg.device), factory_fn)}
    if cfg.budget == "latency":  # the target the budget named: predicted by the search's table, and measured
        summary["latency_target"] = _target_latency(rd, ckpt, final, cfg)
    o, q = summary["original"], summary["pruned"]
    summary["flops_reduction"] = 1 - q["flops"] / o["flops"]
    summary["params_reduction"] = 1 - q["params"] / o["params"]
    write_json(rd.summary, summary)
    with atomic_path(rd.summary_md) as tmp:
        tmp.write_text(summary_markdown(summary))
    dist.barrier()
    return summary


def _measure(original: Path, pruned: Path, splits: DataSplits, latency_batches: tuple[int, ...],
             device: torch.device = torch.device("cpu"), factory: Any = None) -> dict[str, Any]:
    """``original`` and ``pruned``: each side's test metrics (on ``device``), FLOPs, params,
    checkpoint size, median CPU latency per batch size (``latency_cpu_ms``) and, on a GPU, fp32 GPU
    latency (``latency_gpu_ms``, ``gpu``); ``latency_cpu_speedup`` (and ``latency_gpu_speedup``):
    per batch size the spread of the per-round speed-up original/pruned. The two sides are timed
    together, interleaved round by round (:func:`ekg.evaluate.compare_latency`), so that a change
    of load on the machine lands on both."""
    paths = {"original": original, "pruned": pruned}
    ckpts = {name: load_checkpoint(p, factory=factory) for name, p in paths.items()}
    input_size = tuple(ckpts["original"].input_size)
    if tuple(ckpts["pruned"].input_size) != input_size:
        raise EkgError(f"{pruned} expects {tuple(ckpts['pruned'].input_size)} inputs, {original} {input_size}")
    out: dict[str, Any] = {}
    for name, ckpt in ckpts.items():
        res = evaluate(ckpt.model.to(device), splits.test, get_normalization(ckpt.normalization), device=device)
        size = count(ckpt.model.cpu(), ckpt.input_size)
        out[name] = {"checkpoint": str(paths[name]), "arch": ckpt.arch, "top1": res["top1"], "top5": res["top5"],
                     "loss": res["loss"], "n_images": res["n_images"], "flops": size.flops, "params": size.params}
    kinds = [("gpu", device, (*latency_batches, 256))] if device.type == "cuda" else []
    for kind, dev, batches in [*kinds, ("cpu", torch.device("cpu"), tuple(latency_batches))]:
        models = {name: ckpt.model.to(dev) for name, ckpt in ckpts.items()}
        cmp = {f"b{b}": compare_latency(models, input_size, b, device=dev) for b in batches}
        for name in models:
            out[name][f"latency_{kind}_ms"] = {k: c["models"][name]["median_ms"] for k, c in cmp.items()}
            if kind == "gpu":
                out[name]["gpu"] = torch.cuda.get_device_name(dev)
        out[f"latency_{kind}_speedup"] = {k: {**c["speedup"]["pruned"], "iters_per_round": c["iters_per_round"]}
                                          for k, c in cmp.items()}
    for name, p in paths.items():
        out[name]["checkpoint_bytes"] = p.stat().st_size
    return out


def _target_latency(rd: RunDir, original: Checkpoint, final: Checkpoint, cfg: SearchConfig) -> dict[str, Any]:
    """The final model's latency on a latency budget's target against the original's, with the
    speed-up the search's latency model (RUN/latency.json) predicts for its widths."""
    from .graph import build_graph
    from .slim import slim_widths

    size = tuple(original.input_size)
    model = original.model.cpu()
    lat = saved_latency_model(rd, model, build_graph(model, size), cfg.latency_target())
    report = latency_report(lat, model, final.model.cpu(), size, slim_widths(lat.graph, final.model.cpu()))
    report.pop("comparison")
    return report


def summary_markdown(s: dict[str, Any]) -> str:
    o, q = s["original"], s["pruned"]
    rows = [("top-1 (%)", f"{o['top1']:.2f}", f"{q['top1']:.2f}"), ("top-5 (%)", f"{o['top5']:.2f}", f"{q['top5']:.2f}"),
            ("test loss", f"{o['loss']:.4f}", f"{q['loss']:.4f}"),
            ("FLOPs (MACs)", f"{o['flops'] / 1e6:.2f} M", f"{q['flops'] / 1e6:.2f} M ({100 * s['flops_reduction']:.1f}% fewer)"),
            ("params", f"{o['params'] / 1e6:.3f} M", f"{q['params'] / 1e6:.3f} M ({100 * s['params_reduction']:.1f}% fewer)")]
    for kind, label, digits in (("cpu", "CPU latency batch {} (ms, median)", 2),
                                ("gpu", "GPU latency batch {} (ms, median, fp32, " + o.get("gpu", "") + ")", 3)):
        speedup = s.get(f"latency_{kind}_speedup", {})
        for k in o.get(f"latency_{kind}_ms", {}):
            pruned = f"{q[f'latency_{kind}_ms'][k]:.{digits}f}"
            if k in speedup:  # older summaries have no speed-up
                pruned += f"; speed-up {format_speedup(speedup[k])}"
            rows.append((label.format(k[1:]), f"{o[f'latency_{kind}_ms'][k]:.{digits}f}", pruned))
    t = s.get("latency_target")
    if t:  # a latency budget: its target, predicted and measured
        rows.append((f"latency on {t['target']} (ms, median; the budget's target)", f"{t['original_ms']:.3g}",
                     f"{t['measured_ms']:.3g}; speed-up {format_speedup(t['measured_speedup'])}; predicted "
                     f"{t['predicted_speedup']:.2f}× ({100 * t['prediction_error']:+.1f}%)"))
    rows.append(("checkpoint size", f"{o['checkpoint_bytes'] / 1e6:.2f} MB", f"{q['checkpoint_bytes'] / 1e6:.2f} MB"))
    of = " of the latency" if s.get("latency_target") else ""
    head = (f"keep {s['settings']['keep']}{of}, preset {s['settings']['preset']}, kd {s['settings']['kd']}; "
            f"test images: {o['n_images']}; {s['flops_convention']}"
            + ("; latency: both models timed interleaved, the speed-up is the median of the per-round ratios "
               "original/pruned, with their quartiles and range over the rounds" if "latency_cpu_speedup" in s else "")
            + "\n\n")
    return head + "| | original | pruned + fine-tuned |\n|---|---|---|\n" + "".join(
        f"| {a} | {b} | {c} |\n" for a, b, c in rows)


def _say(progress: bool, msg: str) -> None:
    if progress:
        tqdm.write(msg)

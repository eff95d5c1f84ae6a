"""``ekg.prune``: adaptation, sub-network search and slimming into a run directory.

The run directory's layout, what ``config.json`` records and the rule a resumed or adopted
folder must pass are :mod:`ekg.rundir`'s (one owner for every phase): ``config.json`` (the
SearchConfig, model and data with their fingerprints), ``adapted.pt``, ``search_state.pt`` (the
resume point), ``search.jsonl``, ``history.pt``, ``widths.json``, ``pruned.pt`` (an ekg checkpoint
that `ekg test`/`ekg info` read as is), ``trajectory.png`` and ``widths.png``.

Ctrl-C leaves the state of the last finished step; ``resume=True`` continues from it (if the
saved settings match, :func:`ekg.rundir.check_settings`) and ends with exactly the masks of an
uninterrupted run. ``restart=True`` removes the folder's ekg artifacts first
(:meth:`ekg.rundir.RunDir.clear`; refused if it holds anything else).

The Python API also takes a plain ``nn.Module`` (any CNN the dependency graph can read): with an
``input_size`` and a normalisation (defaults: the data's image size and the dataset's preset), and
a ``factory`` to record in the checkpoints (``torchvision:NAME``, or set by
:func:`ekg.arch.torchvision_model`). ``PruneResult.model`` is the slim module.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import classifier_outputs, module_shapes, record_for
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .data import NORMALIZATIONS, DataSplits, Normalization, carve_search_sets, get_normalization, iterate_batches, load_data
from .distributed import Dist
from .errors import EkgError
from .graph import build_graph
from .io import atomic_path, write_json
from .masks import MaskedNetwork
from .rundir import RunDir, check_settings, prune_record, prune_settings
from .search import SearchConfig, Searcher, SearchState, adapt


@dataclass
class PruneResult:
    run_dir: Path
    checkpoint: Checkpoint
    flops: int
    params: int
    flops_ratio: float
    steps: int
    seconds: float
    slim_max_diff: float = 0.0  # largest |slim - masked| output difference on a D_val batch

    @property
    def model(self) -> nn.Module:
        """The slim model (also in ``checkpoint`` and ``RunDir(run_dir).pruned``)."""
        return self.checkpoint.model


def _save_torch(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def prune(model: Checkpoint | str | Path | nn.Module, data: DataSplits | str | Path, keep: float = 0.45, *,
          out: str | Path, config: SearchConfig | None = None, resume: bool = False, restart: bool = False,
          progress: bool = True, input_size: tuple[int, int, int] | None = None,
          normalization: str | dict[str, Any] | Normalization | None = None,
          factory: str | None = None, factory_kwargs: dict[str, Any] | None = None,
          dist: Dist | None = None) -> PruneResult:
    """Search a sub-network of ``model`` at FLOPs ratio ``keep`` and slim it into ``out``.

    ``model``: an ekg :class:`Checkpoint`, any file ``load_checkpoint`` reads, or an ``nn.Module``
    (then ``input_size``, ``normalization`` and ``factory``/``factory_kwargs`` describe it; see the
    module doc); ``data``: a :class:`DataSplits` or anything ``load_data`` reads (the search sets
    are carved from its training split). Raises :class:`EkgError` before anything is written if no
    channel group of the model can be pruned, naming each layer and why, or if ``out`` holds a run:
    without ``resume`` or ``restart`` any run, with ``resume`` one whose settings differ (named
    with the saved and requested values, :mod:`ekg.rundir`); ``restart`` starts over (refused,
    before anything is removed, if ``out`` holds files ekg did not write). With ``dist`` (torchrun)
    every rank runs this with the same arguments: the adaptation, the Taylor scores and the candidate
    evaluations are split over the ranks, every rank takes the same decisions, and rank 0 alone
    writes the run directory."""
    dist = dist or Dist()
    cfg = dataclasses.replace(config, keep=keep) if config is not None else SearchConfig(keep=keep)
    cfg.validate()
    if resume and restart:
        raise EkgError("`resume=True` continues the run in `out` and `restart=True` starts it over: give only one")
    out = Path(out)
    rd = RunDir(out)
    if restart:
        rd.check_restart()  # before any work: nothing is removed if this refuses
    elif rd.config.exists() and not resume:
        raise EkgError(f"{out} already holds a pruning run; add `resume=True` to continue it, `restart=True` to start over, "
                       "or choose another `out`")
    progress = progress and dist.is_main
    t_start = time.perf_counter()
    if isinstance(model, nn.Module):
        splits = data if isinstance(data, DataSplits) else load_data(data, progress=progress)
        ckpt = checkpoint_of_module(model, splits, input_size=input_size, normalization=normalization,
                                    factory=factory, factory_kwargs=factory_kwargs)
    else:
        if input_size is not None or normalization is not None or factory is not None:
            raise EkgError("input_size, normalization and factory describe an nn.Module; a checkpoint records them")
        ckpt = model if isinstance(model, Checkpoint) else load_checkpoint(model)
        splits = data if isinstance(data, DataSplits) else load_data(data, progress=progress)
    check_prunable(ckpt, splits)
    source = str(ckpt.meta.get("source", model))
    record = prune_record(cfg, ckpt, splits, source=source)
    if resume:
        saved = rd.prune_record()
        if saved is not None:
            check_settings(out, prune_settings(saved), prune_settings(record), what="a pruning run")
    if restart and dist.is_main:
        rd.clear()
    # restart: nothing of the old run is looked at (rank 0 may be removing it)
    have_adapted = not restart and rd.adapted.exists()
    have_state = not restart and rd.search_state.exists()
    dist.barrier()  # every rank has looked at the run directory before rank 0 writes to it
    device = dist.device(cfg.device)
    net_model = copy.deepcopy(ckpt.model).to(device)
    for p in net_model.parameters():
        p.requires_grad_(False)
    norm = get_normalization(ckpt.normalization)
    d_val, d_sub = carve_search_sets(splits.train, val_per_class=cfg.val_per_class, sub_per_class=cfg.sub_per_class,
                                     seed=cfg.split_seed)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(rd.config, record)

    if have_adapted:  # its weights only: the architecture is the model's own
        net_model.load_state_dict(torch.load(rd.adapted, map_location=device, weights_only=True)["state_dict"])
    else:
        if cfg.adapt:
            part = dist.part(cfg.batch_size) if dist.enabled else None  # each rank loads its share of a batch
            adapt(net_model, iterate_batches(d_sub.to(device), cfg.batch_size, normalization=norm, drop_last=True,
                                             part=part), cfg, dist=dist)
            # the ranks agree already (same summed gradients); rank 0's copy makes it exact
            dist.broadcast_([*net_model.parameters(), *net_model.buffers()])
        if dist.is_main:
            save_checkpoint(Checkpoint(model=copy.deepcopy(net_model).cpu(), normalization=dict(ckpt.normalization),
                                       dataset=dict(ckpt.dataset), input_size=tuple(ckpt.input_size),
                                       meta={"source": source,
                                             "stage": "after the adaptation epoch" if cfg.adapt else "not adapted"},
                                       record=ckpt.record),
                            rd.adapted)
    net_model.eval()  # dropout off; the Searcher runs every pass with BN on cfg.search_bn statistics

    val_batches = list(iterate_batches(d_val.to(device), cfg.batch_size, normalization=norm))
    net = MaskedNetwork(net_model, input_size=tuple(ckpt.input_size))
    searcher = Searcher(net, val_batches, cfg, dist=dist)
    if searcher.evaluator.note and dist.is_main:
        tqdm.write(f"note: {searcher.evaluator.note}")
    if have_state:
        state = SearchState.from_dict(torch.load(rd.search_state, map_location="cpu", weights_only=True))
    else:
        state = searcher.initial_state()
        if dist.is_main:
            _save_state(out, state)
    searcher.restore(state)
    bar = tqdm(total=round(1 - cfg.keep, 4), desc="search", unit="FLOPs", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} of FLOPs removed [{elapsed}<{remaining}{postfix}]")
    bar.update(round(1 - state.log[-1]["flops_ratio"], 4))

    def on_step(s: SearchState) -> None:
        if dist.is_main:
            _save_state(out, s)
        row = s.log[-1]
        bar.update(max(0.0, round(1 - row["flops_ratio"], 4) - bar.n))
        bar.set_postfix_str(f"step {row['step']}, ratio {row['flops_ratio']:.4f}, val acc {row['val_accuracy']:.1f}%")

    try:
        state = searcher.run(state, on_step=on_step)
    finally:
        bar.close()
    if dist.is_main:
        _save_state(out, state)
    # the search left BN running statistics untouched: slim with them
    slim, diff = _slim_and_check(net, net_model, net.kept_indices(), val_batches[0][0])

    record = None if ckpt.record is None else dataclasses.replace(ckpt.record, shapes=module_shapes(slim), pruned=True)
    result_ckpt = Checkpoint(model=slim.cpu(), normalization=dict(ckpt.normalization), dataset=dict(ckpt.dataset),
                             meta={"source": source, "pruned_by": "ekg prune", "search": cfg.to_dict()},
                             input_size=tuple(ckpt.input_size), record=record)
    if dist.is_main:
        _write_outputs(out, net, state, result_ckpt, diff)
    dist.barrier()  # the run directory is complete for every rank
    last = state.log[-1]
    return PruneResult(run_dir=out, checkpoint=result_ckpt, flops=last["flops"], params=last["params"],
                       flops_ratio=last["flops_ratio"], steps=state.step, seconds=time.perf_counter() - t_start,
                       slim_max_diff=diff)


def checkpoint_of_module(model: nn.Module, splits: DataSplits, *, input_size: tuple[int, int, int] | None = None,
                         normalization: str | dict[str, Any] | Normalization | None = None,
                         factory: str | None = None, factory_kwargs: dict[str, Any] | None = None) -> Checkpoint:
    """A user's module as an ekg checkpoint: ``input_size`` defaults to the data's image size, the
    normalisation to the dataset's preset (ImageNet's for other data)."""
    size = tuple(input_size) if input_size is not None else tuple(splits.train.image_size)
    if len(size) != 3:
        raise EkgError(f"input_size must be (channels, height, width), got {size}")
    if normalization is None:
        normalization = splits.name if splits.name in NORMALIZATIONS else "imagenet"
    name = normalization if isinstance(normalization, str) else "custom"
    norm = {"name": name, **get_normalization(normalization).to_dict()}
    num_classes = classifier_outputs(model, size)
    record = record_for(model, num_classes, factory=factory, kwargs=factory_kwargs)
    return Checkpoint(model=model, normalization=norm, dataset={"name": splits.name, "num_classes": splits.num_classes},
                      meta={"source": f"{record.name} (Python API)"}, input_size=size, record=record)  # type: ignore[arg-type]


def check_prunable(ckpt: Checkpoint, splits: DataSplits) -> None:
    """The errors :func:`prune` raises about its model and data before anything is written: another
    number of classes than the data's, or no prunable channel group."""
    if ckpt.num_classes != splits.num_classes:
        raise EkgError(f"the model predicts {ckpt.num_classes} classes but the data has {splits.num_classes}")
    _require_prunable(ckpt)


def _require_prunable(ckpt: Checkpoint) -> None:
    """One clear error, before any work, when no channel group can be pruned."""
    graph = build_graph(ckpt.model, tuple(ckpt.input_size))
    if not graph.prunable:
        raise EkgError(f"this model ({ckpt.arch}) has no prunable channel group: "
                       + "; ".join(f"{g.name}: {g.reason}" for g in graph.groups if g.producers))


def _save_state(out: Path, state: SearchState) -> None:
    """search_state.pt is the commit point; search.jsonl and history.pt are derived views."""
    rd = RunDir(out)
    _save_torch(state.to_dict(), rd.search_state)
    with atomic_path(rd.search_log) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in state.log))


def _slim_and_check(net: MaskedNetwork, model: torch.nn.Module, kept: dict[int, torch.Tensor],
                    x: torch.Tensor) -> tuple[torch.nn.Module, float]:
    """Slim the model and check, in inference mode, that it computes what the masked one does
    (an error if not); returns the slim model and the largest output difference."""
    from .slim import check_equivalent, slim_model

    slim = slim_model(model, net.graph, kept)
    was = model.training
    model.eval()
    slim.eval()
    try:
        diff = check_equivalent(net, slim, x[:64])
    finally:
        model.train(was)
    return slim, diff


def _write_outputs(out: Path, net: MaskedNetwork, state: SearchState, ckpt: Checkpoint, diff: float) -> None:
    from .plots import plot_trajectory, plot_widths

    rd = RunDir(out)
    _save_torch({"history": state.history, "groups": [g.group.name for g in net.gates]}, rd.history)
    widths = {g.group.name: {"channels": g.channels, "kept": g.kept, "rate": g.rate} for g in net.gates}
    write_json(rd.widths, {"groups": widths, "spec": ckpt.arch_dict(),
                           "slim_check": {"max_abs_diff": diff, "images": 64, "bn": "inference mode"}})
    save_checkpoint(ckpt, rd.pruned)
    plot_trajectory(state.log, rd.trajectory_plot)
    plot_widths([g.group.name for g in net.gates], [g.channels for g in net.gates], [g.kept for g in net.gates],
                rd.widths_plot, title=f"widths before/after (FLOPs ratio {state.log[-1]['flops_ratio']:.3f})")

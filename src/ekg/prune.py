"""``ekg.prune``: adaptation, sub-network search and slimming into a run directory.

Run directory (every phase's artifact, so each can be inspected or resumed alone)::

    RUN/config.json        the SearchConfig, model and data sources
    RUN/adapted.pt         the model after the adaptation epoch (the search's frozen weights; an ekg checkpoint)
    RUN/search_state.pt    the search state after the last finished step (the resume point)
    RUN/search.jsonl       one line per step: chosen group, widths, FLOPs ratio, val acc/loss/J, seconds
    RUN/history.pt         (masks, val loss) of every interim sub-network, for the memory bank
    RUN/widths.json        final width of every channel group
    RUN/pruned.pt          the slim model, an ekg checkpoint (`ekg test`/`ekg info` read it as is)
    RUN/trajectory.png     FLOPs ratio vs val loss/J and accuracy
    RUN/widths.png         per-group widths before/after

Ctrl-C leaves the state of the last finished step; ``resume=True`` continues from it and ends with
exactly the masks of an uninterrupted run.
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
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .data import DataSplits, carve_search_sets, get_normalization, iterate_batches, load_data
from .errors import EkgError
from .evaluate import batch_statistics_bn
from .io import atomic_path, write_json
from .masks import MaskedNetwork
from .distributed import Dist
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


def _save_torch(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _check_resume(out: Path, cfg: SearchConfig, resume: bool) -> None:
    cfg_path = out / "config.json"
    if cfg_path.exists() and not resume:
        raise EkgError(f"{out} already holds a pruning run; add --resume to continue it or choose another --out")
    if resume and cfg_path.exists():
        saved = SearchConfig.from_dict(json.loads(cfg_path.read_text())["search"])
        ignore = {"device", "fast"}  # how the search runs, not what it decides (fast is exact)
        diff = [k for k in saved.to_dict() if k not in ignore and getattr(saved, k) != getattr(cfg, k)]
        if diff:
            raise EkgError(f"cannot resume {out}: these settings differ from the saved run: {', '.join(diff)}")


def prune(model: Checkpoint | str | Path, data: DataSplits | str | Path, keep: float = 0.45, *,
          out: str | Path, config: SearchConfig | None = None, resume: bool = False,
          progress: bool = True, dist: Dist | None = None) -> PruneResult:
    """Search a sub-network of ``model`` at FLOPs ratio ``keep`` and slim it into ``out``.

    ``model``: an ekg :class:`Checkpoint` or any file ``load_checkpoint`` reads; ``data``: a
    :class:`DataSplits` or anything ``load_data`` reads (the search sets are carved from its
    training split). With ``dist`` (torchrun) every rank runs this with the same arguments: the
    adaptation, the Taylor scores and the candidate evaluations are split over the ranks, every
    rank takes the same decisions, and rank 0 alone writes the run directory."""
    dist = dist or Dist()
    cfg = dataclasses.replace(config, keep=keep) if config is not None else SearchConfig(keep=keep)
    cfg.validate()
    out = Path(out)
    _check_resume(out, cfg, resume)
    adapted, state_path = out / "adapted.pt", out / "search_state.pt"
    have_adapted, have_state = adapted.exists(), state_path.exists()
    dist.barrier()  # every rank has looked at the run directory before rank 0 writes to it
    progress = progress and dist.is_main
    t_start = time.perf_counter()
    ckpt = model if isinstance(model, Checkpoint) else load_checkpoint(model)
    splits = data if isinstance(data, DataSplits) else load_data(data, progress=progress)
    if ckpt.num_classes != splits.num_classes:
        raise EkgError(f"the model predicts {ckpt.num_classes} classes but the data has {splits.num_classes}")
    device = dist.device(cfg.device)
    net_model = copy.deepcopy(ckpt.model).to(device)
    for p in net_model.parameters():
        p.requires_grad_(False)
    norm = get_normalization(ckpt.normalization)
    d_val, d_sub = carve_search_sets(splits.train, val_per_class=cfg.val_per_class, sub_per_class=cfg.sub_per_class,
                                     seed=cfg.split_seed)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {"search": cfg.to_dict(), "model": str(ckpt.meta.get("source", model)),
                                         "data": splits.source, "normalization": ckpt.normalization})

    if have_adapted:
        net_model.load_state_dict(load_checkpoint(adapted).model.state_dict())
    else:
        if cfg.adapt:
            adapt(net_model, iterate_batches(d_sub.to(device), cfg.batch_size, normalization=norm, drop_last=True), cfg,
                  dist=dist)
            # the ranks agree already (same summed gradients); rank 0's copy makes it exact
            dist.broadcast_([*net_model.parameters(), *net_model.buffers()])
        if dist.is_main:
                save_checkpoint(Checkpoint(model=copy.deepcopy(net_model).cpu(), normalization=dict(ckpt.normalization),
                                       dataset=dict(ckpt.dataset), input_size=tuple(ckpt.input_size),
                                       meta={"source": str(ckpt.meta.get("source", model)),
                                             "stage": "after the adaptation epoch" if cfg.adapt else "not adapted"}),
                            adapted)

    val_batches = list(iterate_batches(d_val.to(device), cfg.batch_size, normalization=norm))
    with batch_statistics_bn(net_model):
        net = MaskedNetwork(net_model, input_size=tuple(ckpt.input_size))
        if not net.gates:
            raise EkgError("this model has no prunable channel group: "
                           + "; ".join(f"{g.name}: {g.reason}" for g in net.graph.groups if g.producers))
        searcher = Searcher(net, val_batches, cfg, dist=dist)
        if have_state:
            state = SearchState.from_dict(torch.load(state_path, map_location="cpu", weights_only=True))
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
    # BN running statistics are restored now (the search ran BN on batch statistics): slim outside.
    slim, diff = _slim_and_check(net, net_model, net.kept_indices(), val_batches[0][0])

    result_ckpt = Checkpoint(model=slim.cpu(), normalization=dict(ckpt.normalization), dataset=dict(ckpt.dataset),
                             meta={"source": str(ckpt.meta.get("source", model)), "pruned_by": "ekg prune",
                                   "search": cfg.to_dict()}, input_size=tuple(ckpt.input_size))
    if dist.is_main:
        _write_outputs(out, net, state, result_ckpt, diff)
    dist.barrier()  # the run directory is complete for every rank
    last = state.log[-1]
    return PruneResult(run_dir=out, checkpoint=result_ckpt, flops=last["flops"], params=last["params"],
                       flops_ratio=last["flops_ratio"], steps=state.step, seconds=time.perf_counter() - t_start,
                       slim_max_diff=diff)


def _save_state(out: Path, state: SearchState) -> None:
    """search_state.pt is the commit point; search.jsonl and history.pt are derived views."""
    _save_torch(state.to_dict(), out / "search_state.pt")
    with atomic_path(out / "search.jsonl") as tmp:
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

    _save_torch({"history": state.history, "groups": [g.group.name for g in net.gates]}, out / "history.pt")
    widths = {g.group.name: {"channels": g.channels, "kept": g.kept, "rate": g.rate} for g in net.gates}
    write_json(out / "widths.json", {"groups": widths, "spec": ckpt.spec.to_dict(),
                                     "slim_check": {"max_abs_diff": diff, "images": 64, "bn": "inference mode"}})
    save_checkpoint(ckpt, out / "pruned.pt")
    plot_trajectory(state.log, out / "trajectory.png")
    plot_widths([g.group.name for g in net.gates], [g.channels for g in net.gates], [g.kept for g in net.gates],
                out / "widths.png", title=f"widths before/after (FLOPs ratio {state.log[-1]['flops_ratio']:.3f})")

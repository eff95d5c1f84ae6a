"""``ekg.prune`` (this module: ekg.pruning): adaptation, sub-network search and slimming into a run directory.

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

from .arch import module_shapes
from .checkpoint import Checkpoint, save_checkpoint
from .data import DataSplits, ImageSet, as_splits, get_normalization, iterate_batches
from .data.datasets import read_split
from .distributed import Dist
from .errors import EkgError
from .graph import build_graph, check_training_forward
from .io import atomic_path, check_output_folder, save_torch, write_json
from .lock import check_free, hold
from .masks import MaskedNetwork
from .slim import slim_model
from .rundir import ADAPTED, LATENCY, REMEDY, RunDir, check_settings, load_artifact, prune_record, prune_settings
from .latency import compare_on_target
from .search import (SearchConfig, Searcher, SearchState, adapt, carve_search_sets, check_reachable, fit_search_sets,
                     with_keep)
from .user_model import AUTO, as_checkpoint


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
    latency: dict[str, Any] | None = None  # a latency budget's predicted and measured speed-up (latency_report)

    @property
    def model(self) -> nn.Module:
        """The slim model (also in ``checkpoint`` and ``RunDir(run_dir).pruned``)."""
        return self.checkpoint.model


def prune(model: Checkpoint | str | Path | nn.Module, data: Any, keep: float | None = None, *,
          out: str | Path, config: SearchConfig | None = None, resume: bool = False, restart: bool = False,
          progress: bool = True, input_size: tuple[int, int, int] | None = None, normalization: Any = AUTO,
          factory: str | None = None, factory_kwargs: dict[str, Any] | None = None,
          search_sets: tuple[Any, Any] | None = None, classes: Any = None, dist: Dist | None = None) -> PruneResult:
    """Search a sub-network of ``model`` at FLOPs ratio ``keep`` and slim it into ``out``.

    ``model``: an ``nn.Module`` (then ``input_size``, ``normalization`` and
    ``factory``/``factory_kwargs`` describe it: :func:`ekg.checkpoint.checkpoint_of_module`), an
    ekg :class:`Checkpoint`, a checkpoint file or a pretrained name. ``data``: a ``(train, test)``
    pair of torch Datasets or DataLoaders (``classes``: their names), a :class:`DataSplits`, or a
    name or path ``load_data`` reads. The budget is stated once: ``keep``, or ``config.keep``
    (default 0.45); both, if they differ, is an error. The search sets D_val and D_sub are carved
    from the training split by the method's per-class rule (:func:`ekg.search.fit_search_sets`: a
    smaller balanced carve, said in one line, when a class has too few images), or given as
    ``search_sets=(d_val, d_sub)`` (Datasets like ``data``'s). Raises :class:`EkgError` before
    anything is written if no channel group of the model can be pruned, naming each layer and
    why, or if ``out`` holds a run: without ``resume`` or ``restart`` any run, with ``resume`` one
    whose settings differ (named with the saved and requested values, :mod:`ekg.rundir`);
    ``restart`` starts over (refused, before anything is removed, if ``out`` holds files ekg did
    not write). With ``dist`` (torchrun) every rank runs this with the same arguments: the
    adaptation, the Taylor scores and the candidate evaluations are split over the ranks, every
    rank takes the same decisions, and rank 0 alone writes the run directory."""
    dist = dist or Dist()
    cfg = with_keep(config, keep)
    cfg.validate()
    if resume and restart:
        raise EkgError("`resume=True` continues the run in `out` and `restart=True` starts it over: give only one")
    dist.device(cfg.device)  # an unknown or missing device, before any work
    if dist.enabled and cfg.budget == "latency":  # each rank would time its own table and decide otherwise
        raise EkgError("a latency budget is timed by one process: run it without torchrun (the search on one "
                       "device), or use a FLOPs budget with --round-to under torchrun")
    out = Path(out)
    rd = RunDir(out)
    check_output_folder(out)
    check_free(out)  # at once; hold() below is the authoritative lock
    _check_folder(rd, resume, restart)
    progress = progress and dist.is_main
    t_start = time.perf_counter()
    splits = as_splits(data, progress=progress, classes=classes)
    ckpt = as_checkpoint(model, splits, input_size=input_size, normalization=normalization, factory=factory,
                         factory_kwargs=factory_kwargs)
    explicit = _read_search_sets(search_sets, splits, progress)
    graph = check_prunable(ckpt, splits, cfg)
    latency = _latency_model(ckpt, graph, cfg, rd, resume, progress and dist.is_main)  # a latency budget's, before any write
    if latency is not None and cfg.latency_runtime == "onnxruntime" and cfg.round_to % 8:
        dist.note("ONNX Runtime runs convs whose widths are not multiples of its vector block (8, or 16 with "
                  "AVX-512) in a slower layout, which a per-layer "
                  "table cannot see: the prediction may be optimistic; add --round-to 8 (or 16) (BENCHMARKS.md, latency model)")
    source = str(ckpt.meta.get("source", model))
    if explicit is None:
        sizes = fit_search_sets(splits.train, val_per_class=cfg.val_per_class, sub_per_class=cfg.sub_per_class)
        dist.note(sizes.note)
    record = prune_record(cfg, ckpt, splits, source=source, search_sets=explicit)
    with hold(out, dist):  # one process (one torchrun job) in the folder from here on
        _check_folder(rd, resume, restart)  # again, now that no other process can change it
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
        d_val, d_sub = explicit if explicit is not None else carve_search_sets(
            splits.train, val_per_class=sizes.val_per_class, sub_per_class=sizes.sub_per_class, seed=cfg.split_seed)
        # what the run continues from is read before anything is written: a damaged file changes nothing
        adapted = _adapted_weights(rd) if have_adapted else None
        saved_state = SearchState.from_dict(load_artifact(rd.search_state)) if have_state else None
        if dist.is_main:
            write_json(rd.config, record)
            if latency is not None:
                write_json(rd.latency, {"model": latency.to_dict()})
        state, net, net_model, val_batches = _search(ckpt, cfg, rd, d_val, d_sub, source, adapted, saved_state,
                                                     progress, dist, latency)
        # the search left BN running statistics untouched: slim with them
        slim, diff = _slim_and_check(net, net_model, net.kept_indices(), val_batches[0][0])
        slim.requires_grad_(True)  # the search froze the weights; the slim model is a plain trainable module

        record = None if ckpt.record is None else dataclasses.replace(ckpt.record, shapes=module_shapes(slim),
                                                                      pruned=True)
        result_ckpt = Checkpoint(model=slim.cpu(), normalization=dict(ckpt.normalization), dataset=dict(ckpt.dataset),
                                 meta={"source": source, "pruned_by": "ekg prune", "search": cfg.to_dict()},
                                 input_size=tuple(ckpt.input_size), record=record)
        measured = None
        if latency is not None and dist.is_main:  # the slim network on the target, interleaved with the original
            measured = latency_report(latency, ckpt.model, slim, tuple(ckpt.input_size), net.widths())
            write_json(rd.latency, {"model": latency.to_dict(), "measured": measured})
        if dist.is_main:
            _write_outputs(out, net, state, result_ckpt, diff)
        dist.barrier()  # the run directory is complete for every rank
    last = state.log[-1]
    return PruneResult(run_dir=out, checkpoint=result_ckpt, flops=last["flops"], params=last["params"],
                       flops_ratio=last["flops_ratio"], steps=state.step, seconds=time.perf_counter() - t_start,
                       slim_max_diff=diff, latency=measured)


def _check_folder(rd: RunDir, resume: bool, restart: bool) -> None:
    """The run directory may be used as asked: ``restart`` removes only ekg's artifacts; without
    ``resume`` it holds no run yet."""
    if restart:
        rd.check_restart()  # before any work: nothing is removed if this refuses
    elif rd.config.exists() and not resume:
        raise EkgError(f"{rd.path} already holds a pruning run; add `resume=True` to continue it, `restart=True` to "
                       "start over, or choose another `out`")


def _adapted_weights(rd: RunDir) -> dict[str, torch.Tensor]:
    """The state dict in ``adapted.pt`` (an ekg checkpoint); a damaged file is named with the remedy."""
    saved = load_artifact(rd.adapted)
    if not (isinstance(saved, dict) and isinstance(saved.get("state_dict"), dict)):
        raise EkgError(f"{rd.adapted} is not an ekg checkpoint; {REMEDY[ADAPTED]}")
    return saved["state_dict"]


def _search(ckpt: Checkpoint, cfg: SearchConfig, rd: RunDir, d_val: ImageSet, d_sub: ImageSet, source: str,
            adapted: dict[str, torch.Tensor] | None, saved_state: SearchState | None, progress: bool,
            dist: Dist, latency: Any = None) -> tuple[Any, ...]:
    """Phases 1 and 2, resumed from the ``adapted`` weights and the ``saved_state`` of the run
    directory where it has them: the final search state, the masked network, the adapted model
    and the D_val batches."""
    device = dist.device(cfg.device)
    net_model = copy.deepcopy(ckpt.model).to(device)
    for p in net_model.parameters():
        p.requires_grad_(False)
    norm = get_normalization(ckpt.normalization)
    if adapted is not None:  # its weights only: the architecture is the model's own
        net_model.load_state_dict(adapted)
    else:
        if cfg.adapt:
            _adaptation(net_model, d_sub.to(device), norm, cfg, dist)
        if dist.is_main:
            save_checkpoint(Checkpoint(model=copy.deepcopy(net_model).cpu(), normalization=dict(ckpt.normalization),
                                       dataset=dict(ckpt.dataset), input_size=tuple(ckpt.input_size),
                                       meta={"source": source,
                                             "stage": "after the adaptation epoch" if cfg.adapt else "not adapted"},
                                       record=ckpt.record),
                            rd.adapted)
    net_model.eval()  # dropout off; the Searcher runs every pass with BN on cfg.search_bn statistics

    val_batches = list(iterate_batches(d_val.to(device), cfg.batch_size, normalization=norm))
    net = MaskedNetwork(net_model, input_size=tuple(ckpt.input_size), round_to=cfg.round_to)
    if latency is not None and [g.name for g in net.graph.groups] != [g.name for g in latency.graph.groups]:
        raise EkgError("internal error: the latency model's channel groups are not the masked network's "
                       "(this is a bug in ekg)")
    searcher = Searcher(net, val_batches, cfg, dist=dist, latency=latency)
    if searcher.evaluator.note and dist.is_main:
        tqdm.write(f"note: {searcher.evaluator.note}")
    if saved_state is not None:
        state = saved_state
    else:
        state = searcher.initial_state()
        if dist.is_main:
            _save_state(rd.path, state)
    searcher.restore(state)
    ratio = "latency_ratio" if latency is not None else "flops_ratio"
    what = "of the predicted latency" if latency is not None else "of FLOPs"
    bar = tqdm(total=round(1 - cfg.keep, 4), desc="search", unit="FLOPs", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} " + what + " removed [{elapsed}<{remaining}{postfix}]")
    bar.update(min(bar.total, round(1 - state.log[-1][ratio], 4)))

    def on_step(s: SearchState) -> None:
        if dist.is_main:
            _save_state(rd.path, s)
        row = s.log[-1]
        bar.update(max(0.0, min(bar.total, round(1 - row[ratio], 4)) - bar.n))  # lands at or just past the budget
        bar.set_postfix_str(f"step {row['step']}, ratio {row[ratio]:.4f}, val acc {row['val_accuracy']:.1f}%")

    try:
        state = searcher.run(state, on_step=on_step)
        if latency is not None:  # the landing measured end to end; refitted and searched on while too slow
            def measure(widths: Any) -> float:
                slim = slim_model(net_model, net.graph, net.kept_indices())
                cmp = compare_on_target({"original": ckpt.model, "pruned": slim}, tuple(ckpt.input_size),
                                        latency.target, rounds=REFIT_ROUNDS)
                return cmp["ratio"]["pruned"]["median"]

            def save() -> None:
                if dist.is_main:
                    write_json(rd.latency, {"model": latency.to_dict()})

            state = refit_landing(searcher, state, latency, measure, cfg.keep, on_step=on_step, save=save)
    finally:
        bar.close()
    if dist.is_main:
        _save_state(rd.path, state)
    return state, net, net_model, val_batches


LATENCY_REFITS = 3        # most end-to-end refits of a latency budget's landing
LATENCY_TOLERANCE = 0.02  # a landing measured more than 2% above `keep` is refitted and searched on
REFIT_ROUNDS = 5          # interleaved rounds of each landing's measurement


def refit_landing(searcher: Searcher, state: SearchState, latency: Any, measure: Any, keep: float, *,
                  on_step: Any = None, save: Any = None, refits: int = LATENCY_REFITS) -> SearchState:
    """A latency budget's closed loop. The search lands on the table's prediction; ``measure(widths)``
    times the landed sub-network end to end (its latency ratio to the original's). While that is
    more than :data:`LATENCY_TOLERANCE` above ``keep`` (at most ``refits`` times), the measurement is
    added to the latency model (:meth:`ekg.latency.LatencyModel.refit`: the prediction then passes
    through it) and the search goes on from where it stopped, landing again. A landing measured at
    or below is accepted (``latency.accepted``; a resumed run does not measure it again); ``save``
    runs after every change of the model. A landing below the budget is kept: the greedy search
    only removes channels."""
    for k in range(refits + 1):
        widths = [int(w) for w in searcher.net.widths()]
        if latency.accepted is not None and latency.accepted["widths"] == widths:
            return state
        measured = float(measure(widths))
        one_shot = searcher.cfg.method == "uniform"  # no steps to go on with: its landing is measured only
        if measured <= keep * (1 + LATENCY_TOLERANCE) or k == refits or one_shot:
            latency.accepted = {"widths": widths, "measured_ratio": measured, "refits": len(latency.refits)}
            if save:
                save()
            return state
        latency.refit(widths, measured * latency.full_ms)
        if save:
            save()
        state.done = False
        try:
            state = searcher.run(state, on_step=on_step)
        except EkgError:  # every group down to one unit: the last finished step's network is the answer
            searcher.restore(state)
            state.done = True
            latency.accepted = {"widths": [int(w) for w in searcher.net.widths()], "measured_ratio": None,
                                "refits": len(latency.refits), "note": "every prunable group is down to one unit"}
            if save:
                save()
            return state
    return state


def _adaptation(model: nn.Module, d_sub: Any, norm: Any, cfg: SearchConfig, dist: Dist) -> None:
    """Phase 1: one epoch over D_sub (:func:`ekg.search.adapt`), unaugmented, in batches of
    ``cfg.batch_size`` (a D_sub smaller than one batch, from a small dataset, is one batch of all
    of it); under torchrun each rank loads its share of every batch."""
    adapt_cfg = cfg if len(d_sub) >= cfg.batch_size else dataclasses.replace(cfg, batch_size=len(d_sub))
    batch = adapt_cfg.batch_size
    part = dist.part(batch) if dist.enabled else None  # each rank loads its share of a batch
    adapt(model, iterate_batches(d_sub, batch, normalization=norm, drop_last=True, part=part), adapt_cfg, dist=dist)
    # the ranks agree already (same summed gradients); rank 0's copy makes it exact
    dist.broadcast_([*model.parameters(), *model.buffers()])


def _latency_model(ckpt: Checkpoint, graph: Any, cfg: SearchConfig, rd: RunDir, resume: bool, progress: bool) -> Any:
    """A latency budget's cost model (None for a FLOPs budget): the run directory's saved one when a
    run is resumed (it predicts as the search did so far), else built on the target (the layers the
    cache does not have are timed). A ``keep`` below its floor (every prunable group at one unit) is
    refused here, before anything is written in the run directory."""
    if cfg.budget != "latency":
        return None
    import math

    from .latency import LatencyModel

    target = cfg.latency_target()
    if resume and rd.latency.exists():
        lat = saved_latency_model(rd, ckpt.model, graph, target)
    else:
        quantum = [math.lcm(g.blocks, cfg.round_to) for g in graph.groups]
        lat = LatencyModel(ckpt.model, graph, target, quantum=quantum, progress=progress)
        floor = lat.floor(quantum)
        if cfg.keep < floor:
            raise EkgError(f"cannot reach `keep` {cfg.keep} of the latency on {target.describe()}: with every prunable "
                           f"channel group at one channel the predicted latency is still {floor:.4f} of the original's "
                           f"({floor * lat.full_ms:.3g} of {lat.full_ms:.3g} ms); give a `keep` of "
                           f"at least {floor:.4f}")
    return lat


def saved_latency_model(rd: RunDir, model: nn.Module, graph: Any, target: Any) -> Any:
    """The latency model ``RUN/latency.json`` keeps, for ``model`` (its ``graph``) on ``target``; a
    damaged file, or one of another model or target, is one error naming it with the fix."""
    from .io import read_json
    from .latency import LatencyModel

    saved = read_json(rd.latency, REMEDY[LATENCY])
    if not (isinstance(saved, dict) and isinstance(saved.get("model"), dict)):
        raise EkgError(f"{rd.latency} holds no latency model; {REMEDY[LATENCY]}")
    try:
        return LatencyModel(model, graph, target, saved=saved["model"])
    except EkgError as e:
        raise EkgError(f"{rd.latency}: {e}; {REMEDY[LATENCY]}") from None


def latency_report(latency: Any, original: nn.Module, slim: nn.Module, input_size: tuple[int, ...],
                   widths: Any, rounds: int | None = None) -> dict[str, Any]:
    """The slim network's latency on the latency model's target: predicted (ms, ratio and speed-up
    from the table) and measured end to end, interleaved with the original round by round
    (:func:`ekg.latency.compare_on_target`: the median speed-up with its spread over the rounds)."""
    cmp = compare_on_target({"original": original, "pruned": slim}, input_size, latency.target, rounds=rounds)
    predicted = latency.predict(widths)
    measured_ratio = cmp["ratio"]["pruned"]["median"]
    return {"target": cmp["target"], "device": cmp["device"], "batch": latency.target.batch,
            "predicted_ms": predicted, "predicted_ratio": predicted / latency.full_ms,
            "predicted_speedup": latency.full_ms / predicted, "table_full_ms": latency.full_ms,
            "measured_ms": cmp["models"]["pruned"]["median_ms"], "original_ms": cmp["models"]["original"]["median_ms"],
            "measured_ratio": measured_ratio, "measured_speedup": cmp["speedup"]["pruned"],
            "prediction_error": predicted / latency.full_ms / measured_ratio - 1,
            "refits": len(latency.refits), "note": (latency.accepted or {}).get("note"), "comparison": cmp}


def check_prunable(ckpt: Checkpoint, splits: DataSplits, cfg: SearchConfig | None = None) -> Any:
    """The errors :func:`prune` raises about its model and data before anything is written: another
    number of classes than the data's, another image size, no prunable channel group, a training-mode
    forward that is not the traced network (:func:`ekg.graph.check_training_forward`), or (with
    ``cfg``) a ``keep`` below what the graph can reach (:func:`ekg.search.check_reachable`). Returns
    the dependency graph it checked."""
    if ckpt.num_classes != splits.num_classes:
        raise EkgError(f"the model predicts {ckpt.num_classes} classes but the data has {splits.num_classes}")
    if tuple(splits.train.image_size) != tuple(ckpt.input_size):
        raise EkgError(f"the model takes {tuple(ckpt.input_size)} inputs but the images are "
                       f"{tuple(splits.train.image_size)}: give the model images of its size (or its `input_size`)")
    graph = build_graph(ckpt.model, tuple(ckpt.input_size))
    if not graph.prunable:
        raise EkgError(f"this model ({ckpt.arch}) has no prunable channel group: "
                       + "; ".join(f"{g.name}: {g.reason}" for g in graph.groups if g.producers))
    check_training_forward(ckpt.model, tuple(ckpt.input_size))
    if cfg is not None and cfg.budget == "flops":  # a latency budget's floor is its latency model's
        check_reachable(graph, cfg)
    return graph


def _save_state(out: Path, state: SearchState) -> None:
    """search_state.pt is the commit point; search.jsonl and history.pt are derived views."""
    rd = RunDir(out)
    save_torch(state.to_dict(), rd.search_state)
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
    save_torch({"history": state.history, "groups": [g.group.name for g in net.gates]}, rd.history)
    widths = {g.group.name: {"channels": g.channels, "kept": g.kept, "rate": g.rate} for g in net.gates}
    write_json(rd.widths, {"groups": widths, "spec": ckpt.arch_dict(),
                           "slim_check": {"max_abs_diff": diff, "images": 64, "bn": "inference mode"}})
    save_checkpoint(ckpt, rd.pruned)
    plot_trajectory(state.log, rd.trajectory_plot)
    plot_widths([g.group.name for g in net.gates], [g.channels for g in net.gates], [g.kept for g in net.gates],
                rd.widths_plot, title=f"widths before/after (FLOPs ratio {state.log[-1]['flops_ratio']:.3f})")


def _read_search_sets(search_sets: tuple[Any, Any] | None, splits: DataSplits, progress: bool) -> tuple[Any, Any] | None:
    """``search_sets=(d_val, d_sub)`` read like the training split (same image shape, same classes)."""
    if search_sets is None:
        return None
    if not (isinstance(search_sets, (tuple, list)) and len(search_sets) == 2):
        raise EkgError("`search_sets` must be a (d_val, d_sub) pair of Datasets")
    if splits.streamed:
        raise EkgError("`search_sets` are read into memory; with a streamed tree the search sets are carved from it")
    like = (splits.train.image_size, splits.train.kind)
    out = []
    for ds, what in zip(search_sets, ("D_val (search_sets[0])", "D_sub (search_sets[1])")):
        if isinstance(ds, ImageSet):
            out.append(ds)
            continue
        out.append(read_split(ds, what, classes=splits.train.classes, progress=progress, like=like))
    return out[0], out[1]

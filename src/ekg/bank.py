"""The memory bank (method doc, phase 3): interim sub-networks of the search as teachers.

* :func:`select_teachers` picks ``T`` entries of the search history spread evenly in val loss;
* :func:`build_bank` computes each teacher's logits on every training image (unaugmented, in
  dataset order, BN on batch statistics, batches of 256) and stores them as one fp16 array of shape
  ``(N, classes, T)`` in ``.npy`` format, so :func:`open_bank` can memory-map it (a bank larger than
  RAM works; only the rows of a batch are read);
* ``bank.json`` beside it records which sub-networks the teachers are (history index, search step,
  val loss and accuracy, per-group kept counts) and what data the rows belong to.

Layout::

    RUN/bank/logits.npy   float16 (N, classes, T), row i = training image i
    RUN/bank/bank.json    teachers, data fingerprint, temperature-free facts

Building is resumable: rows are written into ``logits.partial.npy`` teacher by teacher, the
finished teachers are recorded in ``progress.json``, and the final name appears only when every
teacher is done.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import ImageSet, Normalization, iterate_index_batches
from .distributed import Dist
from .errors import EkgError
from .evaluate import batch_statistics_bn
from .io import write_json
from .masks import MaskedNetwork


def select_teachers(losses: Sequence[float], count: int = 5) -> list[int]:
    """Indices (into ``losses``, the search history's val CE losses, the final sub-network
    already removed) of ``count`` teachers spread evenly in loss.

    Targets ``L_min + k·(L_max − L_min)/count`` for ``k = 0..count−1``; for each target in turn
    the nearest entry not taken yet (ties: the lower loss, then the earlier entry). Teacher 0 is
    the lowest-loss entry. With ``count`` or fewer entries, all of them, by ascending loss."""
    if count < 1:
        raise EkgError(f"the memory bank needs at least one teacher, got {count}")
    n = len(losses)
    if n == 0:
        raise EkgError("the search history holds no sub-network besides the final one: nothing to build a bank from")
    order = sorted(range(n), key=lambda i: (losses[i], i))
    if n <= count:
        return order
    lo, hi = losses[order[0]], losses[order[-1]]
    taken: list[int] = []
    for k in range(count):
        target = lo + k * (hi - lo) / count
        best = min((i for i in order if i not in taken), key=lambda i: (abs(losses[i] - target), losses[i], i))
        taken.append(best)
    return taken


def data_fingerprint(data: ImageSet) -> dict[str, Any]:
    """What identifies the training set a bank's rows belong to (count, classes, label hash)."""
    labels = data.labels.cpu().numpy().astype(np.int64)
    return {"n_images": len(data), "num_classes": len(data.classes),
            "labels_sha1": hashlib.sha1(labels.tobytes()).hexdigest()}


@dataclass
class MemoryBank:
    """An opened bank: ``logits`` is a (memory-mapped) fp16 array ``(N, classes, T)``."""

    logits: np.ndarray
    info: dict[str, Any]

    def batch(self, index: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Teacher logits of the images at ``index`` as float32 ``(B, T, classes)``."""
        idx = np.asarray(index.cpu().numpy() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        rows = torch.from_numpy(np.ascontiguousarray(self.logits[idx]))  # reads only these rows
        return rows.to(device=device, dtype=torch.float32).transpose(1, 2)

    def check_data(self, data: ImageSet) -> None:
        want, got = self.info["data"], data_fingerprint(data)
        if want != got:
            raise EkgError(f"the memory bank was built for another training set ({want['n_images']} images, "
                           f"{want['num_classes']} classes) than the one given ({got['n_images']} images, "
                           f"{got['num_classes']} classes, or different labels); rebuild it or pass the same --data")


def open_bank(folder: str | os.PathLike) -> MemoryBank:
    """Memory-map ``folder/logits.npy`` (``folder`` may be a run directory holding ``bank/``)."""
    folder = Path(folder)
    if (folder / "bank").is_dir() and not (folder / "logits.npy").exists():
        folder = folder / "bank"
    path, meta = folder / "logits.npy", folder / "bank.json"
    if not path.exists() or not meta.exists():
        raise EkgError(f"no memory bank in {folder}: expected logits.npy and bank.json there "
                       "(build it with `ekg run`, or point --bank at a run directory that has one)")
    try:
        logits = np.load(path, mmap_mode="r")
        info = json.loads(meta.read_text())
    except (ValueError, OSError, json.JSONDecodeError) as e:
        raise EkgError(f"the memory bank in {folder} is unreadable ({e}); delete it and build it again") from None
    if logits.dtype != np.float16 or logits.ndim != 3 or list(logits.shape) != info.get("shape"):
        raise EkgError(f"the memory bank in {folder} has shape {logits.shape} {logits.dtype}, "
                       f"bank.json says {info.get('shape')} float16; delete it and build it again")
    return MemoryBank(logits=logits, info=info)


def _open_checked(folder: Path, data: ImageSet) -> MemoryBank | None:
    """The finished bank in ``folder`` (checked against ``data``), or None if there is none yet."""
    if not ((folder / "logits.npy").exists() and (folder / "bank.json").exists()):
        return None
    bank = open_bank(folder)
    bank.check_data(data)
    return bank


def build_bank(net: MaskedNetwork, history: list[dict[str, Any]], data: ImageSet, normalization: Normalization,
               folder: str | os.PathLike, *, teachers: int = 5, batch_size: int = 256,
               progress: bool = True, dist: Dist | None = None) -> MemoryBank:
    """Select teachers from ``history`` (the search's, final sub-network last) and store their
    logits on every image of ``data``. ``net`` is the masked network on the search's frozen
    (adapted) weights; its masks are restored afterwards.

    With ``dist`` (several processes sharing the folder) each rank computes every
    world_size-th batch (the same batches, so the same rows, as one process) and writes its rows
    into the memory-mapped array; rank 0 writes the progress record and the final names."""
    dist = dist or Dist()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    existing = _open_checked(folder, data)
    if existing is not None:
        return existing
    final, partial, prog = folder / "logits.npy", folder / "logits.partial.npy", folder / "progress.json"
    candidates = history[:-1]
    chosen = select_teachers([float(h["loss"]) for h in candidates], teachers)
    n, classes = len(data), _num_classes(net, data)
    shape = (n, classes, len(chosen))
    info = {"shape": list(shape), "dtype": "float16", "data": data_fingerprint(data),
            "bn": "batch statistics, batches of %d in dataset order" % batch_size,
            "teachers": [{"history_index": i, "step": int(candidates[i].get("step", i)),
                          "val_loss": float(candidates[i]["loss"]),
                          "val_accuracy": float(candidates[i].get("accuracy", float("nan"))),
                          "kept": [int(m.sum()) for m in candidates[i]["masks"]]} for i in chosen]}
    done: list[int] = []
    if partial.exists() and prog.exists():
        saved = json.loads(prog.read_text())
        if saved.get("info") == info:
            done = saved["done"]
    dist.barrier()  # every rank has read the progress record
    if not done and dist.is_main:
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=shape).flush()
    dist.barrier()  # the array exists for every rank
    out = np.load(partial, mmap_mode="r+")
    progress = progress and dist.is_main
    saved_masks = [m.mask.detach().clone() for m in net.masks]
    device = net.masks[0].mask.device if len(net.masks) else torch.device("cpu")
    bar = tqdm(total=len(chosen) * n, initial=len(done) * n, desc="memory bank", unit="img", disable=not progress)
    try:
        with batch_statistics_bn(net.model), torch.no_grad():
            for t, i in enumerate(chosen):
                if t in done:
                    continue
                for gm, m in zip(net.masks, candidates[i]["masks"]):
                    gm.set(m.to(device))
                mine = [range(n)[b * batch_size:(b + 1) * batch_size] for b in dist.shard(-(-n // batch_size))]
                for rows, (x, _) in zip(mine, iterate_index_batches(data, mine, normalization=normalization,
                                                                    device=device)):
                    z = net(x).float().cpu().numpy()
                    out[rows.start:rows.stop, :, t] = z.astype(np.float16)
                    bar.update(len(z) * dist.world_size)
                out.flush()
                dist.barrier()  # every rank's rows of this teacher are on disk
                done.append(t)
                if dist.is_main:
                    write_json(prog, {"info": info, "done": done})
    finally:
        bar.close()
        for gm, m in zip(net.masks, saved_masks):
            gm.set(m.bool())
    del out
    if dist.is_main:
        write_json(folder / "bank.json", info)
        os.replace(partial, final)
        prog.unlink(missing_ok=True)
    dist.barrier()  # the finished bank is in place for every rank
    return open_bank(folder)


def _num_classes(net: MaskedNetwork, data: ImageSet) -> int:
    spec = getattr(net.model, "spec", None)
    return int(spec.num_classes) if spec is not None else len(data.classes)


def bank_for_run(run: str | os.PathLike, data: ImageSet, *, teachers: int = 5, batch_size: int = 256,
                 device: torch.device | str = "cpu", progress: bool = True, dist: Dist | None = None) -> MemoryBank:
    """The memory bank of an `ekg prune` run directory: a finished bank in ``run`` itself (a bank
    folder) or in ``RUN/bank``, checked against ``data``; else one built into ``RUN/bank`` from
    ``RUN/adapted.pt`` and ``RUN/history.pt``."""
    from .checkpoint import load_checkpoint
    from .data import get_normalization

    run = Path(run)
    for folder in (run, run / "bank"):
        existing = _open_checked(folder, data)
        if existing is not None:
            return existing
    missing = [name for name in ("adapted.pt", "history.pt") if not (run / name).exists()]
    if missing:
        raise EkgError(f"{run} is not a finished `ekg prune` run directory (missing {', '.join(missing)}): "
                       "the memory bank is built from its search history")
    ckpt = load_checkpoint(run / "adapted.pt")
    saved = torch.load(run / "history.pt", map_location="cpu", weights_only=True)
    model = ckpt.model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    net = MaskedNetwork(model, input_size=tuple(ckpt.input_size))
    # kept-channels-only layers in channels-last: the same function as the search's, 1.6x faster here
    model.to(memory_format=torch.channels_last)
    net.set_sliced(True)
    names = [g.group.name for g in net.gates]
    if names != list(saved["groups"]):
        raise EkgError(f"the search history in {run} does not match the model's channel groups "
                       f"({len(saved['groups'])} saved, {len(names)} now); was it written by another ekg version?")
    return build_bank(net, saved["history"], data.to(device), get_normalization(ckpt.normalization), run / "bank",
                      teachers=teachers, batch_size=batch_size, progress=progress, dist=dist)

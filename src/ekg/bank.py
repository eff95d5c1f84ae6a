"""The memory bank (method doc, phase 3): interim sub-networks of the search as teachers.

One module because the bank is one file format (the dense and top-k layouts, ``bank.json``, the
``*.partial.npy`` files of a resumable build), written by :func:`build_bank` and read by
:func:`open_bank`/:class:`MemoryBank`: split, the writer and the reader of that format would drift apart.

* :func:`select_teachers` picks ``T`` entries of the search history spread evenly in val loss;
* :func:`build_bank` computes each teacher's logits on every training image (unaugmented, in
  dataset order, BN on batch statistics, batches of 256) and stores them in ``.npy`` files that
  :func:`open_bank` memory-maps (a bank larger than RAM works; only the rows of a batch are read);
* ``bank.json`` beside them records which sub-networks the teachers are (history index, search
  step, val loss and accuracy, per-group kept counts), what data the rows belong to and how the
  logits are stored.

Two layouts. Dense (the default) keeps every logit::

    RUN/bank/logits.npy        float16 (N, classes, T), row i = training image i
    RUN/bank/bank.json         teachers, data fingerprint, "topk": null

Top-k (``topk=K``) keeps, per image and teacher, the K largest logits, their classes and one
"rest" value, the mean of the other ``classes − K`` logits::

    RUN/bank/topk_values.npy   float16 (N, T, K), each row's K largest logits, largest first
    RUN/bank/topk_classes.npy  int16 (int32 above 32768 classes) (N, T, K), their class indices
    RUN/bank/topk_rest.npy     float16 (N, T), the mean of the logits outside the top K
    RUN/bank/bank.json         ..., "topk": K, "fill": "mean"

:meth:`MemoryBank.batch` returns the same dense float32 ``(B, T, classes)`` for both: a top-k row
is densified by filling the classes outside the top K with the rest value (``fill="mean"``). The
alternative, ``fill="-inf"``, renormalises over the top K: it distorts the teachers far more and
collapses EKG's per-batch teacher selection to teacher 0 (measured in ``bench/bank_topk.py``, see
BENCHMARKS.md and docs/design.md). With K = classes the two layouts give identical batches.

Building is resumable: rows are written into ``*.partial.npy`` teacher by teacher, the finished
teachers are recorded in ``progress.json``, and the final names appear only when every teacher is
done. The arrays are preallocated on disk when they are created, so a disk too small for the bank
is one error naming the file before any teacher runs (a sparse memory map would instead die with
``SIGBUS`` on the first page the full disk cannot hold).

:func:`check_student` refuses, before any work, to distil into a model that is not a sub-network
of the network the bank's teachers come from (``bank.json`` records its tensor shapes).
"""

from __future__ import annotations

import errno
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
from .io import output_error, read_json, write_json
from .lock import hold
from .masks import MaskedNetwork
from .rundir import (BANK_DENSE_FILES, BANK_INFO, BANK_PROGRESS, BANK_TOPK_FILES, PRUNED, RunDir, load_artifact,
                     partial_name)


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
    """What identifies the training set a bank's rows belong to (count, classes, label hash; for a
    streamed tree also the evaluation crop and resize the teachers saw)."""
    labels = data.labels.cpu().numpy().astype(np.int64)
    out = {"n_images": len(data), "num_classes": len(data.classes),
           "labels_sha1": hashlib.sha1(labels.tobytes()).hexdigest()}
    config = getattr(data, "config", None)  # a streamed set (ekg.data.FolderSet)
    if config is not None:
        out["stream"] = {"image_size": int(config.image_size), "resize": int(config.eval_resize)}
    return out


DEFAULT_TEACHERS = 5  # the method's T
FILL_RULES = ("mean", "-inf")
DEFAULT_FILL = "mean"
# "-inf" fill: this far below a row's smallest stored logit (finite, so that float32 softmax gives
# those classes exactly zero probability while log-softmax and the KD loss stay finite)
NEG_FILL_GAP = 1e4
TOPK_FILES = BANK_TOPK_FILES    # the file names are ekg.rundir's
DENSE_FILES = BANK_DENSE_FILES


def index_dtype(num_classes: int) -> np.dtype:
    """The dtype of stored class indices: int16 while every index (at most ``num_classes − 1``)
    fits, int32 beyond 32768 classes."""
    return np.dtype(np.int16) if num_classes - 1 <= np.iinfo(np.int16).max else np.dtype(np.int32)


def check_topk(topk: int | None, num_classes: int | None = None) -> None:
    """Refuse a ``topk`` (``ekg --bank-topk``) that is not a whole number in ``[1, num_classes]`` (None: dense)."""
    if topk is None:
        return
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1:
        raise EkgError(f"`topk` must be a whole number of at least 1 (or absent for a dense bank), got {topk!r}")
    if num_classes is not None and topk > num_classes:
        raise EkgError(f"`topk` {topk} exceeds the model's {num_classes} classes; "
                       f"use at most {num_classes} (or leave it out for a dense bank)")


def check_bank_args(kd: str, teachers: int | None, topk: int | None) -> None:
    """``teachers`` and ``topk`` shape the memory bank: valid, and not given when ``kd`` is none."""
    check_teachers(teachers)
    check_topk(topk)
    if kd == "none":
        for name, value in (("teachers", teachers), ("bank_topk", topk)):
            if value is not None:
                raise EkgError(f"`{name}` shapes the memory bank, which `kd` none does not use: leave out `{name}`, "
                               "or distil with `kd` ensemble or single")


def check_teachers(teachers: int | None) -> None:
    """Refuse a ``teachers`` count that is not a whole number of at least 1 (None: the method's 5)."""
    if teachers is None:
        return
    if isinstance(teachers, bool) or not isinstance(teachers, (int, np.integer)) or teachers < 1:
        raise EkgError(f"`teachers` must be a whole number of at least 1 (or absent for the method's "
                       f"{DEFAULT_TEACHERS}), got {teachers!r}")


def topk_compress(logits: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A top-k record of ``logits`` ``(..., classes)``: the ``k`` largest logits (fp16, largest
    first), their class indices (:func:`index_dtype`) and the rest value (fp16), the mean of the
    other ``classes − k`` logits (0 when ``k = classes``: no class is left to fill). Computed in
    float32 from the logits as given, rounded to fp16 once."""
    z = torch.as_tensor(logits).float()
    classes = z.shape[-1]
    check_topk(k, classes)
    values, idx = z.topk(k, dim=-1, largest=True, sorted=True)
    if k < classes:
        rest = (z.sum(-1) - values.sum(-1)) / (classes - k)
    else:
        rest = torch.zeros(z.shape[:-1])
    return (values.numpy().astype(np.float16), idx.numpy().astype(index_dtype(classes)),
            rest.numpy().astype(np.float16))


def densify(values: torch.Tensor, classes: torch.Tensor, rest: torch.Tensor, num_classes: int,
            fill: str = DEFAULT_FILL) -> torch.Tensor:
    """Dense float32 logits ``(..., num_classes)`` from a top-k record (``values``/``classes``
    ``(..., k)``, ``rest`` ``(...)``): the stored values at their classes, every other class
    ``rest`` (``fill="mean"``) or far below the row's smallest stored value (``fill="-inf"``: the
    distribution renormalised over the top k)."""
    if fill not in FILL_RULES:
        raise EkgError(f"the top-k fill rule must be one of {', '.join(FILL_RULES)}, got {fill!r}")
    values = values.float()
    if fill == "mean":
        base = rest.float()[..., None]
    else:
        base = values.min(-1, keepdim=True).values - NEG_FILL_GAP
    out = base.expand(*values.shape[:-1], num_classes).contiguous()
    return out.scatter_(-1, classes.long(), values)


@dataclass
class MemoryBank:
    """An opened bank. Dense: ``logits`` is a (memory-mapped) fp16 array ``(N, classes, T)``.
    Top-k: ``values`` and ``classes`` ``(N, T, K)`` and ``rest`` ``(N, T)``, memory-mapped, and
    ``logits`` is None. ``fill`` is how :meth:`batch` densifies top-k rows (bank.json's rule)."""

    logits: np.ndarray | None
    info: dict[str, Any]
    values: np.ndarray | None = None
    classes: np.ndarray | None = None
    rest: np.ndarray | None = None
    fill: str = DEFAULT_FILL

    @property
    def topk(self) -> int | None:
        """K of a top-k bank, None for a dense one."""
        return self.info.get("topk")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(N, classes, T)``, whatever the layout."""
        return tuple(int(s) for s in self.info["shape"])  # type: ignore[return-value]

    def batch(self, index: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Teacher logits of the images at ``index`` as float32 ``(B, T, classes)``."""
        idx = np.asarray(index.cpu().numpy() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        if self.logits is not None:
            rows = torch.from_numpy(np.ascontiguousarray(self.logits[idx]))  # reads only these rows
            return rows.to(device=device, dtype=torch.float32).transpose(1, 2)
        assert self.values is not None and self.classes is not None and self.rest is not None
        values = torch.from_numpy(np.ascontiguousarray(self.values[idx])).to(device)
        classes = torch.from_numpy(np.ascontiguousarray(self.classes[idx])).to(device)
        rest = torch.from_numpy(np.ascontiguousarray(self.rest[idx])).to(device)
        return densify(values, classes, rest, self.shape[1], self.fill)

    def check_data(self, data: ImageSet) -> None:
        want, got = dict(self.info["data"]), data_fingerprint(data)
        if want == got:
            return
        want_stream, got_stream = want.pop("stream", None), got.pop("stream", None)
        if want == got:  # the same images, read at another size

            def seen(d: dict[str, Any] | None) -> str:
                return f"crop {d['image_size']}, resize {d['resize']}" if d else "in memory, at their own size"
            raise EkgError(f"the memory bank's teachers saw these images {seen(want_stream)}, but they are "
                           f"now read {seen(got_stream)}; pass the same `image_size`/`resize` (or "
                           "`data_mode`) as when it was built, or delete the bank to build it again")
        raise EkgError(f"the memory bank was built for another training set ({want['n_images']} images, "
                       f"{want['num_classes']} classes) than the one given ({got['n_images']} images, "
                       f"{got['num_classes']} classes, or different labels); rebuild it or pass the same `data`")

    def check_teachers(self, teachers: int | None, folder: Path | str) -> None:
        """Refuse a bank built for another number of teachers than ``teachers`` (None: any). Banks
        written before this was recorded are accepted."""
        have = self.info.get("teachers_requested")
        if teachers is None or have is None or have == teachers:
            return
        raise EkgError(f"the memory bank in {folder} was built with `teachers` {have}, but `teachers` {teachers} "
                       f"was asked for; pass `teachers` {have} to use it, or delete {folder} to build it again")

    def check_topk(self, topk: int | None, folder: Path | str) -> None:
        """Refuse a bank stored otherwise than ``topk`` asks (None: dense)."""
        have = self.topk
        if have == topk:
            return
        what = f"the top-{have} logits of each teacher" if have is not None else "every logit (a dense bank)"
        hint = "leave out `topk` to use it" if have is None else f"pass `topk` {have} to use it"
        asked = f"a top-{topk} bank" if topk is not None else "a dense bank (no `topk`)"
        raise EkgError(f"the memory bank in {folder} stores {what}, but {asked} was asked for; "
                       f"{hint}, or delete {folder} to build it again as asked")


def _bank_files(topk: int | None) -> dict[str, str]:
    return DENSE_FILES if topk is None else TOPK_FILES


def _has_bank(folder: Path) -> bool:
    return (folder / BANK_INFO).exists() or any((folder / f).exists()
                                                  for f in (*DENSE_FILES.values(), *TOPK_FILES.values()))


def open_bank(folder: str | os.PathLike, *, fill: str | None = None) -> MemoryBank:
    """Memory-map the bank in ``folder`` (``folder`` may be a run directory holding ``bank/``).
    ``fill`` overrides how a top-k bank is densified (default: bank.json's rule, "mean")."""
    folder = Path(folder)
    if RunDir(folder).bank.is_dir() and not _has_bank(folder):
        folder = RunDir(folder).bank
    meta = folder / BANK_INFO
    try:
        info = json.loads(meta.read_text()) if meta.exists() else None
    except (ValueError, OSError) as e:
        raise EkgError(f"the memory bank in {folder} is unreadable ({e}); delete it and build it again") from None
    topk = info.get("topk") if isinstance(info, dict) else None
    files = _bank_files(topk)
    if info is None or not all((folder / f).exists() for f in files.values()):
        raise EkgError(f"no memory bank in {folder}: expected {' and '.join(files.values())} and bank.json there "
                       "(build it with `ekg run`, or point `bank` at a run directory that has one)")
    shape = info.get("shape")
    try:
        arrays = {name: np.load(folder / f, mmap_mode="r") for name, f in files.items()}
    except (ValueError, OSError) as e:
        raise EkgError(f"the memory bank in {folder} is unreadable ({e}); delete it and build it again") from None
    if topk is None:
        logits = arrays["logits"]
        if logits.dtype != np.float16 or logits.ndim != 3 or list(logits.shape) != shape:
            raise EkgError(f"the memory bank in {folder} has shape {logits.shape} {logits.dtype}, "
                           f"bank.json says {shape} float16; delete it and build it again")
        return MemoryBank(logits=logits, info=info)
    if not (isinstance(shape, list) and len(shape) == 3 and isinstance(topk, int) and 1 <= topk <= shape[1]):
        raise EkgError(f"the memory bank in {folder} has an invalid bank.json (shape {shape}, topk {topk!r}); "
                       "delete it and build it again")
    n, num_classes, t = shape
    want = {"values": ((n, t, topk), np.dtype(np.float16)), "classes": ((n, t, topk), index_dtype(num_classes)),
            "rest": ((n, t), np.dtype(np.float16))}
    for name, (wshape, wdtype) in want.items():
        a = arrays[name]
        if a.shape != wshape or a.dtype != wdtype:
            raise EkgError(f"the memory bank in {folder} has {files[name]} of shape {a.shape} {a.dtype}, but "
                           f"bank.json (shape {shape}, top-{topk}) says {wshape} {wdtype}; delete it and build it again")
    rule = fill or info.get("fill", DEFAULT_FILL)
    if rule not in FILL_RULES:
        raise EkgError(f"the memory bank in {folder} asks for fill rule {rule!r}; expected one of {', '.join(FILL_RULES)}")
    return MemoryBank(logits=None, info=info, values=arrays["values"], classes=arrays["classes"],
                      rest=arrays["rest"], fill=rule)


def _finished(folder: Path) -> bool:
    """Whether ``folder`` holds bank.json and every array of the layout it names."""
    meta = folder / BANK_INFO
    if not meta.exists():
        return False
    try:
        info = json.loads(meta.read_text())
    except (ValueError, OSError):
        return True  # let open_bank say what is wrong
    topk = info.get("topk") if isinstance(info, dict) else None
    return all((folder / f).exists() for f in _bank_files(topk).values())


def _open_checked(folder: Path, data: ImageSet, topk: int | None = None,
                  teachers: int | None = None) -> MemoryBank | None:
    """The finished bank in ``folder`` (checked against ``data``, the layout ``topk`` asks for and
    the number of ``teachers``), or None if there is none yet."""
    if not _finished(folder):
        return None
    bank = open_bank(folder)
    bank.check_data(data)
    bank.check_topk(topk, folder)
    bank.check_teachers(teachers, folder)
    return bank


class _Store:
    """The arrays of one layout being written: ``*.partial.npy`` memory maps, renamed at the end."""

    def __init__(self, folder: Path, shape: tuple[int, int, int], topk: int | None) -> None:
        self.folder, self.topk = folder, topk
        n, classes, t = shape
        self.files = _bank_files(topk)
        if topk is None:
            self.layout = {"logits": (shape, np.dtype(np.float16))}
        else:
            self.layout = {"values": ((n, t, topk), np.dtype(np.float16)),
                           "classes": ((n, t, topk), index_dtype(classes)),
                           "rest": ((n, t), np.dtype(np.float16))}
        self.arrays: dict[str, np.ndarray] = {}

    def partial(self, name: str) -> Path:
        return self.folder / partial_name(self.files[name])

    def partials_exist(self) -> bool:
        return all(self.partial(name).exists() for name in self.layout)

    def create(self) -> None:
        """Fresh partial arrays; any other layout's partial arrays are removed."""
        for other in (*DENSE_FILES.values(), *TOPK_FILES.values()):
            stale = self.folder / partial_name(other)
            if stale.exists() and other not in self.files.values():
                stale.unlink()
        for name, (shape, dtype) in self.layout.items():
            path = self.partial(name)
            try:
                np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
                _preallocate(path)
            except OSError as e:
                for other in self.layout:
                    self.partial(other).unlink(missing_ok=True)
                raise output_error(path, e) from None

    def open(self) -> None:
        self.arrays = {name: np.load(self.partial(name), mmap_mode="r+") for name in self.layout}

    def write(self, rows: slice, t: int, z: np.ndarray) -> None:
        """Teacher ``t``'s float32 logits ``(rows, classes)`` of the images ``rows``."""
        if self.topk is None:
            self.arrays["logits"][rows, :, t] = z.astype(np.float16)
            return
        values, classes, rest = topk_compress(z, self.topk)
        self.arrays["values"][rows, t] = values
        self.arrays["classes"][rows, t] = classes
        self.arrays["rest"][rows, t] = rest

    def flush(self) -> None:
        for a in self.arrays.values():
            a.flush()

    def close(self) -> None:
        self.arrays = {}

    def finish(self) -> None:
        """The final names (the memory maps must be closed)."""
        for name in self.layout:
            os.replace(self.partial(name), self.folder / self.files[name])


def _preallocate(path: Path) -> None:
    """Reserve the disk blocks of a (sparse) file, so that a full disk fails here and not under a memory map."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: write zeros
                raise
            _write_zeros(fd, size)
    finally:
        os.close(fd)


def _write_zeros(fd: int, size: int, chunk: int = 1 << 24) -> None:
    zeros = bytes(min(chunk, size))
    done = 0
    while done < size:
        done += os.pwrite(fd, zeros[:min(chunk, size - done)], done)
    os.fsync(fd)


def model_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """The tensor shapes of ``model``'s state dict (BN's step counters left out)."""
    return {k: list(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def bank_model_shapes(run: str | os.PathLike) -> dict[str, list[int]] | None:
    """The tensor shapes of the network whose sub-networks the bank of ``run`` (a run directory or
    a bank folder) holds: bank.json's record, else the run's ``adapted.pt``; None if neither says."""
    rd = RunDir(run)
    for folder in (rd.path, rd.bank):
        meta = folder / BANK_INFO
        if meta.exists():
            info = read_json(meta, "delete the bank folder to build it again")
            if isinstance(info, dict) and isinstance(info.get("model_shapes"), dict):
                return info["model_shapes"]
    if rd.adapted.exists():
        saved = load_artifact(rd.adapted)
        if isinstance(saved, dict) and isinstance(saved.get("state_dict"), dict):
            return {k: list(v.shape) for k, v in saved["state_dict"].items() if not k.endswith("num_batches_tracked")}
    return None


def check_student(run: str | os.PathLike, model: torch.nn.Module, source: str) -> None:
    """Refuse to distil the memory bank of ``run`` into ``model`` (named ``source``) unless it is a
    sub-network of the network the teachers come from: the same tensors, none wider."""
    teacher = bank_model_shapes(run)
    if teacher is None:
        return
    own = model_shapes(model)
    wrong = [f"{k} is not in the pruned network" for k in own if k not in teacher]
    wrong += [f"{k} of the pruned network is not in the model" for k in teacher if k not in own]
    wrong += [f"{k} is {tuple(own[k])}, wider than the pruned network's {tuple(teacher[k])}" for k in own
              if k in teacher and (len(own[k]) != len(teacher[k]) or any(a > b for a, b in zip(own[k], teacher[k])))]
    if wrong:
        raise EkgError(f"the memory bank of {run} was built from sub-networks of another network than {source} "
                       f"({len(wrong)} tensors differ; first: {wrong[0]}); fine-tune that run's {PRUNED}, or pass "
                       "the `bank` of the run that pruned this model")


def build_bank(net: MaskedNetwork, history: list[dict[str, Any]], data: ImageSet, normalization: Normalization,
               folder: str | os.PathLike, *, teachers: int = 5, batch_size: int = 256,
               progress: bool = True, dist: Dist | None = None, topk: int | None = None) -> MemoryBank:
    """Select teachers from ``history`` (the search's, final sub-network last) and store their
    logits on every image of ``data``. ``net`` is the masked network on the search's frozen
    (adapted) weights; its masks are restored afterwards.

    ``topk=None`` stores every logit (dense); ``topk=K`` only each row's K largest, their classes
    and the mean of the others (see the module doc). A finished bank already in ``folder`` is
    returned if it is stored as asked and refused otherwise.

    With ``dist`` (several processes sharing the folder) each rank computes every
    world_size-th batch (the same batches, so the same rows, as one process) and writes its rows
    into the memory-mapped arrays; rank 0 writes the progress record and the final names."""
    dist = dist or Dist()
    folder = Path(folder)
    n, classes = len(data), _num_classes(net, data)
    check_topk(topk, classes)
    folder.mkdir(parents=True, exist_ok=True)
    existing = _open_checked(folder, data, topk, teachers)
    if existing is not None:
        return existing
    prog = folder / BANK_PROGRESS
    candidates = history[:-1]
    chosen = select_teachers([float(h["loss"]) for h in candidates], teachers)
    shape = (n, classes, len(chosen))
    info: dict[str, Any] = {"shape": list(shape), "dtype": "float16", "topk": topk, "teachers_requested": teachers}
    if topk is not None:
        info.update({"classes_dtype": index_dtype(classes).name, "fill": DEFAULT_FILL,
                     "rest": f"mean of the {classes - topk} logits outside the top {topk}"})
    info.update({"data": data_fingerprint(data), "model_shapes": model_shapes(net.model),
                 "bn": "batch statistics, batches of %d in dataset order" % batch_size,
                 "teachers": [{"history_index": i, "step": int(candidates[i].get("step", i)),
                               "val_loss": float(candidates[i]["loss"]),
                               "val_accuracy": float(candidates[i].get("accuracy", float("nan"))),
                               "kept": [int(m.sum()) for m in candidates[i]["masks"]]} for i in chosen]})
    store = _Store(folder, shape, topk)
    done: list[int] = []
    if store.partials_exist() and prog.exists():
        try:
            saved = json.loads(prog.read_text())
        except (ValueError, OSError):  # a damaged progress record: the bank is built again from its start
            saved = {}
        if isinstance(saved, dict) and saved.get("info") == info:
            done = list(saved.get("done", []))
    dist.barrier()  # every rank has read the progress record
    if not done and dist.is_main:
        store.create()
    dist.barrier()  # the arrays exist for every rank
    store.open()
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
                    store.write(slice(rows.start, rows.stop), t, z)
                    bar.update(len(z) * dist.world_size)
                store.flush()
                dist.barrier()  # every rank's rows of this teacher are on disk
                done.append(t)
                if dist.is_main:
                    write_json(prog, {"info": info, "done": done})
    finally:
        bar.close()
        for gm, m in zip(net.masks, saved_masks):
            gm.set(m.bool())
    store.close()
    if dist.is_main:
        write_json(folder / BANK_INFO, info)
        store.finish()
        prog.unlink(missing_ok=True)
    dist.barrier()  # the finished bank is in place for every rank
    return open_bank(folder)


def _num_classes(net: MaskedNetwork, data: ImageSet) -> int:
    spec = getattr(net.model, "spec", None)
    return int(spec.num_classes) if spec is not None else len(data.classes)


def bank_for_run(run: str | os.PathLike, data: ImageSet, *, teachers: int | None = None, batch_size: int = 256,
                 device: torch.device | str = "cpu", progress: bool = True, dist: Dist | None = None,
                 topk: int | None = None, factory: Any = None) -> MemoryBank:
    """The memory bank of an `ekg prune` run directory: a finished bank in ``run`` itself (a bank
    folder) or in ``RUN/bank``, checked against ``data``, ``topk`` (None: dense; a bank stored
    otherwise is refused) and ``teachers`` (None: any); else one built into ``RUN/bank`` from
    ``RUN/adapted.pt`` and ``RUN/history.pt``, dense or top-``topk``, with ``teachers`` (default 5).
    ``factory`` rebuilds ``adapted.pt`` when its model is a user's module (:func:`ekg.checkpoint.rebuilder`)."""
    check_topk(topk)
    check_teachers(teachers)
    rd = RunDir(run)
    run = rd.path
    for folder in (run, rd.bank):
        existing = _open_checked(folder, data, topk, teachers)
        if existing is not None:
            return existing
    missing = [p.name for p in (rd.adapted, rd.history) if not p.exists()]
    if missing:
        raise EkgError(f"{run} is not a finished `ekg prune` run directory (missing {', '.join(missing)}): "
                       "the memory bank is built from its search history")
    with hold(run, dist):  # one process builds it; a second is refused at once
        return _build_for_run(rd, data, teachers, batch_size, device, progress, dist, topk, factory)


def _build_for_run(rd: RunDir, data: ImageSet, teachers: int | None, batch_size: int, device: Any, progress: bool,
                   dist: Dist | None, topk: int | None, factory: Any) -> MemoryBank:
    """:func:`bank_for_run`'s build, the run directory locked."""
    from .checkpoint import load_checkpoint
    from .data import get_normalization

    run = rd.path
    existing = _open_checked(rd.bank, data, topk, teachers)  # finished by the process that held the lock?
    if existing is not None:
        return existing
    ckpt = load_checkpoint(rd.adapted, factory=factory)
    check_topk(topk, ckpt.num_classes)
    saved = load_artifact(rd.history)
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
    return build_bank(net, saved["history"], data.to(device), get_normalization(ckpt.normalization), rd.bank,
                      teachers=DEFAULT_TEACHERS if teachers is None else teachers, batch_size=batch_size, progress=progress, dist=dist,
                      topk=topk)

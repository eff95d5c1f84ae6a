"""Training: a CIFAR baseline from scratch (``ekg train``) and fine-tuning a pruned model, with
or without the memory bank (``ekg finetune``), in one loop.

One module because it is that one loop (:func:`train`) with its configuration, learning-rate
schedule, per-epoch seeding and resumable epochs; every helper here serves only that loop.

Short on purpose (airbench/nanoGPT style): data lives on the training device as uint8 and is
augmented in batches there; the learning rate is a pure function of the step, and every epoch's
randomness comes from a generator seeded by (seed, epoch), so a run resumed from its last
checkpoint ends with exactly the weights of an uninterrupted run.

Run directory (its names are :class:`ekg.rundir.TrainDir`'s)::

    RUN/config.json     the TrainConfig
    RUN/last.pt         training state after the last finished epoch (model, optimizer, epoch)
    RUN/model.pt        the trained model as an ekg checkpoint (updated every epoch)
    RUN/log.jsonl       one JSON line per epoch
    RUN/tb/             TensorBoard curves

``--resume`` continues only with the saved deciding settings (:func:`ekg.rundir.check_settings`;
the fields that only say how it runs are :data:`ekg.rundir.HOW_IT_RUNS` ``["train"]``).

With ``kd`` other than ``none`` every batch is seen in two augmented views and the loss is
:func:`ekg.distill.kd_loss` against the memory bank's teacher logits of the batch's images.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, save_checkpoint
from .bank import MemoryBank
from .distributed import Dist
from .data import (Augment, AugmentConfig, DataSplits, ImageSet, Transform, augment_batch, batch_positions,
                   get_normalization, iterate_batches)
from .data.augment import transform_name
from .distill import KD_MODES, kd_loss
from .errors import EkgError, check_finite, check_seed
from .evaluate import evaluate
from .io import append_line, atomic_path, check_output_folder, save_torch, write_json
from .lock import check_free, hold
from .models import create_model
from .rundir import FIX_RESUME, REMEDY, TRAIN_STATE, TrainDir, check_settings, decision_settings, load_artifact
from .runtime import autocast, resolve_amp

SCHEDULES = ("cosine", "step")


@dataclass
class TrainConfig:
    """Hyper-parameters of a baseline run. Defaults: the usual CIFAR ResNet recipe."""

    arch: str = "resnet56"
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"          # cosine, or step: ×gamma at each milestone (fractions of training)
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    normalization: str = "auto"       # a preset name; auto = the dataset's own (cifar10 / cifar100)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    amp: str = "auto"
    device: str = "auto"
    eval_batch_size: int = 512
    limit_train: int | None = None    # use only the first N training images (quick runs, tests)
    limit_test: int | None = None
    kd: str = "none"                  # none | single | ensemble: distillation from the memory bank
    temperature: float | None = None  # of the KD loss; None: 4, or 10 with 1000+ classes (the method's values)
    transform: str | None = None      # the name of a user's training transform, which replaces ``augment``
    # how the run executes, not what it computes (ignored on --resume; see ekg.rundir.HOW_IT_RUNS):
    accum: int = 1                    # split each batch of batch_size into this many micro-batches
    compile: bool = False             # torch.compile the model for training
    channels_last: bool = False       # NHWC memory format for the model and its inputs

    def validate(self) -> None:
        if self.epochs < 1:
            raise EkgError(f"`epochs` must be at least 1, got {self.epochs}")
        for name in ("limit_train", "limit_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EkgError(f"`{name}` must be at least 1 (or absent for every image), got {value}")
        if self.batch_size < 1:
            raise EkgError(f"`batch_size` must be at least 1, got {self.batch_size}")
        for name in ("lr", "weight_decay", "warmup_epochs", "temperature"):
            check_finite(name, getattr(self, name))
        if not self.lr > 0:
            raise EkgError(f"`lr` must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise EkgError(f"`weight_decay` must be 0 or more, got {self.weight_decay:g}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise EkgError(f"`warmup_epochs` must be 0 or more and at most `epochs` {self.epochs}, got "
                           f"{self.warmup_epochs:g}")
        check_seed("seed", self.seed)
        if self.schedule not in SCHEDULES:
            raise EkgError(f"`schedule` must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.kd not in KD_MODES:
            raise EkgError(f"`kd` must be one of {', '.join(KD_MODES)}, got {self.kd!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise EkgError(f"`temperature` must be positive, got {self.temperature}")
        if self.accum < 1:
            raise EkgError(f"`accum` must be at least 1, got {self.accum}")
        if self.batch_size % self.accum:
            raise EkgError(f"`batch_size` {self.batch_size} is not divisible by `accum` {self.accum}: "
                           "each of the accum micro-batches holds batch-size/accum images")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        d["augment"] = AugmentConfig(**d.get("augment", {}))
        if "milestones" in d:
            d["milestones"] = tuple(d["milestones"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def finetune_config(kd: str = "ensemble", **overrides: Any) -> TrainConfig:
    """The paper's CIFAR fine-tuning recipe (method doc, phase 5): 100 epochs, batch 128, lr 0.01
    ×0.2 at 30/60/80%, Nesterov SGD, weight decay 5e-4; the colour jitter with the memory bank's
    two views, flip + pad-crop only without it. ``overrides`` replace any field."""
    recipe: dict[str, Any] = dict(arch="(pruned)", epochs=100, batch_size=128, lr=0.01, schedule="step",
                                  milestones=(0.3, 0.6, 0.8), gamma=0.2, augment=AugmentConfig(jitter=kd != "none"),
                                  kd=kd)
    recipe.update(overrides)
    return TrainConfig(**recipe)


def fit_jitter(cfg: TrainConfig, train_set: Any) -> tuple[TrainConfig, str | None]:
    """The recipe's colour jitter is for 3-channel uint8 images: on other in-memory data (grayscale,
    floats) it is left out, with a note saying so. An explicit request is :func:`train`'s to refuse."""
    if _jitter_unfit(cfg, train_set):
        note = (f"the EKG colour jitter needs 3-channel uint8 images; these are {train_set.images.dtype} "
                f"{'x'.join(map(str, train_set.image_size))}, so fine-tuning goes without it (flip + pad-crop only)")
        return dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, jitter=False)), note
    return cfg, None


def _jitter_unfit(cfg: TrainConfig, train_set: Any) -> bool:
    """Whether ``cfg`` asks for the method's colour jitter on in-memory images it does not fit
    (not 3-channel uint8)."""
    return cfg.augment.jitter and cfg.transform is None and isinstance(train_set, ImageSet) and not train_set.rgb_uint8


def default_temperature(num_classes: int) -> float:
    """The method's KD temperature: 4 for CIFAR-sized label sets, 10 for 1000-class data."""
    return 10.0 if num_classes >= 1000 else 4.0


def with_temperature(cfg: TrainConfig, num_classes: int) -> TrainConfig:
    """``cfg`` with its distillation temperature decided (None: :func:`default_temperature`)."""
    if cfg.temperature is not None:
        return cfg
    return dataclasses.replace(cfg, temperature=default_temperature(num_classes))


def lr_at(cfg: TrainConfig, progress: float) -> float:
    """Learning rate at ``progress`` ∈ [0, 1) of training (linear warm-up, then the schedule)."""
    warm = cfg.warmup_epochs / cfg.epochs
    if progress < warm:
        return cfg.lr * (progress / warm)
    if cfg.schedule == "cosine":
        t = (progress - warm) / max(1e-12, 1 - warm)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
    return cfg.lr * (cfg.gamma ** sum(progress >= m for m in cfg.milestones))


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator for one epoch's shuffling and augmentation: a function of (seed, epoch) only."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + epoch)
    return g


def train(cfg: TrainConfig, data: DataSplits, out: str | Path, *, resume: bool = False,
          progress: bool = True, on_epoch: Callable[[dict[str, Any]], None] | None = None,
          init: Checkpoint | None = None, bank: MemoryBank | None = None, dist: Dist | None = None,
          transform: Transform | None = None) -> Path:
    """Train on ``data`` into run directory ``out``; return the path of model.pt.

    ``transform``: a user's batched training augmentation (:data:`ekg.data.Transform`), used
    instead of ``cfg.augment`` on in-memory data; ``cfg.transform`` must hold its name
    (:func:`ekg.data.augment.transform_name`), which the run records and a resume compares.

    From scratch (``cfg.arch``), or, with ``init``, starting from that checkpoint's model and
    preprocessing (fine-tuning). ``cfg.kd`` other than ``none`` needs ``bank``.

    With ``dist`` (torchrun) the model trains under DDP: every rank draws the same batches of
    ``batch_size`` and takes its consecutive share of each, gradients are averaged, the test set
    is split for evaluation and the sums reduced; rank 0 alone writes the run directory."""
    dist = dist or Dist()
    cfg.validate()
    cfg = with_temperature(cfg, data.num_classes)
    if cfg.batch_size % (cfg.accum * dist.world_size):
        raise EkgError(f"`batch_size` {cfg.batch_size} is not divisible by `accum` {cfg.accum} × "
                       f"{dist.world_size} processes: each process runs batch-size/processes images per step")
    aug = _check_inputs(cfg, data, transform, bank)
    out = Path(out)
    check_output_folder(out)  # before the lock makes the folder: "is a file", "read-only" name the cause
    with hold(out, dist):  # one process (one torchrun job) in the folder from here on; refuses a second at once
        saved = check_train_dir(cfg, out, resume, init.model if init is not None else None, locked=True)
        return _train(cfg, data, out, saved, progress and dist.is_main, on_epoch, init, bank, dist, aug)


def check_train_dir(cfg: TrainConfig, out: str | Path, resume: bool, model: torch.nn.Module | None = None,
                    *, locked: bool = False) -> dict[str, Any] | None:
    """What :func:`train` checks of its run directory before any work (``ekg.finetune`` asks
    before it builds a memory bank): ``out`` can be written and no other process works in it; a
    run there is only continued with ``resume``, whose saved ``last.pt`` must be readable, hold
    these settings and (with ``model``) the weights of this model. Returns the saved state (None
    for a fresh run). ``cfg`` as :func:`train` runs it (:func:`with_temperature`); ``locked``: the
    caller holds the folder's lock (no early check for another process)."""
    rd = TrainDir(out)
    check_output_folder(rd.path)
    if not locked:
        check_free(rd.path)
    if rd.state.exists() and not resume:
        raise EkgError(f"{rd.path} already holds a training run; add `resume=True` to continue it or choose "
                       "another `out`")
    if not resume:
        return None
    if not rd.state.exists():
        raise EkgError(f"nothing to resume: {rd.state} does not exist (no epoch finished yet); "
                       "run the same command without `resume=True`")
    state = load_artifact(rd.state)
    if not (isinstance(state, dict) and {"config", "model", "optimizer", "epoch"} <= set(state)):
        raise EkgError(f"{rd.state} is not the state of an ekg training run; {REMEDY[TRAIN_STATE]}")
    check_settings(rd.path, decision_settings("train", state["config"]), decision_settings("train", cfg.to_dict()),
                   what="a training run", fix=FIX_RESUME)
    if model is not None:
        _check_fits(state["model"], model, rd.state)
    return state


def _check_fits(saved: dict[str, torch.Tensor], model: torch.nn.Module, path: Path) -> None:
    """The saved weights of a training run are those of ``model``'s architecture and widths."""
    own = model.state_dict()
    wrong = [f"{k} is saved but not in the model" for k in saved if k not in own]
    wrong += [f"{k} is in the model but not saved" for k in own if k not in saved]
    wrong += [f"{k} is {tuple(saved[k].shape)} saved, {tuple(own[k].shape)} now" for k in own
              if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise EkgError(f"{path} was saved by a training run of another model ({len(wrong)} tensors differ; "
                       f"first: {wrong[0]}); resume with the model that run started from, or choose another `out`")


def _train(cfg: TrainConfig, data: DataSplits, out: Path, state: dict[str, Any] | None, progress: bool,
           on_epoch: Callable[[dict[str, Any]], None] | None, init: Checkpoint | None, bank: MemoryBank | None,
           dist: Dist, aug: Any) -> Path:
    """:func:`train`'s work, its arguments and run directory checked, the folder locked."""
    rd = TrainDir(out)
    device = dist.device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, device)
    norm_record = _normalization_record(cfg, data, init)
    normalization = get_normalization(norm_record)

    train_set = data.train if cfg.limit_train is None else data.train.subset(range(min(cfg.limit_train, len(data.train))))
    test_set = data.test if cfg.limit_test is None else data.test.subset(range(min(cfg.limit_test, len(data.test))))
    if len(train_set) < cfg.batch_size:
        raise EkgError(f"the training set has {len(train_set)} images, fewer than one batch of {cfg.batch_size}: "
                       "lower `batch_size` (or raise `limit_train`)")
    train_set, test_set = train_set.to(device), test_set.to(device)

    if init is not None:
        model = copy.deepcopy(init.model).to(device)
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = create_model(cfg.arch, data.num_classes, seed=cfg.seed).to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch = 0
    if state is not None:
        _check_fits(state["model"], model, rd.state)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if state["scaler"] and scaler.is_enabled():  # empty when saved without fp16
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"])
        _truncate_log(rd.log, start_epoch)
        if start_epoch >= cfg.epochs:
            return rd.model
    dist.barrier()  # every rank has read the run directory before rank 0 writes to it
    writer = None
    if dist.is_main:
        if state is None:  # a fresh run: lines of an epoch whose state was never saved go
            _truncate_log(rd.log, 0)
        write_json(rd.config, cfg.to_dict())
        writer = _tensorboard(rd.tb)

    # the model that trains: compiled (or not); checkpoints always hold `model` itself, whose
    # state_dict keys carry no compile wrapper prefix
    train_model: torch.nn.Module = model
    if dist.enabled:  # DDP averages the ranks' gradients (it also starts every rank from rank 0's weights)
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = _compile(train_model)
    part = dist.part(cfg.batch_size)
    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            train_model.train()
            gen = epoch_generator(cfg.seed, epoch, device)
            if cfg.kd == "none":
                batches = ((x, y, None) for x, y in iterate_batches(
                    train_set, cfg.batch_size, shuffle=True, generator=gen, augment=aug,
                    normalization=normalization, drop_last=True, part=part))
            else:
                batches = _two_view_batches(train_set, cfg, gen, normalization, bank, part, aug)
            bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not progress, leave=False, dynamic_ncols=True)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            seen, kd_sum, selected_sum = 0, 0.0, 0.0
            for i, (x, y, teachers) in enumerate(bar):
                lr = lr_at(cfg, (epoch * steps_per_epoch + i) / total_steps)
                for group in opt.param_groups:
                    group["lr"] = lr
                if cfg.channels_last:
                    x = [v.contiguous(memory_format=torch.channels_last) for v in x] if teachers is not None \
                        else x.contiguous(memory_format=torch.channels_last)
                opt.zero_grad(set_to_none=True)
                for k, (xm, ym, tm) in enumerate(_micro_batches(x, y, teachers, cfg.accum)):
                    # DDP averages gradients over ranks once, after the last micro-batch
                    sync = k == cfg.accum - 1 or not dist.enabled
                    with contextlib.nullcontext() if sync else _no_sync(train_model):
                        with autocast(device, amp_dtype):
                            loss, logits, kd = _loss(train_model, xm, ym, tm, cfg)
                        # the gradient of the batch's mean loss: each micro-batch's mean weighted by its share
                        scaler.scale(loss * (len(ym) / len(y))).backward()
                    loss_sum += loss.detach() * len(ym)
                    correct += (logits.argmax(1) == ym).sum()
                    if kd is not None:
                        kd_sum += kd.kd * len(ym)
                        selected_sum += kd.selected / cfg.accum
                scaler.step(opt)
                scaler.update()
                seen += len(y)
                if progress and i % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4f}")
            bar.close()
            train_seconds = time.perf_counter() - t0
            test = evaluate(model, test_set, normalization, batch_size=cfg.eval_batch_size, device=device, dist=dist)
            sums = dist.all_reduce_sum(torch.stack([loss_sum.double(), correct.double()] + [
                torch.tensor(float(v), dtype=torch.float64, device=device) for v in (seen, kd_sum, selected_sum)]))
            loss_total, correct_total, seen, kd_sum, selected_sum = sums.tolist()
            selected_sum /= dist.world_size
            record = {
                "epoch": epoch + 1, "train_loss": loss_total / max(seen, 1),
                "train_top1": 100.0 * correct_total / max(seen, 1), "test_top1": test["top1"],
                "test_top5": test["top5"], "test_loss": test["loss"], "lr": lr,
                "seconds": time.perf_counter() - t0, "train_images_per_s": seen / train_seconds,
            }
            if cfg.kd != "none":
                record["kd_loss"] = kd_sum / max(seen, 1)
                record["teachers_selected"] = selected_sum / max(1, steps_per_epoch)
            # the log line first, then the commit point (last.pt): a kill between the two leaves a
            # line that --resume drops, never a finished epoch without its line
            if dist.is_main:
                append_line(rd.log, json.dumps(record))
                _save_epoch(out, cfg, data, model, opt, scaler, epoch + 1, norm_record, record, init=init)
            if writer is not None:
                for k, v in record.items():
                    if k != "epoch":
                        writer.add_scalar(k, v, epoch + 1)
                writer.flush()
            if progress:
                tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}  "
                           f"train {record['train_top1']:.2f}%  test {test['top1']:.2f}%  ({record['seconds']:.1f}s)")
            if on_epoch is not None:
                on_epoch(record)
    finally:
        if writer is not None:
            writer.close()
    dist.barrier()  # model.pt is written for every rank
    return rd.model


def _compile(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` of ``model`` (its parameters are shared, so the optimizer and the saved
    state of ``model`` are unchanged)."""
    return torch.compile(model)


def _no_sync(model: torch.nn.Module) -> Any:
    """DDP's ``no_sync`` (gradients stay local) of ``model``, also when it is compiled."""
    return getattr(model, "_orig_mod", model).no_sync()


def _micro_batches(x: Any, y: torch.Tensor, teachers: torch.Tensor | None, n: int):
    """Split a batch (``x`` a tensor, or a list of views) into ``n`` equal consecutive parts."""
    size = len(y) // n
    for k in range(n):
        part = slice(k * size, (k + 1) * size)
        xm = [v[part] for v in x] if isinstance(x, list) else x[part]
        yield xm, y[part], None if teachers is None else teachers[part]


def _loss(model: torch.nn.Module, x: Any, y: torch.Tensor, teachers: torch.Tensor | None,
          cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(mean loss, logits of the first view, the KD details or None) of one (micro-)batch."""
    if teachers is None:
        logits = model(x)
        return F.cross_entropy(logits.float(), y), logits, None
    both = model(torch.cat(x))  # both views in one forward pass of 2B images
    views = list(both.float().chunk(2))
    kd = kd_loss(views, y, teachers, mode=cfg.kd, temperature=cfg.temperature)
    return kd.loss, views[0], kd


def _truncate_log(path: Path, epochs: int) -> None:
    """Keep only the log lines of the first ``epochs`` epochs (those the resumed state holds)."""
    if not path.exists():
        return
    lines = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("epoch", 0) <= epochs:
                lines.append(line)
        except ValueError:  # a line cut short by a kill
            continue
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))


def _check_inputs(cfg: TrainConfig, data: DataSplits, transform: Transform | None,
                  bank: MemoryBank | None) -> Augment:
    """The errors :func:`train` raises about its augmentation and bank before any work; returns
    the augmentation to use (the user's ``transform``, else ``cfg.augment``)."""
    if (transform is None) != (cfg.transform is None) or (transform is not None and
                                                           cfg.transform != transform_name(transform)):
        raise EkgError("`transform` and `TrainConfig.transform` (its recorded name) must be given together")
    if transform is not None and data.streamed:
        raise EkgError("a training `transform` of your own augments images held in memory; a streamed tree is "
                       "augmented by its DataLoader workers")
    if transform is None and _jitter_unfit(cfg, data.train):
        raise EkgError(f"the EKG colour jitter needs 3-channel uint8 images (0..255) but these are "
                       f"{data.train.images.dtype} {tuple(data.train.image_size)}: set `jitter=False` or pass your own "
                       "`transform`")
    if cfg.kd != "none":
        if bank is None:
            raise EkgError(f"`kd` {cfg.kd} needs a memory bank (`bank`)")
        bank.check_data(data.train)
    return transform if transform is not None else cfg.augment


def _normalization_record(cfg: TrainConfig, data: DataSplits, init: Checkpoint | None) -> dict[str, Any]:
    """The normalisation a run trains with: ``init``'s (fine-tuning), else ``cfg.normalization``
    (``auto``: the dataset's preset; ImageNet's for a streamed tree)."""
    if init is not None:
        if init.num_classes != data.num_classes:
            raise EkgError(f"the model predicts {init.num_classes} classes but the data has {data.num_classes}")
        return dict(init.normalization)
    norm_name = cfg.normalization
    if norm_name == "auto":  # ImageNet's for a streamed (ImageNet-style) tree
        norm_name = data.name if data.name in ("cifar10", "cifar100") else "imagenet" if data.streamed else "cifar10"
    norm = get_normalization(norm_name)
    return {"name": norm_name, "mean": list(norm.mean), "std": list(norm.std)}


def _two_view_batches(data: Any, cfg: TrainConfig, gen: torch.Generator, normalization: Any,
                      bank: MemoryBank | None, part: slice = slice(None), aug: Augment | None = None):
    """Shuffled batches of (two augmented views, labels, teacher logits (B, T, classes)): the
    bank's rows are read by each image's index in the training set. Each batch is drawn and
    augmented whole (the same images as on one process); ``part`` of it is yielded. A streamed
    set (:class:`ekg.data.FolderSet`) loads only ``part`` of each batch, two crops per decode."""
    aug = cfg.augment if aug is None else aug  # a user's transform, else the method's pipeline
    n = len(data)
    order = torch.randperm(n, generator=gen, device=gen.device)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
    if not isinstance(data, ImageSet):
        batches = batch_positions(order.cpu(), cfg.batch_size, drop_last=True)
        for views, y, idx in data.stream(batches, data.device, augment=cfg.augment, seed=seed,
                                         normalization=normalization, part=part, views=2):
            yield views, y, bank.batch(idx, device=data.device) if bank is not None else None
        return
    aug_gen = torch.Generator(device=data.images.device)
    aug_gen.manual_seed(seed)
    for idx in batch_positions(order.to(data.images.device), cfg.batch_size, drop_last=True):
        raw, y = data.images[idx], data.labels[idx]
        views = [normalization.apply(augment_batch(raw, aug, aug_gen))[part] for _ in range(2)]
        teachers = bank.batch(idx[part], device=data.images.device) if bank is not None else None
        yield views, y[part], teachers


def _save_epoch(out: Path, cfg: TrainConfig, data: DataSplits, model: torch.nn.Module, opt: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, epoch: int, norm_record: dict[str, Any], record: dict[str, Any], *,
                init: Checkpoint | None = None) -> None:
    """model.pt first, then last.pt: last.pt is the commit point for --resume. A fine-tuned model
    keeps ``init``'s input size and architecture record (any CNN, not only CIFAR ResNets)."""
    meta = {"trained_by": "ekg train" if init is None else "ekg finetune", "epoch": epoch, "metrics": record}
    if init is not None and init.meta.get("source"):
        meta["source"] = str(init.meta["source"])
    ckpt = Checkpoint(model=model, normalization=dict(norm_record),
                      dataset={"name": data.name, "num_classes": data.num_classes}, meta=meta,
                      input_size=tuple(init.input_size) if init is not None else data.train.image_size,
                      record=None if init is None or init.record is None else init.record)
    rd = TrainDir(out)
    save_checkpoint(ckpt, rd.model)
    state = {"config": cfg.to_dict(), "epoch": epoch,
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": opt.state_dict(), "scaler": scaler.state_dict()}
    save_torch(state, rd.state)


def _tensorboard(logdir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
        tqdm.write("warning: tensorboard is not installed; curves go to log.jsonl only")
        return None
    return SummaryWriter(str(logdir))

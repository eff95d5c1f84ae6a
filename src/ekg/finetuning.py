"""``ekg.finetune``: fine-tune a (pruned) model, with the memory bank's ensemble knowledge (phase 5).

The Python side of ``ekg finetune``: the model (an ``nn.Module``, a checkpoint or a pretrained
name) and the data (a ``(train, test)`` pair of torch Datasets or DataLoaders, or anything
``load_data`` reads) go through the same loop as ``ekg train`` (:func:`ekg.train.train`) into a
run directory (:class:`ekg.rundir.TrainDir`). ``kd="ensemble"`` (the default) distils from the
memory bank of an `ekg prune` run (``bank=RUN``: built into ``RUN/bank`` on first use); ``"single"``
uses only its best teacher; ``"none"`` is plain cross-entropy and needs no bank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import Checkpoint, load_checkpoint
from .data import Transform, as_splits
from .data.augment import transform_name
from .distributed import Dist
from .errors import EkgError
from .pruning import PruneResult
from .rundir import RunDir
from .train import TrainConfig, check_train_dir, finetune_config, fit_jitter, train, with_temperature
from .user_model import AUTO, as_checkpoint, rebuilder


@dataclass
class FinetuneResult:
    run_dir: Path
    checkpoint: Checkpoint
    metrics: dict[str, Any]  # the last epoch's record of log.jsonl (test_top1, test_loss, ...)

    @property
    def model(self) -> nn.Module:
        """The fine-tuned model (also in ``checkpoint`` and ``TrainDir(run_dir).model``)."""
        return self.checkpoint.model


def finetune(model: Checkpoint | str | Path | nn.Module, data: Any, *, bank: Any = None, out: str | Path | None = None,
             kd: str | None = None, config: TrainConfig | None = None, jitter: bool | None = None,
             transform: Transform | None = None, teachers: int | None = None, bank_topk: int | None = None,
             resume: bool = False, progress: bool = True, classes: Any = None,
             input_size: tuple[int, int, int] | None = None, normalization: Any = AUTO,
             dist: Dist | None = None) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` into ``out`` (default: ``RUN/finetune`` of ``bank``).

    ``config``: a :class:`TrainConfig` (default: the paper's recipe, :func:`ekg.train.finetune_config`,
    for ``kd``, default ``"ensemble"``); the distillation is stated once (``kd``, or ``config.kd``).
    ``model`` may be the result of :func:`ekg.prune` (its slim model and preprocessing; its run
    directory is then the default ``bank``).
    ``bank``: an `ekg prune` run directory (or a :class:`ekg.pruning.PruneResult`, or a bank folder).
    ``jitter``: the EKG colour jitter, default the recipe's (on with a memory bank; left out, with a
    note, for images that are not 3-channel uint8). ``transform``: your own batched augmentation
    (:data:`ekg.data.Transform`), used instead of the method's. ``teachers``/``bank_topk``: the
    memory bank's size and storage (see :func:`ekg.bank.bank_for_run`). ``input_size`` and
    ``normalization`` describe an ``nn.Module`` (as for :func:`ekg.prune`)."""
    dist = dist or Dist()
    from .bank import bank_for_run, check_bank_args, check_student, check_topk

    if config is not None and kd is not None and kd != config.kd:
        raise EkgError(f"`kd` is {kd!r} but the `config` says kd {config.kd!r}: state it once")
    cfg = config if config is not None else finetune_config(kd or "ensemble", arch="(from the model)")
    if jitter is not None:
        cfg = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, jitter=jitter))
    if transform is not None:
        if not callable(transform):
            raise EkgError(f"`transform` must be a callable (images, generator) -> images, got {type(transform).__name__}")
        cfg = dataclasses.replace(cfg, transform=transform_name(transform))
    cfg.validate()
    check_bank_args(cfg.kd, teachers, bank_topk)
    if bank is None and isinstance(model, PruneResult):
        bank = model
    bank_dir = getattr(bank, "run_dir", bank)  # a PruneResult
    if cfg.kd != "none" and bank_dir is None:
        raise EkgError(f"`kd` {cfg.kd} needs the memory bank: pass `bank` (an `ekg prune` run directory, or a bank "
                       "folder), or fine-tune without it (`kd` none)")
    out = Path(out) if out is not None else (RunDir(bank_dir).finetune if bank_dir is not None else None)
    if out is None:
        raise EkgError("`out` is needed when there is no `bank`")
    progress = progress and dist.is_main
    splits = as_splits(data, progress=progress, classes=classes)
    ckpt = as_checkpoint(model, splits, input_size=input_size, normalization=normalization)
    if cfg.kd != "none":
        check_topk(bank_topk, ckpt.num_classes)
    if jitter is None:
        cfg, note = fit_jitter(cfg, splits.train)
        dist.note(note)
    # everything train() and the bank will refuse, refused before the bank is built (minutes of work)
    check_train_dir(with_temperature(cfg, splits.num_classes), out, resume, ckpt.model)
    if cfg.kd != "none":
        source = str(model) if isinstance(model, (str, Path)) else str(ckpt.meta.get("source") or "the model")
        check_student(bank_dir, ckpt.model, source)
    memory = None
    if cfg.kd != "none":
        memory = bank_for_run(bank_dir, splits.train, teachers=teachers, device=dist.device(cfg.device),
                              progress=progress, dist=dist, topk=bank_topk, factory=rebuilder(ckpt))
    path = train(cfg, splits, out, resume=resume, progress=progress, init=ckpt, bank=memory, dist=dist,
                 transform=transform)
    result = load_checkpoint(path, factory=rebuilder(ckpt))
    return FinetuneResult(run_dir=out, checkpoint=result, metrics=dict(result.meta.get("metrics", {})))


"""A model argument of the API (``ekg.prune``, ``ekg.finetune``, ``ekg.run``, ``landscape``) as an
ekg :class:`~ekg.checkpoint.Checkpoint`: a user's ``nn.Module`` with its input size and
normalisation, a checkpoint file or pretrained name, or an earlier result; and the factory that
reloads the run's checkpoints of a user's module."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from .checkpoint import Checkpoint, load_checkpoint
from .errors import EkgError

AUTO = "auto"  # normalization: the data's own preset (CIFAR's, ImageNet's for image trees)


def as_checkpoint(model: Checkpoint | str | Path | nn.Module, splits: Any, *,
                  input_size: tuple[int, int, int] | None = None, normalization: Any = AUTO,
                  factory: str | None = None, factory_kwargs: dict[str, Any] | None = None) -> Checkpoint:
    """A model argument of ``ekg.prune`` / ``ekg.finetune`` / ``ekg.run`` as a :class:`Checkpoint`:
    a Checkpoint as is, a path or a pretrained name (see ``ekg models``) loaded, or an
    ``nn.Module`` described by ``input_size`` (default: the data's image size), ``normalization``
    (see :func:`checkpoint_of_module`) and ``factory``/``factory_kwargs`` (recorded in checkpoints).
    The result of ``ekg.prune`` or ``ekg.finetune`` stands for its checkpoint."""
    if isinstance(getattr(model, "checkpoint", None), Checkpoint):  # a PruneResult or FinetuneResult
        model = model.checkpoint  # type: ignore[union-attr]
    if isinstance(model, nn.Module):
        return checkpoint_of_module(model, splits, input_size=input_size, normalization=normalization,
                                    factory=factory, factory_kwargs=factory_kwargs)
    given = [k for k, v in (("input_size", input_size), ("factory", factory), ("factory_kwargs", factory_kwargs))
             if v is not None]
    if not (isinstance(normalization, str) and normalization == AUTO):  # None (the identity) is given too
        given.append("normalization")
    if given:
        raise EkgError(f"{', '.join(f'`{g}`' for g in given)} describe{'s' if len(given) == 1 else ''} an nn.Module; "
                       "a checkpoint records them")
    if isinstance(model, Checkpoint):
        return model
    if not isinstance(model, (str, Path)):
        raise EkgError(f"`model` must be an nn.Module, an ekg Checkpoint, a checkpoint path or a pretrained name, "
                       f"got {type(model).__name__}")
    from .pretrained import resolve_model

    return load_checkpoint(resolve_model(model))


def checkpoint_of_module(model: nn.Module, splits: Any, *, input_size: tuple[int, int, int] | None = None,
                         normalization: Any = AUTO, factory: str | None = None,
                         factory_kwargs: dict[str, Any] | None = None) -> Checkpoint:
    """A user's module as an ekg checkpoint. ``input_size`` defaults to the data's image size.
    ``normalization``: a preset name, a ``{"mean", "std"}`` dict or ``(mean, std)`` pair (one
    number per channel, on the images' scale: 0..255 for uint8 images), None when the data
    already yields normalised tensors, or ``"auto"``: CIFAR's preset for CIFAR, ImageNet's for an
    image-folder tree; a user's own Dataset must say which."""
    from .arch import classifier_outputs, record_for
    from .data import NORMALIZATIONS, get_normalization

    size = tuple(input_size) if input_size is not None else tuple(splits.train.image_size)
    if len(size) != 3:
        raise EkgError(f"`input_size` must be (channels, height, width), got {size}")
    if isinstance(normalization, str) and normalization == AUTO:
        if splits.name in NORMALIZATIONS:
            normalization = splits.name
        elif splits.name == "imagefolder":
            normalization = "imagenet"
        else:
            raise EkgError("say how your data is normalised for this model: `normalization` = (mean, std) with one "
                           "number per channel on the images' scale (0..255 for uint8 images), a preset name "
                           f"({', '.join(n for n in NORMALIZATIONS if n != 'none')}), or None when the dataset "
                           "already yields normalised tensors")
    norm = get_normalization(normalization)
    if norm.channels is not None and norm.channels != size[0]:
        raise EkgError(f"the normalisation has constants for {norm.channels} channels but the model takes {size[0]}: "
                       "give one mean and one std per channel")
    name = normalization if isinstance(normalization, str) else "none" if normalization is None else "custom"
    num_classes = classifier_outputs(model, size)
    record = record_for(model, num_classes, factory=factory, kwargs=factory_kwargs)
    return Checkpoint(model=model, normalization={"name": name, **norm.to_dict()},
                      dataset={"name": splits.name, "num_classes": splits.num_classes},
                      meta={"source": f"{record.name} (Python API)"}, input_size=size, record=record)  # type: ignore[arg-type]


def rebuilder(ckpt: Checkpoint) -> Callable[..., nn.Module] | None:
    """A ``factory`` that reloads files written from ``ckpt``'s model (its adapted, pruned and
    fine-tuned checkpoints): a copy of the model itself, which :func:`ekg.arch.rebuild` gives each
    file's recorded widths. None when no factory is needed (registry, torchvision and timm models)."""
    from .arch import zoo_of

    record = ckpt.record
    if record is None or zoo_of(record.factory) is not None:
        return None
    return module_factory(ckpt.model)


def module_factory(template: nn.Module) -> Callable[..., nn.Module]:
    """A ``factory`` for :func:`ekg.checkpoint.load_checkpoint` that builds a copy of ``template``
    (any widths: loading gives it each file's recorded widths), whatever kwargs are recorded."""
    import copy

    def factory(**_: Any) -> nn.Module:
        return copy.deepcopy(template)

    return factory

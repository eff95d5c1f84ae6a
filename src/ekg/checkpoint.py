"""ekg's checkpoint format, and importers for the checkpoints users bring.

Our format is a ``torch.save`` of plain containers and tensors, so it loads with
``torch.load(weights_only=True)`` (no code can run on load)::

    {"format": "ekg-checkpoint", "version": 1,
     "arch": {...ResNetSpec: depth, shortcut, padding, stage_widths, block_widths, num_classes...},
     "preprocess": {"normalization": {"name", "mean", "std"}, "input_size": [3, 32, 32]},
     "dataset": {"name": "cifar10", "num_classes": 10},
     "state_dict": {...},
     "meta": {"source": ..., "created": ..., "ekg_version": ..., ...}}

The architecture record holds every channel width, so a pruned model reloads without the original,
and the preprocessing record means ``ekg test`` needs no extra flags. For a CIFAR ResNet it is its
:class:`~ekg.models.ResNetSpec` (format version 1, unchanged); for any other model it is an
:class:`~ekg.arch.ArchRecord` — the factory that builds the unpruned model (``torchvision:NAME``
with its kwargs, or a user's callable) plus every conv/linear/BN width — written as version 2.

Importers (both through restricted unpicklers that cannot execute code):

* the original EKG release's TensorFlow pickle (``res56_cifar10.pkl``: TF variable names → numpy);
* akamaster's ``.th`` files (legacy torch serialization, read by torch's ``weights_only`` loader).
"""

from __future__ import annotations

import datetime as _dt
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import __version__, safe_pickle
from .errors import CheckpointError, EkgError
from .arch import ArchRecord, rebuild
from .io import save_torch
from .models import CifarResNet, ResNetSpec, arch_name, build_model, spec_for

FORMAT = "ekg-checkpoint"
VERSION = 2          # the newest version this ekg reads
RESNET_VERSION = 1   # CIFAR ResNets are still written as version 1 (older ekg reads them)


@dataclass
class Checkpoint:
    """A model with everything needed to use it: architecture, preprocessing, provenance.

    ``model`` is a :class:`CifarResNet` (its spec is the architecture record) or any other module
    together with its ``record`` (see :mod:`ekg.arch`)."""

    model: nn.Module
    normalization: dict[str, Any]
    dataset: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, int, int] = (3, 32, 32)
    record: ArchRecord | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, CifarResNet) and self.record is None:
            raise EkgError(f"a checkpoint of a {type(self.model).__name__} needs its architecture record "
                           "(ekg.arch.record_for)")

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.model, CifarResNet)

    @property
    def spec(self) -> ResNetSpec:
        if not self.is_resnet:
            raise EkgError(f"this checkpoint holds {self.arch}, not a CIFAR ResNet: it has no ResNet spec")
        return self.model.spec

    @property
    def num_classes(self) -> int:
        return self.model.spec.num_classes if self.is_resnet else self.record.num_classes

    @property
    def arch(self) -> str:
        return arch_name(self.model.spec) if self.is_resnet else self.record.name

    def arch_dict(self) -> dict[str, Any]:
        """The architecture record as stored in the file."""
        return self.spec.to_dict() if self.is_resnet else self.record.to_dict()

    def to_dict(self) -> dict[str, Any]:
        state = state_dict_copy(self.model.state_dict())
        return {
            "format": FORMAT,
            "version": RESNET_VERSION if self.is_resnet else VERSION,
            "arch": self.arch_dict(),
            "preprocess": {"normalization": dict(self.normalization), "input_size": list(self.input_size)},
            "dataset": dict(self.dataset),
            "state_dict": state,
            "meta": dict(self.meta),
        }


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write ``ckpt`` atomically (a crash never leaves a half-written file)."""
    path = Path(path)
    meta = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "ekg_version": __version__, **ckpt.meta}
    payload = ckpt.to_dict()
    payload["meta"] = meta
    save_torch(payload, path)
    return path


def state_dict_copy(state: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """A CPU copy of a state dict that keeps its ``_metadata`` (each module's version, which
    modules such as torchvision's MNASNet read in ``_load_from_state_dict``); ``torch.save`` and
    ``torch.load(weights_only=True)`` keep it too."""
    out = OrderedDict((k, v.detach().cpu().clone()) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict((k, dict(v)) for k, v in metadata.items())  # type: ignore[attr-defined]
    return out


# ----------------------------------------------------------------------------- loading

def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with one readable error when the weights do not fit the model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (first: {wrong[0]})")
        if missing:
            parts.append(f"{len(missing)} missing tensors (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (first: {unexpected[0]})")
        raise CheckpointError(
            f"the weights in {source} do not fit architecture {arch_name(model.spec) if hasattr(model, 'spec') else type(model).__name__}: "
            + "; ".join(parts)
            + " — check `arch`, or convert the file with `ekg convert` without `arch` to detect it"
        )
    full = OrderedDict(own)
    full.update({k: v.to(own[k].dtype) for k, v in state.items()})
    # the versions the weights were saved with; a file without them (older ekg) has the model's own
    full._metadata = getattr(state, "_metadata", None) or own._metadata  # type: ignore[attr-defined]
    model.load_state_dict(full)


# the first bytes of torch.save's two formats: a zip archive, or (before PyTorch 1.6, e.g. akamaster's .th)
# a pickle of torch's magic number 0x1950a86a20f9469cfc6c
_ZIP_HEAD = b"PK\x03\x04"
_LEGACY_HEAD = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
_FIX_DAMAGED = ("download or copy it again (or re-run the command that wrote it; for a pretrained name, delete "
                "the file and fetch it again)")


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is a truncated or damaged {what} (an interrupted download, copy or save?): "
                           + _FIX_DAMAGED)


def _torch_format(path: Path) -> str | None:
    """"zip" or "legacy" if ``path`` begins like a file of torch.save (or is a zip holding a
    data.pkl), "zip-damaged" for a zip that cannot be opened, None otherwise."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_HEAD))
    if head.startswith(_LEGACY_HEAD):
        return "legacy"
    if not head.startswith(_ZIP_HEAD):
        return None
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return "zip-damaged"  # a torch zip cut short has no central directory
    return "zip" if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names) else None


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True, or None if the file is not a torch file at all. A torch
    file that cannot be read is an error: truncated or damaged, or holding more than tensors and
    plain containers (torch's advice to load it with weights_only=False is never passed on)."""
    kind = _torch_format(path)
    if kind == "zip-damaged":
        raise _damaged(path, "PyTorch checkpoint")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 3": we handle the failure below
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds (RuntimeError, EOFError, struct.error, OSError, ...)
        if kind is None:
            return None
        if isinstance(e, pickle.UnpicklingError) and "weights only load failed" in str(e).lower() \
                and "truncated" not in str(e).lower():
            raise CheckpointError(
                f"{path} holds pickled Python objects besides tensors (e.g. a whole model saved with "
                "torch.save(model)), which ekg does not load because unpickling them can run code: save "
                "model.state_dict() instead (or an ekg checkpoint with ekg.save_checkpoint)") from None
        raise _damaged(path, "PyTorch checkpoint") from None


def _read_pickle(path: Path) -> Any:
    """A data pickle (the EKG TensorFlow release) through the restricted unpickler; a file cut short
    (a pickle ends with its STOP opcode, ``.``) or one that fails to unpickle is reported as damaged."""
    with open(path, "rb") as f:
        f.seek(-1, 2)
        complete = f.read(1) == b"."
    if not complete:
        raise _damaged(path, "pickle")
    try:
        return safe_pickle.load(path, encoding="latin1")
    except EkgError as e:
        if isinstance(e.__context__, safe_pickle.RefusedGlobal):
            raise CheckpointError(f"{e}: it is not a model file ekg can read (ekg loads only data pickles of "
                                  "arrays, like the EKG release's res56_cifar10.pkl)") from None
        raise _damaged(path, "pickle") from None


def load_checkpoint(path: str | Path, *, arch: str | None = None,
                    factory: Callable[..., nn.Module] | None = None) -> Checkpoint:
    """Load a model file of any supported kind: an ekg checkpoint, the original EKG release's
    TensorFlow pickle, or an akamaster ``.th``. ``arch`` forces a registry architecture for the
    imported formats (an error if the weights do not fit it). ``factory`` builds the unpruned
    model of a checkpoint whose record names a user's factory (torchvision models need none)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model file {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file (e.g. {path}/pruned.pt)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes; an interrupted download, copy or save?): {_FIX_DAMAGED}")
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if arch is not None:
            raise EkgError(f"{path} is an ekg checkpoint, which records its architecture; drop `arch`")
        return _from_payload(obj, str(path), factory)
    if isinstance(obj, dict) and "state_dict" in obj:
        return import_akamaster(obj, str(path), arch=arch)
    if obj is None:
        if _looks_like_pickle(path):
            data = _read_pickle(path)
            if isinstance(data, dict) and "conv/kernel:0" in data:
                return import_ekg_tf(data, str(path), arch=arch)
    raise CheckpointError(
        f"{path} is not a model checkpoint ekg can read: expected an ekg checkpoint (.pt, written by "
        "`ekg convert`/`ekg train`), the original EKG TensorFlow pickle (res56_cifar10.pkl) or an "
        "akamaster .th file"
    )


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _from_payload(obj: dict[str, Any], source: str, factory: Callable[..., nn.Module] | None = None) -> Checkpoint:
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(f"{source} was written by a newer ekg (format version {obj['version']}); upgrade ekg")
    record = None
    try:
        if isinstance(obj["arch"], dict) and obj["arch"].get("kind") == "module":
            record = ArchRecord.from_dict(obj["arch"])
            model = rebuild(record, factory, source)
        else:
            model = build_model(obj["arch"])
        pre = obj["preprocess"]
        norm = dict(pre["normalization"])
        state = obj["state_dict"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{source} is an incomplete ekg checkpoint (missing {e}): write it again with "
                              "ekg.save_checkpoint, `ekg convert` or the command that made it") from None
    load_state_dict_checked(model, state, source)
    return Checkpoint(model=model, normalization=norm, dataset=dict(obj.get("dataset", {})),
                      meta=dict(obj.get("meta", {})), input_size=tuple(pre.get("input_size", (3, 32, 32))),
                      record=record)


# ----------------------------------------------------------------------------- importers

def _normalization(name: str) -> dict[str, Any]:
    from .data import get_normalization  # data is the home of the presets

    n = get_normalization(name)
    return {"name": name, "mean": list(n.mean), "std": list(n.std)}


def _dataset_record(num_classes: int) -> dict[str, Any]:
    return {"name": {10: "cifar10", 100: "cifar100"}.get(num_classes, "custom"), "num_classes": num_classes}


def _resolve_spec(arch: str | None, detected: ResNetSpec) -> ResNetSpec:
    return detected if arch is None else spec_for(arch, detected.num_classes)


_TF_BLOCK = re.compile(r"BasicBlock(\d+)\.(\d+)/")


def import_ekg_tf(weights: dict[str, Any], source: str, *, arch: str | None = None) -> Checkpoint:
    """Map the original release's TF variables to our ResNet (projection shortcuts, TF padding).

    Conv kernels (kh, kw, cin, cout) become (cout, cin, kh, kw); BN gamma/beta/moving stats become
    weight/bias/running stats; the fc kernel (in, out) is transposed.
    """
    arrays = {k: np.asarray(v) for k, v in weights.items() if not k.startswith("__")}
    blocks = {(int(m.group(1)), int(m.group(2))) for k in arrays if (m := _TF_BLOCK.match(k))}
    if not blocks or "fc/kernel:0" not in arrays:
        raise CheckpointError(f"{source} does not look like an EKG ResNet (no BasicBlock*/fc variables)")
    n = max(j for _, j in blocks) + 1
    num_classes = int(arrays["fc/kernel:0"].shape[-1])
    detected = ResNetSpec(depth=6 * n + 2, num_classes=num_classes, shortcut="B", padding="tf_same")
    spec = _resolve_spec(arch, detected)

    def conv(name: str) -> torch.Tensor:
        return torch.from_numpy(arrays[f"{name}/kernel:0"].transpose(3, 2, 0, 1).copy())

    def bn(name: str, prefix: str, out: dict[str, torch.Tensor]) -> None:
        for tf_key, key in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                            ("moving_variance", "running_var")):
            out[f"{prefix}.{key}"] = torch.from_numpy(arrays[f"{name}/{tf_key}:0"].reshape(-1).copy())

    state: dict[str, torch.Tensor] = {}
    try:
        state["conv1.weight"] = conv("conv")
        bn("bn", "bn1", state)
        for s, j in sorted(blocks):
            tf, pt = f"BasicBlock{s}.{j}", f"layer{s + 1}.{j}"
            for c in (1, 2):
                state[f"{pt}.conv{c}.weight"] = conv(f"{tf}/conv{c}")
                bn(f"{tf}/bn{c}", f"{pt}.bn{c}", state)
            if f"{tf}/conv3/kernel:0" in arrays:
                state[f"{pt}.shortcut.0.weight"] = conv(f"{tf}/conv3")
                bn(f"{tf}/bn3", f"{pt}.shortcut.1", state)
        state["linear.weight"] = torch.from_numpy(arrays["fc/kernel:0"].T.copy())
        state["linear.bias"] = torch.from_numpy(arrays["fc/biases:0"].reshape(-1).copy())
    except KeyError as e:
        raise CheckpointError(f"{source} is missing the TF variable {e}") from None
    model = build_model(spec)
    load_state_dict_checked(model, state, source)
    norm = "ekg_tf_cifar100" if num_classes == 100 else "ekg_tf_cifar10"
    return Checkpoint(model=model, normalization=_normalization(norm), dataset=_dataset_record(num_classes),
                      meta={"source": source, "imported_from": "ekg-tensorflow"})


_AKA_BLOCK = re.compile(r"layer(\d)\.(\d+)\.")


def import_akamaster(obj: dict[str, Any], source: str, *, arch: str | None = None) -> Checkpoint:
    """akamaster/pytorch_resnet_cifar10 checkpoints: option-A ResNets, ``module.`` key prefix,
    inputs normalised with the ImageNet mean/std."""
    raw = obj["state_dict"]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: 'state_dict' is not a dict of tensors")
    state = {k.removeprefix("module."): v for k, v in raw.items()}
    if "linear.weight" not in state:
        raise CheckpointError(f"{source} holds a state dict, but not of an akamaster CIFAR ResNet (no linear.weight): "
                              "import torchvision weights with `ekg convert SRC --torchvision NAME`, or pass an ekg "
                              "checkpoint")
    blocks = {(int(m.group(1)), int(m.group(2))) for k in state if (m := _AKA_BLOCK.match(k))}
    n = max((j for _, j in blocks), default=-1) + 1
    num_classes = int(state["linear.weight"].shape[0])
    try:
        detected = ResNetSpec(depth=6 * n + 2, num_classes=num_classes, shortcut="A", padding="torch")
    except EkgError as e:
        raise CheckpointError(f"{source}: cannot infer a CIFAR ResNet from its tensors ({e})") from None
    spec = _resolve_spec(arch, detected)
    model = build_model(spec)
    load_state_dict_checked(model, state, source)
    meta = {"source": source, "imported_from": "akamaster"}
    if "best_prec1" in obj:
        meta["reported_top1"] = float(obj["best_prec1"])
    return Checkpoint(model=model, normalization=_normalization("imagenet"),
                      dataset=_dataset_record(num_classes), meta=meta)


TORCHVISION_INPUT_SIZE = (3, 224, 224)  # import_torchvision's defaults: ImageNet-sized, ImageNet-normalised
TORCHVISION_NORMALIZATION = "imagenet"


def import_torchvision(path: str | Path, name: str, *, input_size: tuple[int, int, int] = TORCHVISION_INPUT_SIZE,
                       normalization: str = TORCHVISION_NORMALIZATION, **kwargs: Any) -> Checkpoint:
    """A torchvision model's weights (a state dict saved with ``torch.save``, optionally under a
    ``state_dict`` or ``model`` key and with DDP's ``module.`` prefix) as an ekg checkpoint of
    ``torchvision:NAME``. ``num_classes`` and other factory arguments come in ``kwargs``; when
    ``num_classes`` is not given it is read from the weights' last linear layer."""
    from .arch import TORCHVISION

    return import_zoo(path, TORCHVISION, name, input_size=input_size, normalization=normalization, **kwargs)


def import_timm(path: str | Path, name: str, *, input_size: tuple[int, int, int] | None = None,
                normalization: str | None = None, **kwargs: Any) -> Checkpoint:
    """A timm model's weights (a state dict, as for :func:`import_torchvision`) as an ekg checkpoint
    of ``timm:NAME``, built with ``timm.create_model(NAME, pretrained=False, **kwargs)``.
    ``input_size`` and ``normalization`` default to the model's ``pretrained_cfg`` (its
    ``input_size``, ``mean`` and ``std``; the channels follow ``in_chans``), else ImageNet's."""
    from .arch import TIMM

    return import_zoo(path, TIMM, name, input_size=input_size, normalization=normalization, **kwargs)


def import_zoo(path: str | Path, zoo: str, name: str, *, input_size: tuple[int, int, int] | None = None,
               normalization: str | None = None, **kwargs: Any) -> Checkpoint:
    """The weights of model ``name`` of the built-in zoo ``zoo`` (``"torchvision:"`` or ``"timm:"``)
    as an ekg checkpoint recording ``zoo + name`` and ``kwargs``. The state dict is read first (a
    file that is not one is refused before the zoo is imported). ``input_size`` and
    ``normalization`` (a preset name) default to the model's own ``pretrained_cfg`` where it has one
    (timm's), else to ImageNet's (3×224×224, the ``imagenet`` preset)."""
    from .arch import classifier_outputs, record_for, zoo_model

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model file {path} does not exist")
    obj = _torch_load(path)
    if isinstance(obj, dict) and ("state_dict" in obj or "model" in obj):
        obj = obj.get("state_dict", obj.get("model"))
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors (save one with torch.save(model.state_dict(), PATH))")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if "num_classes" not in kwargs:
        linears = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
        if linears:
            kwargs["num_classes"] = int(linears[-1].shape[0])
    model = zoo_model(zoo, name, **kwargs)
    load_state_dict_checked(model, state, str(path))
    size, norm = _zoo_defaults(model, kwargs)
    size = tuple(input_size) if input_size is not None else size
    norm = _normalization(normalization) if normalization is not None else norm
    if len(norm["mean"]) not in (0, size[0]):
        raise EkgError(f"the normalisation {norm['name']} has constants for {len(norm['mean'])} channels but "
                       f"{zoo}{name} takes {size[0]}: give a normalisation for its inputs (`none` for images "
                       "already normalised)")
    num_classes = classifier_outputs(model, size)
    return Checkpoint(model=model, normalization=norm, dataset=_dataset_record(num_classes),
                      meta={"source": str(path), "imported_from": f"{zoo}{name}"},
                      input_size=size, record=record_for(model, num_classes))  # type: ignore[arg-type]


def _zoo_defaults(model: nn.Module, kwargs: dict[str, Any]) -> tuple[tuple[int, ...], dict[str, Any]]:
    """The input size and normalisation ``model``'s ``pretrained_cfg`` (timm's) gives, ImageNet's
    (:data:`TORCHVISION_INPUT_SIZE`, :data:`TORCHVISION_NORMALIZATION`) where it gives none. Preset
    constants are named by the preset; others are recorded as ``pretrained_cfg``."""
    cfg = getattr(model, "pretrained_cfg", None)
    cfg = cfg if isinstance(cfg, dict) else {}
    size: tuple[int, ...] = TORCHVISION_INPUT_SIZE
    try:
        given = tuple(int(n) for n in cfg["input_size"])
        if len(given) == 3 and min(given) >= 1:
            size = given
    except (KeyError, TypeError, ValueError):
        pass
    if isinstance(kwargs.get("in_chans"), int) and kwargs["in_chans"] >= 1:
        size = (kwargs["in_chans"], *size[1:])
    norm = _normalization(TORCHVISION_NORMALIZATION)
    try:
        mean, std = [tuple(255.0 * float(v) for v in cfg[k]) for k in ("mean", "std")]
    except (KeyError, TypeError, ValueError):
        return size, norm
    if len(mean) == len(std) == size[0] and min(std) > 0:
        from .data import NORMALIZATIONS

        name = next((n for n, p in NORMALIZATIONS.items() if len(p.mean) == len(mean) and
                     all(abs(a - b) < 1e-6 for a, b in zip((*p.mean, *p.std), (*mean, *std)))), "pretrained_cfg")
        norm = {"name": name, "mean": list(mean), "std": list(std)} if name == "pretrained_cfg" else _normalization(name)
    return size, norm

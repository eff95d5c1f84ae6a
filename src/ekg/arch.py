"""Architecture records for any ``nn.Module``: rebuilding a (pruned) model without running code
from the checkpoint file.

A record names the *factory* that builds the unpruned model and the keyword arguments it was
called with, plus the shape of every conv, linear, BatchNorm and LayerNorm (channels, groups,
features, normalized shape) and of every other parameter or buffer (a layer scale's ``gamma``,
pruned with the channels it scales)::

    {"kind": "module", "factory": "torchvision:resnet18", "kwargs": {"num_classes": 10},
     "class": "torchvision.models.resnet.ResNet", "num_classes": 10, "pruned": true,
     "shapes": {"conv1": {"type": "conv", "in": 3, "out": 41, "groups": 1}, ...}}

Loading builds the model from the factory, gives each recorded module its recorded widths (empty
tensors of the new shapes), then loads the state dict, which checks every shape. Factories:

* ``torchvision:NAME`` — ``torchvision.models.get_model(NAME, weights=None, **kwargs)`` and
  ``timm:NAME`` — ``timm.create_model(NAME, pretrained=False, **kwargs)``: the built-in zoos
  (:data:`ZOOS`), rebuilt automatically (only names the zoo's own registry knows: nothing named in
  the file is imported; timm is optional, the ``zoo`` extra);
* anything else (a user's ``package.module:callable``, or no factory for a plain module) is only
  recorded: ekg never imports a module named in a file, so the caller passes the callable
  (``load_checkpoint(path, factory=make_net)``), which is called with the recorded kwargs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .bn import inference_modes
from .errors import CheckpointError, EkgError

TORCHVISION = "torchvision:"
TIMM = "timm:"
FACTORY_ATTR = "ekg_factory"  # (factory, kwargs) set on a model by torchvision_model() / timm_model()

_KWARG_TYPES = (bool, int, float, str, type(None))


@dataclass
class ArchRecord:
    """How to rebuild a model: its factory and kwargs, and every conv/linear/BN width."""

    factory: str | None
    kwargs: dict[str, Any]
    shapes: dict[str, dict[str, Any]]
    num_classes: int
    class_name: str = ""
    pruned: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "module", "factory": self.factory, "kwargs": dict(self.kwargs), "class": self.class_name,
                "num_classes": self.num_classes, "pruned": self.pruned,
                "shapes": {k: dict(v) for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArchRecord":
        try:
            return cls(factory=d["factory"], kwargs=dict(d["kwargs"]), shapes={k: dict(v) for k, v in d["shapes"].items()},
                       num_classes=int(d["num_classes"]), class_name=str(d.get("class", "")),
                       pruned=bool(d.get("pruned", False)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"the checkpoint's architecture record is incomplete ({type(e).__name__}: {e})") from None

    @property
    def name(self) -> str:
        base = self.factory or self.class_name or "custom model"
        return f"{base} (pruned)" if self.pruned else base


def module_shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Name → widths of every Conv2d, Linear and BatchNorm of ``model``, the normalized shape of
    every LayerNorm (``{"type": "ln", "shape": [C]}``: ConvNeXt's, pruned with their channels), and
    name → shape of every other parameter or buffer held by another module
    (``{"type": "tensor", "shape": [...]}``)."""
    shapes: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            shapes[name] = {"type": "conv", "in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            shapes[name] = {"type": "linear", "in": m.in_features, "out": m.out_features}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            shapes[name] = {"type": "bn", "features": m.num_features}
        else:
            own = ()
            if isinstance(m, nn.LayerNorm):  # its normalized shape, with its weight and bias
                shapes[name] = {"type": "ln", "shape": list(m.normalized_shape)}
                own = ("weight", "bias")
            for attr, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
                if t is not None and attr not in own:
                    shapes[f"{name}.{attr}" if name else attr] = {"type": "tensor", "shape": list(t.shape)}
    return shapes


def record_for(model: nn.Module, num_classes: int, *, factory: str | None = None,
               kwargs: dict[str, Any] | None = None, pruned: bool = False) -> ArchRecord:
    """The record of ``model``. ``factory``/``kwargs`` default to what :func:`torchvision_model` or
    :func:`timm_model` attached to it; kwargs must be plain values (bool, int, float, str, None)."""
    if factory is None and hasattr(model, FACTORY_ATTR):
        factory, kwargs = getattr(model, FACTORY_ATTR)
    kwargs = dict(kwargs or {})
    for k, v in kwargs.items():
        if not isinstance(v, _KWARG_TYPES):
            raise EkgError(f"factory argument {k}={v!r} cannot be recorded: only bool, int, float, str and None are")
    if factory is not None and ":" not in factory:
        raise EkgError(f"a factory is 'torchvision:NAME', 'timm:NAME' or 'package.module:callable', got {factory!r}")
    cls = type(model)
    return ArchRecord(factory=factory, kwargs=kwargs, shapes=module_shapes(model), num_classes=int(num_classes),
                      class_name=f"{cls.__module__}.{cls.__qualname__}", pruned=pruned)


def torchvision_model(name: str, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, **kwargs)``, tagged with its factory so
    that ekg checkpoints of it (and of its pruned versions) reload by name. No weights are
    downloaded: load your own with ``load_state_dict``."""
    return zoo_model(TORCHVISION, name, **kwargs)


def timm_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)``, tagged with its factory so that ekg
    checkpoints of it (and of its pruned versions) reload by name. No weights are downloaded: load
    your own with ``load_state_dict``. Needs timm (ekg's ``zoo`` extra)."""
    return zoo_model(TIMM, name, **kwargs)


def zoo_model(zoo: str, name: str, **kwargs: Any) -> nn.Module:
    """Model ``name`` of the built-in zoo ``zoo`` (``"torchvision:"`` or ``"timm:"``, see
    :data:`ZOOS`) with random weights, tagged with its factory ``zoo + name`` and ``kwargs``."""
    if zoo not in ZOOS:
        raise EkgError(f"unknown model zoo {zoo!r}: choose one of {', '.join(ZOOS)}")
    model = ZOOS[zoo](name, dict(kwargs))
    setattr(model, FACTORY_ATTR, (zoo + name, dict(kwargs)))
    return model


def zoo_of(factory: str | None) -> str | None:
    """The built-in zoo (a key of :data:`ZOOS`) a recorded factory names, or None (a user's)."""
    return next((zoo for zoo in ZOOS if factory is not None and factory.startswith(zoo)), None)


def _torchvision_build(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import torchvision.models as tv
    except ImportError as e:
        raise EkgError(f"torchvision is needed for {TORCHVISION}{name} but cannot be imported ({e}); "
                       "install ekg's 'vision' extra") from None
    if name not in tv.list_models():
        raise EkgError(f"torchvision has no model {name!r}{_close_names(name, tv.list_models())}")
    try:
        return tv.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as e:
        raise EkgError(f"torchvision cannot build {name} with {kwargs}: {e}") from None


def _timm_build(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError as e:
        raise EkgError(f"timm is needed for {TIMM}{name} but cannot be imported ({' '.join(str(e).split())}): "
                       "pip install timm (ekg's 'zoo' extra)") from None
    if not isinstance(name, str) or not timm.is_model(name):  # timm's own registry only: no hub or file names
        raise EkgError(f"timm has no model {name!r}{_close_names(str(name), timm.list_models())}")
    if "pretrained" in kwargs:
        raise EkgError(f"{TIMM}{name} is built with pretrained=False (ekg downloads nothing): drop `pretrained` and "
                       "load your weights (`ekg convert WEIGHTS --timm NAME`)")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as e:  # timm checks with asserts too
        raise EkgError(f"timm cannot build {name} with {kwargs}: {type(e).__name__}: {' '.join(str(e).split())}") from None


def _close_names(name: str, names: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, names, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


# zoo prefix of a recorded factory → the builder of its models (name, kwargs) with random weights
ZOOS: dict[str, Callable[[str, dict[str, Any]], nn.Module]] = {TORCHVISION: _torchvision_build, TIMM: _timm_build}


def rebuild(record: ArchRecord, factory: Callable[..., nn.Module] | None = None, source: str = "the checkpoint") -> nn.Module:
    """The model the record describes, with the recorded widths and uninitialised weights (load
    the state dict next). ``factory`` replaces the recorded factory (needed for anything but the
    built-in zoos, torchvision and timm)."""
    if factory is not None:
        try:
            model = factory(**record.kwargs)
        except TypeError as e:
            raise CheckpointError(f"the factory given for {source} cannot take its recorded arguments "
                                  f"{record.kwargs}: {e}") from None
    elif (zoo := zoo_of(record.factory)) is not None:
        model = ZOOS[zoo](record.factory[len(zoo):], dict(record.kwargs))  # type: ignore[index]
    else:
        what = f"built by {record.factory!r}" if record.factory else f"a {record.class_name or 'custom model'}"
        raise CheckpointError(f"the model in {source} is {what}; ekg does not import code named in a file: pass "
                              "the function that builds it, load_checkpoint(path, factory=...)")
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"the factory for {source} returned a {type(model).__name__}, not an nn.Module")
    reshape(model, record.shapes, source)
    return model


def reshape(model: nn.Module, shapes: dict[str, dict[str, Any]], source: str = "the checkpoint") -> None:
    """Give each named conv/linear/BN/LayerNorm the recorded widths (fresh, uninitialised tensors)."""
    modules = dict(model.named_modules())
    for name, s in shapes.items():
        kind = s.get("type")
        if kind == "tensor":
            _reshape_tensor(model, name, s, source)
            continue
        m = modules.get(name)
        ok = (kind == "conv" and isinstance(m, nn.Conv2d)) or (kind == "linear" and isinstance(m, nn.Linear)) or \
            (kind == "bn" and isinstance(m, nn.modules.batchnorm._BatchNorm)) or \
            (kind == "ln" and isinstance(m, nn.LayerNorm))
        if not ok:
            raise CheckpointError(f"{source} records a {kind} layer '{name}' that the rebuilt model does not have "
                                  f"(it has {type(m).__name__ if m is not None else 'nothing'} there)")
        try:
            if kind == "conv":
                _reshape_conv(m, int(s["in"]), int(s["out"]), int(s["groups"]))
            elif kind == "linear":
                _reshape_linear(m, int(s["in"]), int(s["out"]))
            elif kind == "ln":
                _reshape_layer_norm(m, [int(n) for n in s["shape"]])
            else:
                _reshape_bn(m, int(s["features"]))
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{source}: the record of layer '{name}' is invalid ({type(e).__name__}: {e})") from None


def _reshape_tensor(model: nn.Module, name: str, s: dict[str, Any], source: str) -> None:
    """Give the parameter or buffer ``name`` the recorded shape (a fresh, uninitialised tensor)."""
    owner, _, attr = name.rpartition(".")
    try:
        m = model.get_submodule(owner)
    except AttributeError:
        m = None
    t = getattr(m, attr, None) if m is not None and attr in {*m._parameters, *m._buffers} else None
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{source} records a tensor '{name}' that the rebuilt model does not have")
    try:
        shape = tuple(int(n) for n in s["shape"])
        if min(shape, default=1) < 0:
            raise ValueError(f"shape {list(shape)}")
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: the record of tensor '{name}' is invalid ({type(e).__name__}: {e})") from None
    if shape == tuple(t.shape):
        return
    new = torch.empty(shape, dtype=t.dtype, device=t.device)
    if isinstance(t, nn.Parameter):
        setattr(m, attr, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        m._buffers[attr] = new


def _param_like(p: nn.Parameter | None, *shape: int) -> nn.Parameter | None:
    if p is None:
        return None
    return nn.Parameter(torch.empty(*shape, dtype=p.dtype, device=p.device), requires_grad=p.requires_grad)


def _reshape_conv(m: nn.Conv2d, cin: int, cout: int, groups: int) -> None:
    if min(cin, cout, groups) < 1 or cin % groups or cout % groups:
        raise ValueError(f"{cin} in, {cout} out channels and groups={groups} do not fit")
    if (cin, cout, groups) == (m.in_channels, m.out_channels, m.groups):
        return
    m.in_channels, m.out_channels, m.groups = cin, cout, groups
    m.weight = _param_like(m.weight, cout, cin // groups, *m.kernel_size)
    if m.bias is not None:
        m.bias = _param_like(m.bias, cout)


def _reshape_linear(m: nn.Linear, fin: int, fout: int) -> None:
    if min(fin, fout) < 1:
        raise ValueError(f"{fin} in and {fout} out features")
    if (fin, fout) == (m.in_features, m.out_features):
        return
    m.in_features, m.out_features = fin, fout
    m.weight = _param_like(m.weight, fout, fin)
    if m.bias is not None:
        m.bias = _param_like(m.bias, fout)


def _reshape_bn(m: nn.modules.batchnorm._BatchNorm, features: int) -> None:
    if features < 1:
        raise ValueError(f"{features} features")
    if features == m.num_features:
        return
    m.num_features = features
    m.weight = _param_like(m.weight, features)
    m.bias = _param_like(m.bias, features)
    for attr in ("running_mean", "running_var"):
        b = getattr(m, attr)
        if b is not None:
            setattr(m, attr, torch.empty(features, dtype=b.dtype, device=b.device))


def _reshape_layer_norm(m: nn.LayerNorm, shape: list[int]) -> None:
    if not shape or min(shape) < 1:
        raise ValueError(f"normalized shape {shape}")
    if tuple(shape) == tuple(m.normalized_shape):
        return
    m.normalized_shape = tuple(shape)
    m.weight = _param_like(m.weight, *shape)
    m.bias = _param_like(m.bias, *shape)


def classifier_outputs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """The number of logits ``model`` returns for one image (an error unless it returns (N, K))."""
    p = next(model.parameters(), None)
    x = torch.zeros(2, *input_size, device=p.device if p is not None else "cpu",
                    dtype=p.dtype if p is not None else torch.float32)
    try:
        with inference_modes(model), torch.no_grad():
            out = model(x)
    except Exception as e:  # a user's model may fail in any way on this input size
        from .graph import CannotRun, build_graph

        try:  # the layer that fails, where torch.fx can trace the model
            build_graph(model, tuple(input_size))
        except CannotRun as named:
            raise named from None
        except Exception:  # noqa: BLE001 - untraceable: the plain message below
            pass
        raise EkgError(f"{type(model).__name__} fails on a batch of input_size {tuple(input_size)} "
                       f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise EkgError(f"{type(model).__name__} must return logits shaped (N, classes) to be pruned, got "
                       f"{type(out).__name__}{'' if not isinstance(out, torch.Tensor) else ' ' + str(tuple(out.shape))}")
    return int(out.shape[1])

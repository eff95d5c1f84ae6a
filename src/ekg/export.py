"""``ekg export``: a checkpoint to ONNX or TorchScript, checked against PyTorch's own outputs.

ONNX goes through ``torch.onnx.export`` (the TorchScript-based exporter, which is fast and needs no
extra package to write; the dynamo exporter is the fallback) with a dynamic batch dimension. The
file is then run with onnxruntime on a batch of a different size than the one it was traced with,
and compared with the PyTorch model: a difference above tolerance is an error and no file is left
behind. The preprocessing the weights expect (normalisation, input size) is stored in the ONNX
file's metadata and in a ``.json`` beside it.

Needs the ``export`` extra: ``pip install "ekg[export]"`` (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .errors import EkgError
from .io import atomic_path, check_output_file, write_json

FORMATS = ("onnx", "torchscript")


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float
    bytes: int


def format_for(path: str | Path, fmt: str | None = None) -> str:
    suffix = Path(path).suffix.lower()
    implied = "onnx" if suffix == ".onnx" else "torchscript" if suffix in (".pt", ".ts", ".torchscript") else None
    if fmt is not None:
        if fmt not in FORMATS:
            raise EkgError(f"`format` must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if implied is not None and implied != fmt:
            raise EkgError(f"`format` {fmt} contradicts the name {Path(path).name!r}, which says {implied}: "
                           f"name the file for {fmt} (or leave out `format`)")
        return fmt
    if implied is not None:
        return implied
    raise EkgError(f"cannot tell the export format from {Path(path).name!r}: name the file *.onnx or *.ts, "
                   "or pass `format` onnx|torchscript")


def export(ckpt: Checkpoint, path: str | Path, fmt: str | None = None, *, atol: float = 1e-4,
           seed: int = 0) -> ExportResult:
    """Export ``ckpt``'s model to ``path`` and check it against the PyTorch model."""
    path = Path(path)
    check_output_file(path)
    fmt = format_for(path, fmt)
    model = ckpt.model.eval().cpu()
    gen = torch.Generator().manual_seed(seed)
    trace_x = torch.randn(2, *ckpt.input_size, generator=gen)
    check_x = torch.randn(5, *ckpt.input_size, generator=gen)  # another batch size: the batch dim is dynamic
    with torch.no_grad():
        want = model(check_x)
    with atomic_path(path) as tmp:
        if fmt == "onnx":
            got = _onnx(model, ckpt, trace_x, check_x, tmp)
        else:
            got = _torchscript(model, trace_x, check_x, tmp)
        diff = float((got - want).abs().max())
        if not bool(((got - want).abs() <= atol * (1 + want.abs())).all()):  # allclose(rtol=atol=atol)
            raise EkgError(f"the exported {fmt} model differs from the PyTorch model by {diff:.3g} (max abs, "
                           f"tolerance {atol}); nothing was written")
    write_json(path.with_name(path.name + ".json"), _preprocess_record(ckpt) | {"format": fmt,
                                                                              "max_abs_diff": diff})
    return ExportResult(path=path, format=fmt, max_abs_diff=diff, bytes=path.stat().st_size)


def _preprocess_record(ckpt: Checkpoint) -> dict:
    norm = dict(ckpt.normalization)
    scale = ("the images as the training data gave them (already normalised)" if not norm.get("mean") else
             f"{ckpt.input_size[0]} channels on the training images' scale (0..255 for uint8 images), then "
             "(x - mean) / std")
    return {"arch": ckpt.arch, "input": ["batch", *ckpt.input_size], "input_scale": scale, "normalization": norm,
            "num_classes": ckpt.num_classes}


def _onnx(model: torch.nn.Module, ckpt: Checkpoint, trace_x: torch.Tensor, check_x: torch.Tensor,
          tmp: Path) -> torch.Tensor:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise EkgError('ONNX export needs onnx and onnxruntime: pip install "ekg[export]"') from None
    names = {"input_names": ["images"], "output_names": ["logits"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (trace_x,), str(tmp), dynamo=False,
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, **names)
        except Exception:  # the TorchScript-based exporter is gone or failed: the dynamo exporter
            torch.onnx.export(model, (trace_x,), str(tmp), dynamo=True,
                              dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, **names)
    proto = onnx.load(str(tmp))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "ekg.preprocess", json.dumps(_preprocess_record(ckpt))
    onnx.save(proto, str(tmp))
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: check_x.numpy()})[0]
    return torch.from_numpy(out)


def _torchscript(model: torch.nn.Module, trace_x: torch.Tensor, check_x: torch.Tensor, tmp: Path) -> torch.Tensor:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, trace_x)
        torch.jit.save(traced, str(tmp))
        loaded = torch.jit.load(str(tmp))
        return loaded(check_x)

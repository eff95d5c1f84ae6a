"""`ekg export`: a model as ONNX or TorchScript, checked against PyTorch."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_model_arg, open_model


def add_parser(sub: Any) -> None:
    from ..export import FORMATS

    p = sub.add_parser("export", help="export a model to ONNX or TorchScript, checked against PyTorch",
                       description="Writes OUT (.onnx or .ts) with a dynamic batch dimension, runs it (onnxruntime "
                                   "for ONNX) and compares with the PyTorch model; OUT.json records the "
                                   "preprocessing. ONNX needs: pip install \"ekg[export]\".")
    add_model_arg(p)
    p.add_argument("--out", required=True, metavar="FILE", help="model.onnx, or model.ts for TorchScript")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: from --out's suffix")
    p.add_argument("--download", action="store_true", help="download a missing pretrained model")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import export

    ckpt = open_model(args)
    res = export(ckpt, args.out, args.format)
    print(f"wrote {res.path} ({res.format}, {res.bytes / 1e6:.2f} MB; max |exported - PyTorch| = "
          f"{res.max_abs_diff:.1e} on a check batch); preprocessing in {res.path.name}.json")
    return 0

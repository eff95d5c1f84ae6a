"""`ekg landscape`: Hessian spectrum (lambda_max, lambda_min, trace) and loss-surface pictures."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import EkgError
from .common import (add_data_args, add_landscape_args, add_model_arg, check_fits, landscape_config, open_data,
                     open_model)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("landscape", help="Hessian spectrum (lambda_max, lambda_min, trace) and loss-surface pictures",
                       description="Measures the loss landscape of a model (slim or not) on fixed training images: "
                                   "lambda_max by power iteration, lambda_min and the density by Lanczos, the trace "
                                   "by Hutchinson, 1-D and 2-D filter-normalised loss surfaces. Writes "
                                   "OUT/landscape.json (with the definitions), OUT/surface_*.json and PNGs.")
    add_model_arg(p)
    add_data_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite an earlier landscape.json in --out")
    add_landscape_args(p, surfaces=True)
    p.set_defaults(func=cmd_landscape)


def cmd_landscape(args: argparse.Namespace) -> int:
    from ..landscape import landscape

    cfg = landscape_config(args)
    out = Path(args.out)
    if (out / "landscape.json").exists() and not args.force:
        raise EkgError(f"{out / 'landscape.json'} exists; add --force to measure again or choose another --out")
    ckpt = open_model(args)
    data = open_data(args, ckpt)
    check_fits(args, ckpt, data, splits=())
    rec = landscape(ckpt, data, out, config=cfg, progress=not args.quiet)
    print(f"lambda_max {rec['lambda_max']:.4g}  lambda_min {rec['lambda_min']:.4g}  "
          f"|lambda_min|/lambda_max {rec['neg_ratio']:.4f}  trace {rec['trace']:.4g} (± {rec['trace_stderr']:.2g})  "
          f"loss {rec['loss']:.4f} on {rec['images']} images ({rec['params']:,} parameters, {rec['seconds']:.0f} s)")
    print(f"wrote {out / 'landscape.json'}" + "".join(f", {out / f}" for k in ("surface_1d_files", "surface_2d_files")
                                                          for f in rec.get(k, [])))
    return 0

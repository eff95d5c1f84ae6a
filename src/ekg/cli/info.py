"""`ekg info`: per-layer widths, FLOPs and params of a model."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_model_arg, open_model, print_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser("info", help="per-layer widths, FLOPs and params of a model")
    add_model_arg(p)
    p.add_argument("--download", action="store_true", help="download a missing pretrained model")
    p.add_argument("--bn-ops", action="store_true", help="add 2 ops per BN output element (the original code's count)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from ..flops import count, human

    ckpt = open_model(args)
    counts = count(ckpt.model, ckpt.input_size, bn_ops=args.bn_ops)
    info = {"model": str(args.model), "arch": ckpt.arch, "spec": ckpt.arch_dict(),
            "num_classes": ckpt.num_classes, "normalization": ckpt.normalization,
            "input_size": list(ckpt.input_size), "meta": ckpt.meta, **counts.to_dict()}
    if args.json:
        print_json(info)
        return 0
    print(f"{info['arch']}: {human(counts.flops)} FLOPs ({counts.convention}), {human(counts.params)} params, "
          f"{ckpt.num_classes} classes, normalization {ckpt.normalization.get('name', 'custom')}")
    print(f"{'layer':28s} {'type':6s} {'in':>5s} {'out':>5s} {'kernel':>7s} {'stride':>6s} {'output':>7s} "
          f"{'FLOPs':>12s} {'params':>8s}")
    for r in counts.layers:
        k = "x".join(map(str, r.kernel)) if r.kernel else "-"
        s = str(r.stride[0]) if r.stride else "-"
        o = "x".join(map(str, r.output_hw)) if r.output_hw else "-"
        print(f"{r.name:28s} {r.type:6s} {r.in_channels:5d} {r.out_channels:5d} {k:>7s} {s:>6s} {o:>7s} "
              f"{r.flops:12,d} {r.params:8,d}")
    return 0

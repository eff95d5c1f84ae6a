"""`ekg convert`: an EKG TF pickle, an akamaster .th or torchvision weights as an ekg checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import EkgError
from ..io import check_output_file


def add_parser(sub: Any) -> None:
    from ..checkpoint import TORCHVISION_INPUT_SIZE, TORCHVISION_NORMALIZATION

    p = sub.add_parser("convert", help="convert an EKG TF pickle, an akamaster .th or torchvision weights into an "
                                       "ekg checkpoint")
    p.add_argument("src", help="res56_cifar10.pkl (original EKG release), an akamaster .th, or (with --torchvision) "
                               "a torchvision model's state dict")
    p.add_argument("--out", required=True, metavar="DST.pt")
    p.add_argument("--arch", default=None, help="force an architecture name (default: detected)")
    p.add_argument("--torchvision", default=None, metavar="NAME",
                   help="SRC holds the weights of torchvision model NAME (e.g. resnet50); needs the vision extra")
    p.add_argument("--num-classes", type=int, default=None, help="with --torchvision; default: from the weights")
    p.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                   help="with --torchvision: the input size the model expects; default: "
                        + " ".join(map(str, TORCHVISION_INPUT_SIZE)))
    p.add_argument("--normalization", default=None,
                   help="with --torchvision: the normalisation preset its weights expect; default: "
                        f"{TORCHVISION_NORMALIZATION}")
    p.set_defaults(func=cmd_convert)


def _check_torchvision_flags(args: argparse.Namespace) -> None:
    """--num-classes, --input-size and --normalization describe torchvision weights; checked before any file is read."""
    from ..data import get_normalization

    given = [flag for flag, value in (("--num-classes", args.num_classes), ("--input-size", args.input_size),
                                      ("--normalization", args.normalization)) if value is not None]
    if not args.torchvision:
        if given:
            raise EkgError(f"{given[0]} describes torchvision weights (with --torchvision NAME); the other formats "
                           f"record their own: drop {given[0]}")
        return
    if args.arch:
        raise EkgError("--arch names a CIFAR ResNet; with --torchvision the architecture is torchvision's")
    if args.num_classes is not None and args.num_classes < 1:
        raise EkgError(f"--num-classes must be at least 1, got {args.num_classes}")
    if args.input_size is not None and min(args.input_size) < 1:
        raise EkgError(f"--input-size must be three sizes of at least 1 (C H W), got {' '.join(map(str, args.input_size))}")
    if args.normalization is not None:
        get_normalization(args.normalization)  # an unknown preset is refused, naming the presets


def cmd_convert(args: argparse.Namespace) -> int:
    from ..checkpoint import TORCHVISION_INPUT_SIZE, TORCHVISION_NORMALIZATION, load_checkpoint, save_checkpoint
    from ..flops import count, human

    src = Path(args.src)
    if Path(args.out).resolve() == src.resolve():
        raise EkgError("--out must differ from the source file")
    check_output_file(args.out)
    _check_torchvision_flags(args)
    if args.torchvision:
        from ..checkpoint import import_torchvision

        kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
        ckpt = import_torchvision(src, args.torchvision, input_size=tuple(args.input_size or TORCHVISION_INPUT_SIZE),
                                  normalization=args.normalization or TORCHVISION_NORMALIZATION, **kwargs)
    else:
        ckpt = load_checkpoint(src, arch=args.arch)
    save_checkpoint(ckpt, args.out)
    c = count(ckpt.model, ckpt.input_size)
    print(f"wrote {args.out}: {ckpt.arch}, {ckpt.num_classes} classes, {human(c.flops)} FLOPs, "
          f"{human(c.params)} params, normalization {ckpt.normalization['name']}")
    return 0

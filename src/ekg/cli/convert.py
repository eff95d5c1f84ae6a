"""`ekg convert`: an EKG TF pickle, an akamaster .th, or torchvision or timm weights as an ekg checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import EkgError
from ..io import check_output_file


def add_parser(sub: Any) -> None:
    from ..checkpoint import TORCHVISION_INPUT_SIZE, TORCHVISION_NORMALIZATION

    p = sub.add_parser("convert", help="convert an EKG TF pickle, an akamaster .th, or torchvision or timm weights "
                                       "into an ekg checkpoint")
    p.add_argument("src", help="res56_cifar10.pkl (original EKG release), an akamaster .th, or (with --torchvision "
                               "or --timm) a torchvision or timm model's state dict")
    p.add_argument("--out", required=True, metavar="DST.pt")
    p.add_argument("--arch", default=None, help="force an architecture name (default: detected)")
    p.add_argument("--torchvision", default=None, metavar="NAME",
                   help="SRC holds the weights of torchvision model NAME (e.g. resnet50); needs the vision extra")
    p.add_argument("--timm", default=None, metavar="NAME",
                   help="SRC holds the weights of timm model NAME (e.g. resnet50d, built with "
                        "timm.create_model(NAME, pretrained=False)); needs timm (the zoo extra)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="with --torchvision or --timm; default: from the weights")
    p.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                   help="with --torchvision or --timm: the input size the model expects; default: the timm "
                        "model's pretrained_cfg, else " + " ".join(map(str, TORCHVISION_INPUT_SIZE)))
    p.add_argument("--normalization", default=None,
                   help="with --torchvision or --timm: the normalisation preset its weights expect; default: "
                        f"the timm model's pretrained_cfg mean and std, else {TORCHVISION_NORMALIZATION}")
    p.set_defaults(func=cmd_convert)


def _zoo_flag(args: argparse.Namespace) -> str | None:
    """The zoo flag given (--torchvision or --timm), or None; both is an error."""
    if args.torchvision and args.timm:
        raise EkgError("--torchvision and --timm both name the model of SRC: give one")
    return "--torchvision" if args.torchvision else "--timm" if args.timm else None


def _check_zoo_flags(args: argparse.Namespace) -> None:
    """--num-classes, --input-size and --normalization describe torchvision or timm weights; checked
    before any file is read."""
    from ..data import get_normalization

    zoo = _zoo_flag(args)
    given = [flag for flag, value in (("--num-classes", args.num_classes), ("--input-size", args.input_size),
                                      ("--normalization", args.normalization)) if value is not None]
    if zoo is None:
        if given:
            raise EkgError(f"{given[0]} describes torchvision or timm weights (with --torchvision NAME or --timm NAME); "
                           f"the other formats record their own: drop {given[0]}")
        return
    if args.arch:
        raise EkgError(f"--arch names a CIFAR ResNet; with {zoo} the architecture is {zoo[2:]}'s")
    if args.num_classes is not None and args.num_classes < 1:
        raise EkgError(f"--num-classes must be at least 1, got {args.num_classes}")
    if args.input_size is not None and min(args.input_size) < 1:
        raise EkgError(f"--input-size must be three sizes of at least 1 (C H W), got {' '.join(map(str, args.input_size))}")
    if args.normalization is not None:
        get_normalization(args.normalization)  # an unknown preset is refused, naming the presets


def cmd_convert(args: argparse.Namespace) -> int:
    from ..arch import TIMM, TORCHVISION
    from ..checkpoint import import_zoo, load_checkpoint, save_checkpoint
    from ..flops import count, human

    src = Path(args.src)
    if Path(args.out).resolve() == src.resolve():
        raise EkgError("--out must differ from the source file")
    check_output_file(args.out)
    zoo = _zoo_flag(args)
    _check_zoo_flags(args)
    if zoo is not None:
        kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
        prefix, name = (TORCHVISION, args.torchvision) if zoo == "--torchvision" else (TIMM, args.timm)
        ckpt = import_zoo(src, prefix, name, input_size=None if args.input_size is None else tuple(args.input_size),
                          normalization=args.normalization, **kwargs)
    else:
        ckpt = load_checkpoint(src, arch=args.arch)
    save_checkpoint(ckpt, args.out)
    c = count(ckpt.model, ckpt.input_size)
    print(f"wrote {args.out}: {ckpt.arch}, {ckpt.num_classes} classes, {human(c.flops)} FLOPs, "
          f"{human(c.params)} params, normalization {ckpt.normalization['name']}")
    return 0

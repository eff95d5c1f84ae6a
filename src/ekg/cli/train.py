"""`ekg train`: train a CIFAR baseline from scratch."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_data_args, add_device_arg, add_training_args, open_data, say, speed


def add_parser(sub: Any) -> None:
    from ..train import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a CIFAR baseline from scratch")
    p.add_argument("--arch", default=d.arch, help="architecture name (see `ekg models`); default: %(default)s")
    add_data_args(p)
    add_device_arg(p)
    p.add_argument("--out", required=True, metavar="RUN", help="run directory")
    add_training_args(p, d)
    p.add_argument("--normalization", default=d.normalization, help="normalization preset; auto = the dataset's own")
    p.add_argument("--jitter", action="store_true", help="add the EKG colour jitter")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from ..data import AugmentConfig
    from ..train import TrainConfig, train

    aug = AugmentConfig(pad=args.pad, pad_mode=args.pad_mode, flip=not args.no_flip, jitter=args.jitter)
    cfg = TrainConfig(arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.wd, schedule=args.schedule, warmup_epochs=args.warmup,
                      normalization=args.normalization, augment=aug, seed=args.seed, device=args.device,
                      limit_train=args.limit_train, limit_test=args.limit_test, **speed(args))
    cfg.validate()
    from ..models import spec_for

    spec_for(cfg.arch)  # a bad --arch fails before the data is read
    data = open_data(args)
    path = train(cfg, data, args.out, resume=args.resume, progress=not args.quiet, dist=args.dist)
    say(args, f"trained model: {path}")
    return 0

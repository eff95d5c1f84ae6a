"""`ekg finetune`: fine-tune a pruned model, with the memory bank's ensemble knowledge."""

from __future__ import annotations

import argparse
from typing import Any

from .common import (add_bank_topk_arg, add_data_args, add_device_arg, add_model_arg, add_training_args, check_fits,
                     open_data, open_model, say, speed)


def add_parser(sub: Any) -> None:
    from ..bank import DEFAULT_TEACHERS
    from ..distill import KD_MODES
    from ..train import default_temperature, finetune_config

    f = finetune_config()
    steps = "/".join(f"{100 * m:g}" for m in f.milestones)
    p = sub.add_parser("finetune", help="fine-tune a pruned model, with the memory bank's ensemble knowledge",
                       description=f"Fine-tune --model (e.g. RUN/pruned.pt). --kd {f.kd} (default) distils from "
                                   "the memory bank of the `ekg prune` run --bank RUN, built on first use into "
                                   "RUN/bank; --kd single uses only its best teacher; --kd none is plain "
                                   f"cross-entropy. Defaults: the paper's CIFAR recipe ({f.epochs} epochs, batch "
                                   f"{f.batch_size}, lr {f.lr:g} ×{f.gamma:g} at {steps}%, Nesterov SGD, weight "
                                   f"decay {f.weight_decay:.0e}).".replace("e-0", "e-"))
    add_model_arg(p)
    add_data_args(p)
    add_device_arg(p)
    p.add_argument("--bank", default=None, metavar="RUN", help="an `ekg prune` run directory (or a bank folder)")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory; default: RUN/finetune")
    p.add_argument("--kd", choices=KD_MODES, default=f.kd,
                   help="distillation: ensemble (EKG's per-batch teacher selection), single (teacher 0), "
                        "none (cross-entropy only); default: %(default)s")
    p.add_argument("--teachers", type=int, default=None,
                   help=f"teachers in a newly built bank (default {DEFAULT_TEACHERS}); an existing bank built with "
                        "another number is refused when this is given")
    add_bank_topk_arg(p)
    p.add_argument("--temperature", type=float, default=None,
                   help=f"KD temperature; default: {default_temperature(10):g}, or {default_temperature(1000):g} "
                        "for data with 1000 or more classes (the method's values)")
    add_training_args(p, f)
    p.add_argument("--jitter", action=argparse.BooleanOptionalAction, default=None,
                   help="the EKG colour jitter; default: on with --kd ensemble/single, off with --kd none")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..data import AugmentConfig
    from ..finetuning import finetune
    from ..rundir import TrainDir
    from ..train import finetune_config

    recipe = finetune_config(args.kd)
    aug = AugmentConfig(pad=args.pad, pad_mode=args.pad_mode, flip=not args.no_flip, jitter=recipe.augment.jitter)
    cfg = finetune_config(args.kd, arch="(from --model)", epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr, weight_decay=args.wd, schedule=args.schedule, warmup_epochs=args.warmup,
                          augment=aug, seed=args.seed, device=args.device, limit_train=args.limit_train,
                          limit_test=args.limit_test, temperature=args.temperature, **speed(args))
    ckpt = open_model(args)
    data = open_data(args, ckpt)
    check_fits(args, ckpt, data, splits=())
    res = finetune(ckpt, data, bank=args.bank, out=args.out, config=cfg, jitter=args.jitter, teachers=args.teachers,
                   bank_topk=args.bank_topk, resume=args.resume, progress=not args.quiet, dist=args.dist)
    say(args, f"fine-tuned model: {TrainDir(res.run_dir).model}")
    return 0

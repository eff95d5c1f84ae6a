"""`ekg study`: does smoothness predict fine-tuned quality? (the paper's potential study)"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import add_data_args, add_landscape_args, landscape_config, open_data


def add_parser(sub: Any) -> None:
    from ..study import StudyConfig

    d = StudyConfig()
    p = sub.add_parser("study", help="does smoothness predict fine-tuned quality? (the paper's potential study)",
                       description="Takes finished `ekg prune` runs of one model at one budget (e.g. different "
                                   "--importance), adds random perturbations of each, measures every sub-network's "
                                   "val loss and Hessian numbers, fine-tunes each on the same short schedule and "
                                   "reports rank correlations (Spearman, Kendall, bootstrap intervals) with the "
                                   "test loss after fine-tuning. Re-running continues an interrupted study.")
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN", help="`ekg prune` run directories")
    add_data_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="study folder")
    p.add_argument("--perturb", type=int, default=d.perturb, help="random perturbations per run; default: %(default)s")
    p.add_argument("--swap", type=float, nargs=2, default=d.swap, metavar=("LOW", "HIGH"),
                   help="range of the fraction of kept channels swapped for pruned ones; default: "
                        + " ".join(f"{s:g}" for s in d.swap))
    p.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs,
                   help="epochs of plain fine-tuning; default: %(default)s")
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr, help="default: %(default)s")
    p.add_argument("--limit-train", type=int, default=d.limit_train, help="fine-tune on the first N training images only")
    p.add_argument("--bootstrap", type=int, default=d.bootstrap, help="bootstrap resamples; default: %(default)s")
    add_landscape_args(p, surfaces=False, defaults=d.landscape)
    p.set_defaults(func=cmd_study)


def cmd_study(args: argparse.Namespace) -> int:
    from ..study import StudyConfig, study

    base = StudyConfig()
    cfg = StudyConfig(perturb=args.perturb, swap=(args.swap[0], args.swap[1]), finetune_epochs=args.finetune_epochs,
                      finetune_lr=args.finetune_lr, limit_train=args.limit_train, bootstrap=args.bootstrap,
                      seed=args.seed if args.seed is not None else base.seed,
                      landscape=landscape_config(args, **base.landscape.to_dict()))
    cfg.validate()
    data = open_data(args)
    rec = study(args.runs, data, args.out, config=cfg, progress=not args.quiet)
    from ..study import study_markdown

    print(study_markdown(rec), end="")
    print(f"wrote {Path(args.out) / 'study.json'}, study.md, study.png")
    return 0

"""`ekg run`: the whole method (search, slimming, memory bank, fine-tuning, comparison)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import (add_bank_topk_arg, add_budget_args, add_restart_arg, add_speed_args, check_fits,
                     default_of, open_data, open_model, say, search_config, speed)


def add_parser(sub: Any) -> None:
    from ..bank import DEFAULT_TEACHERS
    from ..distill import KD_MODES
    from ..pipeline import PRESETS, run

    p = sub.add_parser("run", help="the whole method: search, slimming, memory bank, fine-tuning, comparison",
                       description="Every phase into one run directory; re-running continues where it stopped. "
                                   "An existing RUN (a stopped `ekg run`, or an `ekg prune` run to adopt) is "
                                   "continued only if its recorded settings match; --restart starts over. "
                                   "Leaves RUN/final.pt and RUN/summary.json (original vs pruned).")
    add_budget_args(p)
    p.add_argument("--preset", choices=tuple(PRESETS), default=default_of(run, "preset"),
                   help=f"paper: {PRESETS['paper'].epochs} fine-tuning epochs; quick: a demonstration in minutes "
                        "on a CPU; default: %(default)s")
    p.add_argument("--kd", choices=KD_MODES, default=default_of(run, "kd"),
                   help="fine-tuning distillation (see `ekg finetune`); default: %(default)s")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's fine-tuning epochs")
    p.add_argument("--limit-train", type=int, default=None, help="fine-tune on the first N training images only")
    p.add_argument("--teachers", type=int, default=None,
                   help=f"teachers in the memory bank (default {DEFAULT_TEACHERS})")
    add_bank_topk_arg(p)
    add_speed_args(p)
    add_restart_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from ..pipeline import run, summary_markdown
    from ..rundir import RunDir

    cfg = search_config(args)
    ckpt = open_model(args)
    data = open_data(args, ckpt)
    check_fits(args, ckpt, data)
    summary = run(ckpt, data, args.keep, out=args.out, preset=args.preset, kd=args.kd, search=cfg,
                  progress=not args.quiet, epochs=args.epochs, limit_train=args.limit_train, teachers=args.teachers,
                  bank_topk=args.bank_topk, speed=speed(args), restart=args.restart, dist=args.dist)
    say(args, summary_markdown(summary), end="")
    rd = RunDir(args.out)
    say(args, f"final model: {rd.final}; summary: {rd.summary}")
    return 0

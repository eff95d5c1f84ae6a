"""`ekg prune`: EKG sub-network search and slimming to a FLOPs (or measured-latency) budget."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import EkgError
from .common import add_budget_args, add_restart_arg, check_fits, open_data, open_model, say, search_config


def add_parser(sub: Any) -> None:
    p = sub.add_parser("prune", help="EKG sub-network search and slimming to a FLOPs or latency budget",
                       description="Adaptation epoch, greedy EKG search on D_val, slimming. Writes RUN/pruned.pt, "
                                   "RUN/search.jsonl and the other artifacts of the run directory.")
    add_budget_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last finished step (its settings must match)")
    add_restart_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> int:
    from ..flops import human
    from ..pruning import prune
    from ..rundir import RunDir

    cfg = search_config(args)
    if args.restart and args.resume:
        raise EkgError("--resume continues the run in --out and --restart starts it over: give only one")
    ckpt = open_model(args)
    data = open_data(args, ckpt)
    check_fits(args, ckpt, data)
    res = prune(ckpt, data, args.keep, out=args.out, config=cfg, resume=args.resume, restart=args.restart,
                progress=not args.quiet, dist=args.dist)
    say(args, f"pruned model: {RunDir(res.run_dir).pruned}  ({res.checkpoint.arch})")
    say(args, f"FLOPs {human(res.flops)} (ratio {res.flops_ratio:.4f}), params {human(res.params)}, "
              f"{res.steps} steps, {res.seconds:.0f} s; slim == masked (max output difference {res.slim_max_diff:.1e})")
    if res.latency is not None:
        say(args, latency_line(res.latency))
    return 0


def latency_line(r: dict[str, Any]) -> str:
    """A latency budget's result in one line: predicted and measured speed-up on its target."""
    from ..evaluate import format_speedup

    return (f"latency on {r['target']}: predicted {r['predicted_ms']:.3g} ms ({r['predicted_speedup']:.2f}x faster), "
            f"measured {r['measured_ms']:.3g} ms vs {r['original_ms']:.3g} ms original, speed-up "
            f"{format_speedup(r['measured_speedup'])}; prediction {100 * r['prediction_error']:+.1f}%"
            + (f" (after {r['refits']} refit{'s' if r['refits'] != 1 else ''} of the landing)" if r.get("refits") else "")
            + (f"; {r['note']}" if r.get("note") else ""))

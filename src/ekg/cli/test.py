"""`ekg test`: accuracy, loss, FLOPs, params (and CPU latency) of a model."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import EkgError
from .common import (add_data_args, add_device_arg, add_model_arg, check_fits, default_of, open_data, open_model,
                     print_json)


def add_parser(sub: Any) -> None:
    from ..bn import BN_STATS
    from ..evaluate import COMPARE_ROUNDS, LATENCY_BATCHES, SPLITS, evaluate

    p = sub.add_parser("test", help="accuracy, loss, FLOPs, params (and CPU latency) of a model",
                       description="Evaluate a model. BN runs in inference mode unless --bn batch.")
    add_model_arg(p)
    add_data_args(p)
    add_device_arg(p)
    p.add_argument("--split", choices=SPLITS, default=SPLITS[0])
    p.add_argument("--batch-size", type=int, default=default_of(evaluate, "batch_size"))
    p.add_argument("--bn", choices=BN_STATS, default=default_of(evaluate, "bn_mode"),
                   help="running: running statistics (inference mode); batch: each test batch's statistics, as "
                        "the original EKG test.py did; default: %(default)s")
    p.add_argument("--latency", action="store_true", help="also measure CPU latency")
    p.add_argument("--latency-batch", type=int, nargs="+", default=list(LATENCY_BATCHES), metavar="B",
                   help=f"batch sizes of the latency measurement; default: {' '.join(map(str, LATENCY_BATCHES))}")
    p.add_argument("--latency-baseline", default=None, metavar="CKPT",
                   help="also time this checkpoint (e.g. the unpruned original), interleaved with --model round "
                        "by round so that load on the machine lands on both, and print the speed-up "
                        "baseline/--model with its range over the rounds; implies --latency")
    p.add_argument("--latency-rounds", type=int, default=None, metavar="N",
                   help=f"rounds of the --latency-baseline comparison; default: {COMPARE_ROUNDS}")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.set_defaults(func=cmd_test)


def cmd_test(args: argparse.Namespace) -> int:
    from ..data import get_normalization
    from ..evaluate import COMPARE_ROUNDS, compare_latency, evaluate, measure_latency
    from ..flops import count
    from ..runtime import resolve_device

    if args.latency_rounds is not None and args.latency_baseline is None:
        raise EkgError("--latency-rounds sets the rounds of a --latency-baseline comparison; add --latency-baseline")
    if args.latency_rounds is not None and args.latency_rounds < 1:
        raise EkgError(f"--latency-rounds must be at least 1, got {args.latency_rounds}")
    if args.batch_size < 1:
        raise EkgError(f"--batch-size must be at least 1, got {args.batch_size}")
    if any(b < 1 for b in args.latency_batch):
        raise EkgError(f"--latency-batch sizes must be at least 1, got {' '.join(map(str, args.latency_batch))}")
    ckpt = open_model(args)
    baseline = None
    if args.latency_baseline is not None:
        baseline = open_model(args, model=args.latency_baseline)
        if tuple(baseline.input_size) != tuple(ckpt.input_size):
            raise EkgError(f"--latency-baseline expects {tuple(baseline.input_size)} inputs but --model expects "
                           f"{tuple(ckpt.input_size)}: compare models of one input size")
    data = open_data(args, ckpt)
    check_fits(args, ckpt, data, splits=[args.split])
    split = data.test if args.split == "test" else data.train
    device = resolve_device(args.device)
    model = ckpt.model.to(device)
    norm = get_normalization(ckpt.normalization)
    result: dict[str, Any] = {"model": str(args.model), "arch": ckpt.arch, "data": str(args.data),
                              "split": args.split, "bn_mode": args.bn}
    result.update(evaluate(model, split, norm, batch_size=args.batch_size, device=device, bn_mode=args.bn))
    counts = count(ckpt.model, ckpt.input_size)
    result.update({"flops": counts.flops, "params": counts.params, "flops_convention": counts.convention})
    if baseline is not None:  # both timed interleaved, round by round
        models = {"model": ckpt.model.to("cpu"), "baseline": baseline.model.to("cpu")}
        rounds = args.latency_rounds or COMPARE_ROUNDS
        cmp = [compare_latency(models, ckpt.input_size, b, rounds=rounds, baseline="baseline")
               for b in args.latency_batch]
        result["latency_baseline"] = str(args.latency_baseline)
        result["latency_cpu"] = [{"batch_size": c["batch_size"], **{k: c["models"]["model"][k] for k in
                                  ("median_ms", "p90_ms", "images_per_s")}, "threads": c["threads"]} for c in cmp]
        result["latency_cpu_comparison"] = cmp
    elif args.latency:
        cpu_model = ckpt.model.to("cpu")
        result["latency_cpu"] = [measure_latency(cpu_model, ckpt.input_size, b) for b in args.latency_batch]
    if args.json:
        print_json(result)
    else:
        print_test(result)
    return 0


def print_test(r: dict[str, Any]) -> None:
    """The human-readable form of `ekg test`'s result."""
    from ..evaluate import format_speedup
    from ..flops import human

    print(f"model   {r['model']}  ({r['arch']})")
    print(f"data    {r['data']}  [{r['split']}, {r['n_images']} images, BN {r['bn_mode']}]")
    print(f"top-1   {r['top1']:.2f}%    top-5 {r['top5']:.2f}%    loss {r['loss']:.4f}")
    print(f"FLOPs   {human(r['flops'])}  ({r['flops_convention']})")
    print(f"params  {human(r['params'])}")
    comparison = r.get("latency_cpu_comparison")
    if comparison:  # --latency-baseline
        c = comparison[0]
        print(f"latency on CPU ({c['threads']} thread{'s' if c['threads'] != 1 else ''}), against the baseline {r['latency_baseline']}; both timed "
              f"interleaved, {c['rounds']} rounds of {c['iters_per_round']} passes each")
        for c in comparison:
            print(f"latency batch {c['batch_size']:>3}: {c['models']['model']['median_ms']:.2f} ms median vs "
                  f"{c['models']['baseline']['median_ms']:.2f} ms baseline; "
                  f"speed-up {format_speedup(c['speedup']['model'])}")
        return
    for lat in r.get("latency_cpu", []):
        print(f"latency batch {lat['batch_size']:>3}: {lat['median_ms']:.2f} ms median, "
              f"{lat['images_per_s']:.0f} images/s on CPU ({lat['threads']} threads)")

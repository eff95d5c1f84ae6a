"""`ekg test`: accuracy, loss, FLOPs, params (and CPU latency) of a model."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import EkgError
from .common import (add_data_args, add_device_arg, add_latency_target_args, add_model_arg, check_fits, default_of,
                     latency_target, open_data, open_model, print_json)


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
    p.add_argument("--latency", action="store_true",
                   help="also measure latency (on the CPU with torch, or on the --latency-* target)")
    add_latency_target_args(p)
    p.add_argument("--latency-batch", type=int, nargs="+", default=list(LATENCY_BATCHES), metavar="B",
                   help=f"batch sizes of the latency measurement; default: {' '.join(map(str, LATENCY_BATCHES))}")
    p.add_argument("--latency-baseline", default=None, metavar="CKPT",
                   help="also time this checkpoint (e.g. the unpruned original), interleaved with --model round "
                        "by round so that load on the machine lands on both, and print the speed-up "
                        "baseline/--model with its range over the rounds, and the speed-up the baseline's latency "
                        "table predicts for --model's widths on the target; implies --latency")
    p.add_argument("--latency-rounds", type=int, default=None, metavar="N",
                   help=f"rounds of the --latency-baseline comparison; default: {COMPARE_ROUNDS}")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.set_defaults(func=cmd_test)


def cmd_test(args: argparse.Namespace) -> int:
    from ..data import get_normalization
    from ..evaluate import COMPARE_ROUNDS, evaluate, measure_latency
    from ..latency import LatencyTarget, compare_on_target
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
    targets = [latency_target(args, b) for b in args.latency_batch]  # checked before any work
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
    default_target = targets[0] == LatencyTarget(batch=targets[0].batch)  # the plain CPU measurement
    if baseline is not None:  # both timed interleaved, round by round, on the target
        models = {"model": ckpt.model.to("cpu"), "baseline": baseline.model.to("cpu")}
        rounds = args.latency_rounds or COMPARE_ROUNDS
        cmp = [compare_on_target(models, ckpt.input_size, t, rounds=rounds, baseline="baseline") for t in targets]
        result["latency_baseline"] = str(args.latency_baseline)
        result["latency_target"] = targets[0].describe().rsplit(", batch", 1)[0]
        result["latency_cpu" if default_target else "latency_on_target"] = [
            {"batch_size": c["batch_size"], **{k: c["models"]["model"][k] for k in ("median_ms", "p90_ms", "images_per_s")},
             "threads": c["threads"]} for c in cmp]
        result["latency_cpu_comparison"] = cmp
        result["latency_predicted"] = [predicted_speedup(baseline.model.to("cpu"), ckpt.model, ckpt.input_size, t)
                                       for t in targets]
    elif args.latency and default_target:
        cpu_model = ckpt.model.to("cpu")
        result["latency_cpu"] = [measure_latency(cpu_model, ckpt.input_size, b) for b in args.latency_batch]
    elif args.latency:
        result["latency_target"] = targets[0].describe().rsplit(", batch", 1)[0]
        result["latency_on_target"] = []
        for t in targets:
            c = compare_on_target({"model": ckpt.model.to("cpu")}, ckpt.input_size, t)
            result["latency_on_target"].append({"batch_size": t.batch, **{k: c["models"]["model"][k] for k in
                                                ("median_ms", "p90_ms", "images_per_s")}, "threads": c["threads"]})
    if args.json:
        print_json(result)
    else:
        print_test(result)
    return 0


def predicted_speedup(baseline: Any, model: Any, input_size: Any, target: Any) -> dict[str, Any]:
    """The speed-up of ``model`` over ``baseline`` on ``target`` that the baseline's latency table
    predicts for ``model``'s widths (``model`` must be the baseline slimmed: its layers by name), or
    why there is none."""
    from ..graph import build_graph
    from ..latency import LatencyModel

    from ..slim import slim_widths

    base_graph = build_graph(baseline, tuple(input_size))
    try:
        widths = slim_widths(base_graph, model)
    except EkgError as e:
        return {"batch_size": target.batch, "note": f"--model is not --latency-baseline with its channels cut ({e}): "
                                                    "no prediction"}
    lat = LatencyModel(baseline, base_graph, target, progress=False)
    return {"batch_size": target.batch, "predicted_ms": lat.predict(widths), "baseline_ms": lat.full_ms,
            "predicted_speedup": lat.full_ms / lat.predict(widths)}


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
        print(f"latency on {r['latency_target']}, against the baseline {r['latency_baseline']}; both timed "
              f"interleaved, {c['rounds']} rounds of {c['iters_per_round']} passes each")
        for c, pred in zip(comparison, r.get("latency_predicted", [{}] * len(comparison))):
            guess = (f"; predicted {pred['predicted_speedup']:.2f}x" if "predicted_speedup" in pred else "")
            print(f"latency batch {c['batch_size']:>3}: {c['models']['model']['median_ms']:.2f} ms median vs "
                  f"{c['models']['baseline']['median_ms']:.2f} ms baseline; "
                  f"speed-up {format_speedup(c['speedup']['model'])}{guess}")
        return
    for lat in r.get("latency_on_target", []):
        print(f"latency batch {lat['batch_size']:>3}: {lat['median_ms']:.2f} ms median, "
              f"{lat['images_per_s']:.0f} images/s on {r['latency_target']}")
    for lat in r.get("latency_cpu", []):
        print(f"latency batch {lat['batch_size']:>3}: {lat['median_ms']:.2f} ms median, "
              f"{lat['images_per_s']:.0f} images/s on CPU ({lat['threads']} threads)")

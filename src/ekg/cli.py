"""The ``ekg`` command line: a thin layer over the Python API.

Every user error is one line on stderr (``ekg: error: ...``) and a non-zero exit; nothing is left
half-written. ``EKG_DEBUG=1`` shows tracebacks of unexpected errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import EkgError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


# ----------------------------------------------------------------------------- shared helpers

def _add_model_arg(p: argparse.ArgumentParser, default: str | None = None) -> None:
    from .pretrained import DEFAULT_MODEL

    p.add_argument("--model", default=default or DEFAULT_MODEL, metavar="CKPT",
                   help="checkpoint path (ekg .pt, EKG TF .pkl, akamaster .th) or a pretrained name "
                        "(see `ekg models`); default: %(default)s")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="cifar10", metavar="DIR",
                   help="folder containing (or being) cifar-10-batches-py / cifar-100-python, an official "
                        ".tar.gz, a train/ + val/ (or test/) class-folder tree or its zips, or the name "
                        "cifar10/cifar100 (looked up under $EKG_DATA); default: %(default)s")
    p.add_argument("--download", action="store_true",
                   help="download missing data or pretrained weights (needs a network)")
    p.add_argument("--data-mode", choices=("auto", "memory", "stream"), default="auto",
                   help="how a class-folder tree is read: memory (decoded once into memory; one image size), "
                        "stream (from disk batch by batch with torchvision's transforms: ImageNet), or auto: "
                        "stream unless the images share one size of at most 128 pixels a side and fit in "
                        "2 GiB; default: %(default)s")
    p.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="streamed trees: the crop side (RandomResizedCrop for training, CenterCrop for "
                        "evaluation); default: the model's input size, else 224")
    p.add_argument("--resize", type=int, default=None, metavar="R",
                   help="streamed trees: resize the shorter side to R before the evaluation centre crop "
                        "(0: no resize); default: image-size x 256/224")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="streamed trees: DataLoader worker processes per process (0: decode in-process); "
                        "default: the CPUs shared among the processes of this machine, at most 8")


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N; default: auto")


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    """--model, --data, --device, --keep, --out and the search's settings: what `ekg prune` and
    `ekg run` start from (defaults from SearchConfig)."""
    from .bn import BN_STATS
    from .search import COMPATS, IMPORTANCES, METHODS, REWARDS, SearchConfig

    d = SearchConfig()
    _add_model_arg(p)
    _add_data_args(p)
    _add_device_arg(p)
    p.add_argument("--keep", type=float, default=d.keep, help="target FLOPs ratio in (0, 1); default: %(default)s")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory")
    p.add_argument("--search-bn", choices=BN_STATS, default=d.search_bn,
                   help="BN statistics in every search pass: batch (the method: each D_val batch's statistics, "
                        "running statistics untouched) or running (inference-mode BN, an ablation); "
                        "default: %(default)s")
    p.add_argument("--compat", choices=COMPATS, default=d.compat,
                   help="method (the method's rules) or release (replay the original TensorFlow release's "
                        "effective search decision for decision: its candidate cost, candidates until rate 0, "
                        "adaptation loss, BN ops in the FLOPs ratio, landing and tie order; see docs/design.md); "
                        "default: %(default)s")
    p.add_argument("--importance", choices=IMPORTANCES, default=d.importance,
                   help="channel scores: ekg (Taylor of the ensemble objective), taylor (of cross-entropy), "
                        "l1, fpgm, random; default: %(default)s")
    p.add_argument("--reward", choices=REWARDS, default=d.reward,
                   help="candidate reward: ensemble (J) or val-loss; default: %(default)s")
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help="greedy search, or the same fraction removed from every group; default: %(default)s")
    p.add_argument("--no-adapt", action="store_true", help="skip the adaptation epoch")
    p.add_argument("--bn-ops", action="store_true", help="count BN ops in the FLOPs ratio, as the original code")
    p.add_argument("--straightforward", action="store_true",
                   help="evaluate every candidate on the whole network (slower, same decisions)")
    p.add_argument("--search-seed", "--seed", dest="search_seed", type=int, default=d.seed,
                   help="seed of --importance random; default: %(default)s")
    p.add_argument("--val-per-class", type=int, default=d.val_per_class, metavar="N",
                   help="images per class in the search set D_val (the last N of each class); default: %(default)s")
    p.add_argument("--sub-per-class", type=int, default=d.sub_per_class, metavar="N",
                   help="images per class in the adaptation set D_sub (the first N of each class); "
                        "default: %(default)s")
    p.add_argument("--search-cache-gb", type=float, default=None, metavar="GB",
                   help="memory the search may use to cache activations (the same decisions, less compute); "
                        "above it, each candidate runs the whole network; default: half the device's free memory")


def _add_training_args(p: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float,
                       schedule: str) -> None:
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay")
    p.add_argument("--schedule", choices=("cosine", "step"), default=schedule,
                   help="cosine, or step decay (train: ×0.1 at 50%% and 75%%; finetune: ×0.2 at 30/60/80%%)")
    p.add_argument("--warmup", type=float, default=0.0, help="linear warm-up epochs")
    p.add_argument("--pad", type=int, default=4)
    p.add_argument("--pad-mode", choices=("reflect", "zeros"), default="reflect")
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    _add_speed_args(p)
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_speed_args(p: argparse.ArgumentParser) -> None:
    """How training runs (not what it computes): precision, compilation, memory format, accumulation."""
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                   help="mixed precision: auto (bf16 or fp16 on GPUs, off on the CPU), off, bf16 (also on the "
                        "CPU), fp16 (GPUs only, with loss scaling); default: %(default)s")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for the model and its inputs")
    p.add_argument("--accum", type=int, default=1, metavar="N",
                   help="gradient accumulation: each --batch-size batch runs as N micro-batches of batch-size/N "
                        "(the same gradient, up to BN's per-micro-batch statistics); default: %(default)s")


def _speed(args: argparse.Namespace) -> dict[str, Any]:
    return {"amp": args.amp, "compile": args.compile, "channels_last": args.channels_last, "accum": args.accum}


def _open_model(args: argparse.Namespace, arch: str | None = None, model: str | None = None) -> Any:
    """The checkpoint --model names (or ``model``: another flag's value of the same kind)."""
    from .checkpoint import load_checkpoint
    from .pretrained import resolve_model

    return load_checkpoint(resolve_model(model or args.model, download=getattr(args, "download", False)), arch=arch)


def _open_data(args: argparse.Namespace, ckpt: Any = None) -> Any:
    """The --data splits; a streamed tree crops to --image-size, by default the model's input size."""
    from .data import load_data

    stream = None
    if args.data_mode != "memory":
        from .data import StreamConfig

        size = args.image_size or (int(ckpt.input_size[-1]) if ckpt is not None else 224)
        stream = StreamConfig(image_size=size, resize=args.resize, workers=args.workers)
    return load_data(args.data, download=args.download, progress=sys.stderr.isatty(), mode=args.data_mode,
                     stream=stream)


def _say(args: argparse.Namespace, text: str, end: str = "\n") -> None:
    """Print on stdout, once: on rank 0 of a torchrun launch."""
    if args.dist.is_main:
        print(text, end=end)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


# ----------------------------------------------------------------------------- commands

def cmd_test(args: argparse.Namespace) -> int:
    from .data import get_normalization
    from .evaluate import COMPARE_ROUNDS, compare_latency, evaluate, measure_latency
    from .flops import count
    from .runtime import resolve_device

    if args.latency_rounds is not None and args.latency_baseline is None:
        raise EkgError("--latency-rounds sets the rounds of a --latency-baseline comparison; add --latency-baseline")
    if args.latency_rounds is not None and args.latency_rounds < 1:
        raise EkgError(f"--latency-rounds must be at least 1, got {args.latency_rounds}")
    if any(b < 1 for b in args.latency_batch):
        raise EkgError(f"--latency-batch sizes must be at least 1, got {' '.join(map(str, args.latency_batch))}")
    ckpt = _open_model(args)
    baseline = None
    if args.latency_baseline is not None:
        baseline = _open_model(args, model=args.latency_baseline)
        if tuple(baseline.input_size) != tuple(ckpt.input_size):
            raise EkgError(f"--latency-baseline expects {tuple(baseline.input_size)} inputs but --model expects "
                           f"{tuple(ckpt.input_size)}: compare models of one input size")
    data = _open_data(args, ckpt)
    if ckpt.num_classes != data.num_classes:
        raise EkgError(
            f"the model predicts {ckpt.num_classes} classes but the data ({data.name}, {args.data}) has "
            f"{data.num_classes}: use a checkpoint trained on this dataset"
        )
    split = data.test if args.split == "test" else data.train
    if tuple(split.image_size) != tuple(ckpt.input_size):
        raise EkgError(f"the model expects {tuple(ckpt.input_size)} inputs but the images are "
                       f"{tuple(split.image_size)}" + (" (set --image-size)" if data.streamed else ""))
    device = resolve_device(args.device)
    model = ckpt.model.to(device)
    norm = get_normalization(ckpt.normalization)
    result: dict[str, Any] = {"model": str(args.model), "arch": ckpt.arch, "data": str(args.data),
                              "split": args.split, "bn_mode": args.bn_mode}
    result.update(evaluate(model, split, norm, batch_size=args.batch_size, device=device, bn_mode=args.bn_mode))
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
        _print_json(result)
    else:
        _print_test(result)
    return 0


def _print_test(r: dict[str, Any]) -> None:
    from .evaluate import format_speedup
    from .flops import human

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


def cmd_info(args: argparse.Namespace) -> int:
    from .flops import count, human

    ckpt = _open_model(args)
    counts = count(ckpt.model, ckpt.input_size, bn_ops=args.bn_ops)
    info = {"model": str(args.model), "arch": ckpt.arch, "spec": ckpt.arch_dict(),
            "num_classes": ckpt.num_classes, "normalization": ckpt.normalization,
            "input_size": list(ckpt.input_size), "meta": ckpt.meta, **counts.to_dict()}
    if args.json:
        _print_json(info)
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


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint, save_checkpoint
    from .flops import count, human

    src = Path(args.src)
    if Path(args.out).resolve() == src.resolve():
        raise EkgError("--out must differ from the source file")
    if args.torchvision:
        from .checkpoint import import_torchvision

        if args.arch:
            raise EkgError("--arch names a CIFAR ResNet; with --torchvision the architecture is torchvision's")
        kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
        ckpt = import_torchvision(src, args.torchvision, input_size=tuple(args.input_size),
                                  normalization=args.normalization, **kwargs)
    else:
        ckpt = load_checkpoint(src, arch=args.arch)
    save_checkpoint(ckpt, args.out)
    c = count(ckpt.model, ckpt.input_size)
    print(f"wrote {args.out}: {ckpt.arch}, {ckpt.num_classes} classes, {human(c.flops)} FLOPs, "
          f"{human(c.params)} params, normalization {ckpt.normalization['name']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .data import AugmentConfig
    from .train import TrainConfig, train

    aug = AugmentConfig(pad=args.pad, pad_mode=args.pad_mode, flip=not args.no_flip, jitter=args.jitter)
    cfg = TrainConfig(arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.wd, schedule=args.schedule, warmup_epochs=args.warmup,
                      normalization=args.normalization, augment=aug, seed=args.seed, device=args.device,
                      limit_train=args.limit_train, limit_test=args.limit_test, **_speed(args))
    cfg.validate()
    from .models import spec_for

    spec_for(cfg.arch)  # a bad --arch fails before the data is read
    data = _open_data(args)
    path = train(cfg, data, args.out, resume=args.resume, progress=not args.quiet, dist=args.dist)
    _say(args, f"trained model: {path}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .bank import bank_for_run, check_topk
    from .data import AugmentConfig
    from .rundir import RunDir
    from .train import finetune_config, train

    jitter = args.kd != "none" if args.jitter is None else args.jitter
    aug = AugmentConfig(pad=args.pad, pad_mode=args.pad_mode, flip=not args.no_flip, jitter=jitter)
    cfg = finetune_config(args.kd, arch="(from --model)", epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr, weight_decay=args.wd, schedule=args.schedule, warmup_epochs=args.warmup,
                          augment=aug, seed=args.seed, device=args.device, limit_train=args.limit_train,
                          limit_test=args.limit_test, temperature=args.temperature, **_speed(args))
    cfg.validate()
    check_topk(args.bank_topk)
    if args.kd != "none" and args.bank is None:
        raise EkgError(f"--kd {args.kd} needs --bank RUN (an `ekg prune` run directory, or a bank folder); "
                       "use --kd none to fine-tune without the memory bank")
    out = args.out or (RunDir(args.bank).finetune if args.bank else None)
    if out is None:
        raise EkgError("--out is required when there is no --bank")
    ckpt = _open_model(args)
    data = _open_data(args, ckpt)
    bank = None
    if args.kd != "none":
        bank = bank_for_run(args.bank, data.train, teachers=args.teachers, device=args.dist.device(args.device),
                            progress=not args.quiet, dist=args.dist, topk=args.bank_topk)
    path = train(cfg, data, out, resume=args.resume, progress=not args.quiet, init=ckpt, bank=bank, dist=args.dist)
    _say(args, f"fine-tuned model: {path}")
    return 0


def _search_config(args: argparse.Namespace) -> Any:
    """The SearchConfig of `ekg prune` / `ekg run` (the flags of _add_budget_args), validated."""
    from .search import SearchConfig

    cfg = SearchConfig(keep=args.keep, importance=args.importance, reward=args.reward, method=args.method,
                       adapt=not args.no_adapt, bn_ops=args.bn_ops, fast=not args.straightforward,
                       device=args.device, seed=args.search_seed, val_per_class=args.val_per_class,
                       sub_per_class=args.sub_per_class, cache_gb=args.search_cache_gb,
                       search_bn=args.search_bn, compat=args.compat)
    cfg.validate()
    return cfg


def cmd_prune(args: argparse.Namespace) -> int:
    from .flops import human
    from .pruning import prune
    from .rundir import RunDir

    cfg = _search_config(args)
    if args.restart and args.resume:
        raise EkgError("--resume continues the run in --out and --restart starts it over: give only one")
    ckpt = _open_model(args)
    data = _open_data(args, ckpt)
    res = prune(ckpt, data, args.keep, out=args.out, config=cfg, resume=args.resume, restart=args.restart,
                progress=not args.quiet, dist=args.dist)
    _say(args, f"pruned model: {RunDir(res.run_dir).pruned}  ({res.checkpoint.arch})")
    _say(args, f"FLOPs {human(res.flops)} (ratio {res.flops_ratio:.4f}), params {human(res.params)}, "
               f"{res.steps} steps, {res.seconds:.0f} s; slim == masked (max output difference {res.slim_max_diff:.1e})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run, summary_markdown
    from .rundir import RunDir

    cfg = _search_config(args)
    ckpt = _open_model(args)
    data = _open_data(args, ckpt)
    summary = run(ckpt, data, args.keep, out=args.out, preset=args.preset, kd=args.kd, search=cfg,
                  progress=not args.quiet, epochs=args.epochs, limit_train=args.limit_train, teachers=args.teachers,
                  bank_topk=args.bank_topk, speed=_speed(args), restart=args.restart, dist=args.dist)
    _say(args, summary_markdown(summary), end="")
    rd = RunDir(args.out)
    _say(args, f"final model: {rd.final}; summary: {rd.summary}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    ckpt = _open_model(args)
    res = export(ckpt, args.out, args.format)
    print(f"wrote {res.path} ({res.format}, {res.bytes / 1e6:.2f} MB; max |exported - PyTorch| = "
          f"{res.max_abs_diff:.1e} on a check batch); preprocessing in {res.path.name}.json")
    return 0


def _landscape_config(args: argparse.Namespace, **defaults: Any) -> Any:
    from .landscape import LandscapeConfig

    cfg = LandscapeConfig(**defaults)
    for name in ("images", "batch_size", "bn", "power_iters", "lanczos_steps", "hutchinson_samples", "surface_1d",
                 "surface_2d", "surface_range", "seed", "device"):
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.validate()
    return cfg


def _add_restart_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--restart", action="store_true",
                   help="start over: remove the ekg artifacts of --out (search, bank, fine-tuning, summary) once "
                        "every setting is checked; refused, with nothing removed, if --out also holds files ekg "
                        "did not write there")


def _add_bank_topk_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bank-topk", type=int, default=None, metavar="K",
                   help="store only each teacher's K largest logits per image (fp16, with their classes and the "
                        "mean of the other logits, which fills the other classes when read): a bank about "
                        "classes/(2K) times smaller, for data with many classes; an existing bank must have been "
                        "built with the same K. Default: every logit (a dense fp16 bank)")


def _add_landscape_args(p: argparse.ArgumentParser, *, surfaces: bool) -> None:
    p.add_argument("--images", type=int, default=None, help="fixed training images the loss is measured on "
                   "(the same number per class)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (BN batch statistics); default 128")
    p.add_argument("--bn", choices=("batch", "running"), default=None,
                   help="BN on each batch's statistics (as the search; default) or on its running statistics")
    p.add_argument("--power-iters", type=int, default=None, help="power iterations for lambda_max")
    p.add_argument("--lanczos-steps", type=int, default=None, help="Lanczos steps for lambda_min and the density")
    p.add_argument("--hutchinson-samples", type=int, default=None, help="Rademacher vectors for the trace")
    if surfaces:
        p.add_argument("--surface-1d", type=int, default=None, help="points of the 1-D surface (0: none); default 41")
        p.add_argument("--surface-2d", type=int, default=None,
                       help="points per axis of the 2-D surface (0: none); default 15")
        p.add_argument("--surface-range", type=float, default=None, help="surface coordinates in [-R, R]; default 1")
    p.add_argument("--seed", type=int, default=None, help="seed of every random vector and direction; default 0")
    _add_device_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_landscape(args: argparse.Namespace) -> int:
    from .landscape import landscape

    cfg = _landscape_config(args)
    out = Path(args.out)
    if (out / "landscape.json").exists() and not args.force:
        raise EkgError(f"{out / 'landscape.json'} exists; add --force to measure again or choose another --out")
    ckpt = _open_model(args)
    data = _open_data(args, ckpt)
    rec = landscape(ckpt, data, out, config=cfg, progress=not args.quiet)
    print(f"lambda_max {rec['lambda_max']:.4g}  lambda_min {rec['lambda_min']:.4g}  "
          f"|lambda_min|/lambda_max {rec['neg_ratio']:.4f}  trace {rec['trace']:.4g} (± {rec['trace_stderr']:.2g})  "
          f"loss {rec['loss']:.4f} on {rec['images']} images ({rec['params']:,} parameters, {rec['seconds']:.0f} s)")
    print(f"wrote {out / 'landscape.json'}" + "".join(f", {out / f}" for k in ("surface_1d_files", "surface_2d_files")
                                                          for f in rec.get(k, [])))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .study import StudyConfig, study

    base = StudyConfig()
    cfg = StudyConfig(perturb=args.perturb, swap=(args.swap[0], args.swap[1]), finetune_epochs=args.finetune_epochs,
                      finetune_lr=args.finetune_lr, limit_train=args.limit_train, bootstrap=args.bootstrap,
                      seed=args.seed if args.seed is not None else 0,
                      landscape=_landscape_config(args, **base.landscape.to_dict()))
    cfg.validate()
    data = _open_data(args)
    rec = study(args.runs, data, args.out, config=cfg, progress=not args.quiet)
    from .study import study_markdown

    print(study_markdown(rec), end="")
    print(f"wrote {Path(args.out) / 'study.json'}, study.md, study.png")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import model_names
    from .pretrained import PRETRAINED

    print("architectures (ekg train --arch):")
    print("  " + ", ".join(model_names()))
    print("pretrained (--model NAME):")
    for p in PRETRAINED.values():
        print(f"  {p.name:24s} {p.description}; {p.expected_top1}% on the exact CIFAR-10 test subset")
    return 0


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="ekg", description="Filter pruning of pretrained CNNs with EKG.")
    parser.add_argument("--version", action="version", version=f"ekg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .evaluate import COMPARE_ROUNDS

    p = sub.add_parser("test", help="accuracy, loss, FLOPs, params (and CPU latency) of a model",
                       description="Evaluate a model. BN runs in inference mode unless --bn-mode batch.")
    _add_model_arg(p)
    _add_data_args(p)
    _add_device_arg(p)
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--bn-mode", choices=("eval", "batch"), default="eval",
                   help="eval: running statistics (default); batch: each test batch's statistics, as the "
                        "original EKG test.py did")
    p.add_argument("--latency", action="store_true", help="also measure CPU latency")
    p.add_argument("--latency-batch", type=int, nargs="+", default=[1, 64], metavar="B",
                   help="batch sizes of the latency measurement; default: 1 64")
    p.add_argument("--latency-baseline", default=None, metavar="CKPT",
                   help="also time this checkpoint (e.g. the unpruned original), interleaved with --model round "
                        "by round so that load on the machine lands on both, and print the speed-up "
                        "baseline/--model with its range over the rounds; implies --latency")
    p.add_argument("--latency-rounds", type=int, default=None, metavar="N",
                   help=f"rounds of the --latency-baseline comparison; default: {COMPARE_ROUNDS}")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("info", help="per-layer widths, FLOPs and params of a model")
    _add_model_arg(p)
    p.add_argument("--download", action="store_true", help="download a missing pretrained model")
    p.add_argument("--bn-ops", action="store_true", help="add 2 ops per BN output element (the original code's count)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert an EKG TF pickle, an akamaster .th or torchvision weights into an "
                                       "ekg checkpoint")
    p.add_argument("src", help="res56_cifar10.pkl (original EKG release), an akamaster .th, or (with --torchvision) "
                               "a torchvision model's state dict")
    p.add_argument("--out", required=True, metavar="DST.pt")
    p.add_argument("--arch", default=None, help="force an architecture name (default: detected)")
    p.add_argument("--torchvision", default=None, metavar="NAME",
                   help="SRC holds the weights of torchvision model NAME (e.g. resnet50); needs the vision extra")
    p.add_argument("--num-classes", type=int, default=None, help="with --torchvision; default: from the weights")
    p.add_argument("--input-size", type=int, nargs=3, default=(3, 224, 224), metavar=("C", "H", "W"),
                   help="with --torchvision: the input size the model expects; default: 3 224 224")
    p.add_argument("--normalization", default="imagenet",
                   help="with --torchvision: the normalisation preset its weights expect; default: %(default)s")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="train a CIFAR baseline from scratch")
    p.add_argument("--arch", default="resnet56", help="architecture name (see `ekg models`); default: %(default)s")
    _add_data_args(p)
    _add_device_arg(p)
    p.add_argument("--out", required=True, metavar="RUN", help="run directory")
    _add_training_args(p, epochs=200, batch_size=128, lr=0.1, schedule="cosine")
    p.add_argument("--normalization", default="auto", help="normalization preset; auto = the dataset's own")
    p.add_argument("--jitter", action="store_true", help="add the EKG colour jitter")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a pruned model, with the memory bank's ensemble knowledge",
                       description="Fine-tune --model (e.g. RUN/pruned.pt). --kd ensemble (default) distils from "
                                   "the memory bank of the `ekg prune` run --bank RUN, built on first use into "
                                   "RUN/bank; --kd single uses only its best teacher; --kd none is plain "
                                   "cross-entropy. Defaults: the paper's CIFAR recipe (100 epochs, batch 128, "
                                   "lr 0.01 ×0.2 at 30/60/80%%, Nesterov SGD, weight decay 5e-4).")
    _add_model_arg(p)
    _add_data_args(p)
    _add_device_arg(p)
    p.add_argument("--bank", default=None, metavar="RUN", help="an `ekg prune` run directory (or a bank folder)")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory; default: RUN/finetune")
    p.add_argument("--kd", choices=("none", "single", "ensemble"), default="ensemble",
                   help="distillation: ensemble (EKG's per-batch teacher selection), single (teacher 0), "
                        "none (cross-entropy only); default: %(default)s")
    p.add_argument("--teachers", type=int, default=None,
                   help="teachers in a newly built bank (default 5); an existing bank built with another number "
                        "is refused when this is given")
    _add_bank_topk_arg(p)
    p.add_argument("--temperature", type=float, default=None,
                   help="KD temperature; default: 4, or 10 for data with 1000 or more classes (the method's values)")
    _add_training_args(p, epochs=100, batch_size=128, lr=0.01, schedule="step")
    p.add_argument("--jitter", action=argparse.BooleanOptionalAction, default=None,
                   help="the EKG colour jitter; default: on with --kd ensemble/single, off with --kd none")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("prune", help="EKG sub-network search and slimming to a FLOPs budget",
                       description="Adaptation epoch, greedy EKG search on D_val, slimming. Writes RUN/pruned.pt, "
                                   "RUN/search.jsonl and the other artifacts of the run directory.")
    _add_budget_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last finished step (its settings must match)")
    _add_restart_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("run", help="the whole method: search, slimming, memory bank, fine-tuning, comparison",
                       description="Every phase into one run directory; re-running continues where it stopped. "
                                   "An existing RUN (a stopped `ekg run`, or an `ekg prune` run to adopt) is "
                                   "continued only if its recorded settings match; --restart starts over. "
                                   "Leaves RUN/final.pt and RUN/summary.json (original vs pruned).")
    _add_budget_args(p)
    p.add_argument("--preset", choices=("paper", "quick"), default="paper",
                   help="paper: 100 fine-tuning epochs (default); quick: a demonstration in minutes on a CPU")
    p.add_argument("--kd", choices=("none", "single", "ensemble"), default="ensemble",
                   help="fine-tuning distillation (see `ekg finetune`); default: %(default)s")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's fine-tuning epochs")
    p.add_argument("--limit-train", type=int, default=None, help="fine-tune on the first N training images only")
    p.add_argument("--teachers", type=int, default=None, help="teachers in the memory bank (default 5)")
    _add_bank_topk_arg(p)
    _add_speed_args(p)
    _add_restart_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("export", help="export a model to ONNX or TorchScript, checked against PyTorch",
                       description="Writes OUT (.onnx or .ts) with a dynamic batch dimension, runs it (onnxruntime "
                                   "for ONNX) and compares with the PyTorch model; OUT.json records the "
                                   "preprocessing. ONNX needs: pip install \"ekg[export]\".")
    _add_model_arg(p)
    p.add_argument("--out", required=True, metavar="FILE", help="model.onnx, or model.ts for TorchScript")
    p.add_argument("--format", choices=("onnx", "torchscript"), default=None, help="default: from --out's suffix")
    p.add_argument("--download", action="store_true", help="download a missing pretrained model")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("landscape", help="Hessian spectrum (lambda_max, lambda_min, trace) and loss-surface pictures",
                       description="Measures the loss landscape of a model (slim or not) on fixed training images: "
                                   "lambda_max by power iteration, lambda_min and the density by Lanczos, the trace "
                                   "by Hutchinson, 1-D and 2-D filter-normalised loss surfaces. Writes "
                                   "OUT/landscape.json (with the definitions), OUT/surface_*.json and PNGs.")
    _add_model_arg(p)
    _add_data_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite an earlier landscape.json in --out")
    _add_landscape_args(p, surfaces=True)
    p.set_defaults(func=cmd_landscape)

    p = sub.add_parser("study", help="does smoothness predict fine-tuned quality? (the paper's potential study)",
                       description="Takes finished `ekg prune` runs of one model at one budget (e.g. different "
                                   "--importance), adds random perturbations of each, measures every sub-network's "
                                   "val loss and Hessian numbers, fine-tunes each on the same short schedule and "
                                   "reports rank correlations (Spearman, Kendall, bootstrap intervals) with the "
                                   "test loss after fine-tuning. Re-running continues an interrupted study.")
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN", help="`ekg prune` run directories")
    _add_data_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="study folder")
    p.add_argument("--perturb", type=int, default=3, help="random perturbations per run; default: %(default)s")
    p.add_argument("--swap", type=float, nargs=2, default=(0.1, 0.6), metavar=("LOW", "HIGH"),
                   help="range of the fraction of kept channels swapped for pruned ones; default: 0.1 0.6")
    p.add_argument("--finetune-epochs", type=int, default=1, help="epochs of plain fine-tuning; default: %(default)s")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="default: %(default)s")
    p.add_argument("--limit-train", type=int, default=None, help="fine-tune on the first N training images only")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples; default: %(default)s")
    _add_landscape_args(p, surfaces=False)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("models", help="list architectures and pretrained checkpoints")
    p.set_defaults(func=cmd_models)
    return parser


# commands that split their work over the processes of a torchrun launch
DISTRIBUTED = ("train", "finetune", "prune", "run")


def main(argv: Sequence[str] | None = None) -> int:
    from .distributed import Dist, init_distributed, shutdown

    parser = build_parser()
    args = parser.parse_args(argv)
    args.dist = Dist()
    try:
        if args.command in DISTRIBUTED:
            args.dist = init_distributed(args.device)
        return args.func(args)
    except EkgError as e:
        print(f"ekg: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("ekg: interrupted; finished work is saved (re-run with --resume where the command has it)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # an ekg bug or an environment problem: still one line, unless debugging
        if os.environ.get("EKG_DEBUG"):
            raise
        print(f"ekg: internal error: {type(e).__name__}: {e} (set EKG_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_ERROR
    finally:
        shutdown(args.dist)


if __name__ == "__main__":
    sys.exit(main())

"""What several commands share: argument groups, opening --model and --data, printing.

Every choice list and default comes from the library (a constant, a config dataclass or a
function's signature), never retyped here.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from typing import Any, Callable

from ..errors import EkgError


def default_of(func: Callable[..., Any], name: str) -> Any:
    """The default value of parameter ``name`` of ``func``."""
    return inspect.signature(func).parameters[name].default


# ----------------------------------------------------------------------------- argument groups

def add_model_arg(p: argparse.ArgumentParser, default: str | None = None) -> None:
    from ..pretrained import DEFAULT_MODEL

    p.add_argument("--model", default=default or DEFAULT_MODEL, metavar="CKPT",
                   help="checkpoint path (ekg .pt, EKG TF .pkl, akamaster .th) or a pretrained name "
                        "(see `ekg models`); default: %(default)s")


def add_data_args(p: argparse.ArgumentParser) -> None:
    from ..data import DATA_MODES, load_data
    from ..data import StreamConfig
    from ..pretrained import DEFAULT_DATA

    p.add_argument("--data", default=DEFAULT_DATA, metavar="DIR",
                   help="folder containing (or being) cifar-10-batches-py / cifar-100-python, an official "
                        ".tar.gz, a train/ + val/ (or test/) class-folder tree or its zips, or the name "
                        "cifar10/cifar100 (looked up under $EKG_DATA); default: %(default)s")
    p.add_argument("--download", action="store_true",
                   help="download missing data or pretrained weights (needs a network)")
    p.add_argument("--data-mode", choices=DATA_MODES, default=default_of(load_data, "mode"),
                   help="how a class-folder tree is read: memory (decoded once into memory; one image size), "
                        "stream (from disk batch by batch with torchvision's transforms: ImageNet), or auto: "
                        "stream unless the images share one size of at most 128 pixels a side and fit in "
                        "2 GiB; default: %(default)s")
    p.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="streamed trees: the crop side (RandomResizedCrop for training, CenterCrop for "
                        f"evaluation); default: the model's input size, else {StreamConfig().image_size}")
    p.add_argument("--resize", type=int, default=None, metavar="R",
                   help="streamed trees: resize the shorter side to R before the evaluation centre crop "
                        "(0: no resize); default: image-size x 256/224")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="streamed trees: DataLoader worker processes per process (0: decode in-process); "
                        "default: the CPUs shared among the processes of this machine, at most 8")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    from ..runtime import resolve_device

    p.add_argument("--device", default=default_of(resolve_device, "name"),
                   help="auto (GPU if present), cpu, cuda, cuda:N; default: %(default)s")


def add_budget_args(p: argparse.ArgumentParser) -> None:
    """--model, --data, --device, --keep, --out and the search's settings: what `ekg prune` and
    `ekg run` start from (defaults from SearchConfig)."""
    from ..bn import BN_STATS
    from ..search import BUDGETS, COMPATS, IMPORTANCES, METHODS, REWARDS, SearchConfig

    d = SearchConfig()
    add_model_arg(p)
    add_data_args(p)
    add_device_arg(p)
    p.add_argument("--keep", type=float, default=d.keep,
                   help="target FLOPs ratio in (0, 1) (--budget latency: the fraction of the original's measured "
                        "latency); default: %(default)s")
    p.add_argument("--budget", choices=BUDGETS, default=d.budget,
                   help="what --keep is a fraction of: flops, or latency measured on the --latency-* target (a "
                        "per-layer latency table timed there once, cached in $EKG_CACHE/latency); default: %(default)s")
    add_latency_target_args(p)
    p.add_argument("--latency-batch", type=int, default=d.latency_batch, metavar="B",
                   help="batch size of the latency target; default: %(default)s")
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
    p.add_argument("--round-to", type=int, default=d.round_to, metavar="N",
                   help="keep every width a multiple of N channels (or a group's full width where it is narrower): "
                        "widths that vectorised CPU kernels and tensor cores run fast; default: %(default)s (any width)")
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
    p.add_argument("--search-cache-gb", type=float, default=d.cache_gb, metavar="GB",
                   help="memory the search may use to cache activations (the same decisions, less compute); "
                        "above it, each candidate runs the whole network; default: half the device's free memory")


def add_latency_target_args(p: argparse.ArgumentParser) -> None:
    """--latency-device, --latency-runtime, --latency-threads, --latency-dtype, --latency-channels-last:
    the machine a latency is measured on and the format the model runs in there (defaults from
    SearchConfig)."""
    from ..latency import DEVICES, DTYPES, RUNTIMES
    from ..search import SearchConfig

    d = SearchConfig()
    p.add_argument("--latency-device", choices=DEVICES, default=d.latency_device,
                   help="where latency is measured; default: %(default)s")
    p.add_argument("--latency-runtime", choices=RUNTIMES, default=d.latency_runtime,
                   help="torch (eager, inference mode) or onnxruntime (CPU; needs the 'export' extra); "
                        "default: %(default)s")
    p.add_argument("--latency-threads", type=int, default=d.latency_threads, metavar="T",
                   help="CPU threads of the latency target; default: torch's current number")
    p.add_argument("--latency-dtype", choices=list(DTYPES), default=d.latency_dtype,
                   help="the dtype the model is deployed in (torch runtime; float16 on cuda only); default: "
                        "%(default)s")
    p.add_argument("--latency-channels-last", action="store_true", default=d.latency_channels_last,
                   help="the model is deployed in channels-last memory format (torch runtime)")


def latency_target(args: argparse.Namespace, batch: int) -> Any:
    """The LatencyTarget of the --latency-* flags at ``batch``, validated."""
    from ..latency import LatencyTarget

    from ..search.config import LATENCY_TARGET_FIELDS

    fields = {name: getattr(args, name) for name in LATENCY_TARGET_FIELDS} | {"latency_batch": batch}
    return LatencyTarget(*fields.values()).validate()


def _percents(fractions: Any) -> str:
    return "/".join(f"{100 * f:g}" for f in fractions) + "%%"


def add_training_args(p: argparse.ArgumentParser, d: Any) -> None:
    """The trainer's flags, with the defaults of TrainConfig ``d`` (TrainConfig() for `ekg train`,
    finetune_config() for `ekg finetune`)."""
    from ..data import PAD_MODES
    from ..train import SCHEDULES, TrainConfig, finetune_config

    t, f = TrainConfig(), finetune_config()
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--wd", type=float, default=d.weight_decay, help="weight decay")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help=f"cosine, or step decay (train: ×{t.gamma:g} at {_percents(t.milestones)}; "
                        f"finetune: ×{f.gamma:g} at {_percents(f.milestones)})")
    p.add_argument("--warmup", type=float, default=d.warmup_epochs, help="linear warm-up epochs")
    p.add_argument("--pad", type=int, default=d.augment.pad)
    p.add_argument("--pad-mode", choices=PAD_MODES, default=d.augment.pad_mode)
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    add_speed_args(p)
    p.add_argument("--limit-train", type=int, default=d.limit_train, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, default=d.limit_test, help="evaluate on the first N test images only")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """How training runs (not what it computes): precision, compilation, memory format, accumulation."""
    from ..runtime import AMP_MODES
    from ..train import TrainConfig

    d = TrainConfig()
    p.add_argument("--amp", choices=AMP_MODES, default=d.amp,
                   help="mixed precision: auto (bf16 or fp16 on GPUs, off on the CPU), off, bf16 (also on the "
                        "CPU), fp16 (GPUs only, with loss scaling); default: %(default)s")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for the model and its inputs")
    p.add_argument("--accum", type=int, default=d.accum, metavar="N",
                   help="gradient accumulation: each --batch-size batch runs as N micro-batches of batch-size/N "
                        "(the same gradient, up to BN's per-micro-batch statistics); default: %(default)s")


def add_restart_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--restart", action="store_true",
                   help="start over: remove the ekg artifacts of --out (search, bank, fine-tuning, summary) once "
                        "every setting is checked; refused, with nothing removed, if --out also holds files ekg "
                        "did not write there")


def add_bank_topk_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bank-topk", type=int, default=None, metavar="K",
                   help="store only each teacher's K largest logits per image (fp16, with their classes and the "
                        "mean of the other logits, which fills the other classes when read): a bank about "
                        "classes/(2K) times smaller, for data with many classes; an existing bank must have been "
                        "built with the same K. Default: every logit (a dense fp16 bank)")


def add_landscape_args(p: argparse.ArgumentParser, *, surfaces: bool, defaults: Any = None) -> None:
    """The Hessian measurement's flags (None: the LandscapeConfig ``defaults``, named in the help)."""
    from ..bn import BN_STATS
    from ..landscape import LandscapeConfig

    d = defaults or LandscapeConfig()
    p.add_argument("--images", type=int, default=None, help="fixed training images the loss is measured on "
                   f"(the same number per class); default {d.images}")
    p.add_argument("--batch-size", type=int, default=None, help=f"batch size (BN batch statistics); default {d.batch_size}")
    p.add_argument("--bn", choices=BN_STATS, default=None,
                   help="BN on each batch's statistics (batch, as the search) or on its running statistics "
                        f"(running); default {d.bn}")
    p.add_argument("--power-iters", type=int, default=None, help=f"power iterations for lambda_max; default {d.power_iters}")
    p.add_argument("--lanczos-steps", type=int, default=None,
                   help=f"Lanczos steps for lambda_min and the density; default {d.lanczos_steps}")
    p.add_argument("--hutchinson-samples", type=int, default=None,
                   help=f"Rademacher vectors for the trace; default {d.hutchinson_samples}")
    if surfaces:
        p.add_argument("--surface-1d", type=int, default=None,
                       help=f"points of the 1-D surface (0: none); default {d.surface_1d}")
        p.add_argument("--surface-2d", type=int, default=None,
                       help=f"points per axis of the 2-D surface (0: none); default {d.surface_2d}")
        p.add_argument("--surface-range", type=float, default=None,
                       help=f"surface coordinates in [-R, R]; default {d.surface_range:g}")
    p.add_argument("--seed", type=int, default=None, help=f"seed of every random vector and direction; default {d.seed}")
    add_device_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------------- configs from flags

def speed(args: argparse.Namespace) -> dict[str, Any]:
    return {"amp": args.amp, "compile": args.compile, "channels_last": args.channels_last, "accum": args.accum}


def search_config(args: argparse.Namespace) -> Any:
    """The SearchConfig of `ekg prune` / `ekg run` (the flags of add_budget_args), validated."""
    from ..search import SearchConfig
    from ..search.config import LATENCY_TARGET_FIELDS

    cfg = SearchConfig(keep=args.keep, importance=args.importance, reward=args.reward, method=args.method,
                       adapt=not args.no_adapt, bn_ops=args.bn_ops, fast=not args.straightforward,
                       device=args.device, seed=args.search_seed, val_per_class=args.val_per_class,
                       sub_per_class=args.sub_per_class, cache_gb=args.search_cache_gb,
                       search_bn=args.search_bn, compat=args.compat, round_to=args.round_to, budget=args.budget,
                       **{name: getattr(args, name) for name in LATENCY_TARGET_FIELDS})
    cfg.validate()
    return cfg


def landscape_config(args: argparse.Namespace, **defaults: Any) -> Any:
    """A LandscapeConfig of ``defaults`` with the landscape flags that were given, validated."""
    from ..landscape import LandscapeConfig

    cfg = LandscapeConfig(**defaults)
    for name in ("images", "batch_size", "bn", "power_iters", "lanczos_steps", "hutchinson_samples", "surface_1d",
                 "surface_2d", "surface_range", "seed", "device"):
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- model, data, output

def open_model(args: argparse.Namespace, arch: str | None = None, model: str | None = None) -> Any:
    """The checkpoint --model names (or ``model``: another flag's value of the same kind)."""
    from ..checkpoint import load_checkpoint
    from ..pretrained import resolve_model

    return load_checkpoint(resolve_model(model or args.model, download=getattr(args, "download", False)), arch=arch)


def open_data(args: argparse.Namespace, ckpt: Any = None) -> Any:
    """The --data splits; a streamed tree crops to --image-size, by default the model's input size."""
    from ..data import load_data

    stream = None
    if args.data_mode != "memory":
        from ..data import StreamConfig

        size = args.image_size if args.image_size is not None else (
            int(ckpt.input_size[-1]) if ckpt is not None else StreamConfig().image_size)
        stream = StreamConfig(image_size=size, resize=args.resize, workers=args.workers)
    return load_data(args.data, download=args.download, progress=sys.stderr.isatty(), mode=args.data_mode,
                     stream=stream)


def check_fits(args: argparse.Namespace, ckpt: Any, data: Any, *, splits: Any = ("train", "test")) -> None:
    """The model's classes (and its input size: that of the images of ``splits``) against the --data
    splits, named the same way by every command before any work."""
    if ckpt.num_classes != data.num_classes:
        raise EkgError(f"the model predicts {ckpt.num_classes} classes but the data ({data.name}, {args.data}) has "
                       f"{data.num_classes}: use a checkpoint trained on this dataset (or data with its classes)")
    for split in (getattr(data, s) for s in splits):
        if tuple(split.image_size) != tuple(ckpt.input_size):
            raise EkgError(f"the model expects {tuple(ckpt.input_size)} inputs but the images of {args.data} are "
                           f"{tuple(split.image_size)}: " + ("crop them to its size with --image-size" if data.streamed
                                                             else "give it images of its size"))


def say(args: argparse.Namespace, text: str, end: str = "\n") -> None:
    """Print on stdout, once: on rank 0 of a torchrun launch."""
    if args.dist.is_main:
        print(text, end=end)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))

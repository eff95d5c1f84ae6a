"""Throughput of the training data pipeline: ekg's batched augmentation vs a per-image pipeline.

Both sides do the same work on the same images, in one process on one machine:

* batched: ``ekg.data.iterate_batches`` over the training images held as one uint8 tensor
  (shuffle, pad 4 reflect + random crop, horizontal flip, EKG colour jitter, normalise), whole
  batches at a time on ``--device``;
* per-image: the usual torchvision-style pipeline, one image at a time: uint8 array -> PIL image
  -> pad 4 reflect -> random 32x32 crop -> random horizontal flip -> brightness/contrast/saturation
  jitter -> float tensor -> normalise, then ``torch.stack`` into a batch. It uses the real
  ``torchvision.transforms`` when torchvision is importable, else a PIL/numpy reimplementation
  (``PIL.ImageEnhance`` for the jitter); the output says which.

Usage::

    python bench/data_pipeline.py [--data PATH | --jpeg] [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

try:
    from ekg.data import AugmentConfig, DataSplits, Normalization, get_normalization, iterate_batches, load_data
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from ekg.data import AugmentConfig, DataSplits, Normalization, get_normalization, iterate_batches, load_data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, shared_data_root  # noqa: E402

PAD, JITTER = 4, 0.2
AUGMENT = AugmentConfig(pad=PAD, pad_mode="reflect", flip=True, jitter=True,
                        brightness=JITTER, contrast=JITTER, saturation=JITTER)



def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batched(data: DataSplits, norm: Normalization, device: torch.device, batch_size: int,
                 repeats: int, warmup: int) -> float:
    """Median images/s of whole epochs through ``iterate_batches`` with the full augmentation."""
    images = data.train.to(device)
    generator = torch.Generator().manual_seed(0)

    def epoch(limit: int | None = None) -> int:
        seen = 0
        for i, (x, _) in enumerate(iterate_batches(images, batch_size, shuffle=True, generator=generator,
                                                   augment=AUGMENT, normalization=norm, device=device)):
            seen += len(x)
            if limit is not None and i + 1 >= limit:
                break
        synchronize(device)
        return seen

    epoch(limit=warmup)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = epoch()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def torchvision_pipeline(norm: Normalization) -> Callable[[Image.Image], torch.Tensor] | None:
    """The standard torchvision CIFAR training transform, or None if torchvision is not installed."""
    try:
        from torchvision import transforms
    except ImportError:
        return None
    return transforms.Compose([
        transforms.RandomCrop(32, padding=PAD, padding_mode="reflect"),
        transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER),
        transforms.ToTensor(),
        transforms.Normalize([m / 255 for m in norm.mean], [s / 255 for s in norm.std]),
    ])


def pil_pipeline(norm: Normalization, seed: int = 0) -> Callable[[Image.Image], torch.Tensor]:
    """A PIL/numpy reimplementation of :func:`torchvision_pipeline`, one image at a time."""
    rng = random.Random(seed)
    mean = torch.tensor(norm.mean).view(3, 1, 1)
    std = torch.tensor(norm.std).view(3, 1, 1)

    def transform(img: Image.Image) -> torch.Tensor:
        padded = Image.fromarray(np.pad(np.asarray(img), ((PAD, PAD), (PAD, PAD), (0, 0)), mode="reflect"))
        ox, oy = rng.randint(0, 2 * PAD), rng.randint(0, 2 * PAD)
        img = padded.crop((ox, oy, ox + img.width, oy + img.height))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhancer(img).enhance(rng.uniform(1 - JITTER, 1 + JITTER))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
        return (x - mean) / std

    return transform


def time_per_image(data: DataSplits, transform: Callable[[Image.Image], torch.Tensor], batch_size: int,
                   n_images: int, repeats: int, warmup: int) -> float:
    """Median images/s of the per-image pipeline, including ``Image.fromarray`` and ``torch.stack``
    as a dataset's ``__getitem__`` and the default collate would do."""
    hwc = data.train.images.permute(0, 2, 3, 1).contiguous().numpy()
    order = np.random.default_rng(0).permutation(len(hwc))

    def run(n: int) -> int:
        done = 0
        while done < n:
            idx = order[np.arange(done, done + min(batch_size, n - done)) % len(hwc)]
            batch = torch.stack([transform(Image.fromarray(hwc[i])) for i in idx])
            done += len(batch)
        return done

    run(warmup * batch_size)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = run(n_images)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="dataset for load_data (default: the shared exact CIFAR-10 subset)")
    p.add_argument("--jpeg", action="store_true", help="use the 60k CIFAR-10 JPEG zips from the shared data instead")
    p.add_argument("--cache-dir", type=Path, help="decode cache for --jpeg (default: $EKG_CACHE or ~/.cache/ekg)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the batched pipeline")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="timed epochs / per-image runs; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up batches before timing each side")
    p.add_argument("--per-image-n", type=int, default=4096, help="images per timed per-image run")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the text report")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = args.data or shared_data_root() / "cifar10" / ("jpeg75" if args.jpeg else "exact-subset")
    data = load_data(spec, cache_dir=args.cache_dir, progress=not args.json)
    norm = get_normalization("cifar10")
    device = torch.device(args.device)

    transform = torchvision_pipeline(norm)
    per_image_kind = "torchvision.transforms" if transform else "PIL/numpy reimplementation (torchvision not installed)"
    transform = transform or pil_pipeline(norm)

    batched = time_batched(data, norm, device, args.batch_size, args.repeats, args.warmup)
    per_image = time_per_image(data, transform, args.batch_size, args.per_image_n, args.repeats, args.warmup)
    result = {
        "benchmark": "data_pipeline",
        "command": " ".join(["python", *sys.argv]),
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "data": data.source, "train_images": len(data.train), "image_size": list(data.train.images.shape[2:]),
        "batch_size": args.batch_size, "augment": "pad 4 reflect + random crop + flip + EKG jitter (0.2) + normalise",
        "batched_images_per_s": round(batched, 1), "per_image_images_per_s": round(per_image, 1),
        "per_image_pipeline": per_image_kind, "speedup": round(batched / per_image, 2),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    gpu = f" ({result['gpu']})" if result["gpu"] else ""
    print("ekg data pipeline benchmark")
    print(f"command   : {result['command']}")
    print(f"machine   : {result['cpu']}, {result['cores']} cores (torch threads {result['torch_threads']}), "
          f"torch {result['torch']}, Python {result['python']}, device {device}{gpu}")
    print(f"data      : {data.source}: {len(data.train)} train images, "
          f"{data.train.images.shape[2]}x{data.train.images.shape[3]}")
    print(f"augment   : {result['augment']}, batch {args.batch_size}")
    print(f"batched   : {batched:10.0f} images/s  (ekg.data.iterate_batches on {device}, median of "
          f"{args.repeats} epochs)")
    print(f"per-image : {per_image:10.0f} images/s  ({per_image_kind}, median of {args.repeats} x "
          f"{args.per_image_n} images)")
    print(f"speed-up  : {batched / per_image:10.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

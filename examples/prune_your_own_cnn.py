"""Prune your own CNN on your own data with ekg, end to end.

The data: scikit-learn's handwritten digits (1,797 real 8x8 grayscale scans, 10 classes; shipped
inside scikit-learn, nothing is downloaded), held in a plain ``torch.utils.data.Dataset`` that
yields already-normalised float tensors. The model: a small CNN defined here, trained for a few
seconds first (the "pretrained" model you would bring). Then the whole method through the front
door: ``ekg.prune`` (adaptation, EKG search, slimming) → ``ekg.finetune`` (with the memory bank's
ensemble knowledge) → the evidence (test accuracy, FLOPs, params, interleaved CPU latency).

    pip install -e ".[examples]"     # scikit-learn
    python examples/prune_your_own_cnn.py --out runs/digits
    python examples/prune_your_own_cnn.py --out runs/digits --keep 0.4 --epochs 10
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ekg
from ekg.evaluate import compare_latency, evaluate, format_speedup
from ekg.flops import count


class Digits(torch.utils.data.Dataset):
    """One split of the digits as ``(1x8x8 float tensor, int label)``, normalised with the training
    split's mean and std (so ekg is told ``normalization=None``)."""

    classes = [str(d) for d in range(10)]

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float) -> None:
        self.x, self.y = (images - mean) / std, labels

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i].unsqueeze(0), int(self.y[i])


def digits() -> tuple[Digits, Digits]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels = torch.tensor(d.images, dtype=torch.float32), torch.tensor(d.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]  # 80 / 20
    mean, std = images[train].mean().item(), images[train].std().item()
    return Digits(images[train], labels[train], mean, std), Digits(images[test], labels[test], mean, std)


class DigitNet(nn.Module):
    """A user's CNN: three conv-BN-ReLU blocks, global average pooling, a linear classifier."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width)
        self.conv3, self.bn3 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def pretrain(model: nn.Module, train: Digits, epochs: int) -> nn.Module:
    """What you would have done before ekg: train the model (plain PyTorch)."""
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/digits", help="run folder (replaced); default: %(default)s")
    ap.add_argument("--keep", type=float, default=0.5, help="FLOPs budget; default: %(default)s")
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs; default: %(default)s")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    torch.manual_seed(0)
    train, test = digits()
    model = pretrain(DigitNet(), train, args.pretrain_epochs)

    # the search and the slimming: your module and your Datasets, nothing else
    result = ekg.prune(model, (train, test), keep=args.keep, out=out / "prune", normalization=None)
    # fine-tuning with the memory bank of the search's sub-networks: the paper's recipe, shortened, with
    # an augmentation for 8x8 digits (shift by at most one pixel, no mirror images) instead of CIFAR's
    recipe = ekg.finetune_config("ensemble", epochs=args.epochs, batch_size=64, lr=0.01,
                                 augment=ekg.AugmentConfig(pad=1, pad_mode="zeros", flip=False))
    tuned = ekg.finetune(result, (train, test), config=recipe)  # the slim model, its run's memory bank

    splits = ekg.data.as_splits((train, test), progress=False)  # the same Datasets, read for evaluation
    norm = ekg.data.get_normalization(None)
    size = tuple(result.checkpoint.input_size)
    before, after = evaluate(model, splits.test, norm), evaluate(tuned.model, splits.test, norm)
    c0, c1 = count(model, size), count(tuned.model, size)
    latency = compare_latency({"original": model, "pruned": tuned.model}, size, 64, baseline="original")
    print(f"test top-1   original {before['top1']:.2f}%   pruned + fine-tuned {after['top1']:.2f}%  "
          f"({len(splits.test)} test images)")
    print(f"FLOPs        {c0.flops:,} -> {c1.flops:,} ({c1.flops / c0.flops:.3f} of the original)")
    print(f"params       {c0.params:,} -> {c1.params:,}")
    print(f"CPU latency  batch 64: {latency['models']['original']['median_ms']:.2f} ms -> "
          f"{latency['models']['pruned']['median_ms']:.2f} ms; speed-up {format_speedup(latency['speedup']['pruned'])}")
    print(f"slim model   {result.run_dir / 'pruned.pt'}; fine-tuned {tuned.run_dir / 'model.pt'}")


if __name__ == "__main__":
    main()

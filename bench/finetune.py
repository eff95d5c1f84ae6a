"""Fine-tuning speed: what does distilling from the stored memory bank cost?

On one slim model (the pruned ResNet-56 of an `ekg prune` run) and the same batches, in one
process, this times training steps of

* ``plain``    — the recipe's plain fine-tuning: one augmented view, cross-entropy;
* ``plain-2v`` — cross-entropy on two augmented views (the same forward/backward work as KD);
* ``kd``       — EKG's loss: two views, teacher logits read from the memory-mapped bank,
                 per-batch teacher selection, T·KL.

and reports training images per second (an image counts once, whatever its views). The cost of
distillation itself is ``kd / plain-2v`` (aim: >= 0.95); ``kd / plain`` also shows the price of the
second view. It also times building the memory bank (5 teachers over the training set).

    python bench/finetune.py --run bench/runs/criteria/keep0.45/ekg      # an `ekg prune` run directory
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ekg.bank import bank_for_run
from ekg.checkpoint import load_checkpoint
from ekg.data import AugmentConfig, get_normalization, iterate_batches, load_data
from ekg.distill import kd_loss
from ekg.train import TrainConfig, _two_view_batches, epoch_generator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import machine, shared_data_root  # noqa: E402


def time_steps(model, batches, step, steps: int, warmup: int) -> float:
    """Images/s over ``steps`` training steps after ``warmup`` (each batch's images counted once)."""
    it = iter(batches)
    for _ in range(warmup):
        step(model, *next(it))
    n, t0 = 0, time.perf_counter()
    for _ in range(steps):
        x, y, t = next(it)
        step(model, x, y, t)
        n += len(y)
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "bench/runs/criteria/keep0.45/ekg"), help="an `ekg prune` run dir")
    ap.add_argument("--data", default=str(shared_data_root() / "cifar10/exact-subset"))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="alternate the three loops this many times; best of each")
    args = ap.parse_args()

    run = Path(args.run)
    data = load_data(args.data, progress=False)
    if (run / "bank").exists():
        shutil.rmtree(run / "bank")  # time a fresh build
    t0 = time.perf_counter()
    bank = bank_for_run(run, data.train, teachers=5, progress=False)
    bank_s = time.perf_counter() - t0

    ckpt = load_checkpoint(run / "pruned.pt")
    model = ckpt.model.train()
    norm = get_normalization(ckpt.normalization)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    cfg_kd = TrainConfig(batch_size=args.batch_size, augment=AugmentConfig(jitter=True), kd="ensemble")
    cfg_plain = TrainConfig(batch_size=args.batch_size, augment=AugmentConfig(jitter=False))

    def sgd(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def plain_step(m, x, y, _t):
        sgd(F.cross_entropy(m(x), y))

    def plain2_step(m, x, y, _t):
        sgd(F.cross_entropy(m(torch.cat(x)), torch.cat([y, y])))

    def kd_step(m, x, y, t):
        views = list(m(torch.cat(x)).chunk(2))
        sgd(kd_loss(views, y, t, mode="ensemble", temperature=4.0).loss)

    def loops(epoch: int):
        gen = epoch_generator(0, epoch, torch.device("cpu"))
        plain = ((x, y, None) for x, y in iterate_batches(data.train, args.batch_size, shuffle=True, generator=gen,
                                                          augment=cfg_plain.augment, normalization=norm,
                                                          drop_last=True))
        two = _two_view_batches(data.train, cfg_kd, epoch_generator(0, epoch, torch.device("cpu")), norm, None)
        kd = _two_view_batches(data.train, cfg_kd, epoch_generator(0, epoch, torch.device("cpu")), norm, bank)
        return {"plain": (plain, plain_step), "plain-2v": (two, plain2_step), "kd": (kd, kd_step)}

    best = {"plain": 0.0, "plain-2v": 0.0, "kd": 0.0}
    need = args.steps + args.warmup
    if need * args.batch_size > len(data.train):
        raise SystemExit(f"--steps + --warmup = {need} batches of {args.batch_size} exceed the {len(data.train)} "
                         "training images")
    for r in range(args.rounds):
        for name, (batches, step) in loops(r).items():
            best[name] = max(best[name], time_steps(model, batches, step, args.steps, args.warmup))
            print(f"round {r + 1}: {name:8s} {best[name]:8.1f} images/s (best so far)", file=sys.stderr)
    report = {
        "command": "python " + " ".join(sys.argv), "machine": machine("cpu"),
        "model": f"{ckpt.arch} from {run / 'pruned.pt'}", "batch_size": args.batch_size,
        "steps": args.steps, "rounds": args.rounds, "bank": f"5 teachers x {len(data.train)} images, fp16 memmap",
        "bank_build_s": round(bank_s, 1),
        "images_per_s": {k: round(v, 1) for k, v in best.items()},
        "kd_over_plain_2views": round(best["kd"] / best["plain-2v"], 3),
        "kd_over_plain_1view": round(best["kd"] / best["plain"], 3),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

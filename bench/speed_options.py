"""Fine-tuning throughput with the speed options: plain vs --amp, --channels-last, --compile.

Fine-tunes one slim model (an `ekg prune` run's pruned.pt) with `ekg.train.train` for one epoch on
``--limit-train`` images per configuration, in one process on one device, and reports the training
images per second that the training loop itself logs (``train_images_per_s``; the first epoch of a
``--compile`` run includes compilation, so it is run for ``--epochs`` epochs and the last is taken).

    python bench/speed_options.py --run bench/runs/criteria/keep0.45/ekg --device cuda      # a GPU
    python bench/speed_options.py --run RUN --device cpu --configs plain bf16 channels-last  # a CPU

Meant for an accelerator (the issue's "GPU evidence"); on a CPU, bf16 autocast and compile are
usually slower than plain float32.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import machine, shared_data_root  # noqa: E402

from ekg.checkpoint import load_checkpoint  # noqa: E402
from ekg.data import load_data  # noqa: E402
from ekg.runtime import resolve_device  # noqa: E402
from ekg.train import finetune_config, train  # noqa: E402

CONFIGS = {
    "plain": {},
    "bf16": {"amp": "bf16"},
    "fp16": {"amp": "fp16"},
    "channels-last": {"channels_last": True},
    "bf16+channels-last": {"amp": "bf16", "channels_last": True},
    "compile": {"compile": True},
    "bf16+channels-last+compile": {"amp": "bf16", "channels_last": True, "compile": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "bench" / "runs" / "criteria" / "keep0.45" / "ekg"))
    ap.add_argument("--data", default=str(shared_data_root() / "cifar10" / "exact-subset"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--limit-train", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    args.device = str(resolve_device(args.device))
    print(f"# fine-tuning speed options — {machine(args.device)}")
    print(f"# command: python bench/speed_options.py {' '.join(sys.argv[1:])}")
    ckpt = load_checkpoint(Path(args.run) / "pruned.pt")
    data = load_data(args.data, progress=False)
    rows = []
    for name in args.configs:
        cfg = finetune_config("none", epochs=args.epochs, batch_size=args.batch_size, limit_train=args.limit_train,
                              limit_test=512, device=args.device, amp=CONFIGS[name].get("amp", "off"),
                              **{k: v for k, v in CONFIGS[name].items() if k != "amp"})
        with tempfile.TemporaryDirectory() as tmp:
            train(cfg, data, Path(tmp) / "run", init=ckpt, progress=False)
            last = json.loads((Path(tmp) / "run" / "log.jsonl").read_text().splitlines()[-1])
        rows.append((name, last["train_images_per_s"], last["test_top1"]))
        print(f"{name}: {last['train_images_per_s']:.0f} images/s", flush=True)
    base = rows[0][1]
    print(f"\n| configuration | images/s (last of {args.epochs} epochs) | vs {rows[0][0]} | test top-1 (512 images) |")
    print("|---|---|---|---|")
    for name, ips, top1 in rows:
        print(f"| {name} | {ips:.0f} | {ips / base:.2f}× | {top1:.2f} |")


if __name__ == "__main__":
    main()

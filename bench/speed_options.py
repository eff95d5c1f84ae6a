"""Fine-tuning throughput with the speed options: plain vs --amp, --channels-last, --compile.

Fine-tunes one slim model (an `ekg prune` run's pruned.pt) with `ekg.train.train` for ``--epochs`` on
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

from ekg.bank import bank_for_run  # noqa: E402
from ekg.checkpoint import load_checkpoint  # noqa: E402
from ekg.data import load_data  # noqa: E402
from ekg.runtime import resolve_device  # noqa: E402
from ekg.train import finetune_config, train  # noqa: E402

# "ensemble+..." rows fine-tune as the method does (two views, teacher logits from the run's memory
# bank, built on first use); the others with plain cross-entropy. Images count once, whatever the views.
CONFIGS = {
    "plain": {},
    "bf16": {"amp": "bf16"},
    "fp16": {"amp": "fp16"},
    "channels-last": {"channels_last": True},
    "bf16+channels-last": {"amp": "bf16", "channels_last": True},
    "compile": {"compile": True},
    "bf16+channels-last+compile": {"amp": "bf16", "channels_last": True, "compile": True},
    "ensemble": {"kd": "ensemble"},
    "ensemble+bf16+channels-last": {"kd": "ensemble", "amp": "bf16", "channels_last": True},
    "ensemble+bf16+channels-last+compile": {"kd": "ensemble", "amp": "bf16", "channels_last": True, "compile": True},
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
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args()
    args.device = str(resolve_device(args.device))
    print(f"# fine-tuning speed options — {machine(args.device)}")
    print(f"# command: python bench/speed_options.py {' '.join(sys.argv[1:])}")
    ckpt = load_checkpoint(Path(args.run) / "pruned.pt")
    data = load_data(args.data, progress=False)
    bank = None
    if any(CONFIGS[name].get("kd") for name in args.configs):
        bank = bank_for_run(args.run, data.train, device=resolve_device(args.device), progress=False)
    rows = []
    for name in args.configs:
        opts = dict(CONFIGS[name])
        cfg = finetune_config(opts.pop("kd", "none"), epochs=args.epochs, batch_size=args.batch_size,
                              limit_train=args.limit_train, limit_test=512, device=args.device,
                              amp=opts.pop("amp", "off"), **opts)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                train(cfg, data, Path(tmp) / "run", init=ckpt, progress=False, bank=bank if cfg.kd != "none" else None)
            except Exception as e:  # one failing option (e.g. compile on a new stack) must not hide the others
                print(f"{name}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            log = [json.loads(line) for line in (Path(tmp) / "run" / "log.jsonl").read_text().splitlines()]
        row = {"config": name, "images_per_s": log[-1]["train_images_per_s"],
               "first_epoch_s": log[0]["seconds"], "last_epoch_s": log[-1]["seconds"], "kd": cfg.kd}
        rows.append(row)
        print(f"{name}: {row['images_per_s']:.0f} images/s (first epoch {row['first_epoch_s']:.1f} s)", flush=True)
    base = rows[0]["images_per_s"]
    print(f"\n| configuration | images/s (last of {args.epochs} epochs) | vs {rows[0]['config']} | "
          "first epoch (s, with compilation) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['images_per_s']:.0f} | {r['images_per_s'] / base:.2f}× | "
              f"{r['first_epoch_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(args.device), "command": sys.argv[1:],
                                               "epochs": args.epochs, "limit_train": args.limit_train,
                                               "batch_size": args.batch_size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

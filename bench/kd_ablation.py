"""The paper's fine-tuning ablation axis: --kd none | single | ensemble, paired on the same test images.

Starts from one pruned model (an `ekg prune` run directory, by default the `ekg` run of
`bench/criteria.py`: the release's ResNet-56 at keep 0.45 on the exact CIFAR-10 subset), builds or
reuses its memory bank, and fine-tunes it three times with the same schedule, seed and data order:

    none      one view, cross-entropy, flip + pad-crop (the recipe's plain fine-tuning)
    single    two views + colour jitter, T·KL to teacher 0 (the best interim sub-network)
    ensemble  two views + colour jitter, EKG's per-batch teacher selection

Each model is tested on the same test images; the differences come with a paired bootstrap 95%
interval and the counts of images only one of the two gets right.

    python bench/kd_ablation.py --epochs 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ekg.bank import bank_for_run
from ekg.checkpoint import load_checkpoint
from ekg.data import load_data
from ekg.train import finetune_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import finetune_and_test, machine, paired, shared_data_root  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "bench/runs/criteria/keep0.45/ekg"), help="an `ekg prune` run dir")
    ap.add_argument("--data", default=str(shared_data_root() / "cifar10/exact-subset"))
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench/runs/kd_ablation"))
    args = ap.parse_args()

    run, out = Path(args.run), Path(args.out)
    data = load_data(args.data, progress=False)
    bank = bank_for_run(run, data.train, teachers=5, progress=False)
    pruned = load_checkpoint(run / "pruned.pt")
    rows, right = {}, {}
    for kd in ("none", "single", "ensemble"):
        cfg = finetune_config(kd, epochs=args.epochs)
        folder = out / f"{run.name}-e{args.epochs}" / kd
        rows[kd], right[kd] = finetune_and_test(cfg, data, folder, pruned, None if kd == "none" else bank)
        print(f"{kd}: {rows[kd]}", file=sys.stderr, flush=True)
    rows["single"]["vs_none"] = paired(right["none"], right["single"])
    rows["ensemble"]["vs_none"] = paired(right["none"], right["ensemble"])
    rows["ensemble"]["vs_single"] = paired(right["single"], right["ensemble"])
    report = {"command": "python " + " ".join(sys.argv), "machine": machine("cpu"),
              "model": f"{pruned.arch} from {run / 'pruned.pt'}", "epochs": args.epochs,
              "schedule": "paper recipe scaled to the epochs: batch 128, lr 0.01 x0.2 at 30/60/80%",
              "data": f"{len(data.train)} training / {len(data.test)} test images", "rows": rows}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

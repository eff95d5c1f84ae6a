"""Criteria comparison: which sub-network does each criterion choose at the same budget?

Runs `ekg prune` on the original release's pretrained ResNet-56 (exact CIFAR-10 subset; search
sets carved from its training batches) once per criterion, all at the same ``--keep``:

    ekg      greedy search, EKG's Taylor scores of J, ensemble reward (the method)
    taylor   greedy search, Taylor scores of plain cross-entropy
    l1       greedy search, filter L1 norms
    fpgm     greedy search, FPGM (distance to the other filters)
    random   greedy search, random scores
    uniform  the same kept fraction in every group (channels by EKG's scores of the unpruned net)

and, with the method's scores and reward, the search variants (``--criteria ekg ekg-release
ekg-running``: the search-mode comparison):

    ekg-release  `--compat release`: the original TensorFlow release's effective rules
    ekg-running  `--search-bn running`: the search on BN running statistics (an ablation)

Each slim model is then compared **without fine-tuning**, tested on the exact test subset three
ways: BN in inference mode with the running statistics it carries, BN on test-batch statistics
(`ekg test --bn batch`, the release's test.py), and after its BN running statistics are re-estimated
on the training images (unaugmented; `ekg.evaluate.recalibrate_bn`). With ``--finetune-epochs E``
each is also fine-tuned with the same short recipe (the paper's, scaled to E epochs, memory bank
of 5 teachers, ensemble KD, same seed and data order) and tested again. Every pair is evaluated on the same test images; the accuracy
difference to ``ekg`` comes with a paired bootstrap 95% interval and the counts of images only
one of the two gets right.

    python bench/criteria.py                            # all six, keep 0.45 (about 30 min on 2 cores)
    python bench/criteria.py --criteria ekg l1 --keep 0.6
    python bench/criteria.py --criteria ekg ekg-release ekg-running --finetune-epochs 3

Runs go to ``--out`` (default ``bench/runs/criteria``, git-ignored); a finished run is reused
(its recorded search time is reported), so the script can be re-run after an interruption.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ekg.bank import bank_for_run
from ekg.checkpoint import load_checkpoint
from ekg.data import get_normalization, load_data
from ekg.train import finetune_config
from ekg.evaluate import metrics_from_logits, predict_logits, recalibrate_bn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import finetune_and_test, machine, paired, shared_data_root  # noqa: E402

CRITERIA = {
    "ekg": [],
    "taylor": ["--importance", "taylor"],
    "l1": ["--importance", "l1"],
    "fpgm": ["--importance", "fpgm"],
    "random": ["--importance", "random"],
    "uniform": ["--method", "uniform"],
    "ekg-release": ["--compat", "release"],
    "ekg-running": ["--search-bn", "running"],
}


def run_prune(name: str, model: Path, data: Path, keep: float, out: Path) -> dict:
    """`ekg prune` for one criterion (reused when finished); returns its timing record."""
    record = out / "bench_timing.json"
    if (out / "pruned.pt").exists() and record.exists():
        return json.loads(record.read_text())
    cmd = ["ekg", "prune", "--model", str(model), "--data", str(data), "--keep", str(keep), "--out", str(out),
           "--quiet", *CRITERIA[name]]
    if (out / "config.json").exists():
        cmd.append("--resume")
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    rec = {"command": " ".join(cmd), "seconds": round(time.perf_counter() - t0, 1), "resumed": "--resume" in cmd}
    record.write_text(json.dumps(rec))
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(shared_data_root()))
    ap.add_argument("--keep", type=float, default=0.45)
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    ap.add_argument("--out", default=str(ROOT / "bench" / "runs" / "criteria"))
    ap.add_argument("--finetune-epochs", type=int, default=0, metavar="E",
                    help="also fine-tune each slim model E epochs (the same recipe for all) and test it")
    args = ap.parse_args()

    root = Path(args.data)
    model_path = root / "pretrained/ekg_tf/res56_cifar10.pkl"
    data_path = root / "cifar10/exact-subset"
    data = load_data(data_path, progress=False)
    original = load_checkpoint(model_path)
    norm = get_normalization(original.normalization)
    labels = data.test.labels

    def correct(model: torch.nn.Module, bn_mode: str = "running") -> tuple[dict, np.ndarray]:
        logits = predict_logits(model, data.test, norm, bn_mode=bn_mode)
        return metrics_from_logits(logits, labels), (logits.argmax(1) == labels).numpy()

    rows, right, tuned = {}, {}, {}
    m, right["original"] = correct(original.model)
    rows["original"] = {"top1": m["top1"], "loss": m["loss"], "flops": None, "params": None}
    for name in args.criteria:
        out = Path(args.out) / f"keep{args.keep}" / name
        timing = run_prune(name, model_path, data_path, args.keep, out)
        log = [json.loads(line) for line in (out / "search.jsonl").read_text().splitlines()]
        ckpt = load_checkpoint(out / "pruned.pt")
        before, _ = correct(ckpt.model)
        batch_bn, _ = correct(ckpt.model, "batch")
        recalibrate_bn(ckpt.model, data.train, norm)
        after, right[name] = correct(ckpt.model)
        widths = json.loads((out / "widths.json").read_text())
        rows[name] = {"top1_no_recal": before["top1"], "top1_batch_bn": batch_bn["top1"], "top1": after["top1"],
                      "loss": after["loss"], "widths": [g["kept"] for g in widths["groups"].values()],
                      "flops": log[-1]["flops"], "flops_ratio": round(log[-1]["flops_ratio"], 4),
                      "params": log[-1]["params"], "steps": len(log) - 1, "val_loss": round(log[-1]["val_loss"], 4),
                      "slim_max_diff": widths["slim_check"]["max_abs_diff"],
                      "search_s": timing["seconds"], "resumed": timing["resumed"], "command": timing["command"]}
        if args.finetune_epochs:
            cfg = finetune_config("ensemble", epochs=args.finetune_epochs)
            bank = bank_for_run(out, data.train, teachers=5, progress=False)
            folder = Path(args.out) / f"keep{args.keep}" / "finetuned" / f"{name}-e{args.finetune_epochs}"
            rows[name]["finetuned"], tuned[name] = finetune_and_test(cfg, data, folder, load_checkpoint(out / "pruned.pt"),
                                                                     bank)
        print(f"{name}: {json.dumps(rows[name])}", file=sys.stderr, flush=True)
    ref = "ekg" if "ekg" in right else None
    for name in args.criteria:
        if ref and name != ref:
            rows[name]["vs_ekg"] = paired(right[ref], right[name])
            if name in tuned and ref in tuned:
                rows[name]["finetuned"]["vs_ekg"] = paired(tuned[ref], tuned[name])

    report = {"command": "python " + " ".join(sys.argv),
              "machine": machine("cpu"),
              "model": "EKG release ResNet-56 (res56_cifar10.pkl)", "keep": args.keep,
              "data": f"exact CIFAR-10 subset: BN recalibrated on its {len(data.train)} training images, "
                      f"tested on its {len(data.test)} test images", "rows": rows}
    print(json.dumps(report))
    def vs(r: dict) -> str:
        v = r.get("vs_ekg")
        return f"{v['diff']:+.2f} [{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}]" if v else "-"

    print("\n| criterion | FLOPs ratio | params | steps | search s | top-1 (no recal) | top-1 (batch BN) | "
          "top-1 (BN recal) | loss | vs ekg (points, 95% CI) |", file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for name, r in rows.items():
        if name == "original":
            print(f"| original | 1.0 | - | - | - | - | - | {r['top1']:.2f} | {r['loss']:.3f} | - |", file=sys.stderr)
            continue
        print(f"| {name} | {r['flops_ratio']:.4f} | {r['params'] / 1e6:.3f} M | {r['steps']} | {r['search_s']:.0f} | "
              f"{r['top1_no_recal']:.2f} | {r['top1_batch_bn']:.2f} | {r['top1']:.2f} | {r['loss']:.3f} | {vs(r)} |",
              file=sys.stderr)
    if tuned:
        print(f"\n| criterion | fine-tuned {args.finetune_epochs} epochs: top-1 | top-5 | loss | vs ekg (points, 95% CI) |",
              file=sys.stderr)
        print("|---|---|---|---|---|", file=sys.stderr)
        for name in tuned:
            f = rows[name]["finetuned"]
            print(f"| {name} | {f['top1']:.2f} | {f['top5']:.2f} | {f['loss']:.3f} | {vs(f)} |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

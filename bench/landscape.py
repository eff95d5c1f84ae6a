"""Smoothness of the sub-networks different criteria find at the same budget (the paper's table).

Measures, with `ekg.landscape`, the Hessian numbers of the slim sub-networks left by
`bench/criteria.py` (pretrained ResNet-56 of the original release, keep 0.45, before fine-tuning)
and of the adapted, unpruned network for reference: λmax (power iteration, cross-checked by
Lanczos), λmin and |λmin|/λmax (Lanczos), the trace (Hutchinson, with its standard error), all on
the same fixed training images with BN on batch statistics (as the search).

    python bench/criteria.py --criteria ekg l1 uniform     # the runs (reused when present)
    python bench/landscape.py                              # about 30 min on 2 CPU cores

Results (JSON per network, the surfaces' PNGs) go to ``--out`` (default ``bench/runs/landscape``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import machine, shared_data_root  # noqa: E402

from ekg.data import load_data  # noqa: E402
from ekg.landscape import LandscapeConfig, landscape  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(shared_data_root() / "cifar10" / "exact-subset"))
    ap.add_argument("--runs", default=str(ROOT / "bench" / "runs" / "criteria" / "keep0.45"),
                    help="folder holding one `ekg prune` run per criterion (bench/criteria.py)")
    ap.add_argument("--criteria", nargs="+", default=["ekg", "l1", "uniform"])
    ap.add_argument("--no-original", action="store_true", help="skip the unpruned (adapted) network")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--power-iters", type=int, default=30)
    ap.add_argument("--lanczos-steps", type=int, default=20)
    ap.add_argument("--hutchinson-samples", type=int, default=20)
    ap.add_argument("--surface-2d", type=int, default=11)
    ap.add_argument("--out", default=str(ROOT / "bench" / "runs" / "landscape"))
    args = ap.parse_args()

    print(f"# landscape benchmark — {machine('cpu')}")
    print(f"# command: python bench/landscape.py {' '.join(sys.argv[1:])}")
    data = load_data(args.data, progress=False)
    cfg = LandscapeConfig(images=args.images, power_iters=args.power_iters, lanczos_steps=args.lanczos_steps,
                          hutchinson_samples=args.hutchinson_samples, surface_1d=21, surface_2d=args.surface_2d,
                          device="cpu")
    runs = Path(args.runs)
    targets = [(c, runs / c / "pruned.pt") for c in args.criteria]
    if not args.no_original:
        targets.append(("original (adapted)", runs / args.criteria[0] / "adapted.pt"))
    rows = []
    for name, model in targets:
        if not model.exists():
            raise SystemExit(f"{model} is missing: run `python bench/criteria.py --criteria {name}` first")
        out = Path(args.out) / name.split()[0]
        done = out / "landscape.json"
        if done.exists():
            rec = json.loads(done.read_text())
        else:
            t0 = time.perf_counter()
            rec = landscape(model, data, out, config=cfg, progress=sys.stderr.isatty())
            rec["wall_seconds"] = time.perf_counter() - t0
            done.write_text(json.dumps(rec, indent=2))
        log = runs / name / "search.jsonl"
        flops = json.loads(log.read_text().splitlines()[-1])["flops_ratio"] if name in args.criteria else 1.0
        rows.append((name, flops, rec))

    print(f"\n{cfg.images} fixed training images, BN on batch statistics, seed {cfg.seed}; "
          f"power ≤{cfg.power_iters} iterations (tol {cfg.power_tol}), {cfg.lanczos_steps} Lanczos steps, "
          f"{cfg.hutchinson_samples} Hutchinson samples\n")
    print("| network | FLOPs ratio | loss | λmax (power) | λmax (Lanczos) | λmin | \\|λmin\\|/λmax | trace ± se |")
    print("|---|---|---|---|---|---|---|---|")
    for name, flops, r in rows:
        conv = "" if r["power"]["converged"] else " (not converged)"
        print(f"| {name} | {flops:.4f} | {r['loss']:.4f} | {r['lambda_max']:.2f}{conv} | {r['lanczos_lambda_max']:.2f} | "
              f"{r['lambda_min']:.3f} | {r['neg_ratio']:.5f} | {r['trace']:.0f} ± {r['trace_stderr']:.0f} |")


if __name__ == "__main__":
    main()

"""Search speed: the straightforward search vs the optimised one, same decisions required.

Runs EKG's greedy search on the original release's pretrained ResNet-56 (exact CIFAR-10 subset,
search sets carved from its training batches) twice in one process, from the same adapted
weights:

* straightforward: every candidate re-runs the whole masked network on D_val;
* optimised: every candidate re-runs only the graph nodes downstream of the group it changes,
  re-using the other activations (bit-identical), with one host sync per candidate.

Both use the same kernels (channels-last, kept-channels-only layers; ``--plain-kernels`` turns that
off for both), so they must choose exactly the same steps; the script checks it and prints both
times and the ratio.

    python bench/search.py                       # full search to keep 0.45 (minutes on 2 cores)
    python bench/search.py --steps 10            # first 10 steps only
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from ekg.checkpoint import load_checkpoint
from ekg.data import get_normalization, iterate_batches, load_data
from ekg.search import carve_search_sets
from ekg.masks import MaskedNetwork
from ekg.search import SearchConfig, Searcher, adapt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import machine, shared_data_root  # noqa: E402


def run_search(model: torch.nn.Module, val, norm, cfg: SearchConfig, max_steps: int | None) -> tuple[list[dict], float]:
    model = copy.deepcopy(model)
    device = next(model.parameters()).device
    norm_batches = list(iterate_batches(val.to(device), cfg.batch_size, normalization=norm))
    t0 = time.perf_counter()
    model.eval()  # as ekg prune: dropout off; the Searcher sets BN to cfg.search_bn for every pass
    net = MaskedNetwork(model)
    searcher = Searcher(net, norm_batches, cfg)
    state = searcher.initial_state()
    searcher.restore(state)
    while searcher.ratio() > cfg.keep and (max_steps is None or state.step < max_steps):
        state = searcher.step(state)
        row = state.log[-1]
        print(f"  step {row['step']:3d}  {row['group_name']:24s} ratio {row['flops_ratio']:.4f}  "
              f"J {row['j']:.5f}  evaluated {row['evaluated']:2d}  {row['seconds']:.2f}s", file=sys.stderr)
    return state.log, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(shared_data_root()))
    ap.add_argument("--keep", type=float, default=0.45)
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--plain-kernels", action="store_true", help="full-width masked kernels, contiguous layout")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    root = Path(args.data)
    ckpt = load_checkpoint(root / "pretrained/ekg_tf/res56_cifar10.pkl")
    data = load_data(root / "cifar10/exact-subset", progress=False)
    norm = get_normalization(ckpt.normalization)
    d_val, d_sub = carve_search_sets(data.train)
    model = ckpt.model.to(args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    base = SearchConfig(keep=args.keep, sliced=not args.plain_kernels, device=args.device)
    t0 = time.perf_counter()
    adapt(model, iterate_batches(d_sub.to(args.device), 256, normalization=norm, drop_last=True), base)
    adapt_s = time.perf_counter() - t0

    results = {}
    for name, fast in (("straightforward", False), ("optimised", True)):
        print(f"{name} search ...", file=sys.stderr)
        cfg = SearchConfig(**{**base.to_dict(), "fast": fast})
        results[name] = run_search(model, d_val, norm, cfg, args.steps)

    (log_s, t_s), (log_o, t_o) = results["straightforward"], results["optimised"]
    same = [r["group"] for r in log_s] == [r["group"] for r in log_o] and \
        [r.get("widths") for r in log_s] == [r.get("widths") for r in log_o]
    report = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(args.device),
        "model": "EKG release ResNet-56, exact CIFAR-10 subset (D_val 320, D_sub 2560)",
        "kernels": "plain masked" if args.plain_kernels else "channels-last, kept-channels-only",
        "keep": args.keep, "steps": len(log_o) - 1, "final_flops_ratio": log_o[-1]["flops_ratio"],
        "adaptation_s": round(adapt_s, 2),
        "straightforward_s": round(t_s, 2), "optimised_s": round(t_o, 2), "speedup": round(t_s / t_o, 2),
        "same_decisions": same,
    }
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:18s}: {v}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

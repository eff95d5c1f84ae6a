"""Search speed on wide networks, two source trees interleaved in one run, same decisions required.

Times EKG's greedy search (no adaptation; search only) on torchvision DenseNet-121 and
Wide-ResNet-50-2 (random weights, seed 0) and on the release's pretrained CIFAR ResNet-56, at
32×32 on real CIFAR-10 images (D_val carved from the exact subset's training batches by the
project's rule, ``--val-per-class`` images per class: 2 by default, 20 images): the seconds of
step 0 (the unpruned network's pass) and of each of ``--steps`` greedy steps, and steps/s.

Each measurement runs in a fresh subprocess with ``PYTHONPATH=TREE/src``, so two checkouts can be
compared on the same machine in the same run: ``--before DIR`` (e.g. a worktree of the commit
before an optimisation) and ``--after DIR`` (default: this tree). The runs alternate per round
(before/after, then after/before, ...), so a load change on a shared machine hits both alike; the
ratios of each round are reported beside the medians. Every run also records its trajectory
(each step's chosen group, rate, widths, ranks, J, CE and accuracy as exact float bits, and the
ensemble K); the script exits non-zero unless every run of a model has the same trajectory.

    python bench/search_speed.py --before /work/wt-speed-base --rounds 3
    python bench/search_speed.py --models resnet20,resnet56:32 --steps 10 --rounds 1   # decisions only
    python bench/search_speed.py --worker --model densenet121 --steps 5     # one run, JSON on stdout

Model names: a torchvision name (``densenet121``, ``wide_resnet50_2``, ...; needs torchvision),
``resnet56`` (the release's ``res56_cifar10.pkl``) or ``resnet20`` (akamaster's); ``NAME:V`` sets
V images per class for that model, and ``NAME@R`` starts the timed steps from a mid-search state,
every group at rate R (channels kept in channel order) instead of the unpruned network: the first
steps of a search leave most layers whole, while later ones run every layer on its kept channels.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = "densenet121,wide_resnet50_2,resnet56"


# ---------------------------------------------------------------------------------------------- worker
def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _build(name: str, data_root: Path):
    """(model, normalization) of ``name``, weights frozen as ``ekg prune`` freezes them."""
    import torch

    from ekg.checkpoint import load_checkpoint
    from ekg.data import get_normalization

    if name == "resnet56":
        ckpt = load_checkpoint(data_root / "pretrained/ekg_tf/res56_cifar10.pkl")
        model, norm = ckpt.model, get_normalization(ckpt.normalization)
    elif name == "resnet20":
        ckpt = load_checkpoint(data_root / "pretrained/akamaster/resnet20-12fca82f.th")
        model, norm = ckpt.model, get_normalization(ckpt.normalization)
    else:
        import torchvision.models as tvm

        torch.manual_seed(0)
        model, norm = tvm.get_model(name, weights=None, num_classes=10), get_normalization("cifar10")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), norm


def worker(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    import ekg
    from ekg.data import iterate_batches, load_data
    from ekg.masks import MaskedNetwork
    from ekg.search import SearchConfig, Searcher, carve_search_sets

    spec, _, start = args.model.partition("@")
    name, _, vpc = spec.partition(":")
    vpc = int(vpc) if vpc else args.val_per_class
    root = Path(args.data)
    data = load_data(root / "cifar10/exact-subset", progress=False)
    d_val, _ = carve_search_sets(data.train, val_per_class=vpc, sub_per_class=0)
    model, norm = _build(name, root)
    batches = list(iterate_batches(d_val, 256, normalization=norm))
    cfg = SearchConfig(keep=args.keep, adapt=False, device="cpu")

    t0 = time.perf_counter()
    net = MaskedNetwork(model)
    searcher = Searcher(net, batches, cfg)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = searcher.initial_state()
    step0_s = time.perf_counter() - t0
    if start:  # a mid-search state: every group at this rate, channels kept in channel order
        state.rates = [float(start)] * len(net.gates)
    searcher.restore(state)
    seconds, trajectory = [], []
    for _ in range(args.steps):
        if searcher.ratio() <= cfg.keep:
            break
        t0 = time.perf_counter()
        state = searcher.step(state)
        seconds.append(time.perf_counter() - t0)
        row, hist = state.log[-1], state.history[-1]
        trajectory.append({"group": row["group"], "rate": float(row["rate"]).hex(), "widths": row["widths"],
                           "j": float(row["j"]).hex(), "ce": float(row["val_loss"]).hex(),
                           "accuracy": float(row["val_accuracy"]).hex(), "history_loss": float(hist["loss"]).hex(),
                           "evaluated": row["evaluated"], "ranks": _digest(state.ranks),
                           "ensemble": _digest([state.ensemble])})
    trajectory.insert(0, {"step0_j": float(state.log[0]["j"]).hex(), "step0_ce": float(state.log[0]["val_loss"]).hex()})
    print(json.dumps({"model": args.model, "tree": str(Path(ekg.__file__).resolve().parents[2]),
                      "images": len(d_val.labels), "gates": len(net.gates), "setup_s": setup_s, "step0_s": step0_s,
                      "step_s": seconds, "trajectory": trajectory, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))
    return 0


# ---------------------------------------------------------------------------------------------- driver
def run_worker(tree: Path, model: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "EKG_SHARED_DATA": args.data,
           "OMP_NUM_THREADS": str(args.threads)}
    cmd = [args.python, str(Path(__file__).resolve()), "--worker", "--model", model, "--steps", str(args.steps),
           "--threads", str(args.threads), "--val-per-class", str(args.val_per_class), "--keep", str(args.keep),
           "--data", args.data]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker failed ({tree}, {model}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _slim(runs: list[dict]) -> list[dict]:
    """``runs`` with each trajectory as its SHA-256, the full trajectory kept on a model's first run."""
    seen, out = set(), []
    for x in runs:
        x = dict(x, trajectory_sha=hashlib.sha256(json.dumps(x["trajectory"]).encode()).hexdigest()[:16])
        if x["model"] in seen:
            del x["trajectory"]
        seen.add(x["model"])
        out.append(x)
    return out


def machine_line(threads: int) -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {threads} torch thread(s)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, default=None, help="the baseline source tree (a checkout)")
    ap.add_argument("--after", type=Path, default=ROOT, help="the tree to compare (default: this one)")
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--val-per-class", type=int, default=2)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--python", default=sys.executable, help="the interpreter of every run")
    ap.add_argument("--data", default=os.environ.get("EKG_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--json", type=Path, default=None, help="write every run's record here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    trees = {"after": args.after.resolve()}
    if args.before is not None:
        trees = {"before": args.before.resolve(), **trees}
    models = args.models.split(",")
    print(f"machine: {machine_line(args.threads)}; python {args.python}", flush=True)
    runs: list[dict] = []
    for r in range(args.rounds):
        for model in models:
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for label in order:
                rec = run_worker(trees[label], model, args)
                rec.update(label=label, round=r)
                runs.append(rec)
                print(f"round {r} {model:18s} {label:6s} step0 {rec['step0_s']:.3f}s  steps "
                      + " ".join(f"{s:.3f}" for s in rec["step_s"]), flush=True)
    print(f"torch {runs[0]['torch']}, threads {runs[0]['threads']}")

    same = True
    print("\n| model | images | gates | tree | step 0 (s) | s per step | steps/s | ratio per round |")
    print("|---|---|---|---|---|---|---|---|")
    for model in models:
        mine = [x for x in runs if x["model"] == model]
        ref = mine[0]["trajectory"]
        identical = all(x["trajectory"] == ref for x in mine)
        same &= identical
        per_round: dict[int, dict[str, float]] = {}
        for x in mine:
            per_round.setdefault(x["round"], {})[x["label"]] = sum(x["step_s"]) / max(1, len(x["step_s"]))
        for label in trees:
            xs = [x for x in mine if x["label"] == label]
            step = statistics.median(sum(x["step_s"]) / max(1, len(x["step_s"])) for x in xs)
            step0 = statistics.median(x["step0_s"] for x in xs)
            ratios = ""
            if label == "after" and "before" in trees:
                rs = [d["before"] / d["after"] for d in per_round.values()]
                ratios = f"{statistics.median(rs):.2f}× ({', '.join(f'{q:.2f}' for q in rs)})"
            print(f"| {model} | {mine[0]['images']} | {mine[0]['gates']} | {label} | {step0:.3f} | {step:.3f} | "
                  f"{1 / step:.3f} | {ratios} |")
        print(f"<!-- {model}: {len(mine)} runs, {len(ref) - 1} steps each, trajectories identical: {identical} -->")
        for x in mine:
            diff = next(((k, a, b) for k, (a, b) in enumerate(zip(ref, x["trajectory"])) if a != b), None)
            if diff is not None or len(x["trajectory"]) != len(ref):
                k, a, b = diff or (min(len(ref), len(x["trajectory"])), None, None)
                fields = sorted(f for f in set(a or {}) | set(b or {}) if (a or {}).get(f) != (b or {}).get(f))
                print(f"   {x['label']} round {x['round']} differs from {mine[0]['label']} round "
                      f"{mine[0]['round']} first at step {k}: {fields}")
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "machine": machine_line(args.threads),
                                         "runs": _slim(runs)}))
    print(f"\ntrajectories identical across every run and tree: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

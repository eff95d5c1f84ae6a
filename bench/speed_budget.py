"""Issue 15's benchmark: a FLOPs budget vs ``--round-to 8`` vs a latency budget, at the same target.

Two parts, each one run on this machine, every latency measured **interleaved** (round by round,
each model in turn: :func:`ekg.latency.compare_on_target`), the speed-up being the median of the
per-round ratios original/pruned with its range:

* ``resnet56``: the original release's pretrained ResNet-56 (``res56_cifar10.pkl``) on the exact
  CIFAR-10 subset, eager torch on this CPU (``--threads``), at batch 1 and batch 64. Arms: the
  FLOPs budget at ``--keep``; the same with ``--round-to 8``; and, per batch size, a latency budget
  whose target is the FLOPs arm's measured latency ratio at that batch (so that the two are
  compared at the same measured latency). Each arm's slim network is then fine-tuned with the same
  short recipe (plain cross-entropy, ``--epochs`` on the subset's 5,085 training images) and its
  test top-1 before and after is reported, paired on the subset's 1,017 test images against the
  FLOPs arm (bootstrap 95% interval of the difference).
* ``mobilenet_v2``: torchvision's MobileNet-V2 (random weights, 10 classes) at 224×224 in ONNX
  Runtime at batch 1 (needs torchvision and onnxruntime: the CI's second venv). Arms, all at
  ``--mb-keep``: the FLOPs budget, the FLOPs budget with ``--round-to 8``, a latency budget (that
  fraction of the measured latency), and the latency budget with ``--round-to 8``. The search runs on a few CIFAR-10 images resized
  to 224 (accuracy is not the point here: random weights).

For every arm: FLOPs ratio, predicted latency ratio (the latency table's, calibrated; for a latency
arm the one its search used), measured latency ratio and speed-up with its range.

    PYTHONPATH=src python bench/speed_budget.py resnet56                  # ~25 min on 2 cores
    PYTHONPATH=src .venv-tv/bin/python bench/speed_budget.py mobilenet_v2 # ~30 min on 2 cores

Run directories go to ``--out`` (default ``bench/runs/speed_budget``; a finished arm is reused, an
interrupted one resumed); the report (Markdown on stdout and JSON in ``--json``) names the machine
and the command. Latency tables are cached in ``$EKG_CACHE/latency`` as ekg always does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from _common import finetune_and_test, machine, paired, shared_data_root  # noqa: E402

from ekg.evaluate import format_speedup  # noqa: E402
from ekg.graph import build_graph  # noqa: E402
from ekg.latency import LatencyModel, LatencyTarget, compare_on_target  # noqa: E402
from ekg.pruning import prune  # noqa: E402
from ekg.search import SearchConfig  # noqa: E402
from ekg.slim import slim_widths  # noqa: E402


def flops_ratio(graph: Any, model: torch.nn.Module) -> float:
    return graph.cost(slim_widths(graph, model))[0] / graph.cost(graph.full_widths())[0]


def run_arm(name: str, ckpt: Any, data: Any, out: Path, cfg: SearchConfig) -> tuple[Any, float]:
    t0 = time.perf_counter()
    print(f"== {name}: {cfg.budget} budget, keep {cfg.keep}, round_to {cfg.round_to}", file=sys.stderr, flush=True)
    res = prune(ckpt, data, out=out / name, config=cfg, resume=True, progress=False)
    return res, time.perf_counter() - t0


def measure(original: Any, arms: dict[str, Any], size: tuple[int, ...], target: LatencyTarget, rounds: int,
            tables: dict[str, LatencyModel]) -> dict[str, dict[str, Any]]:
    """Every arm and the original timed together on ``target``; per arm the measured ratio and
    speed-up, and the predicted ratio (``tables[arm]``, else ``tables['']``)."""
    cmp = compare_on_target({"original": original, **{k: r.model for k, r in arms.items()}}, size, target,
                            rounds=rounds, baseline="original")
    rows = {}
    graph = build_graph(original, size)
    for k, r in arms.items():
        lat = tables.get(k, tables[""])
        rows[k] = {"flops_ratio": flops_ratio(graph, r.model),
                   "predicted_ratio": lat.ratio(slim_widths(graph, r.model)),
                   "measured_ratio": cmp["ratio"][k]["median"], "measured_speedup": cmp["speedup"][k],
                   "ms": cmp["models"][k]["median_ms"]}
    rows["original"] = {"ms": cmp["models"]["original"]["median_ms"]}
    return {"target": cmp["target"], "rounds": cmp["rounds"], "iters_per_round": cmp["iters_per_round"], "rows": rows}


def table(title: str, m: dict[str, Any], extra: dict[str, str] | None = None) -> str:
    o = m["rows"]["original"]["ms"]
    lines = [f"{title}: {m['target']}, original {o:.3g} ms (median of {m['rounds']} interleaved rounds of "
             f"{m['iters_per_round']} passes)", "",
             "| arm | FLOPs ratio | predicted latency ratio | measured latency ratio | measured speed-up | "
             "bar: 0.8 × FLOPs reduction |" + (" top-1 |" if extra else ""),
             "|---|---|---|---|---|---|" + ("---|" if extra else "")]
    for k, r in m["rows"].items():
        if k == "original":
            continue
        lines.append(f"| {k} | {r['flops_ratio']:.3f} | {r['predicted_ratio']:.3f} | {r['measured_ratio']:.3f} | "
                     f"{format_speedup(r['measured_speedup'])} | {0.8 / r['flops_ratio']:.2f}× |"
                     + (f" {extra.get(k, '')} |" if extra else ""))
    return "\n".join(lines) + "\n"


def resnet56(args: argparse.Namespace) -> dict[str, Any]:
    from ekg.checkpoint import load_checkpoint
    from ekg.data import get_normalization, load_data
    from ekg.evaluate import predict_logits
    from ekg.train import finetune_config

    root = shared_data_root()
    ckpt = load_checkpoint(root / "pretrained/ekg_tf/res56_cifar10.pkl")
    data = load_data(root / "cifar10/exact-subset", progress=False)
    size = tuple(ckpt.input_size)
    out = Path(args.out) / "resnet56"
    base = dict(val_per_class=args.val_per_class, sub_per_class=args.sub_per_class)
    arms: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    arms["flops"], seconds["flops"] = run_arm("flops", ckpt, data, out, SearchConfig(keep=args.keep, **base))
    arms["round8"], seconds["round8"] = run_arm("round8", ckpt, data, out,
                                                SearchConfig(keep=args.keep, round_to=8, **base))
    targets = {b: LatencyTarget("cpu", "torch", args.threads, b) for b in (1, 64)}
    # the FLOPs arm's measured latency ratio at each batch: the latency budgets' targets
    goal = {}
    for b, t in targets.items():
        name = f"latency-b{b}"
        saved = out / name / "config.json"
        if getattr(args, f"goal_b{b}") is not None:  # given: a re-run aimed where an earlier run measured
            goal[b] = getattr(args, f"goal_b{b}")
        elif saved.exists():  # the target measured when the arm was made (a re-run continues that arm)
            goal[b] = json.loads(saved.read_text())["search"]["keep"]
        else:
            c = compare_on_target({"original": ckpt.model, "flops": arms["flops"].model}, size, t, rounds=args.rounds)
            goal[b] = round(c["ratio"]["flops"]["median"], 3)
        arms[name], seconds[name] = run_arm(name, ckpt, data, out, SearchConfig(
            keep=goal[b], budget="latency", latency_threads=args.threads, latency_batch=b, **base))
    report: dict[str, Any] = {"goal_latency_ratio": goal, "search_seconds": seconds, "batches": {}}
    for b, t in targets.items():
        tables = {"": LatencyModel(ckpt.model, build_graph(ckpt.model, size), t, progress=False)}
        own = LatencyModel(ckpt.model, build_graph(ckpt.model, size), t,
                           saved=json.loads((out / f"latency-b{b}" / "latency.json").read_text())["model"])
        tables[f"latency-b{b}"] = own
        report["batches"][b] = measure(ckpt.model, arms, size, t, args.rounds, tables)
        report["batches"][b]["search_report"] = {k: v for k, v in arms[f"latency-b{b}"].latency.items()
                                                 if k != "comparison"}
    # the same short fine-tuning of every arm, paired on the test images
    norm = get_normalization(ckpt.normalization)
    labels = data.test.labels
    acc: dict[str, Any] = {}
    right: dict[str, np.ndarray] = {}
    for k, r in arms.items():
        before = predict_logits(r.model, data.test, norm).argmax(1) == labels
        cfg = finetune_config("none", epochs=args.epochs, schedule="cosine", seed=0)
        row, right[k] = finetune_and_test(cfg, data, out / k / "finetune", r.checkpoint, None)
        acc[k] = {"before": round(100 * float(before.float().mean()), 2), **row}
    for k in arms:
        if k != "flops":
            acc[k]["vs_flops"] = paired(right["flops"], right[k])
    report["accuracy"] = acc
    report["settings"] = {"keep": args.keep, **base, "threads": args.threads, "epochs": args.epochs,
                          "rounds": args.rounds}
    return report


def print_resnet56(r: dict[str, Any]) -> None:
    acc = r["accuracy"]
    top1 = {k: f"{a['before']:.2f} → {a['top1']:.2f}" + (f" ({a['vs_flops']['diff']:+.2f}, 95% CI "
                                                        f"{a['vs_flops']['ci95'][0]:+.2f}…{a['vs_flops']['ci95'][1]:+.2f})"
                                                        if "vs_flops" in a else "") for k, a in acc.items()}
    for b, m in r["batches"].items():
        print(table(f"ResNet-56, batch {b}", m, top1))
        s = m["search_report"]
        print(f"latency-b{b}'s own end-to-end check (ekg prune): target {r['goal_latency_ratio'][b]}, predicted "
              f"{s['predicted_ratio']:.3f}, measured {s['measured_ratio']:.3f}, after {s.get('refits', 0)} refit(s) "
              "of the landing\n")
    print("top-1 (%): before → after the same fine-tuning (test images of the exact subset); in brackets the "
          "paired difference to the FLOPs arm")


def mobilenet_v2(args: argparse.Namespace) -> dict[str, Any]:
    from ekg.checkpoint import Checkpoint
    from ekg.data import get_normalization
    from zoo import cifar_subset
    from zoo_models import build

    size = (3, args.mb_size, args.mb_size)
    model = build("torchvision:mobilenet_v2")
    norm = get_normalization("cifar10")
    from ekg.arch import record_for

    ckpt = Checkpoint(model=model, normalization={"name": "cifar10", **norm.to_dict()}, input_size=size,
                      dataset={"name": "cifar10", "num_classes": 10}, record=record_for(model, 10))
    data = cifar_subset(size, per_class=4, test_per_class=1)
    out = Path(args.out) / "mobilenet_v2"
    base = dict(val_per_class=2, sub_per_class=2, adapt=False, batch_size=20, step=args.mb_step)
    target = LatencyTarget("cpu", "onnxruntime", args.threads, 1)
    lat = dict(budget="latency", latency_runtime="onnxruntime", latency_threads=args.threads)
    arms: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    arms["flops"], seconds["flops"] = run_arm("flops", ckpt, data, out, SearchConfig(keep=args.mb_keep, **base))
    arms["round8"], seconds["round8"] = run_arm("round8", ckpt, data, out,
                                                SearchConfig(keep=args.mb_keep, round_to=8, **base))
    goal = args.mb_keep  # the same target as the FLOPs arms' (their measured ratio in ONNX Runtime can be ~1)
    arms["latency"], seconds["latency"] = run_arm("latency", ckpt, data, out, SearchConfig(keep=goal, **lat, **base))
    arms["latency-round8"], seconds["latency-round8"] = run_arm(
        "latency-round8", ckpt, data, out, SearchConfig(keep=goal, round_to=8, **lat, **base))
    graph = build_graph(model, size)
    tables = {"": LatencyModel(model, graph, target, progress=False)}
    for k in ("latency", "latency-round8"):
        tables[k] = LatencyModel(model, graph, target, saved=json.loads((out / k / "latency.json").read_text())["model"])
    m = measure(model, arms, size, target, args.rounds, tables)
    m["search_reports"] = {k: {x: v for x, v in arms[k].latency.items() if x != "comparison"}
                           for k in ("latency", "latency-round8")}
    return {"goal_latency_ratio": goal, "search_seconds": seconds, "measured": m,
            "settings": {"keep": args.mb_keep, **base, "threads": args.threads, "rounds": args.rounds}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("part", choices=("resnet56", "mobilenet_v2"))
    ap.add_argument("--keep", type=float, default=0.45, help="ResNet-56's FLOPs budget (default 0.45, the paper's)")
    ap.add_argument("--mb-keep", type=float, default=0.5, help="MobileNet-V2's FLOPs budget (default 0.5)")
    ap.add_argument("--mb-size", type=int, default=224, help="MobileNet-V2's input size (default 224)")
    ap.add_argument("--mb-step", type=float, default=0.5, help="MobileNet-V2's search step (default 0.5)")
    ap.add_argument("--val-per-class", type=int, default=10, help="ResNet-56's D_val per class (default 10)")
    ap.add_argument("--sub-per-class", type=int, default=64, help="ResNet-56's D_sub per class (default 64)")
    for b in (1, 64):
        ap.add_argument(f"--goal-b{b}", type=float, default=None,
                        help=f"the batch-{b} latency arm's target (default: the FLOPs arm's measured latency ratio)")
    ap.add_argument("--epochs", type=int, default=3, help="the short fine-tuning's epochs (default 3)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads of every target")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds of every comparison (default 10)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "runs" / "speed_budget"))
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    head = {"command": "python " + " ".join(sys.argv), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"machine: {head['machine']}\ncommand: {head['command']}\ndate: {head['date']}\n")
    if args.part == "resnet56":
        report = resnet56(args)
        print_resnet56(report)
    else:
        report = mobilenet_v2(args)
        print(table(f"MobileNet-V2 {args.mb_size}×{args.mb_size} (random weights), batch 1", report["measured"]))
        print(f"every arm's target: {report['goal_latency_ratio']} (FLOPs ratio, or fraction of the measured latency)")
        for k, r in report["measured"]["search_reports"].items():
            print(f"{k}'s own end-to-end check (ekg prune): predicted {r['predicted_ratio']:.3f}, measured "
                  f"{r['measured_ratio']:.3f}, after {r.get('refits', 0)} refit(s) of the landing")
    print(f"search seconds: {json.dumps({k: round(v) for k, v in report['search_seconds'].items()})}")
    if args.json:
        Path(args.json).write_text(json.dumps({**head, **report}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the deployed format change what is fast? (``--latency-dtype``, ``--latency-channels-last``)

One run on this machine, eager torch on the CPU with ``--threads`` threads, the original release's
pretrained ResNet-56 (``res56_cifar10.pkl``) on the exact CIFAR-10 subset:

1. **The formats.** The original and its slim networks from a FLOPs budget at ``--keep`` (free
   widths, and widths in multiples of ``--round-to``), each in four formats (float32 / bfloat16 ×
   contiguous / channels-last): all twelve timed **interleaved** (round by round, each in turn:
   :func:`ekg.evaluate.compare_latency`) at batch 1 and ``--batch``. Per format: the original's
   time and each slim network's speed-up in that format (median of the per-round ratios, with its
   range).
2. **A latency budget in each format.** ``ekg.prune`` with ``budget="latency"`` at
   ``--latency-keep`` (batch ``--batch``) on float32, on bfloat16 + channels-last, and on the
   latter with ``--round-to``: the FLOPs ratio it lands on, its predicted and measured latency
   ratio on its own format, and each landing measured on float32 and on bfloat16 + channels-last,
   interleaved with the original there.

    PYTHONPATH=src python bench/latency_format.py --json bench/results/latency-format-DATE.json

Run directories go to ``--out`` (a finished search is reused, an interrupted one resumed). The
report (Markdown on stdout, JSON in ``--json``) names the machine and the command.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import machine, shared_data_root  # noqa: E402

from ekg.evaluate import compare_latency, format_speedup, spread  # noqa: E402
from ekg.errors import EkgError  # noqa: E402
from ekg.graph import build_graph  # noqa: E402
from ekg.latency import LatencyTarget  # noqa: E402
from ekg.pruning import prune  # noqa: E402
from ekg.search import SearchConfig  # noqa: E402
from ekg.slim import slim_widths  # noqa: E402

FORMATS = {"float32": ("float32", False), "float32, channels-last": ("float32", True),
           "bfloat16": ("bfloat16", False), "bfloat16, channels-last": ("bfloat16", True)}


class Deployed(nn.Module):
    """A model converted to a target's format, run on its own input in that format (the timing
    loop's input is ignored): models of several formats can then be timed in one interleaved loop."""

    def __init__(self, model: nn.Module, target: LatencyTarget, input_size: tuple[int, ...]) -> None:
        super().__init__()
        self.model = target.deployed(copy.deepcopy(model))
        self.x = target.example((target.batch, *input_size))

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.model(self.x)


def interleaved(models: dict[str, tuple[nn.Module, LatencyTarget]], size: tuple[int, ...], batch: int,
                rounds: int, baseline: str) -> dict[str, Any]:
    runners = {k: Deployed(m, t, size) for k, (m, t) in models.items()}
    return compare_latency(runners, size, batch, rounds=rounds, baseline=baseline)


def target(fmt: str, threads: int, batch: int) -> LatencyTarget:
    dtype, cl = FORMATS[fmt]
    return LatencyTarget(threads=threads, batch=batch, dtype=dtype, channels_last=cl).validate()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", type=float, default=0.5, help="the FLOPs budget of part 1")
    p.add_argument("--latency-keep", type=float, default=0.6, help="the latency budget of part 2")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--round-to", type=int, default=16, help="the rounded arms' multiple (AMX tiles: 16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--val-per-class", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "bench" / "runs" / "latency_format"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ekg.checkpoint import load_checkpoint
    from ekg.data import load_data

    root = shared_data_root()
    ckpt = load_checkpoint(root / "pretrained/ekg_tf/res56_cifar10.pkl")
    data = load_data(root / "cifar10/exact-subset", progress=False)
    size = tuple(ckpt.input_size)
    graph = build_graph(ckpt.model, size)
    full_flops = graph.cost(graph.full_widths())[0]
    out = Path(args.out)
    base = dict(val_per_class=args.val_per_class, sub_per_class=0, adapt=False)
    report: dict[str, Any] = {"machine": machine(), "command": " ".join(["python", *sys.argv]),
                              "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args)}

    # 1. the formats
    slims = {"slim": prune(ckpt, data, out=out / "flops", config=SearchConfig(keep=args.keep, **base), resume=True,
                           progress=False).model,
             f"slim, round-to {args.round_to}": prune(
                 ckpt, data, out=out / f"flops-r{args.round_to}",
                 config=SearchConfig(keep=args.keep, round_to=args.round_to, **base), resume=True, progress=False).model}
    part1 = {}
    for b in (1, args.batch):
        models = {}
        for fmt in FORMATS:
            t = target(fmt, args.threads, b)
            models[f"original | {fmt}"] = (ckpt.model, t)
            for k, m in slims.items():
                models[f"{k} | {fmt}"] = (m, t)
        cmp = interleaved(models, size, b, args.rounds, baseline="original | float32")
        rows = {}
        for fmt in FORMATS:
            rows[fmt] = {"original_ms": cmp["models"][f"original | {fmt}"]["median_ms"],
                         "original_vs_float32": cmp["speedup"].get(f"original | {fmt}"),
                         **{k: {"ms": cmp["models"][f"{k} | {fmt}"]["median_ms"], "speedup": _pair(cmp, fmt, k)}
                            for k in slims}}
        part1[b] = {"rows": rows, "flops_ratio": {k: graph.cost(slim_widths(graph, m))[0] / full_flops
                                                  for k, m in slims.items()}}
    report["formats"] = part1

    # 2. a latency budget in each format
    part2 = {}
    for fmt, round_to in (("float32", 1), ("bfloat16, channels-last", 1), ("bfloat16, channels-last", args.round_to)):
        dtype, cl = FORMATS[fmt]
        cfg = SearchConfig(keep=args.latency_keep, budget="latency", latency_threads=args.threads, round_to=round_to,
                           latency_batch=args.batch, latency_dtype=dtype, latency_channels_last=cl, **base)
        name = "latency-" + ("fp32" if dtype == "float32" else "bf16-cl") + (f"-r{round_to}" if round_to > 1 else "")
        arm = fmt + (f", round-to {round_to}" if round_to > 1 else "")
        t0 = time.perf_counter()
        try:
            res = prune(ckpt, data, out=out / name, config=cfg, resume=True, progress=False)
        except EkgError as e:  # out of reach in this format: that is a result too
            part2[arm] = {"refused": str(e), "seconds": time.perf_counter() - t0}
            continue
        saved = json.loads((out / name / "latency.json").read_text())
        part2[arm] = {"model": res.model, "seconds": time.perf_counter() - t0,
                      "flops_ratio": graph.cost(slim_widths(graph, res.model))[0] / full_flops,
                      "predicted_ratio": saved["measured"]["predicted_ratio"],
                      "own_check": saved["measured"]["measured_ratio"], "refits": saved["measured"]["refits"]}
    cross = {}
    landed = {k: v for k, v in part2.items() if "model" in v}
    for fmt in ("float32", "bfloat16, channels-last") if landed else ():  # the landings on each format, interleaved
        t = target(fmt, args.threads, args.batch)
        models = {"original": (ckpt.model, t), **{f"searched in {k}": (v["model"], t) for k, v in landed.items()}}
        cmp = interleaved(models, size, args.batch, args.rounds, baseline="original")
        cross[fmt] = {k: cmp["ratio"][k] for k in models if k != "original"}
    report["latency_budgets"] = {k: {kk: vv for kk, vv in v.items() if kk != "model"} for k, v in part2.items()}
    report["cross"] = cross
    print_report(report, args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


def _pair(cmp: dict[str, Any], fmt: str, slim: str) -> dict[str, Any]:
    """A slim network's speed-up over the original in one format, per round (both in that format)."""
    o = cmp["models"][f"original | {fmt}"]["round_ms"]
    s = cmp["models"][f"{slim} | {fmt}"]["round_ms"]
    return spread([a / b for a, b in zip(o, s)])


def print_report(r: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"{r['machine']}\n{r['date']}; command: {r['command']}\n")
    for b, part in r["formats"].items():
        slims = list(part["flops_ratio"])
        print(f"Part 1, batch {b}: the original and its FLOPs-budget slim networks at keep {args.keep} ("
              + ", ".join(f"{k}: FLOPs ratio {v:.3f}" for k, v in part["flops_ratio"].items())
              + f"), all formats timed interleaved, {args.rounds} rounds\n")
        print("| format | original ms | original vs float32 | " + " | ".join(f"{k}: ms | {k}: speed-up" for k in slims)
              + " |")
        print("|---|---|---|" + "---|---|" * len(slims))
        for fmt, row in part["rows"].items():
            vs = row["original_vs_float32"]
            print(f"| {fmt} | {row['original_ms']:.3g} | {format_speedup(vs) if vs else '1'} | "
                  + " | ".join(f"{row[k]['ms']:.3g} | {format_speedup(row[k]['speedup'])}" for k in slims) + " |")
        print()
    print(f"Part 2: a latency budget at keep {args.latency_keep}, batch {args.batch}, searched in each format\n")
    print("| searched in | FLOPs ratio | predicted latency ratio | its own check | refits | "
          + " | ".join(f"measured on {f}" for f in r["cross"]) + " |")
    print("|---|---|---|---|---|" + "---|" * len(r["cross"]))
    for fmt, row in r["latency_budgets"].items():
        if "refused" in row:
            print(f"| {fmt} | refused before any work: {row['refused']} |" + " |" * (3 + len(r["cross"])))
            continue
        cells = []
        for on, ratios in r["cross"].items():
            x = ratios[f"searched in {fmt}"]
            cells.append(f"{x['median']:.3f} (range {x['min']:.3f}–{x['max']:.3f})")
        print(f"| {fmt} | {row['flops_ratio']:.3f} | {row['predicted_ratio']:.3f} | {row['own_check']:.3f} | "
              f"{row['refits']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())

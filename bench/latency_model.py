"""How well does ekg.latency predict a sub-network's latency, and what do rounded widths buy?

On the release's ResNet-56 architecture (random weights: timing does not depend on them), for the
torch (eager) and onnxruntime runtimes on this CPU: builds the latency table (cached in a scratch
folder), then for random sub-networks with free widths and with widths rounded to 8, and for
uniform cuts, measures the sub-network and the full network **interleaved** (round by round, each
model in turn) and prints the measured ratio beside the predicted one and the FLOPs ratio.

    PYTHONPATH=src python bench/latency_model.py [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile

import torch

from ekg.graph import build_graph
from ekg.latency import LatencyModel, LatencyTarget, _Timer, device_name
from ekg.masks import MaskedNetwork
from ekg.models import create_model
from ekg.slim import slim_model


def cut(net: MaskedNetwork, fracs: list[float], q: int) -> list[float]:
    rates = []
    for gate, f in zip(net.gates, fracs):
        c = gate.channels
        k = max(1, round(c * f)) if q == 1 else max(q, round(c * f / q) * q)
        rates.append(min(k, c) / c)
    return rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--subnets", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {device_name('cpu')}, {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"command: {' '.join(sys.argv)}")
    model = create_model("resnet56", seed=0).eval()
    graph = build_graph(model)
    full_flops = graph.cost(graph.full_widths())[0]
    for runtime in ("torch", "onnxruntime"):
        target = LatencyTarget(runtime=runtime, threads=args.threads)
        timer = _Timer(target.resolved(), min_iters=30)
        for q in (1, 8):
            with tempfile.TemporaryDirectory() as cache:
                lm = LatencyModel(model, graph, target, cache=cache, progress=False, quantum=q)
            net = MaskedNetwork(model, graph)
            gen = torch.Generator().manual_seed(0)
            subnets = [("uniform 0.5", [0.5] * len(net.gates)), ("uniform 0.6", [0.6] * len(net.gates))]
            for i in range(args.subnets):
                subnets.append((f"random {i}", [0.3 + 0.6 * torch.rand(1, generator=gen).item() for _ in net.gates]))
            print(f"\n{runtime}, widths {'free' if q == 1 else 'multiples of 8'}: full {lm.full_ms:.3f} ms, "
                  f"half {lm.half_ms:.3f} ms, scale {lm.scale:.3f}")
            print("| sub-network | FLOPs ratio | predicted latency ratio | measured (median of rounds) | range |")
            print("|---|---|---|---|---|")
            for name, fracs in subnets:
                net.set_rates(cut(net, fracs, q))
                slim = slim_model(model, graph, net.kept_indices()).eval()
                widths = net.widths()
                per_round = []
                for _ in range(args.rounds):  # interleaved: full, then slim, round after round
                    a = timer.time_module(model, (3, 32, 32))
                    b = timer.time_module(slim, (3, 32, 32))
                    per_round.append(b / a)
                med = statistics.median(per_round)
                print(f"| {name} | {graph.cost(widths)[0] / full_flops:.3f} | {lm.ratio(widths):.3f} | {med:.3f} | "
                      f"{min(per_round):.3f}–{max(per_round):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does Torch-Pruning's dependency graph group our CIFAR ResNets correctly?

Why `ekg.graph` exists instead of Torch-Pruning: this script checks Torch-Pruning on the two
shortcut families. It is not a dependency; install it only to run this
(`pip install --no-deps torch-pruning`).

For each model it builds Torch-Pruning's ``DependencyGraph``, takes the group of the first
block's last conv (a stage-1 stream producer) and of a block-internal conv, and compares them with
``ekg.graph``'s groups. Then it prunes one channel of the stage-1 stream through Torch-Pruning and
tests whether the pruned model still computes the masked original (channel zeroed): for a
zero-padding shortcut the stream channel c of stage 1 reappears as channel c + pad of stage 2,
which a plain channel-index coupling cannot express.

    pip install --no-deps torch-pruning && python bench/torch_pruning_check.py
"""

from __future__ import annotations

import copy
import sys

import torch

from ekg.graph import build_graph
from ekg.models import create_model


def tp_group_convs(tp, model: torch.nn.Module, conv: torch.nn.Module) -> list[str]:
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])
    names = {m: n for n, m in model.named_modules()}
    return sorted({names[dep.target.module] for dep, _ in group if dep.target.module in names
                   and isinstance(dep.target.module, torch.nn.Conv2d)})


def masked_reference(model: torch.nn.Module, producers: list[str], channel: int, x: torch.Tensor) -> torch.Tensor:
    """The original with ``channel`` of the given stream zeroed at every producer (conv + its BN)."""
    ref = copy.deepcopy(model).eval()
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name in producers:
            bn = mods[name.replace("conv", "bn")]
            bn.weight[channel] = 0
            bn.bias[channel] = 0
    return ref(x)


def main() -> int:
    try:
        import torch_pruning as tp
    except ImportError:
        print("torch_pruning is not installed: pip install --no-deps torch-pruning", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    for arch in ("resnet20", "resnet20_a"):
        model = create_model(arch, seed=0).eval()
        with torch.no_grad():  # random BN statistics so that a wrong channel shows in the output
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
                    m.bias.uniform_(-0.5, 0.5)
        graph = build_graph(model)

        stream = next(g for g in graph.groups if "layer1.0.conv2" in g.producers)
        print(f"== {arch}")
        print(f"ekg.graph: stage-1 stream producers {sorted(stream.producers)}; prunable={stream.prunable}"
              + (f" ({stream.reason})" if stream.reason else ""))
        tp_convs = tp_group_convs(tp, model, model.layer1[0].conv2)
        print(f"torch_pruning: group of layer1.0.conv2 out-channels touches convs {tp_convs}")
        inner = tp_group_convs(tp, model, model.layer1[0].conv1)
        print(f"torch_pruning: group of layer1.0.conv1 out-channels touches convs {inner}")
        # prune stream channel 3 through torch_pruning and compare with the masked original
        pruned = copy.deepcopy(model)
        dg = tp.DependencyGraph().build_dependency(pruned, example_inputs=x[:1])
        group = dg.get_pruning_group(pruned.layer1[0].conv2, tp.prune_conv_out_channels, idxs=[3])
        group.prune()
        try:
            with torch.no_grad():
                out = pruned(x)
            ref = masked_reference(model, sorted(stream.producers), 3, x)
            diff = float((out - ref).abs().max())
            print(f"torch_pruning prune of stream channel 3: runs; max |pruned - masked original| = {diff:.3g}"
                  + ("  (WRONG: not the masked network)" if diff > 1e-4 else "  (equal)"))
        except Exception as e:  # noqa: BLE001 - the point is to report what happens
            print(f"torch_pruning prune of stream channel 3: the pruned model fails: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

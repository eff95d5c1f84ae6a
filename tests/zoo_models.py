"""The zoo models of issue 14, one list for ``tests/test_zoo.py`` and ``bench/zoo.py``.

:data:`TORCHVISION` is every classification model of ``torchvision.models.list_models(module=
torchvision.models)`` (torchvision 0.29.1: 80; a test checks the list against the installed
torchvision), :data:`TIMM` 20 timm models of the families issue 14 names (ResNet-D,
EfficientNet/-Lite, MobileNet-V3, GhostNet, RepVGG, CSP, ReXNet, RegNet, ConvNeXt, and a few
more). :data:`ZOO` is both, as ``torchvision:NAME`` / ``timm:NAME`` (ekg's zoo factory names).

Every model is built with random weights and 10 classes, and runs at 32×32 (CIFAR) unless
:data:`INPUT_SIZE` gives the smallest square size it accepts: AlexNet pools 32×32 to nothing
(63 is its smallest), Inception-v3's stem needs 75, ViT asserts its 224×224 and MaxViT's
7×7 windows after a stride of 32 need a multiple of 224. (Swin runs at 32.)

:data:`REFUSED` is the models ekg refuses up front today (before any work), each with a few
words its one-line reason must contain; every other model of :data:`ZOO` is pruned. When ekg
learns to prune one of them (grouped convs, ConvNeXt's LayerNorm), its zoo test fails and says
to move it out of :data:`REFUSED`.

Importable without torchvision and timm (the names are plain strings); :func:`build` needs them.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10

TORCHVISION = [
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny", "densenet121", "densenet161",
    "densenet169", "densenet201", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l",
    "efficientnet_v2_m", "efficientnet_v2_s", "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5",
    "mnasnet0_75", "mnasnet1_0", "mnasnet1_3", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
    "regnet_x_16gf", "regnet_x_1_6gf", "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf",
    "regnet_x_8gf", "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf",
    "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf", "resnet101", "resnet152", "resnet18", "resnet34",
    "resnet50", "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d", "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "squeezenet1_0", "squeezenet1_1", "swin_b",
    "swin_s", "swin_t", "swin_v2_b", "swin_v2_s", "swin_v2_t", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16",
    "vgg16_bn", "vgg19", "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32",
    "wide_resnet101_2", "wide_resnet50_2",
]

TIMM = [
    "resnet18d", "resnet50d",                                   # ResNet-D
    "efficientnet_b0", "efficientnet_lite0", "tf_efficientnetv2_b0",  # EfficientNet, -Lite, -V2 (TF "SAME" padding)
    "mobilenetv3_large_100", "mobilenetv3_small_050",           # MobileNet-V3
    "ghostnet_100",                                             # GhostNet
    "repvgg_a0",                                                # RepVGG
    "cspresnet50", "cspdarknet53",                              # CSP
    "rexnet_100",                                               # ReXNet
    "regnetx_002", "regnety_002",                               # RegNet
    "convnext_atto",                                            # ConvNeXt
    "resnext26ts", "seresnext26d_32x4d",                        # ResNeXt (grouped convs)
    "mnasnet_100", "lcnet_050", "dla34",                        # MNASNet, LCNet, DLA
]

ZOO = [f"torchvision:{n}" for n in TORCHVISION] + [f"timm:{n}" for n in TIMM]

# the smallest square input each model runs at, where 32×32 does not work
INPUT_SIZE = {"torchvision:alexnet": 63, "torchvision:inception_v3": 75, "torchvision:maxvit_t": 224,
              **{f"torchvision:{n}": 224 for n in TORCHVISION if n.startswith("vit_")}}

# the arguments a model is built with, where not the defaults: GoogLeNet and Inception-v3 without
# their auxiliary heads, as torchvision builds them for its pretrained weights (with the heads, ekg
# refuses them up front: they run in training only; test_zoo checks that refusal)
KWARGS = {"torchvision:googlenet": {"aux_logits": False}, "torchvision:inception_v3": {"aux_logits": False}}

_NO_GROUP = "has no prunable channel group"
_FLOOR = "cannot reach `keep` 0.5"
# refused up front at keep 0.5 today (ConvNeXt and the grouped-conv RegNets prune since the
# channels-last LayerNorm and grouped-conv rules): words their reason contains
REFUSED = {
    **{f"torchvision:{n}": _NO_GROUP for n in TORCHVISION if n.startswith(("swin_", "vit_"))},
    "torchvision:maxvit_t": _FLOOR,
}


# the few whose zoo test takes more than ~15 s on 2 CPU cores (ViT-H/14: 632 M parameters, 167 GFLOPs
# per 224×224 image; RegNetY-128GF: 645 M parameters): marked slow, still run by CI
SLOW = {"torchvision:vit_h_14", "torchvision:regnet_y_128gf"}


def input_size(name: str) -> tuple[int, int, int]:
    s = INPUT_SIZE.get(name, 32)
    return (3, s, s)


def build(name: str, *, seed: int = 0, randomised: bool = True) -> nn.Module:
    """Zoo model ``name`` (``torchvision:NAME`` or ``timm:NAME``) with 10 classes and random weights
    (``torch.manual_seed(seed)``), tagged with its factory (:func:`ekg.arch.zoo_model`), in eval
    mode. ``randomised``: random BN biases and running statistics and random layer scales too (as
    ``test_zoo.randomise``), so that a wrong channel shows in the output; the running variances lie
    in [1, 2] (``randomise``'s [0.5, 1.5] let tf_efficientnetv2_b0's logits grow to ~3e4, where
    float32 rounding alone parts slim and masked by 1.7e-4 of the scale: float64 agrees to 1e-12)."""
    from ekg.arch import zoo_model

    zoo, _, arch = name.partition(":")
    torch.manual_seed(seed)
    model = zoo_model(zoo + ":", arch, num_classes=NUM_CLASSES, **KWARGS.get(name, {}))
    if randomised:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                    m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 1.0)
                    if m.bias is not None:
                        m.bias.copy_(torch.rand(m.num_features, generator=gen) * 0.5)
            for pname, p in model.named_parameters():
                if pname.rpartition(".")[2] in ("gamma", "layer_scale"):
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model.eval()


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The layers writing the class scores (the final classifier, and auxiliary heads' own): every
    Linear with 10 outputs and every conv with 10 output channels (SqueezeNet's classifier conv)."""
    return [m for m in model.modules()
            if (isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES)
            or (isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES)]

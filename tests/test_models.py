"""Models and FLOPs: the counter against hand counts, and the architectural variants."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from ekg import flops, models
from ekg.errors import EkgError
from ekg.models import Conv2dSame, ResNetSpec, ZeroPadShortcut, build_model, create_model


def hand_count(spec: ResNetSpec, hw: int = 32) -> tuple[int, int]:
    """FLOPs (MACs of conv+linear) and params of a CIFAR ResNet, written out by hand."""
    w = spec.stage_widths
    fl = hw * hw * w[0] * 3 * 9                       # stem conv
    pa = w[0] * 3 * 9 + 2 * w[0]                      # stem conv + BN
    cin, size = w[0], hw
    for s in range(3):
        for j, mid in enumerate(spec.block_widths[s]):
            stride = 2 if (s > 0 and j == 0) else 1
            size_out = size // stride
            fl += size_out * size_out * mid * cin * 9 + size_out * size_out * w[s] * mid * 9
            pa += mid * cin * 9 + 2 * mid + w[s] * mid * 9 + 2 * w[s]
            if spec.shortcut == "B" and (stride != 1 or cin != w[s]):
                fl += size_out * size_out * w[s] * cin
                pa += w[s] * cin + 2 * w[s]
            cin, size = w[s], size_out
    fl += w[2] * spec.num_classes
    pa += w[2] * spec.num_classes + spec.num_classes
    return fl, pa


@pytest.mark.parametrize("name", models.model_names())
def test_flops_and_params_equal_hand_counts(name):
    for classes in (10, 100):
        model = create_model(name, classes)
        c = flops.count(model)
        assert (c.flops, c.params) == hand_count(model.spec)


def test_resnet56_published_numbers():
    c = flops.count(create_model("resnet56"))
    assert c.flops == 125_747_840  # "about 125.75 M" with projection shortcuts
    assert round(c.params / 1e6, 2) == 0.86
    c_a = flops.count(create_model("resnet56_a"))
    assert c_a.flops == 125_485_696  # option A has no 1x1 shortcut convs


def test_flops_for_random_pruned_widths():
    rng = random.Random(0)
    for shortcut in ("A", "B"):
        for _ in range(5):
            stages = sorted(rng.randint(1, 64) for _ in range(3)) if shortcut == "A" else [rng.randint(1, 64) for _ in range(3)]
            blocks = [[rng.randint(1, 64) for _ in range(3)] for _ in range(3)]
            spec = ResNetSpec(depth=20, shortcut=shortcut, stage_widths=stages, block_widths=blocks)
            model = build_model(spec)
            c = flops.count(model)
            assert (c.flops, c.params) == hand_count(spec)
            assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bn_ops_option_adds_two_per_bn_output():
    model = create_model("resnet20")
    base, with_bn = flops.count(model), flops.count(model, bn_ops=True)
    bn_elems = 32 * 32 * 16 * (1 + 2 * 3) + 16 * 16 * 32 * (2 * 3 + 1) + 8 * 8 * 64 * (2 * 3 + 1)
    assert with_bn.flops - base.flops == 2 * bn_elems


def test_tf_same_padding_pads_bottom_right_only():
    conv = Conv2dSame(4, 5, 3, stride=2, bias=False)
    x = torch.randn(2, 4, 32, 32)
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    assert torch.equal(conv(x), ref)
    assert conv(x).shape[-2:] == (16, 16)
    # the tf variant uses it only where TF and PyTorch padding differ: the strided 3x3 convs
    model = create_model("resnet56_tf")
    same = [n for n, m in model.named_modules() if isinstance(m, Conv2dSame)]
    assert same == ["layer2.0.conv1", "layer3.0.conv1"]


def test_zero_pad_shortcut():
    sc = ZeroPadShortcut(16, 32, 2)
    x = torch.randn(2, 16, 8, 8)
    y = sc(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0
    with pytest.raises(EkgError):
        ZeroPadShortcut(32, 16, 2)


def test_state_dict_names_follow_the_common_family():
    keys = set(create_model("resnet20_a").state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer3.2.conv2.weight", "linear.bias"} <= keys
    assert not any("shortcut" in k for k in keys)  # option A has no shortcut parameters
    keys_b = set(create_model("resnet20").state_dict())
    assert {"layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.running_var"} <= keys_b


@pytest.mark.parametrize("bad", [dict(depth=21), dict(depth=20, shortcut="C"), dict(depth=20, padding="same"),
                                 dict(depth=20, stage_widths=[16, 0, 64]), dict(depth=20, block_widths=[[16]])])
def test_bad_specs_are_clear_errors(bad):
    with pytest.raises(EkgError):
        ResNetSpec(**bad)


def test_unknown_model_name_lists_choices():
    with pytest.raises(EkgError, match="resnet56_tf"):
        create_model("resnet57")


def test_seeded_creation_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = create_model("resnet20", seed=7), create_model("resnet20", seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

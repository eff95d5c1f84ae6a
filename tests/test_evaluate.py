"""BN recalibration (used to compare pruned sub-networks before fine-tuning)."""

from __future__ import annotations

import torch
from torch import nn

from ekg.data import ImageSet, get_normalization, iterate_batches
from ekg.evaluate import recalibrate_bn


def _data(n: int = 48) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)])


def test_recalibrate_bn_is_the_mean_of_the_batch_statistics() -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)
    model = nn.Sequential(conv, bn, nn.ReLU())
    bn.running_mean.fill_(7.0)
    bn.running_var.fill_(9.0)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    data, norm = _data(), get_normalization("cifar10")
    model.eval()
    assert recalibrate_bn(model, data, norm, batch_size=16) == 1
    means, vars_ = [], []
    with torch.no_grad():
        for x, _ in iterate_batches(data, 16, normalization=norm):
            y = conv(x)
            means.append(y.mean((0, 2, 3)))
            vars_.append(y.var((0, 2, 3), unbiased=True))
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, torch.stack(vars_).mean(0), rtol=1e-4)
    # weights untouched, mode and momentum restored
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert not model.training and bn.momentum == 0.1


def test_recalibrate_bn_without_bn_is_a_no_op() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    before = model[0].weight.clone()
    assert recalibrate_bn(model, _data(), get_normalization("cifar10")) == 0
    assert torch.equal(model[0].weight, before)

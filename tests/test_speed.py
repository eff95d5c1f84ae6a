"""Speed options of the training loop: --accum, --compile, --channels-last, --amp bf16."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekg import train as train_mod
from ekg.cli import main
from ekg.errors import EkgError
from ekg.models import create_model
from ekg.train import TrainConfig, _loss, _micro_batches, train

pytestmark = pytest.mark.slow


def bn_free(arch: str = "resnet20_a", num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A CIFAR ResNet with every BatchNorm replaced by the identity: no batch statistics, so a
    micro-batch's gradient does not depend on the rest of its batch."""
    model = create_model(arch, num_classes, seed=seed)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.BatchNorm2d):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
    return model


def cfg(**kw) -> TrainConfig:
    base = dict(arch="resnet20_a", epochs=1, batch_size=128, lr=0.05, limit_train=128, limit_test=64, device="cpu",
                seed=1, amp="off", weight_decay=5e-4)
    return TrainConfig(**{**base, **kw})


def last_model(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def test_accum_4_of_32_gives_the_gradient_of_the_batch_of_128():
    model = bn_free()
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    model.zero_grad()
    _loss(model, x, y, None, cfg())[0].backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    parts = list(_micro_batches(x, y, None, 4))
    assert [len(ym) for _, ym, _ in parts] == [32] * 4
    for xm, ym, tm in parts:
        (_loss(model, xm, ym, tm, cfg())[0] * (len(ym) / len(y))).backward()
    for a, p in zip(full, model.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-6)
    # with BN on batch statistics the micro-batches normalise with their own statistics
    bn = create_model("resnet20_a", 10, seed=0).train()
    bn.zero_grad()
    _loss(bn, x, y, None, cfg())[0].backward()
    full_bn = [p.grad.clone() for p in bn.parameters()]
    bn.zero_grad()
    for xm, ym, tm in _micro_batches(x, y, None, 4):
        (_loss(bn, xm, ym, tm, cfg())[0] * 0.25).backward()
    assert not all(torch.allclose(a, p.grad, rtol=1e-4, atol=1e-6) for a, p in zip(full_bn, bn.parameters()))


def test_one_training_step_with_accum_equals_the_large_batch(tmp_path, exact, monkeypatch):
    monkeypatch.setattr(train_mod, "create_model", lambda arch, n, seed: bn_free(arch, n, seed))
    train(cfg(), exact, tmp_path / "big", progress=False)
    train(cfg(accum=4), exact, tmp_path / "accum", progress=False)
    a, b = last_model(tmp_path / "big"), last_model(tmp_path / "accum")
    init = bn_free(seed=1).state_dict()
    for k in a:
        moved = (a[k] - init[k]).abs().max()
        assert moved > 1e-3, k  # the step moved every weight
        assert (a[k] - b[k]).abs().max() <= 1e-4 * moved, k  # and both moved them alike, up to float rounding


def test_accum_must_divide_the_batch(tmp_path, cifar10_exact, capsys):
    with pytest.raises(EkgError, match="not divisible by `accum` 3"):
        cfg(accum=3).validate()
    code = main(["train", "--arch", "resnet20_a", "--data", str(cifar10_exact), "--out", str(tmp_path / "r"),
                 "--batch-size", "100", "--accum", "3", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "not divisible by --accum 3" in err and "Traceback" not in err


def test_channels_last_computes_the_same_step(tmp_path, exact):
    train(cfg(), exact, tmp_path / "plain", progress=False)
    train(cfg(channels_last=True), exact, tmp_path / "nhwc", progress=False)
    a, b = last_model(tmp_path / "plain"), last_model(tmp_path / "nhwc")
    nhwc = torch.channels_last
    assert b["conv1.weight"].is_contiguous(memory_format=nhwc) and not a["conv1.weight"].is_contiguous(memory_format=nhwc)
    init = create_model("resnet20_a", 10, seed=1).state_dict()
    for k in a:
        moved = (a[k] - init[k]).abs().max().float()
        # the same step up to float rounding, which a freshly initialised BN network amplifies
        # (in float64 the two gradients agree to 1e-13)
        assert (a[k] - b[k]).abs().max() <= 0.02 * moved + 1e-6, k


def test_compile_saves_the_plain_state_dict_and_resume_ignores_how_it_runs(tmp_path, exact, monkeypatch):
    compiled = []

    def eager_compile(model):  # the inductor backend needs minutes on 2 CPU cores; dynamo alone is enough here
        compiled.append(model)
        return torch.compile(model, backend="eager")

    monkeypatch.setattr(train_mod, "_compile", eager_compile)
    run = tmp_path / "run"
    path = train(cfg(compile=True, channels_last=True, amp="bf16"), exact, run, progress=False)
    assert compiled
    keys = set(create_model("resnet20_a", 10).state_dict())
    assert set(last_model(run)) == keys
    from ekg.checkpoint import load_checkpoint

    assert set(load_checkpoint(path).model.state_dict()) == keys
    # accum, compile, channels_last and amp say how a run executes: a resume may change them
    train(cfg(epochs=2, accum=2), exact, run, resume=True, progress=False)
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2
    with pytest.raises(EkgError, match="batch_size"):
        train(cfg(epochs=3, batch_size=64), exact, run, resume=True, progress=False)

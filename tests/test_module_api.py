"""The Python API on a user's own ``nn.Module``: ``prune()`` takes the module, returns the slim
module, and writes checkpoints that reload from their architecture record (with the user's
factory passed explicitly: ekg never imports code named in a file). Models that cannot be pruned
are refused with one clear error. No torchvision needed (tests/test_vision.py covers its models)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ekg import flops
from ekg.arch import ArchRecord, record_for, reshape
from ekg.checkpoint import load_checkpoint
from ekg.data import DataSplits
from ekg.errors import CheckpointError, EkgError
from ekg.pruning import prune
from ekg.search import SearchConfig

from conftest import random_splits


class TinyMobile(nn.Module):
    """Stem, an inverted residual (expansion, depthwise, projection + skip), flatten of a 4x4 map,
    a hidden linear layer: every kind of group the graph knows."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem, self.bs = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width)
        self.expand, self.be = nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width)
        self.dw, self.bd = nn.Conv2d(4 * width, 4 * width, 3, padding=1, groups=4 * width, bias=False), nn.BatchNorm2d(4 * width)
        self.project, self.bp = nn.Conv2d(4 * width, width, 1, bias=False), nn.BatchNorm2d(width)
        self.head = nn.Conv2d(width, 12, 3, stride=2, padding=1)
        self.fc1, self.fc2 = nn.Linear(12 * 4 * 4, 16), nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bs(self.stem(x)))
        y = F.relu6(self.be(self.expand(x)))
        y = F.relu6(self.bd(self.dw(y)))
        x = x + self.bp(self.project(y))
        x = F.relu(self.head(x))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class Opaque(nn.Module):
    """No group can be pruned: a conv with a channel multiplier, and a concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.c3 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(24 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = F.relu(self.c2(F.relu(self.c1(x))))
        c = F.relu(self.c3(x))
        return self.fc(torch.cat([b, c], 1).flatten(1))


def random_data(size: int = 16, per_class: int = 2) -> DataSplits:
    return random_splits("imagefolder", size, per_class)


CFG = SearchConfig(adapt=False, val_per_class=1, sub_per_class=1, batch_size=10)


def test_prune_a_user_module_and_reload_it_with_its_factory(tmp_path):
    torch.manual_seed(0)
    model = TinyMobile()
    data = random_data()
    # keep 0.5: with batch-statistics BN in the search (the method) this budget prunes the
    # depthwise-coupled group too, so its slimming is checked below
    res = prune(model, data, 0.5, out=tmp_path / "run", config=CFG, progress=False)
    slim = res.model
    assert isinstance(slim, TinyMobile) and slim is not model
    size = (3, 16, 16)
    full = flops.count(model, size).flops
    assert flops.count(slim, size).flops == res.flops <= 0.5 * full
    assert slim.dw.groups == slim.dw.in_channels == slim.dw.out_channels == slim.expand.out_channels < 32
    assert res.checkpoint.normalization["name"] == "imagenet" and res.checkpoint.input_size == size
    assert res.checkpoint.arch.endswith("TinyMobile (pruned)")
    path = tmp_path / "run" / "pruned.pt"
    with pytest.raises(CheckpointError, match="factory="):
        load_checkpoint(path)  # the file names a class; ekg will not import it
    back = load_checkpoint(path, factory=TinyMobile)
    x = torch.randn(3, *size)
    with torch.no_grad():
        assert torch.equal(back.model.eval()(x), slim.eval()(x))
    assert back.num_classes == 10 and back.record.pruned


def test_a_model_with_no_prunable_group_is_refused_before_any_work(tmp_path):
    with pytest.raises(EkgError) as err:
        prune(Opaque(), random_data(), 0.5, out=tmp_path / "run", config=CFG, progress=False)
    message = str(err.value)
    assert "no prunable channel group" in message and "\n" not in message
    assert "conv 'c2' has a channel multiplier" in message and "cat() in the forward of Opaque" in message
    assert not (tmp_path / "run").exists()


def test_module_api_arguments_are_checked(tmp_path):
    with pytest.raises(EkgError, match="input_size"):
        prune(TinyMobile(), random_data(), 0.5, out=tmp_path / "a", config=CFG, progress=False, input_size=(3, 7))
    with pytest.raises(EkgError, match="classes"):
        prune(TinyMobile(num_classes=4), random_data(), 0.5, out=tmp_path / "b", config=CFG, progress=False)
    with pytest.raises(EkgError, match=r"TinyMobile cannot run on \(3, 20, 20\) inputs: .* fails"):
        prune(TinyMobile(), random_data(size=20), 0.5, out=tmp_path / "c", config=CFG, progress=False)
    with pytest.raises(EkgError, match="cannot be recorded"):
        record_for(TinyMobile(), 10, factory="mypkg.nets:tiny", kwargs={"widths": [1, 2]})


def test_reshape_refuses_a_record_that_does_not_fit():
    record = record_for(TinyMobile(width=4), 10, factory="mypkg.nets:tiny")
    assert ArchRecord.from_dict(record.to_dict()) == record
    with pytest.raises(CheckpointError, match="'dw'"):
        reshape(TinyMobile(), {"dw": {"type": "linear", "in": 4, "out": 4}})
    with pytest.raises(CheckpointError, match="do not fit"):
        reshape(TinyMobile(), {"dw": {"type": "conv", "in": 6, "out": 6, "groups": 4}})


def test_a_pruned_user_module_fine_tunes_and_keeps_its_record(tmp_path):
    from ekg.train import finetune_config, train

    torch.manual_seed(0)
    data = random_data()
    res = prune(TinyMobile(), data, 0.6, out=tmp_path / "run", config=CFG, progress=False)
    cfg = finetune_config("none", epochs=1, batch_size=10, device="cpu")
    path = train(cfg, data, tmp_path / "ft", init=res.checkpoint, progress=False)
    tuned = load_checkpoint(path, factory=TinyMobile)
    assert tuned.input_size == (3, 16, 16) and tuned.record.pruned
    assert {k: v.shape for k, v in tuned.model.state_dict().items()} == \
        {k: v.shape for k, v in res.model.state_dict().items()}
    assert not torch.equal(tuned.model.fc2.weight, res.model.fc2.weight)  # it trained
    assert tuned.meta["trained_by"] == "ekg finetune"

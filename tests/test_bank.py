"""The memory bank: teacher selection from a search history, and the fp16 memory-mapped store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ekg.bank import build_bank, open_bank, select_teachers
from ekg.data import ImageSet, get_normalization, iterate_batches
from ekg.errors import EkgError
from ekg.evaluate import batch_statistics_bn
from ekg.masks import MaskedNetwork
from ekg.models import create_model


def test_select_teachers_spread_evenly_in_loss() -> None:
    # targets 0.10, 0.26, 0.42, 0.58, 0.74 -> nearest untaken: 0.10, 0.30, 0.45, 0.50, 0.70
    assert select_teachers([0.10, 0.50, 0.30, 0.12, 0.90, 0.45, 0.70], 5) == [0, 2, 5, 1, 6]


def test_select_teachers_skips_taken_entries() -> None:
    # targets 0, .2, .4, .6, .8: .6's nearest (.5) is taken by .4 -> .9; .8's nearest (.9) taken -> 1.0
    assert select_teachers([0.0, 0.01, 0.02, 1.0, 0.9, 0.5], 5) == [0, 2, 5, 4, 3]


def test_select_teachers_small_histories_and_ties() -> None:
    assert select_teachers([0.3, 0.1, 0.2], 5) == [1, 2, 0]  # all, by loss
    assert select_teachers([0.5, 0.5, 0.1, 0.9, 0.7, 0.2], 2) == [2, 0]  # target .5: tie -> earlier entry
    with pytest.raises(EkgError, match="history"):
        select_teachers([], 5)


def _setup(n: int = 40):
    torch.manual_seed(0)
    model = create_model("resnet20", seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    data = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)])
    net = MaskedNetwork(model)
    history = []
    for k, loss in enumerate([0.2, 0.9, 0.5, 0.35, 1.3]):  # the last one is the final sub-network
        masks = []
        for gate in net.gates:
            m = torch.ones(gate.channels, dtype=torch.bool)
            m[: k * gate.channels // 8] = False
            masks.append(m)
        history.append({"step": k, "masks": masks, "loss": loss, "accuracy": 50.0})
    return net, data, history


def test_bank_round_trip_memory_mapped(tmp_path) -> None:
    net, data, history = _setup()
    norm = get_normalization("cifar10")
    bank = build_bank(net, history, data, norm, tmp_path / "bank", teachers=3, batch_size=16, progress=False)
    assert isinstance(bank.logits, np.memmap) and bank.logits.dtype == np.float16
    assert bank.logits.shape == (40, 10, 3)
    info = json.loads((tmp_path / "bank" / "bank.json").read_text())
    # losses of the non-final entries 0.2, 0.9, 0.5, 0.35: targets 0.2, 0.433, 0.667 -> 0.2, 0.5 (.067) , 0.9 (.233)
    assert [t["history_index"] for t in info["teachers"]] == [0, 2, 1]
    assert not (tmp_path / "bank" / "logits.partial.npy").exists()
    # the stored logits are the teachers' own, image by image (BN on batch statistics, batches of 16)
    for t, h in enumerate([0, 2, 1]):
        for gm, m in zip(net.masks, history[h]["masks"]):
            gm.set(m)
        with batch_statistics_bn(net.model), torch.no_grad():
            want = torch.cat([net(x) for x, _ in iterate_batches(data, 16, normalization=norm)])
        got = torch.from_numpy(np.asarray(bank.logits[:, :, t], dtype=np.float32))
        assert torch.allclose(got, want.half().float(), atol=0, rtol=0)
    # reading a batch: rows by index, as (B, T, classes) float32
    idx = torch.tensor([7, 3, 39])
    rows = bank.batch(idx)
    assert rows.shape == (3, 3, 10) and rows.dtype == torch.float32
    assert torch.equal(rows[1, 2], torch.from_numpy(bank.logits[3, :, 2].astype(np.float32)))
    # reopening reads the same bank; another dataset is refused
    again = open_bank(tmp_path)  # a run directory holding bank/
    assert np.array_equal(np.asarray(again.logits), np.asarray(bank.logits))
    other = ImageSet(data.images[:30], data.labels[:30], data.classes)
    with pytest.raises(EkgError, match="another training set"):
        again.check_data(other)


def test_bank_build_resumes_after_an_interrupt(tmp_path, monkeypatch) -> None:
    net, data, history = _setup(24)
    norm = get_normalization("cifar10")
    full = build_bank(net, history, data, norm, tmp_path / "a", teachers=3, batch_size=8, progress=False)
    calls = {"n": 0}
    real = net.forward

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 5:  # during the second teacher
            raise KeyboardInterrupt
        return real(x)

    monkeypatch.setattr(net, "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_bank(net, history, data, norm, tmp_path / "b", teachers=3, batch_size=8, progress=False)
    assert not (tmp_path / "b" / "logits.npy").exists()
    assert json.loads((tmp_path / "b" / "progress.json").read_text())["done"] == [0]
    monkeypatch.setattr(net, "forward", real)
    resumed = build_bank(net, history, data, norm, tmp_path / "b", teachers=3, batch_size=8, progress=False)
    assert np.array_equal(np.asarray(resumed.logits), np.asarray(full.logits))


def test_open_bank_errors(tmp_path) -> None:
    with pytest.raises(EkgError, match="no memory bank"):
        open_bank(tmp_path)

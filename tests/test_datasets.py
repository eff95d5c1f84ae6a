"""A user's own data and model through the front door: ``ekg.prune`` → ``ekg.finetune`` →
evaluation on a ``(train, test)`` pair of torch Datasets (or DataLoaders), for every form the
Dataset seam takes (uint8 tensors, float tensors already normalised, PIL images, 1-channel images,
a non-square size, DataLoaders), on real CIFAR-10 images recast into each form; the search-set
carve of a small dataset (the largest balanced one, said in one line) and its refusal; the budget
stated once; and the built-in CIFAR path pinned to the decisions it took before the data and
search code moved into packages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import ekg
from ekg.data import get_normalization
from ekg.errors import DataError, EkgError
from ekg.evaluate import evaluate
from ekg.rundir import RunDir, TrainDir

from conftest import search_log

pytestmark = pytest.mark.usefixtures("one_thread")

PER_CLASS_TRAIN, PER_CLASS_TEST = 24, 8  # real CIFAR-10 images per class


class SmallCNN(nn.Module):
    """A user's CNN for any channel count and image size (global pooling before the classifier)."""

    def __init__(self, channels: int = 3, num_classes: int = 10, width: int = 12) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width)
        self.c3, self.b3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        x = F.relu(self.b3(self.c3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Items(torch.utils.data.Dataset):
    """A plain map-style Dataset over a list of (image, label) pairs, with torchvision-style ``classes``."""

    def __init__(self, items: list, classes: list[str] | None = None) -> None:
        self.items = items
        if classes is not None:
            self.classes = classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _real_images(exact, split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    part = getattr(exact, split)
    idx = np.concatenate([np.where(part.labels.numpy() == c)[0][:per_class] for c in range(10)])
    return part.images[idx], part.labels[idx]


CIFAR_MEAN, CIFAR_STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)


def _form(exact, form: str):
    """``(train, test, channels, normalization)`` of the real images in one data form."""
    out = []
    for split, per in (("train", PER_CLASS_TRAIN), ("test", PER_CLASS_TEST)):
        x, y = _real_images(exact, split, per)
        labels = [int(v) for v in y]
        if form == "uint8":
            items = [(img, lab) for img, lab in zip(x, labels)]
        elif form == "float-normalised":
            mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
            items = [((img.float() - mean) / std, torch.tensor(lab)) for img, lab in zip(x, labels)]
        elif form == "pil":
            items = [(Image.fromarray(img.permute(1, 2, 0).numpy()), lab) for img, lab in zip(x, labels)]
        elif form == "gray":  # 1-channel uint8, as PIL "L" would give
            gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).round().to(torch.uint8)
            items = [(img[None], lab) for img, lab in zip(gray, labels)]
        elif form == "non-square":  # 24x32: the middle rows
            items = [(img[:, 4:28, :].contiguous(), lab) for img, lab in zip(x, labels)]
        elif form == "loaders":
            items = [(img, lab) for img, lab in zip(x, labels)]
        else:
            raise AssertionError(form)
        ds = Items(items, classes=list(exact.train.classes))
        out.append(torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True) if form == "loaders" else ds)
    channels = 1 if form == "gray" else 3
    normalization = None if form == "float-normalised" else \
        ((127.0,), (64.0,)) if form == "gray" else (CIFAR_MEAN, CIFAR_STD)
    return out[0], out[1], channels, normalization


FORMS = ["uint8", "float-normalised", "pil", "gray", "non-square", "loaders"]


@pytest.mark.parametrize("form", FORMS)
def test_prune_finetune_and_evaluate_a_user_cnn_on_each_data_form(form, exact, tmp_path, capsys):
    train, test, channels, norm = _form(exact, form)
    torch.manual_seed(0)
    model = SmallCNN(channels)
    cfg = ekg.SearchConfig(val_per_class=4, sub_per_class=16, batch_size=64)
    res = ekg.prune(model, (train, test), keep=0.6, out=tmp_path / "run", config=cfg, normalization=norm,
                    progress=False)
    n_train, n_test = 10 * PER_CLASS_TRAIN, 10 * PER_CLASS_TEST
    assert res.flops_ratio <= 0.6 and res.slim_max_diff < 1e-4
    assert res.checkpoint.input_size[0] == channels
    expected_hw = (24, 32) if form == "non-square" else (32, 32)
    assert tuple(res.checkpoint.input_size[1:]) == expected_hw
    record = json.loads(RunDir(res.run_dir).config.read_text())
    assert record["data_fingerprint"]["n_images"] == n_train
    assert record["normalization"]["name"] == ("none" if norm is None else "custom")
    # the search ran on the carve of this dataset: 4 per class of D_val
    assert all(round(row["val_accuracy"] * 40 / 100, 6).is_integer() for row in search_log(res.run_dir))

    tuned = ekg.finetune(res.model, (train, test), bank=res, config=_one_epoch(), normalization=None,
                         progress=False)
    err = capsys.readouterr().err
    jitter_off = form in ("float-normalised", "gray")
    assert ("colour jitter needs 3-channel uint8" in err) == jitter_off
    saved = json.loads(TrainDir(tuned.run_dir).config.read_text())
    assert saved["augment"]["jitter"] is not jitter_off and saved["kd"] == "ensemble"
    bank = json.loads((res.run_dir / "bank" / "bank.json").read_text())
    assert bank["data"]["n_images"] == n_train  # one row per training image, in dataset order
    # evaluation of the returned model on the user's test set gives the run's own number
    splits = ekg.data.as_splits((train, test), progress=False)
    assert len(splits.test) == n_test and splits.train.image_size == (channels, *expected_hw)
    got = evaluate(tuned.model, splits.test, get_normalization(tuned.checkpoint.normalization))
    assert got["n_images"] == n_test and got["top1"] == pytest.approx(tuned.metrics["test_top1"], abs=1e-6)


def _one_epoch():
    from ekg.train import finetune_config

    return finetune_config("ensemble", epochs=1, batch_size=32, lr=0.01)


def test_a_users_transform_replaces_the_method_augmentation(exact, tmp_path):
    train, test, _, norm = _form(exact, "uint8")
    calls = []

    def shift_right(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        calls.append((tuple(x.shape), x.dtype, generator.device.type))
        return torch.roll(x, shifts=1, dims=3)

    from ekg.train import finetune_config

    tuned = ekg.finetune(SmallCNN(), (train, test), out=tmp_path / "ft", normalization=norm, transform=shift_right,
                         config=finetune_config("none", epochs=1, batch_size=32), progress=False)
    assert tuned.metrics["epoch"] == 1
    assert calls and calls[0] == ((32, 3, 32, 32), torch.float32, "cpu")
    assert len(calls) == (10 * PER_CLASS_TRAIN) // 32  # every training batch, once
    saved = json.loads(TrainDir(tuned.run_dir).config.read_text())
    assert saved["transform"].endswith("shift_right")


def test_a_small_dataset_gets_the_largest_balanced_carve_said_in_one_line(exact, tmp_path, capsys):
    train, test, _, norm = _form(exact, "uint8")  # 24 per class: fewer than 32 + 256
    ekg.prune(SmallCNN(), (train, test), keep=0.8, out=tmp_path / "run", normalization=norm, progress=False,
              config=ekg.SearchConfig(batch_size=64))
    err = [line for line in capsys.readouterr().err.splitlines() if "carving" in line]
    # 24 * 32 // 288 = 2 images of D_val, 22 of D_sub per class
    assert err == ["note: the smallest class, 0 (airplane), has 24 training images, fewer than the 32 + 256 per "
                   "class the search sets take: carving 2 + 22 per class instead (D_val 20 images, D_sub 220)"]
    assert all(round(row["val_accuracy"] * 20 / 100, 6).is_integer() for row in search_log(tmp_path / "run"))


def test_fit_search_sets_keeps_the_rule_when_it_fits_and_refuses_a_class_of_one(exact):
    from ekg.search import carve_search_sets, fit_search_sets

    assert fit_search_sets(exact.train) == ekg.search.SearchSetSizes(32, 256)
    small = exact.train.subset(np.concatenate([np.where(exact.train.labels.numpy() == c)[0][:9] for c in range(10)]))
    sizes = fit_search_sets(small)
    assert (sizes.val_per_class, sizes.sub_per_class) == (1, 8)
    d_val, d_sub = carve_search_sets(small, val_per_class=1, sub_per_class=8)
    assert torch.bincount(d_val.labels).tolist() == [1] * 10 and torch.bincount(d_sub.labels).tolist() == [8] * 10
    one = np.concatenate([np.where(exact.train.labels.numpy() == c)[0][: 1 if c == 3 else 9] for c in range(10)])
    with pytest.raises(DataError, match=r"class 3 \(cat\) has 1 training image; the search sets need at least 2"):
        fit_search_sets(exact.train.subset(one))


def test_a_dataset_too_small_to_carve_is_refused_before_anything_is_written(exact, tmp_path):
    x, y = _real_images(exact, "train", 5)
    keep = [i for i in range(len(y)) if int(y[i]) != 7 or i % 5 == 0]  # class 7 (horse) keeps 1 image
    train = Items([(x[i], int(y[i])) for i in keep], classes=list(exact.train.classes))
    test = Items([(x[i], int(y[i])) for i in range(len(y))])
    with pytest.raises(DataError, match=r"class 7 \(horse\) has 1 training image"):
        ekg.prune(SmallCNN(), (train, test), keep=0.8, out=tmp_path / "run", normalization=(CIFAR_MEAN, CIFAR_STD),
                  progress=False)
    assert not (tmp_path / "run").exists()


def test_explicit_search_sets_are_used_and_recorded(exact, tmp_path):
    train, test, _, norm = _form(exact, "uint8")
    x, y = _real_images(exact, "test", 3)  # D_val: 30 test-split images; D_sub: 5 per class of train
    d_val = Items([(img, int(lab)) for img, lab in zip(x, y)])
    xs, ys = _real_images(exact, "train", 5)
    d_sub = Items([(img, int(lab)) for img, lab in zip(xs, ys)])
    res = ekg.prune(SmallCNN(), (train, test), keep=0.8, out=tmp_path / "run", normalization=norm, progress=False,
                    search_sets=(d_val, d_sub), config=ekg.SearchConfig(batch_size=64))
    record = json.loads(RunDir(res.run_dir).config.read_text())
    assert [s["n_images"] for s in record["data_fingerprint"]["search_sets"]] == [30, 50]
    assert all(round(row["val_accuracy"] * 30 / 100, 6).is_integer() for row in search_log(res.run_dir))
    with pytest.raises(DataError, match="D_val .* images are uint8 3x24x32 but the training set's are uint8 3x32x32"):
        ekg.prune(SmallCNN(), (train, test), keep=0.8, out=tmp_path / "run2", normalization=norm, progress=False,
                  search_sets=(Items([(img[:, :24], int(lab)) for img, lab in zip(x, y)]), d_sub))


def test_bad_user_data_and_model_arguments_are_one_clear_line(exact, tmp_path):
    train, test, _, norm = _form(exact, "uint8")
    out = tmp_path / "run"

    def refused(match, *args, **kw):
        with pytest.raises(EkgError, match=match) as e:
            ekg.prune(*args, out=out, progress=False, **kw)
        assert "\n" not in str(e.value) and not out.exists()

    refused("say how your data is normalised", SmallCNN(), (train, test), keep=0.8)
    refused("constants for 1 channels but the model takes 3", SmallCNN(), (train, test), keep=0.8,
            normalization=((1.0,), (2.0,)))
    refused(r"the model takes \(1, 32, 32\) inputs but the images are \(3, 32, 32\)", SmallCNN(1), (train, test),
            keep=0.8, normalization=((1.0,), (2.0,)), input_size=(1, 32, 32))
    refused(r"`keep` is 0.5 but the `config` says keep 0.3", SmallCNN(), (train, test), keep=0.5,
            config=ekg.SearchConfig(keep=0.3), normalization=norm)
    refused("a single Dataset: pass \\(train_set, test_set\\)", SmallCNN(), train, keep=0.8, normalization=norm)
    mixed = Items([(train[i][0] if i != 5 else train[i][0][:, :16], train[i][1]) for i in range(len(train))])
    refused("item 5 of the training set is a torch.uint8 image of 3x16x32 but item 0 is torch.uint8 3x32x32",
            SmallCNN(), (mixed, test), keep=0.8, normalization=norm)
    floats = Items([(train[i][0], 0.5) for i in range(3)])
    refused("item 0 of the training set has the label 0.5", SmallCNN(), (floats, test), keep=0.8, normalization=norm)
    # the budget in the config alone is the budget
    res = ekg.prune(SmallCNN(), (train, test), out=out, normalization=norm, progress=False,
                    config=ekg.SearchConfig(keep=0.7, val_per_class=2, sub_per_class=8, batch_size=64))
    assert res.flops_ratio <= 0.7 and json.loads(RunDir(out).config.read_text())["search"]["keep"] == 0.7


def test_import_ekg_is_light_and_exposes_the_workflow():
    code = ("import sys, ekg; light = not any(m in sys.modules for m in ('torch', 'numpy', 'ekg.pruning')); "
            "names = [ekg.prune, ekg.finetune, ekg.run, ekg.load_data, ekg.load_checkpoint, ekg.save_checkpoint, "
            "ekg.SearchConfig, ekg.TrainConfig, ekg.AugmentConfig, ekg.StreamConfig, ekg.EkgError]; "
            "import ekg.pruning, ekg.finetuning; "
            "print(light, callable(ekg.prune), callable(ekg.finetune), ekg.prune.__module__, ekg.finetune.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "True", "ekg.pruning", "ekg.finetuning"]
    with pytest.raises(AttributeError):
        ekg.no_such_thing  # noqa: B018


def test_the_builtin_cifar_search_takes_the_decisions_it_took_before_the_move(pruned_run):
    """The shared fixture's search (the real ResNet-20 to keep 0.85, no adaptation) gives the widths,
    steps and FLOPs that commit e897bb3 (before the data/, search/ and cli/ packages) gave: measured
    by running the same prune with that commit's src/."""
    widths = json.loads(RunDir(pruned_run).widths.read_text())["groups"]
    assert {k: v["kept"] for k, v in widths.items()} == {
        "layer1.0.conv1": 10, "layer1.1.conv1": 16, "layer1.2.conv1": 10, "layer2.0.conv1": 32, "layer2.1.conv1": 26,
        "layer2.2.conv1": 26, "layer3.0.conv1": 64, "layer3.1.conv1": 53, "layer3.2.conv1": 64}
    last = search_log(pruned_run)[-1]
    assert (last["step"], last["flops"]) == (7, 34431616)


def test_landscape_and_study_take_a_users_datasets_and_module(exact, tmp_path):
    from ekg.landscape import LandscapeConfig, landscape
    from ekg.study import StudyConfig, study

    train, test, _, norm = _form(exact, "gray")
    torch.manual_seed(0)
    model = SmallCNN(1)
    res = ekg.prune(model, (train, test), keep=0.7, out=tmp_path / "run", normalization=norm, progress=False,
                    config=ekg.SearchConfig(val_per_class=4, sub_per_class=16, batch_size=64))
    small = dict(images=40, batch_size=20, power_iters=3, lanczos_steps=3, hutchinson_samples=2)
    rec = landscape(res, (train, test), tmp_path / "land", progress=False,
                    config=LandscapeConfig(surface_1d=0, surface_2d=0, **small))
    assert rec["images"] == 40 and rec["params"] == sum(p.numel() for p in res.model.parameters())
    assert "Items" in rec["data"]
    cfg = StudyConfig(perturb=1, finetune_epochs=1, batch_size=32, bootstrap=10,
                      landscape=LandscapeConfig(surface_1d=0, surface_2d=0, **small))
    out = study([res.run_dir], (train, test), tmp_path / "study", config=cfg, model=model, progress=False)
    assert len(out["subnetworks"]) == 2  # the run's sub-network and one perturbation of it
    assert all(r["test_loss_after"] > 0 for r in out["subnetworks"]) and "Items" in out["data"]


TORCHRUN_SCRIPT = '''
import json, sys
import torch
import ekg
from ekg.distributed import init_distributed, shutdown
sys.path.insert(0, sys.argv[3])
from test_datasets import SmallCNN, _form

exact = ekg.load_data(sys.argv[1], progress=False)
train, test, _, norm = _form(exact, "gray")
dist = init_distributed("cpu")
torch.manual_seed(0)
res = ekg.prune(SmallCNN(1), (train, test), keep=0.6, out=sys.argv[2], normalization=norm, progress=False,
                config=ekg.SearchConfig(val_per_class=4, sub_per_class=16, batch_size=64, device="cpu"), dist=dist)
shutdown(dist)
'''


@pytest.mark.slow
def test_a_users_datasets_under_torchrun_take_the_one_process_decisions(cifar10_exact, tmp_path):
    """torchrun shares of a user's Dataset pair: 2 processes (gloo) search what 1 process searches."""
    import os

    script = tmp_path / "prune_mine.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    widths = {}
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), str(script),
               str(cifar10_exact), str(out), str(Path(__file__).parent)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        widths[n] = {k: v["kept"] for k, v in json.loads(RunDir(out).widths.read_text())["groups"].items()}
        log = search_log(out)
    assert widths[1] == widths[2] and len(log) > 1


def test_a_search_on_a_users_datasets_resumes_to_the_uninterrupted_masks(exact, tmp_path, monkeypatch):
    from ekg.search import Searcher

    train, test, _, norm = _form(exact, "non-square")
    cfg = ekg.SearchConfig(keep=0.6, val_per_class=4, sub_per_class=16, batch_size=64)

    def run(out, **kw):
        torch.manual_seed(0)
        return ekg.prune(SmallCNN(), (train, test), out=tmp_path / out, config=cfg, normalization=norm,
                         progress=False, **kw)

    full = run("full")
    real_step, calls = Searcher.step, []

    def interrupted(self, state):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, state)

    monkeypatch.setattr(Searcher, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run("part")
    monkeypatch.setattr(Searcher, "step", real_step)
    assert len(search_log(tmp_path / "part")) == 3  # step 0 and two finished steps
    with pytest.raises(EkgError, match="already holds a pruning run"):
        run("part")
    resumed = run("part", resume=True)
    assert json.loads(RunDir(resumed.run_dir).widths.read_text())["groups"] == \
        json.loads(RunDir(full.run_dir).widths.read_text())["groups"]
    other = Items([(x, (y + 1) % 10) for x, y in train.items], classes=train.classes)  # other labels: other data
    with pytest.raises(EkgError, match="data"):
        ekg.prune(SmallCNN(), (other, test), out=tmp_path / "part", config=cfg, normalization=norm, progress=False,
                  resume=True)


def test_ekg_run_takes_a_users_module_and_datasets(exact, tmp_path):
    train, test, _, norm = _form(exact, "pil")
    torch.manual_seed(0)
    search = ekg.SearchConfig(val_per_class=4, sub_per_class=16, batch_size=64)
    summary = ekg.run(SmallCNN(), (train, test), keep=0.6, out=tmp_path / "run", preset="quick", epochs=1,
                      search=search, normalization=norm, progress=False, latency_batches=(1,))
    assert summary["pruned"]["flops"] <= 0.6 * summary["original"]["flops"]
    assert summary["original"]["n_images"] == summary["pruned"]["n_images"] == 10 * PER_CLASS_TEST
    assert "Items" in summary["data"] and summary["settings"]["keep"] == 0.6
    # the run's checkpoints of a user's module reload with the module as the factory
    final = ekg.load_checkpoint(RunDir(tmp_path / "run").final, factory=SmallCNN)
    assert sum(p.numel() for p in final.model.parameters()) == summary["pruned"]["params"]

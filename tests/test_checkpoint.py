"""Checkpoints: our format, the importers, and the real pretrained models' accuracy."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ekg import safe_pickle
from ekg.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ekg.data import get_normalization
from ekg.errors import CheckpointError, EkgError
from ekg.evaluate import evaluate, predict_logits
from ekg.models import build_model, create_model


@pytest.fixture(scope="module")
def ekg_tf(shared_data):
    return load_checkpoint(shared_data / "pretrained/ekg_tf/res56_cifar10.pkl")


def test_tf_import_reproduces_reference_logits_image_by_image(ekg_tf, exact, shared_data):
    ref = np.load(shared_data / "reference/ekg_res56_cifar10_logits_exact_test.npz")
    assert ekg_tf.arch == "resnet56_tf" and ekg_tf.normalization["name"] == "ekg_tf_cifar10"
    assert np.array_equal(ref["labels"], exact.test.labels.numpy())
    logits = predict_logits(ekg_tf.model, exact.test, get_normalization(ekg_tf.normalization))
    diff = (logits.numpy() - ref["logits"]).__abs__().max()
    assert diff <= 1e-3, diff
    acc = (logits.argmax(1) == exact.test.labels).float().mean().item() * 100
    assert acc >= 93.3


def test_tf_padding_and_reversed_constants_both_matter(ekg_tf, exact):
    """The two details the data README names: without either, accuracy drops."""
    norm = get_normalization(ekg_tf.normalization)
    full = evaluate(ekg_tf.model, exact.test, norm)["top1"]
    sym = build_model({**ekg_tf.spec.to_dict(), "padding": "torch"})
    sym.load_state_dict(ekg_tf.model.state_dict())
    rgb = get_normalization({"mean": list(norm.mean)[::-1], "std": list(norm.std)[::-1]})
    assert evaluate(sym, exact.test, norm)["top1"] < full - 0.5
    assert evaluate(ekg_tf.model, exact.test, rgb)["top1"] < full - 0.3


@pytest.mark.parametrize("depth,expected", [(20, 91.6), (32, 92.8), (56, 92.7)])
def test_akamaster_accuracy(depth, expected, shared_data, exact):
    path = next((shared_data / "pretrained/akamaster").glob(f"resnet{depth}-*.th"))
    ckpt = load_checkpoint(path)
    assert ckpt.arch == f"resnet{depth}_a"
    acc = evaluate(ckpt.model, exact.test, get_normalization(ckpt.normalization))["top1"]
    assert abs(acc - expected) <= 0.2, acc


def test_round_trip_of_a_pruned_model_needs_no_original(tmp_path, slim_checkpoint):
    ckpt = slim_checkpoint
    model, spec = ckpt.model, ckpt.spec
    path = save_checkpoint(ckpt, tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)  # loads without allowing any code
    assert raw["format"] == "ekg-checkpoint" and raw["arch"]["block_widths"][2][0] == 64
    back = load_checkpoint(path)
    assert back.spec == spec and back.arch == "resnet20 (pruned)"
    model.eval(), back.model.eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model(x), back.model(x))


def test_converted_file_loads_weights_only_and_matches(tmp_path, shared_data, ekg_tf):
    from ekg.cli import main

    assert main(["convert", str(shared_data / "pretrained/ekg_tf/res56_cifar10.pkl"), "--out", str(tmp_path / "r.pt")]) == 0
    back = load_checkpoint(tmp_path / "r.pt")
    assert back.arch == "resnet56_tf" and back.normalization == ekg_tf.normalization
    for (k, a), (_, b) in zip(ekg_tf.model.state_dict().items(), back.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"conv/kernel:0": Evil()}))
    with pytest.raises(EkgError, match="refusing to load global"):
        safe_pickle.load(path)
    with pytest.raises(EkgError, match="refusing to load global builtins.print"):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_of_another_architecture(shared_data):
    with pytest.raises(CheckpointError, match="do not fit architecture resnet56_a"):
        load_checkpoint(shared_data / "pretrained/akamaster/resnet20-12fca82f.th", arch="resnet56_a")


def test_truncated_checkpoint(tmp_path):
    model = create_model("resnet20")
    ckpt = Checkpoint(model=model, normalization={"name": "cifar10", **get_normalization("cifar10").to_dict()})
    path = save_checkpoint(ckpt, tmp_path / "m.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_convert_torchvision_weights_needs_torchvision_or_says_so(tmp_path, capsys):
    import importlib.util

    import torch

    from ekg.cli import main

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: tests/test_vision.py covers the conversion")
    torch.save({"fc.weight": torch.zeros(10, 4)}, tmp_path / "w.pth")
    assert main(["convert", str(tmp_path / "w.pth"), "--torchvision", "resnet18", "--out", str(tmp_path / "o.pt")]) == 1
    err = capsys.readouterr().err
    assert "vision" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.pt").exists()
    torch.save([1, 2], tmp_path / "bad.pth")
    assert main(["convert", str(tmp_path / "bad.pth"), "--torchvision", "resnet18", "--out", str(tmp_path / "o.pt")]) == 1
    assert "state dict" in capsys.readouterr().err
